"""List, then watch, Services and EndpointSlices through kubernetes-asyncio.

One loop per (kind, namespace): list to learn the whole state and its ``resourceVersion``,
then watch from that version with bookmarks requested (so a quiet watch still advances the
version and a reconnect does not replay or miss anything). The loop reconnects:

* a watch the server ends (its ``timeoutSeconds``, or a dropped connection): at once, from the
  last version seen;
* ``410 Gone`` (the version is older than the server's history): a fresh list, which replaces
  the state, so deletions missed in between are noticed;
* any other failure (server down, connection refused, 5xx): after an exponential backoff with
  jitter (tenacity's), so many control planes do not reconnect in step.

Until then the last known state stays in ``ClusterState`` and keeps being served.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp
from kubernetes_asyncio import client, config
from kubernetes_asyncio.client.exceptions import ApiException
from kubernetes_asyncio.config.config_exception import ConfigException
from kubernetes_asyncio.watch import Watch
from tenacity import RetryCallState, Retrying, wait_exponential, wait_random

from control_plane.kube.state import ENDPOINT_SLICE, SERVICE, ClusterState, MalformedObject
from pilotfish.config.errors import ConfigError

log = logging.getLogger(__name__)

# The server ends each watch after this long (plus its own jitter); we then re-watch from the
# last version. Short enough that a silently dead connection is noticed.
WATCH_TIMEOUT_SECONDS = 240
# A dead peer that never closes the connection is noticed by the client timeout.
REQUEST_TIMEOUT = WATCH_TIMEOUT_SECONDS + 30


class KubeConfigError(ConfigError):
    """No usable kubeconfig or in-cluster service account."""


async def api_client(kubeconfig: str | None = None) -> client.ApiClient:
    """In a pod: the service account; otherwise ``kubeconfig``, then ``$KUBECONFIG``, then
    ``~/.kube/config``."""
    configuration = client.Configuration()
    try:
        if kubeconfig is None and "KUBERNETES_SERVICE_HOST" in os.environ:
            config.load_incluster_config(client_configuration=configuration)  # type: ignore[no-untyped-call]
        else:
            await config.load_kube_config(
                config_file=kubeconfig, client_configuration=configuration
            )
    except (ConfigException, OSError) as exc:
        raise KubeConfigError(
            "--kubeconfig", f"no usable Kubernetes configuration: {exc}"
        ) from None
    return client.ApiClient(configuration)


@dataclass(slots=True)
class WatchStats:
    """Counters for metrics and tests: how the watches have gone so far."""

    lists: int = 0
    watches: int = 0
    events: int = 0
    bookmarks: int = 0
    gone: int = 0
    failures: int = 0
    malformed: int = 0

    def by_name(self) -> dict[str, int]:
        """For metrics: ``{"list": ..., "watch": ..., "event": ...}``."""
        return {
            "list": self.lists,
            "watch": self.watches,
            "event": self.events,
            "bookmark": self.bookmarks,
            "gone": self.gone,
            "failure": self.failures,
            "malformed": self.malformed,
        }


class KubeWatcher:
    """Keeps ``state`` in step with the API server; calls ``on_change`` after each change."""

    def __init__(
        self,
        api: client.ApiClient,
        state: ClusterState,
        on_change: Callable[[], None],
        namespaces: Sequence[str] = (),
        backoff_initial: float = 0.2,
        backoff_max: float = 10.0,
        watch_timeout: int = WATCH_TIMEOUT_SECONDS,
    ) -> None:
        self._api = api
        self._state = state
        self._on_change = on_change
        self._namespaces: tuple[str | None, ...] = tuple(namespaces) or (None,)
        # Doubling from ``backoff_initial`` up to ``backoff_max``, plus up to one
        # ``backoff_initial`` of jitter so that replicas do not retry in step.
        self._wait = wait_exponential(multiplier=backoff_initial, max=backoff_max) + wait_random(
            0, backoff_initial
        )
        self._retrying = Retrying(wait=self._wait)
        self._watch_timeout = watch_timeout
        self.stats = WatchStats()
        self.synced = asyncio.Event()  # set once every kind has been listed
        self._listed: set[tuple[str, str | None]] = set()

    async def run(self) -> None:
        async with asyncio.TaskGroup() as group:
            for kind in (SERVICE, ENDPOINT_SLICE):
                for namespace in self._namespaces:
                    group.create_task(self._loop(kind, namespace), name=f"watch-{kind}")

    def backoff(self, failures: int) -> float:
        """Seconds to wait after ``failures`` failures in a row (jittered)."""
        state = RetryCallState(self._retrying, None, (), {})
        state.attempt_number = failures
        return float(self._wait(state))

    async def _loop(self, kind: str, namespace: str | None) -> None:
        version: str | None = None
        failures = 0
        where = f"{kind} in {namespace or 'all namespaces'}"
        while True:
            try:
                if version is None:
                    version = await self._list(kind, namespace)
                    self._listed.add((kind, namespace))
                    if len(self._listed) == 2 * len(self._namespaces):
                        self.synced.set()
                    failures = 0
                progress = _Progress(version)
                try:
                    await self._watch(kind, namespace, progress)
                finally:
                    version = progress.version
                    if progress.events:
                        failures = 0
            except ApiException as exc:
                if exc.status == 410:
                    self.stats.gone += 1
                    log.info("kubernetes: %s: version %s is gone, listing again", where, version)
                    version = None
                    continue
                failures += 1
                await self._fail(where, f"HTTP {exc.status} {exc.reason}", failures)
            except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
                failures += 1
                await self._fail(where, f"{type(exc).__name__}: {exc}", failures)
            except Exception as exc:
                # The library reports a malformed watch line as a bare Exception. Giving up
                # would freeze the endpoints for good; log it loudly and start over.
                failures += 1
                log.exception("kubernetes: %s: unexpected failure", where)
                version = None
                await self._fail(where, f"{type(exc).__name__}: {exc}", failures)

    async def _fail(self, where: str, reason: str, failures: int) -> None:
        self.stats.failures += 1
        delay = self.backoff(failures)
        log.warning(
            "kubernetes: %s: %s; serving the last known endpoints, retrying in %.1fs",
            where,
            reason,
            delay,
        )
        await asyncio.sleep(delay)

    def _list_call(self, kind: str, namespace: str | None) -> tuple[Any, dict[str, Any]]:
        kwargs: dict[str, Any] = {} if namespace is None else {"namespace": namespace}
        fn: Any
        if kind == SERVICE:
            core = client.CoreV1Api(self._api)
            fn = core.list_namespaced_service if namespace else core.list_service_for_all_namespaces
        else:
            disc = client.DiscoveryV1Api(self._api)
            fn = (
                disc.list_namespaced_endpoint_slice
                if namespace
                else disc.list_endpoint_slice_for_all_namespaces
            )
        return fn, kwargs

    async def _list(self, kind: str, namespace: str | None) -> str:
        fn, kwargs = self._list_call(kind, namespace)
        # Raw JSON, not the generated models: the state reads plain dictionaries.
        response = await fn(**kwargs, _preload_content=False, _request_timeout=30)
        try:
            body = json.loads(await response.read())
        finally:
            response.release()
        items = body.get("items")
        version = (body.get("metadata") or {}).get("resourceVersion")
        if not isinstance(items, list) or not isinstance(version, str):
            raise ValueError(f"{kind} list: items and metadata.resourceVersion are required")
        self.stats.lists += 1
        changed = self._state.replace(kind, items, namespace)
        for problem in self._state.rejected:
            self.stats.malformed += 1
            log.error("kubernetes: ignoring a listed object: %s", problem)
        if changed:
            self._on_change()
        log.info("kubernetes: listed %d %s objects at version %s", len(items), kind, version)
        return version

    async def _watch(self, kind: str, namespace: str | None, progress: _Progress) -> None:
        fn, kwargs = self._list_call(kind, namespace)
        self.stats.watches += 1
        # ``object``: events keep their JSON; the library still tracks resourceVersion and
        # bookmarks, and turns an ERROR event into ApiException (410 included, since a
        # server-side timeout is set).
        watch = Watch(return_type="object")
        async with watch.stream(
            fn,
            **kwargs,
            resource_version=progress.version,
            allow_watch_bookmarks=True,
            timeout_seconds=self._watch_timeout,
            _request_timeout=self._watch_timeout + 30,
        ) as stream:
            async for event in stream:
                kind_of_event = event["type"]
                if kind_of_event == "BOOKMARK":
                    self.stats.bookmarks += 1
                else:
                    self.stats.events += 1
                    try:
                        changed = self._state.apply(kind, kind_of_event, event["raw_object"])
                    except MalformedObject as exc:
                        self.stats.malformed += 1
                        log.error("kubernetes: ignoring an event: %s", exc)
                        changed = False
                    if changed:
                        self._on_change()
                progress.events += 1
                if watch.resource_version:
                    progress.version = str(watch.resource_version)


@dataclass(slots=True)
class _Progress:
    version: str
    events: int = 0
