"""Prometheus metrics in the text exposition format, without a client library.

Each process owns one ``Registry``; metrics are created through it and rendered by ``render()``.
Thread-safe: workers update metrics from the engine thread while the server thread renders them.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Iterable, Sequence

Labels = tuple[tuple[str, str], ...]

# Latency buckets in seconds, from sub-millisecond decode steps to long prefills.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


def _fmt_labels(labels: Labels) -> str:
    if not labels:
        return ""
    body = ",".join(f'{k}="{_escape(v)}"' for k, v in labels)
    return "{" + body + "}"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _fmt_value(v: float) -> str:
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    return repr(float(v)) if not float(v).is_integer() else str(int(v))


class _Metric:
    kind = ""

    def __init__(self, name: str, help_text: str, label_names: Sequence[str]) -> None:
        self.name, self.help, self.label_names = name, help_text, tuple(label_names)
        self._lock = threading.Lock()

    def _key(self, labels: dict[str, str]) -> Labels:
        if set(labels) != set(self.label_names):
            raise ValueError(f"metric {self.name} takes labels {self.label_names}, got {sorted(labels)}")
        return tuple((k, str(labels[k])) for k in self.label_names)

    def header(self) -> list[str]:
        return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.kind}"]


class Counter(_Metric):
    kind = "counter"

    def __init__(self, *args) -> None:
        super().__init__(*args)
        self._values: dict[Labels, float] = {}

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        if amount < 0:
            raise ValueError(f"counter {self.name} cannot decrease (inc by {amount})")
        key = self._key(labels)
        with self._lock:
            self._values[key] = self._values.get(key, 0.0) + amount

    def value(self, **labels: str) -> float:
        with self._lock:
            return self._values.get(self._key(labels), 0.0)

    def samples(self) -> list[str]:
        with self._lock:
            return [f"{self.name}{_fmt_labels(k)} {_fmt_value(v)}" for k, v in sorted(self._values.items())]


class Gauge(_Metric):
    """A gauge set directly, or computed at render time by ``set_function``."""

    kind = "gauge"

    def __init__(self, *args) -> None:
        super().__init__(*args)
        self._values: dict[Labels, float] = {}
        self._functions: dict[Labels, Callable[[], float]] = {}

    def set(self, value: float, **labels: str) -> None:
        key = self._key(labels)
        with self._lock:
            self._values[key] = float(value)

    def set_function(self, fn: Callable[[], float], **labels: str) -> None:
        key = self._key(labels)
        with self._lock:
            self._functions[key] = fn

    def value(self, **labels: str) -> float:
        key = self._key(labels)
        with self._lock:
            fn = self._functions.get(key)
            return float(fn()) if fn is not None else self._values.get(key, 0.0)

    def samples(self) -> list[str]:
        with self._lock:
            values = dict(self._values)
            functions = dict(self._functions)
        values.update({k: float(fn()) for k, fn in functions.items()})
        return [f"{self.name}{_fmt_labels(k)} {_fmt_value(v)}" for k, v in sorted(values.items())]


class Histogram(_Metric):
    kind = "histogram"

    def __init__(
        self, name: str, help_text: str, label_names: Sequence[str], buckets: Iterable[float]
    ) -> None:
        super().__init__(name, help_text, label_names)
        self.buckets = (*sorted(buckets), math.inf)
        self._counts: dict[Labels, list[int]] = {}
        self._sums: dict[Labels, float] = {}

    def observe(self, value: float, **labels: str) -> None:
        key = self._key(labels)
        with self._lock:
            counts = self._counts.setdefault(key, [0] * len(self.buckets))
            for i, bound in enumerate(self.buckets):
                if value <= bound:
                    counts[i] += 1
            self._sums[key] = self._sums.get(key, 0.0) + value

    def count(self, **labels: str) -> int:
        with self._lock:
            return self._counts.get(self._key(labels), [0])[-1]

    def samples(self) -> list[str]:
        out = []
        with self._lock:
            for key in sorted(self._counts):
                for bound, n in zip(self.buckets, self._counts[key]):
                    le = (*key, ("le", _fmt_value(bound)))
                    out.append(f"{self.name}_bucket{_fmt_labels(le)} {n}")
                out.append(f"{self.name}_sum{_fmt_labels(key)} {_fmt_value(self._sums[key])}")
                out.append(f"{self.name}_count{_fmt_labels(key)} {self._counts[key][-1]}")
        return out


class Registry:
    def __init__(self) -> None:
        self._metrics: dict[str, _Metric] = {}
        self._lock = threading.Lock()

    def _add(self, metric: _Metric) -> _Metric:
        with self._lock:
            if metric.name in self._metrics:
                raise ValueError(f"metric {metric.name} registered twice")
            self._metrics[metric.name] = metric
        return metric

    def counter(self, name: str, help_text: str, labels: Sequence[str] = ()) -> Counter:
        return self._add(Counter(name, help_text, labels))

    def gauge(self, name: str, help_text: str, labels: Sequence[str] = ()) -> Gauge:
        return self._add(Gauge(name, help_text, labels))

    def histogram(
        self,
        name: str,
        help_text: str,
        labels: Sequence[str] = (),
        buckets: Iterable[float] = LATENCY_BUCKETS,
    ) -> Histogram:
        return self._add(Histogram(name, help_text, labels, buckets))

    def render(self) -> str:
        with self._lock:
            metrics = list(self._metrics.values())
        lines: list[str] = []
        for m in metrics:
            lines += m.header() + m.samples()
        return "\n".join(lines) + "\n"


def parse_samples(text: str) -> dict[tuple[str, Labels], float]:
    """Parses exposition text back into ``{(name, labels): value}`` (for the proxy's relay and tests)."""
    out: dict[tuple[str, Labels], float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        head, _, value = line.rpartition(" ")
        name, _, rest = head.partition("{")
        labels: list[tuple[str, str]] = []
        rest = rest.rstrip("}")
        while rest:
            key, _, rest = rest.partition('="')
            val, i = [], 0
            while i < len(rest) and rest[i] != '"':
                if rest[i] == "\\" and i + 1 < len(rest):
                    val.append({"n": "\n"}.get(rest[i + 1], rest[i + 1]))
                    i += 2
                    continue
                val.append(rest[i])
                i += 1
            labels.append((key.lstrip(","), "".join(val)))
            rest = rest[i + 1 :]
        out[(name, tuple(labels))] = float(value.replace("+Inf", "inf"))
    return out
