"""Watch the mesh file and apply good edits; a bad edit is logged and the last good mesh stays."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
from collections.abc import Callable
from pathlib import Path

from control_plane.mesh import Mesh, parse_mesh_text
from control_plane.xds.snapshot import InconsistentSnapshot
from pilotfish.config.errors import ConfigError

log = logging.getLogger(__name__)
POLL_INTERVAL = 0.2


class MeshFileWatcher:
    """Polls a file; ``poll()`` is synchronous so tests call it directly, without a loop.

    A change is noticed by mtime and size, and confirmed by a content hash, so touching the
    file or rewriting identical bytes does not rebuild anything. No inotify dependency.
    """

    def __init__(self, path: str | Path, apply: Callable[[Mesh], None], digest: str = "") -> None:
        self._path = Path(path)
        self._apply = apply
        self._stat: tuple[int, int] | None = None
        self._digest = digest
        self.last_error: str | None = None
        self.errors = 0  # edits rejected, for metrics

    @staticmethod
    def digest_of(data: bytes) -> str:
        return hashlib.sha256(data).hexdigest()

    def poll(self) -> bool:
        """Check the file once; return True if a new mesh was applied."""
        try:
            st = os.stat(self._path)
        except OSError as exc:
            self._fail(f"{self._path}: cannot read: {exc.strerror}")
            return False
        stat = (st.st_mtime_ns, st.st_size)
        if stat == self._stat:
            return False
        self._stat = stat
        try:
            data = self._path.read_bytes()
        except OSError as exc:
            self._fail(f"{self._path}: cannot read: {exc.strerror}")
            return False
        digest = self.digest_of(data)
        if digest == self._digest:
            return False
        self._digest = digest
        try:
            mesh = parse_mesh_text(data.decode("utf-8", errors="replace"), str(self._path))
            self._apply(mesh)
        except (ConfigError, InconsistentSnapshot) as exc:
            self._fail(f"{self._path}: edit rejected, still serving the last good mesh: {exc}")
            return False
        self.last_error = None
        log.info("%s: mesh applied (%d services)", self._path, len(mesh.services))
        return True

    def _fail(self, message: str) -> None:
        if message != self.last_error:
            log.error("%s", message)
            self.errors += 1
        self.last_error = message

    async def run(self, interval: float = POLL_INTERVAL) -> None:
        while True:
            await asyncio.sleep(interval)
            self.poll()
