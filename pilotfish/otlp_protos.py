"""Keep ``opentelemetry.proto`` working where ``xds-protos`` overwrote its files.

A single ``pip install`` of Pilotfish always leaves xds-protos's old copies of
opentelemetry-proto's generated modules in place (``pilotfish/deps.py`` says why), and the
OpenTelemetry OTLP exporters, which the sidecar exports spans with, cannot import them. The
wheel carries the descriptors of the real modules (``setup.py`` takes them from
opentelemetry-proto at build time). ``install()`` looks at the one module the overwrite breaks
and, only if that is an old copy, checks opentelemetry-proto's files against the hashes its
own RECORD lists; only if they were overwritten, and only for the
opentelemetry-proto version the descriptors came from, it puts an import hook first on
``sys.meta_path`` that builds each ``opentelemetry.proto.*_pb2`` module from its descriptor,
as the generated module itself would. Nothing changes on disk.

It must run before anything imports those modules (Envoy's OpenTelemetry tracer config, from
xds-protos, imports them too): ``pilotfish``'s command line calls it first, as does the
sidecar's exporter factory (when the tracer is built, not the exporter) for embedders.
"""

from __future__ import annotations

import base64
import hashlib
import importlib
import importlib.machinery
import importlib.util
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, cast

if TYPE_CHECKING:
    from importlib.abc import Loader, MetaPathFinder

log = logging.getLogger(__name__)

DISTRIBUTION = "opentelemetry-proto"
DESCRIPTORS = "_otlp_descriptors.binpb"
VERSION = "_otlp_descriptors.version"
PREFIX = "opentelemetry.proto."

_installed: _DescriptorFinder | None = None


def module_name(proto_file: str) -> str:
    """``opentelemetry/proto/common/v1/common.proto`` → its module,
    ``opentelemetry.proto.common.v1.common_pb2``."""
    return proto_file.removesuffix(".proto").replace("/", ".") + "_pb2"


# Not derived from importlib.abc's classes, which import importlib.resources (tempfile, shutil,
# lzma, bz2: 1 MB resident) into every process: the import system only calls these methods.
class _DescriptorFinder:
    def __init__(self, files: dict[str, bytes]) -> None:
        self.files = files  # module name -> serialized FileDescriptorProto

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname not in self.files:
            return None
        loader = cast("Loader", self)
        return importlib.machinery.ModuleSpec(fullname, loader, origin=f"pilotfish:{DESCRIPTORS}")

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return None  # the default module

    def exec_module(self, module: ModuleType) -> None:
        from google.protobuf import descriptor_pb2, descriptor_pool
        from google.protobuf.internal import builder

        serialized = self.files[module.__name__]
        proto = descriptor_pb2.FileDescriptorProto.FromString(serialized)
        for dependency in proto.dependency:  # the pool needs them first, as generated code does
            importlib.import_module(module_name(dependency))
        descriptor = descriptor_pool.Default().AddSerializedFile(serialized)
        namespace = module.__dict__
        builder.BuildMessageAndEnumDescriptors(descriptor, namespace)
        builder.BuildTopDescriptorsAndMessages(descriptor, module.__name__, namespace)


def replaced_files() -> list[str] | None:
    """opentelemetry-proto's modules whose bytes are no longer the ones it installed (from
    its RECORD's hashes); None when it is not installed."""
    from importlib import metadata

    try:
        dist = metadata.distribution(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        return None
    replaced = []
    for file in dist.files or ():
        if file.hash is None or file.hash.mode != "sha256" or file.suffix != ".py":
            continue
        try:
            digest = hashlib.sha256(Path(file.locate()).read_bytes()).digest()
        except OSError:
            replaced.append(str(file))
            continue
        if base64.urlsafe_b64encode(digest).rstrip(b"=").decode() != file.hash.value:
            replaced.append(str(file))
    return replaced


def bundled_version() -> str | None:
    from importlib import resources

    try:
        return resources.files("pilotfish").joinpath(VERSION).read_text().strip()
    except OSError:
        return None  # a source tree or an editable install: nothing bundled


def _common_module_is_current() -> bool:
    """Whether ``opentelemetry/proto/common/v1/common_pb2.py`` on disk defines
    ``InstrumentationScope``, which xds-protos's older copies lack: the overwrite breaks exactly
    that import. A file read, not the RECORD check of ``replaced_files``, because
    ``importlib.metadata`` costs every process that loads it 2.4 MB resident."""
    spec = importlib.util.find_spec("opentelemetry")
    for root in (spec.submodule_search_locations or ()) if spec is not None else ():
        try:
            text = (Path(root) / "proto" / "common" / "v1" / "common_pb2.py").read_bytes()
        except OSError:
            continue
        return b"InstrumentationScope" in text
    return False


def install() -> bool:
    """Serve the overwritten modules from the bundled descriptors; True if the hook is on."""
    global _installed
    if _installed is not None:
        return True
    if _common_module_is_current():
        return False  # the common case, decided without importlib.metadata
    replaced = replaced_files()
    if not replaced:
        return False  # sound, or opentelemetry-proto is not installed at all
    from importlib import metadata

    bundled = bundled_version()
    installed = metadata.version(DISTRIBUTION)
    if bundled != installed:
        log.debug("no descriptors for opentelemetry-proto %s (bundled: %s)", installed, bundled)
        return False
    if any(name.startswith(PREFIX) for name in sys.modules):
        log.warning("opentelemetry.proto was imported before its overwritten files could be "
                    "bypassed; the OTLP exporters may fail to import")
        return False
    from importlib import resources

    from google.protobuf import descriptor_pb2

    data = resources.files("pilotfish").joinpath(DESCRIPTORS).read_bytes()
    files = descriptor_pb2.FileDescriptorSet.FromString(data)
    _installed = _DescriptorFinder({module_name(f.name): f.SerializeToString() for f in files.file})
    sys.meta_path.insert(0, cast("MetaPathFinder", _installed))
    return True


def active() -> bool:
    return _installed is not None
