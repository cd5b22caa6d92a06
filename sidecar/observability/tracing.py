"""Tracing for the request path: one SERVER span per downstream request, one CLIENT span per
upstream attempt, recorded by the OpenTelemetry SDK and exported over OTLP/gRPC or OTLP/HTTP by
its OTLP exporters (``otlp_export`` builds the one the config names).

The router talks to ``Tracer`` only (``start_server_span``, ``start_client_span``, ``inject``,
``end``). The sampling decision (parent-based, trace-id ratio) is taken here, before the SDK is
touched, so a request that is not sampled costs one pass over its headers and a small handle;
with tracing disabled only ``x-request-id`` is handled. Spans leave through a bounded queue
drained by the SDK's worker thread: ending a span never waits on the collector, a dead
collector loses spans (counted in ``dropped_spans``), never requests.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Mapping

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SpanExporter
from opentelemetry.sdk.trace.id_generator import IdGenerator, RandomIdGenerator
from opentelemetry.sdk.trace.sampling import ALWAYS_ON, TraceIdRatioBased
from opentelemetry.trace import NonRecordingSpan, SpanContext, SpanKind, Status, StatusCode
from opentelemetry.trace.span import TraceFlags, TraceState

from sidecar.observability import propagation
from sidecar.observability.export import CountingBatchSpanProcessor, DropCounter
from sidecar.observability.propagation import Headers
from sidecar.observability.semconv import (
    AttrValue,
    is_error,
    request_attributes,
    span_name,
    split_host_port,
)
from sidecar.observability.tracing_config import TracingConfig

log = logging.getLogger("pilotfish.tracing")

Attrs = Mapping[str, AttrValue]

_LOW64 = (1 << 64) - 1


class SpanHandle:
    """What the router holds for a span: ids for propagation and logs, and the SDK span when
    the request is sampled (``span is None`` otherwise, and after ``end``)."""

    __slots__ = (
        "base_attrs",
        "name",
        "parent_span_id",
        "request_id",
        "request_id_generated",
        "sampled",
        "server",
        "span",
        "span_id",
        "trace_id",
        "tracestate",
    )

    def __init__(
        self,
        request_id: bytes,
        request_id_generated: bool,
        trace_id: int = 0,
        span_id: int = 0,
        sampled: bool = False,
        tracestate: bytes = b"",
    ) -> None:
        self.request_id = request_id
        self.request_id_generated = request_id_generated
        self.trace_id = trace_id
        self.span_id = span_id
        self.parent_span_id = 0
        self.sampled = sampled
        self.tracestate = tracestate
        self.server = True
        self.span: trace.Span | None = None
        self.name = ""
        self.base_attrs: dict[str, AttrValue] = {}

    @property
    def recording(self) -> bool:
        return self.span is not None

    @property
    def trace_id_hex(self) -> str:
        """For access logs: 32 hex digits, or ``""`` when there is no trace."""
        return f"{self.trace_id:032x}" if self.trace_id else ""


class _PresetIdGenerator(IdGenerator):
    """Lets the SDK use the trace id the ratio sampler has already judged.

    ``preset`` is set just before a root span is started on the event loop thread and consumed by
    that same synchronous ``start_span`` call."""

    def __init__(self) -> None:
        self.preset = 0
        self._random = RandomIdGenerator()

    def generate_span_id(self) -> int:
        return self._random.generate_span_id()

    def generate_trace_id(self) -> int:
        trace_id, self.preset = self.preset, 0
        return trace_id or self._random.generate_trace_id()


class Tracer:
    """The tracing facade the router calls. Build one per sidecar with ``Tracer.create``."""

    def __init__(
        self,
        config: TracingConfig,
        exporter: SpanExporter | None = None,
        *,
        rng: random.Random | None = None,
    ) -> None:
        """``exporter`` replaces the OTLP exporter (tests); ``config`` is used as given —
        ``Tracer.create`` applies the ``OTEL_*`` environment first."""
        self.config = config
        self.enabled = config.enabled
        self.inject_formats = propagation.parse_formats(config.propagators)
        # Read every format a caller may use; write only the configured ones.
        self.extract_formats = propagation.ALL_FORMATS if self.inject_formats else 0
        self._unsampled = propagation.unsampled_writer(self.inject_formats)
        # Whether ``add_context`` writes trace headers, so callers strip the caller's first.
        self.rewrites_context = bool(self.enabled and self.inject_formats)
        self.parent_based = config.parent_based
        self._bound = TraceIdRatioBased(config.sample_ratio).bound
        # The module's generator by default: it is reseeded in a forked child.
        self._bits = rng.getrandbits if rng is not None else random.getrandbits
        self.drops = DropCounter()
        self.exported = DropCounter()
        self._provider: TracerProvider | None = None
        self._processor: CountingBatchSpanProcessor | None = None
        self._ids = _PresetIdGenerator()
        if not self.enabled:
            self._tracer: trace.Tracer = trace.NoOpTracer()
            return
        if exporter is None:
            exporter = _otlp_exporter(config)
        resource = Resource.create({"service.name": config.service_name, **dict(config.resource)})
        # Sampling is decided in start_server_span; the SDK records whatever it is handed.
        self._provider = TracerProvider(
            resource=resource, sampler=ALWAYS_ON, id_generator=self._ids
        )
        self._processor = CountingBatchSpanProcessor(
            exporter,
            self.drops,
            exported=self.exported,
            max_queue_size=config.max_queue_size,
            max_export_batch_size=config.max_export_batch_size,
            schedule_delay_s=config.schedule_delay_s,
            shutdown_timeout_s=config.shutdown_timeout_s,
        )
        self._provider.add_span_processor(self._processor)
        self._tracer = self._provider.get_tracer("pilotfish.sidecar")

    @classmethod
    def create(cls, config: TracingConfig, environ: Mapping[str, str] | None = None) -> Tracer:
        """The tracer for ``config`` with the standard ``OTEL_*`` variables applied on top."""
        return cls(config.with_env(environ))

    @property
    def dropped_spans(self) -> int:
        """Spans lost: queue full, export failed, or ended after shutdown."""
        return self.drops.value

    @property
    def exported_spans(self) -> int:
        """Spans the collector accepted."""
        return self.exported.value

    # -- the request path -------------------------------------------------------------------

    def start_server_span(
        self,
        headers: Headers,
        attrs: Attrs | None = None,
        *,
        route: str | None = None,
        name: str | None = None,
        root_trace_id: int = 0,
    ) -> SpanHandle:
        """Read the caller's trace context and ``x-request-id``; start the SERVER span if the
        request is sampled. ``route`` (the matched route's name) becomes ``pilotfish.route`` on
        this span and its client spans; ``attrs`` are added to the standard ones taken from
        ``headers``; ``name`` replaces the semantic-convention span name. ``root_trace_id``:
        the trace id ``root_context`` judged sampled, for a request without trace headers."""
        if root_trace_id:
            found = propagation.Extracted(None, None, propagation.request_id(headers))
        else:
            found = propagation.extract(headers, self.extract_formats)
        request_id = found.request_id
        generated = request_id is None
        if request_id is None:
            request_id = propagation.new_request_id()
        if root_trace_id:
            return self._start_sampled(headers, attrs, route, name, None, root_trace_id,
                                       request_id, generated)  # fmt: skip
        if not self.enabled:
            return SpanHandle(request_id, generated)
        parent = found.parent
        if parent is not None:
            trace_id = parent.trace_id
            sampled = parent.sampled if self.parent_based else self._ratio(trace_id)
        else:
            trace_id = self._bits(128) or 1
            hint = found.sampled_hint if self.parent_based else None
            sampled = hint if hint is not None else self._ratio(trace_id)
        if not sampled:
            # Not ours to record: pass the caller's ids on untouched (or a fresh unsampled root).
            span_id = parent.span_id if parent is not None else self._bits(64) or 1
            tracestate = parent.tracestate if parent is not None else b""
            return SpanHandle(request_id, generated, trace_id, span_id, False, tracestate)
        return self._start_sampled(
            headers, attrs, route, name, parent, trace_id, request_id, generated
        )

    def root_context(self) -> tuple[int, Headers | None]:
        """The sampling decision for a request that came with no trace headers (the caller
        sent none of ``propagation.TRACE_HEADERS``): its new trace id, and either None (it is
        sampled: pass the id to ``start_server_span`` as ``root_trace_id``) or the trace
        context to send upstream for it, unsampled, so every later hop follows the decision.
        No span and no handle are made for such a request. Tracing must be enabled."""
        trace_id = self._bits(128) or 1
        if (trace_id & _LOW64) < self._bound:
            return trace_id, None
        if not self.rewrites_context:
            return trace_id, []
        span_id = self._bits(64) or 1
        return trace_id, self._unsampled(trace_id, span_id)

    def _start_sampled(
        self,
        headers: Headers,
        attrs: Attrs | None,
        route: str | None,
        name: str | None,
        parent: propagation.RemoteParent | None,
        trace_id: int,
        request_id: bytes,
        generated: bool,
    ) -> SpanHandle:
        base = request_attributes(headers)
        base["pilotfish.request_id"] = request_id.decode("latin-1")
        if route is not None:
            base["pilotfish.route"] = route
        name = name or span_name(base)
        if attrs:
            base.update(attrs)
        if parent is not None:
            remote = SpanContext(
                parent.trace_id,
                parent.span_id,
                is_remote=True,
                trace_flags=TraceFlags(TraceFlags.SAMPLED),
                trace_state=_trace_state(parent.tracestate),
            )
            context = trace.set_span_in_context(NonRecordingSpan(remote))
        else:
            self._ids.preset = trace_id
            context = None
        span = self._tracer.start_span(name, context=context, kind=SpanKind.SERVER, attributes=base)
        sc = span.get_span_context()
        handle = SpanHandle(request_id, generated, sc.trace_id, sc.span_id, True)
        handle.tracestate = parent.tracestate if parent is not None else b""
        handle.parent_span_id = parent.span_id if parent is not None else 0
        handle.span = span
        handle.name = name
        handle.base_attrs = base
        return handle

    def start_client_span(
        self,
        parent: SpanHandle,
        attempt: int,
        attrs: Attrs | None = None,
        *,
        upstream: str = "",
        cluster: str | None = None,
    ) -> SpanHandle:
        """A CLIENT span for one upstream attempt (1 for the first try) to ``upstream``
        (``host:port``) of ``cluster``. For a request that is not recorded this returns
        ``parent`` itself (nothing to end twice: ``end`` is idempotent)."""
        if parent.span is None:
            return parent
        base = parent.base_attrs
        span_attrs: dict[str, AttrValue] = {
            k: v for k, v in base.items() if not k.startswith(("server.", "client."))
        }
        span_attrs["pilotfish.attempt"] = attempt
        if attempt > 1:
            span_attrs["http.request.resend_count"] = attempt - 1
        if upstream:
            span_attrs["pilotfish.upstream.address"] = upstream
            host, port = split_host_port(upstream)
            span_attrs["server.address"] = host
            if port:
                span_attrs["server.port"] = port
        if cluster is not None:
            span_attrs["pilotfish.cluster"] = cluster
        if attrs:
            span_attrs.update(attrs)
        context = trace.set_span_in_context(parent.span)
        span = self._tracer.start_span(
            parent.name, context=context, kind=SpanKind.CLIENT, attributes=span_attrs
        )
        sc = span.get_span_context()
        handle = SpanHandle(parent.request_id, parent.request_id_generated, sc.trace_id)
        handle.span_id = sc.span_id
        handle.parent_span_id = parent.span_id
        handle.sampled = True
        handle.tracestate = parent.tracestate
        handle.server = False
        handle.span = span
        handle.name = parent.name
        handle.base_attrs = span_attrs
        return handle

    def inject(self, span: SpanHandle, headers: Headers) -> Headers:
        """The upstream request's headers: our trace context and ``x-request-id`` written in.
        Returns ``headers`` itself when there is nothing to change."""
        if not span.trace_id or not self.inject_formats:
            if not span.request_id_generated:
                return headers
            return [*headers, (propagation.REQUEST_ID, span.request_id)]
        out = propagation.without_context(headers)
        self.add_context(span, out)
        return out

    def add_context(self, span: SpanHandle, headers: Headers) -> None:
        """``inject`` in place, for ``headers`` that hold no trace headers when
        ``rewrites_context`` (the caller stripped ``propagation.TRACE_HEADERS``)."""
        if not self.rewrites_context or not span.trace_id:
            if span.request_id_generated:
                headers.append((propagation.REQUEST_ID, span.request_id))
            return
        propagation.append_context(
            headers,
            self.inject_formats,
            span.trace_id,
            span.span_id,
            span.sampled,
            tracestate=span.tracestate,
            parent_span_id=span.parent_span_id,
            request_id=span.request_id if span.request_id_generated else None,
        )

    def end(
        self,
        span: SpanHandle,
        status: int = 0,
        attrs: Attrs | None = None,
        *,
        grpc_status: int | None = None,
        flag: str | None = None,
        error: str | None = None,
    ) -> None:
        """End ``span`` with the response: HTTP ``status`` (0: none was sent), ``grpc_status``,
        the response flag's code, an error description. Ending twice is harmless."""
        sdk_span = span.span
        if sdk_span is None:
            return
        span.span = None
        if status:
            sdk_span.set_attribute("http.response.status_code", status)
        if grpc_status is not None:
            sdk_span.set_attribute("rpc.grpc.status_code", grpc_status)
        if flag:
            sdk_span.set_attribute("pilotfish.response_flags", flag)
        if attrs:
            sdk_span.set_attributes(attrs)
        if error or flag:
            sdk_span.set_status(Status(StatusCode.ERROR, error or flag))
        elif is_error(span.server, "rpc.system" in span.base_attrs, status, grpc_status):
            sdk_span.set_status(Status(StatusCode.ERROR))
        sdk_span.end()

    def shutdown(self) -> None:
        """Flush what is queued, waiting at most ``config.shutdown_timeout_s``. Blocking: call it
        off the event loop (``loop.run_in_executor``) or once the loop has stopped."""
        if self._provider is not None:
            self._provider.shutdown()
            self._provider = None
            # What a user needs to tell "exported" from "sent nowhere" (the demo reads it).
            log.info(
                "tracing: %d spans exported to %s, %d dropped",
                self.exported.value, self.config.export_endpoint, self.drops.value,
            )

    def force_flush(self, timeout_s: float = 5.0) -> bool:
        """Export everything queued now (blocking; for tests and shutdown paths)."""
        if self._processor is None:
            return True
        return self._processor.force_flush(int(timeout_s * 1000))

    def _ratio(self, trace_id: int) -> bool:
        # The same test as the SDK's TraceIdRatioBased, so every hop of a trace agrees.
        return (trace_id & _LOW64) < self._bound


def _trace_state(raw: bytes) -> TraceState | None:
    if not raw:
        return None
    return TraceState.from_header([raw.decode("latin-1")])


def _otlp_exporter(config: TracingConfig) -> SpanExporter:
    # Imported here: a sidecar without tracing does not load the exporter at all.
    from sidecar.observability.otlp_export import otlp_exporter

    return otlp_exporter(config)
