"""JWT authentication at the I/O edge: reading JWKS files and URLs, and checking a request.

The validation itself is ``sidecar.security.jwt_authn`` (sans-IO); this module fetches keys
when the cache asks for them, and retries a token once after a fetch when its key id is new
(the provider rotated its keys).
"""

from __future__ import annotations

import asyncio
import logging
import time
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from pilotfish.config.security import JwtProvider
from sidecar.security.jwt_authn import (
    JwksCache,
    JwksError,
    JwtError,
    JwtFailure,
    JwtValidator,
    Verified,
    token_from_headers,
)

log = logging.getLogger(__name__)

MAX_JWKS_BYTES = 1024 * 1024


def _read_url(uri: str, timeout: float) -> bytes:
    request = urllib.request.Request(uri, headers={"accept": "application/json"})
    # The mesh file admits only http:// and https:// URLs here (no file:// or ftp://).
    with urllib.request.urlopen(request, timeout=timeout) as response:
        body: bytes = response.read(MAX_JWKS_BYTES + 1)
    if len(body) > MAX_JWKS_BYTES:
        raise JwksError(f"larger than {MAX_JWKS_BYTES} bytes")
    return body


class JwksFetcher:
    """Keeps one provider's ``JwksCache`` filled from its inline text, file or URL."""

    def __init__(self, provider: JwtProvider, cache: JwksCache, timeout: float = 5.0) -> None:
        self.provider = provider
        self.cache = cache
        self._timeout = timeout
        self._lock = asyncio.Lock()
        self.fetches = 0

    async def _read(self) -> bytes:
        source = self.provider.jwks
        if source.inline is not None:
            return source.inline.encode()
        if source.file is not None:
            return await asyncio.to_thread(Path(source.file).read_bytes)
        assert source.uri is not None
        return await asyncio.to_thread(_read_url, source.uri, self._timeout)

    async def refresh(self) -> bool:
        """Read the JWKS now; False (and the previous keys kept) when that fails."""
        async with self._lock:  # concurrent misses share one fetch
            self.cache.attempt()
            self.fetches += 1
            try:
                self.cache.update(await self._read())
            except JwksError as exc:
                log.warning("JWKS of %s unusable: %s", self.provider.name, exc)
                return False
            except OSError as exc:
                self.cache.failed(str(exc))
                log.warning("JWKS of %s unreadable: %s", self.provider.name, exc)
                return False
            return True

    async def ensure_fresh(self) -> None:
        if self.cache.due():
            await self.refresh()


class JwtAuthenticator:
    """Checks a request's token against the providers a route or listener requires."""

    def __init__(
        self,
        providers: Sequence[JwtProvider],
        required: bool = True,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.required = required
        self._providers = {p.name: p for p in providers}
        # Headers that carry forwarded claims: removed from every request before forwarding.
        self.stripped = frozenset(
            header.encode() for p in providers for _, header in p.forward_claims
        )
        self._entries = []
        for provider in providers:
            cache = JwksCache(provider.jwks.refresh, provider.jwks.min_refetch, clock)
            self._entries.append(
                (JwtValidator(provider, cache, clock), JwksFetcher(provider, cache))
            )

    def provider(self, name: str) -> JwtProvider:
        return self._providers[name]

    @property
    def fetchers(self) -> list[JwksFetcher]:
        return [fetcher for _, fetcher in self._entries]

    async def authenticate(self, headers: Mapping[str, str]) -> Verified | None:
        """The verified token, None when there is none and none is required; else ``JwtError``."""
        last: JwtError | None = None
        for validator, fetcher in self._entries:
            token = token_from_headers(validator.provider, headers)
            if token is None:
                continue
            await fetcher.ensure_fresh()
            try:
                return validator.validate(token)
            except JwtError as exc:
                last = exc
                if exc.failure is not JwtFailure.UNKNOWN_KEY or not fetcher.cache.may_refetch():
                    continue
            if await fetcher.refresh():
                try:
                    return validator.validate(token)
                except JwtError as exc:
                    last = exc
        if last is not None:
            raise last
        if self.required:
            raise JwtError(JwtFailure.MISSING)
        return None
