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

    __slots__ = ("_lock", "capacity", "queued")

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.queued = 0
        self._lock = threading.Lock()

    def try_enter(self) -> bool:
        with self._lock:
            if self.queued >= self.capacity:
                return False
            self.queued += 1
            return True

    def leave(self, n: int) -> None:
        with self._lock:
            self.queued = max(0, self.queued - n)

    def reset_after_fork(self) -> None:
        # The SDK empties its queue in a forked child; the count must follow.
        self._lock = threading.Lock()
        self.queued = 0


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
        self._shut = False
        self._shut_lock = threading.Lock()

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        self.admission.leave(len(spans))
        try:
            result = self.inner.export(spans)
        except Exception:
            self.drops.add(len(spans))
            raise  # the SDK's worker logs it and carries on
        if result is SpanExportResult.SUCCESS:
            self.exported.add(len(spans))
        else:
            self.drops.add(len(spans))
        return result

    def shutdown(self) -> None:
        with self._shut_lock:
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
        """Export what is queued; past the timeout, abort the exporter's retries so a dead
        collector cannot hold the process (the spans still queued are counted as lost)."""
        self._closed = True
        abort = threading.Timer(self._shutdown_timeout_s, self._counting.shutdown)
        abort.daemon = True
        abort.start()
        try:
            super().shutdown()  # type: ignore[no-untyped-call]
        finally:
            abort.cancel()
            self._counting.shutdown()
            lost = self._admission.queued
            if lost:
                self._admission.leave(lost)
                self.drops.add(lost)
