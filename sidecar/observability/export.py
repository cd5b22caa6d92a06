"""Span export that never waits on the collector and counts every span it loses.

The SDK's ``BatchSpanProcessor`` keeps a bounded queue and silently pushes out the oldest span
when it is full. ``CountingBatchSpanProcessor`` admits a span only while fewer than
``max_queue_size`` are waiting (tracked by a counter the exporter side decrements as batches
leave the queue), so the queue never overflows and each refusal is counted; batches the exporter
fails to deliver (collector down, timeout) are counted too.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence

from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

# How long shutdown waits for the worker once the exporter was aborted.
ABORT_GRACE_S = 1.0


class DropCounter:
    """A thread-safe count of spans (lost ones, or exported ones; read by the metrics at scrape
    time)."""

    __slots__ = ("_lock", "value")

    def __init__(self) -> None:
        self.value = 0
        self._lock = threading.Lock()

    def add(self, n: int) -> None:
        with self._lock:
            self.value += n


class _Admission:
    """How many spans have been handed to the processor and not yet to the exporter."""

    __slots__ = ("_lock", "capacity", "closed", "queued")

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.queued = 0
        self.closed = False
        self._lock = threading.Lock()

    def try_enter(self) -> bool:
        with self._lock:
            if self.queued >= self.capacity:
                return False
            self.queued += 1
            return True

    def leave(self, n: int) -> bool:
        """``n`` spans go to the exporter; False once ``close`` has counted them already."""
        with self._lock:
            if self.closed:
                return False
            self.queued = max(0, self.queued - n)
            return True

    def close(self) -> int:
        """No span leaves from now on: how many are still waiting (lost)."""
        with self._lock:
            self.closed, lost, self.queued = True, self.queued, 0
            return lost

    def reset_after_fork(self) -> None:
        # The SDK empties its queue in a forked child; the count must follow.
        self._lock = threading.Lock()
        self.queued = 0
        self.closed = False


class _CountingExporter(SpanExporter):
    """Wraps the real exporter: batches leaving the queue, failures counted as drops."""

    def __init__(
        self,
        inner: SpanExporter,
        admission: _Admission,
        drops: DropCounter,
        exported: DropCounter,
    ) -> None:
        self.inner = inner
        self.admission = admission
        self.drops = drops
        self.exported = exported
        self._in_flight = 0  # spans of the export under way, not yet counted either way
        self._lock = threading.Lock()
        self._shut = False

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        if not self.admission.leave(len(spans)):
            return SpanExportResult.FAILURE  # counted as lost when the processor shut down
        with self._lock:
            self._in_flight = len(spans)
        delivered = False
        try:
            result = self.inner.export(spans)
            delivered = result is SpanExportResult.SUCCESS
            return result  # an exception goes to the SDK's worker, which logs it and carries on
        finally:
            with self._lock:
                unsent, self._in_flight = self._in_flight, 0
            if delivered:
                self.exported.add(unsent)
            else:
                self.drops.add(unsent)

    def abandon(self) -> None:
        """Count the export under way as lost now: it outlives the shutdown."""
        with self._lock:
            unsent, self._in_flight = self._in_flight, 0
        self.drops.add(unsent)

    def shutdown(self) -> None:
        with self._lock:
            if self._shut:
                return
            self._shut = True
        self.inner.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self.inner.force_flush(timeout_millis)


class CountingBatchSpanProcessor(BatchSpanProcessor):
    """``BatchSpanProcessor`` with admission control, drop counting and a bounded shutdown."""

    def __init__(
        self,
        exporter: SpanExporter,
        drops: DropCounter,
        *,
        exported: DropCounter | None = None,
        max_queue_size: int = 2048,
        max_export_batch_size: int = 512,
        schedule_delay_s: float = 1.0,
        shutdown_timeout_s: float = 5.0,
    ) -> None:
        self.drops = drops
        self.exported = exported if exported is not None else DropCounter()
        self._admission = _Admission(max_queue_size)
        self._counting = _CountingExporter(exporter, self._admission, drops, self.exported)
        self._shutdown_timeout_s = shutdown_timeout_s
        self._closed = False
        if hasattr(os, "register_at_fork"):
            os.register_at_fork(after_in_child=self._admission.reset_after_fork)
        super().__init__(
            self._counting,
            max_queue_size=max_queue_size,
            schedule_delay_millis=schedule_delay_s * 1000,
            max_export_batch_size=min(max_export_batch_size, max_queue_size),
        )

    @property
    def queued(self) -> int:
        return self._admission.queued

    def on_end(self, span: ReadableSpan) -> None:
        if not (span.context and span.context.trace_flags.sampled):
            return
        if self._closed or not self._admission.try_enter():
            self.drops.add(1)
            return
        super().on_end(span)

    def shutdown(self) -> None:
        """Export what is queued, for at most ``shutdown_timeout_s``; then abort the exporter
        (a gRPC call in flight and any backoff end at once) and wait a last second for the
        worker. An OTLP/HTTP request to a collector that does not answer cannot be cut: it
        ends at its export timeout in the worker, a daemon thread, while this returns. The
        spans still queued are counted as lost."""
        self._closed = True
        abort = threading.Timer(self._shutdown_timeout_s, self._counting.shutdown)
        abort.daemon = True
        abort.start()
        worker = threading.Thread(
            target=BatchSpanProcessor.shutdown, args=(self,), name="span-processor-shutdown",
            daemon=True,
        )
        worker.start()
        worker.join(self._shutdown_timeout_s + ABORT_GRACE_S)
        abort.cancel()
        self._counting.shutdown()
        self._counting.abandon()
        self.drops.add(self._admission.close())
