"""A small metrics registry rendered in the Prometheus text format, version 0.0.4.

Families hold children, one per label-value tuple. The request path resolves a child once
(``family.labels(...)``) and keeps it: an update is then an attribute add, with no lookup, lock
or string work. Everything runs on the event loop thread; values set by other threads (span
drops) are read through callbacks at scrape time.
"""

from __future__ import annotations

import abc
import math
from bisect import bisect_left
from collections.abc import Callable, Iterable, Sequence
from typing import Generic, TypeVar

LabelValues = tuple[str, ...]
Sample = tuple[LabelValues, float]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class CounterChild:
    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1.0) -> None:
        self.value += amount


class GaugeChild:
    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def set(self, value: float) -> None:
        self.value = value

    def add(self, delta: float) -> None:
        self.value += delta


class HistogramChild:
    """Per-bucket (not cumulative) counts; the cumulative ``le`` view is made at render."""

    __slots__ = ("bounds", "count", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.count = 0
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.count += 1
        self.sum += value


C = TypeVar("C", CounterChild, GaugeChild, HistogramChild)


class Family(abc.ABC, Generic[C]):
    kind = "untyped"

    def __init__(self, name: str, help_text: str, labelnames: Sequence[str]) -> None:
        _check_name(name)
        for label in labelnames:
            _check_name(label)
            if label.startswith("__") or label == "le":
                raise ValueError(f"metric {name}: label name {label!r} is reserved")
        self.name = name
        self.help = help_text
        self.labelnames = tuple(labelnames)
        self.children: dict[LabelValues, C] = {}

    def labels(self, *values: str) -> C:
        """The child for these label values, created on first use. Keep it: it is the cheap
        handle for updates."""
        child = self.children.get(values)
        if child is None:
            if len(values) != len(self.labelnames):
                raise ValueError(f"metric {self.name}: wants labels {self.labelnames}")
            child = self.children[values] = self._new_child()
        return child

    def remove(self, *values: str) -> None:
        self.children.pop(values, None)

    @abc.abstractmethod
    def _new_child(self) -> C:
        """Supplied by the subclass."""

    def render(self, out: list[str]) -> None:
        out.append(f"# HELP {self.name} {_escape_help(self.help)}")
        out.append(f"# TYPE {self.name} {self.kind}")
        for values in sorted(self.children):
            self._render_child(out, values, self.children[values])

    @abc.abstractmethod
    def _render_child(self, out: list[str], values: LabelValues, child: C) -> None:
        """Supplied by the subclass."""

    def _render_value(self, out: list[str], values: LabelValues, value: float) -> None:
        out.append(f"{self.name}{_labels(self.labelnames, values)} {_number(value)}")


class CounterFamily(Family[CounterChild]):
    kind = "counter"

    def _new_child(self) -> CounterChild:
        return CounterChild()

    def _render_child(self, out: list[str], values: LabelValues, child: CounterChild) -> None:
        self._render_value(out, values, child.value)


class GaugeFamily(Family[GaugeChild]):
    kind = "gauge"

    def _new_child(self) -> GaugeChild:
        return GaugeChild()

    def _render_child(self, out: list[str], values: LabelValues, child: GaugeChild) -> None:
        self._render_value(out, values, child.value)


class HistogramFamily(Family[HistogramChild]):
    kind = "histogram"

    def __init__(
        self, name: str, help_text: str, labelnames: Sequence[str], buckets: Sequence[float]
    ) -> None:
        super().__init__(name, help_text, labelnames)
        bounds = tuple(sorted(float(b) for b in buckets if b != math.inf))
        if not bounds or len(set(bounds)) != len(bounds):
            raise ValueError(f"metric {name}: buckets must be distinct, at least one finite")
        self.bounds = bounds
        self._le = [_number(b) for b in bounds] + ["+Inf"]

    def _new_child(self) -> HistogramChild:
        return HistogramChild(self.bounds)

    def _render_child(self, out: list[str], values: LabelValues, child: HistogramChild) -> None:
        names = (*self.labelnames, "le")
        running = 0
        for le, n in zip(self._le, child.counts, strict=True):
            running += n
            out.append(f"{self.name}_bucket{_labels(names, (*values, le))} {running}")
        plain = _labels(self.labelnames, values)
        out.append(f"{self.name}_sum{plain} {_number(child.sum)}")
        out.append(f"{self.name}_count{plain} {child.count}")


class CallbackFamily:
    """A counter or gauge whose samples are read at scrape time (process stats, span drops)."""

    def __init__(
        self,
        name: str,
        help_text: str,
        kind: str,
        collect: Callable[[], Iterable[Sample]],
        labelnames: Sequence[str] = (),
    ) -> None:
        if kind not in ("counter", "gauge"):
            raise ValueError(f"metric {name}: a callback is a counter or a gauge, not {kind}")
        _check_name(name)
        self.name = name
        self.help = help_text
        self.kind = kind
        self.collect = collect
        self.labelnames = tuple(labelnames)

    def render(self, out: list[str]) -> None:
        out.append(f"# HELP {self.name} {_escape_help(self.help)}")
        out.append(f"# TYPE {self.name} {self.kind}")
        for values, value in self.collect():
            out.append(f"{self.name}{_labels(self.labelnames, values)} {_number(value)}")


AnyFamily = CounterFamily | GaugeFamily | HistogramFamily | CallbackFamily


class Registry:
    def __init__(self) -> None:
        self.families: dict[str, AnyFamily] = {}

    def _add(self, family: AnyFamily) -> None:
        if family.name in self.families:
            raise ValueError(f"metric {family.name} is already registered")
        self.families[family.name] = family

    def counter(self, name: str, help_text: str, labels: Sequence[str] = ()) -> CounterFamily:
        family = CounterFamily(name, help_text, labels)
        self._add(family)
        return family

    def gauge(self, name: str, help_text: str, labels: Sequence[str] = ()) -> GaugeFamily:
        family = GaugeFamily(name, help_text, labels)
        self._add(family)
        return family

    def histogram(
        self, name: str, help_text: str, labels: Sequence[str], buckets: Sequence[float]
    ) -> HistogramFamily:
        family = HistogramFamily(name, help_text, labels, buckets)
        self._add(family)
        return family

    def callback(
        self,
        name: str,
        help_text: str,
        kind: str,
        collect: Callable[[], Iterable[Sample]],
        labels: Sequence[str] = (),
    ) -> CallbackFamily:
        family = CallbackFamily(name, help_text, kind, collect, labels)
        self._add(family)
        return family

    def render(self) -> str:
        """The exposition: every family, HELP and TYPE first, samples grouped."""
        out: list[str] = []
        for family in self.families.values():
            family.render(out)
        return "\n".join(out) + "\n" if out else ""


def _check_name(name: str) -> None:
    if (
        not name
        or not (name[0].isalpha() or name[0] in "_:")
        or not all(c.isalnum() or c in "_:" for c in name)
        or not name.isascii()
    ):
        raise ValueError(f"{name!r} is not a valid Prometheus name")


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _escape_value(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _labels(names: tuple[str, ...], values: LabelValues) -> str:
    if not names:
        return ""
    inner = ",".join(f'{n}="{_escape_value(v)}"' for n, v in zip(names, values, strict=True))
    return "{" + inner + "}"


def _number(value: float) -> str:
    if value != value:
        return "NaN"
    if value in (math.inf, -math.inf):
        return "+Inf" if value > 0 else "-Inf"
    if float(value).is_integer() and abs(value) < 1e15:
        return str(int(value))
    return repr(float(value))
