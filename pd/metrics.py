"""Prometheus metrics on ``prometheus_client``, behind the small API the rest of pd calls.

Each process owns one ``Registry`` (its own ``CollectorRegistry``, never the library's global one);
metrics are created through it and rendered by ``render()`` in the text exposition format (0.0.4).
A name, help text or label that ``promtool check metrics`` would flag is refused when the metric is
created (``MetricNameError``), so what a registry renders passes it.
Thread-safe: prometheus_client's metrics are; workers update them from the engine thread while the
server thread renders them.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, TypeVar

import prometheus_client
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

Labels = tuple[tuple[str, str], ...]

# Latency buckets in seconds, from sub-millisecond decode steps to long prefills.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


# ---- the naming rules of `promtool check metrics` (Prometheus 2.42), checked at creation ----
# Two are stricter than promtool: names and labels are lowercase snake_case (promtool flags only
# camelCase and ':'), and "_bucket", "_count", "_sum" end no metric's name, histograms' included.

_SNAKE_CASE = re.compile(r"[a-z_][a-z0-9_]*\Z")
_TYPES = ("counter", "gauge", "histogram", "summary")
# Flagged as a word after the first ("_ms_" or a final "_ms").
_ABBREVIATED_UNITS = frozenset(
    ["s", "ms", "us", "ns", "sec", "h", "d", "m", "b", "kb", "mb", "gb", "tb", "pb"]
)
# Flagged as a word anywhere: a base unit with a prefix, or a unit that is not a base unit. (promtool
# looks at one unit word, picked in Go map order, so a name holding a base unit and another unit
# passes or fails at random; here every such word is refused.)
_BASE_UNITS = frozenset(
    ["amperes", "bytes", "celsius", "grams", "joules", "kelvin", "meters", "metres", "seconds", "volts"]
)
_UNIT_PREFIXES = (
    *("peta", "tera", "giga", "mega", "kilo", "hecto", "deca", "deci", "centi", "milli", "micro"),
    *("nano", "pico", "kibi", "gibi", "tebi", "pebi"),
)
_NON_BASE_UNITS = {
    **dict.fromkeys(("minutes", "hours", "days", "weeks"), "seconds"),
    "bits": "bytes",
    **dict.fromkeys(("inches", "miles", "yards"), "meters"),
    **dict.fromkeys(("pounds", "ounces"), "grams"),
    "calories": "joules",
    **dict.fromkeys(("fahrenheit", "rankine"), "celsius"),
    "kelvins": "kelvin",
}


class MetricNameError(ValueError):
    """A metric name, help text or label that breaks the rules above."""


def _base_unit(word: str) -> str | None:
    """The base unit ``word`` should be written in, or None if it is fine as it is."""
    prefix = next((p for p in _UNIT_PREFIXES if word.startswith(p) and len(word) > len(p)), "")
    unit = word[len(prefix) :]
    if unit in _NON_BASE_UNITS:
        return _NON_BASE_UNITS[unit]
    return unit if prefix and unit in _BASE_UNITS else None


def promtool_problems(kind: str, name: str, help_text: str, label_names: Sequence[str]) -> list[str]:
    """What breaks the rules above (as ``promtool check metrics`` would say it); empty if nothing.

    ``name`` is the exposed name: a counter's includes ``_total``, a histogram's has no series suffix.
    """
    problems = []
    if not _SNAKE_CASE.match(name):
        problems.append("the name must be snake_case ([a-z_][a-z0-9_]*)")
    if not help_text.strip():
        problems.append("no help text")
    if kind == "counter" and not name.endswith("_total"):
        problems.append('a counter\'s name must end in "_total"')
    if kind != "counter" and name.endswith("_total"):
        problems.append(f'only counters end in "_total", not a {kind}')
    for suffix in ("_bucket", "_count", "_sum"):
        if name.endswith(suffix):
            problems.append(f'"{suffix}" is reserved for the series of histograms and summaries')
    words = name.split("_")
    for t in _TYPES:
        if t in words[1:]:
            problems.append(f"the name must not include the type {t!r}")
    if any(w in _ABBREVIATED_UNITS for w in words[1:]):
        problems.append("the name must not contain abbreviated units")
    for w in words:
        if base := _base_unit(w):
            problems.append(f'use the base unit "{base}" instead of "{w}"')
    for label in label_names:
        if not _SNAKE_CASE.match(label) or label.startswith("__"):
            problems.append(f"label {label!r} must be snake_case ([a-z_][a-z0-9_]*, no leading '__')")
        if label in ("le", "quantile"):
            problems.append(f"label {label!r} is reserved for histogram buckets and summary quantiles")
    if len(set(label_names)) != len(label_names):
        problems.append(f"duplicate labels in {tuple(label_names)}")
    return problems


# ---- metrics ----


class _Metric:
    kind = ""

    def __init__(self, lib: MetricWrapperBase, name: str, help_text: str, label_names: Sequence[str]) -> None:
        self._lib = lib
        self.name, self.help, self.label_names = name, help_text, tuple(label_names)

    def _check(self, labels: dict[str, str]) -> None:
        if set(labels) != set(self.label_names):
            raise ValueError(f"metric {self.name} takes labels {self.label_names}, got {sorted(labels)}")

    def _child(self, labels: dict[str, str]) -> Any:
        """The library's series for these label values (the metric itself when it has no labels)."""
        self._check(labels)
        return self._lib.labels(**labels) if self.label_names else self._lib

    def _sample(self, sample_name: str, labels: dict[str, str]) -> float:
        """One sample's current value; 0 for a series not created yet (reading does not create it)."""
        self._check(labels)
        want = {k: str(v) for k, v in labels.items()}
        for family in self._lib.collect():
            for s in family.samples:
                if s.name == sample_name and s.labels == want:
                    return s.value
        return 0.0


class Counter(_Metric):
    kind = "counter"

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        if amount < 0:
            raise ValueError(f"counter {self.name} cannot decrease (inc by {amount})")
        self._child(labels).inc(amount)

    def value(self, **labels: str) -> float:
        return self._sample(self.name, labels)


class Gauge(_Metric):
    """A gauge set directly, or computed at render time by ``set_function``."""

    kind = "gauge"

    def set(self, value: float, **labels: str) -> None:
        self._child(labels).set(value)

    def set_function(self, fn: Callable[[], float], **labels: str) -> None:
        self._child(labels).set_function(fn)

    def value(self, **labels: str) -> float:
        return self._sample(self.name, labels)


class Histogram(_Metric):
    kind = "histogram"

    def observe(self, value: float, **labels: str) -> None:
        self._child(labels).observe(value)

    def count(self, **labels: str) -> int:
        return int(self._sample(f"{self.name}_count", labels))


class _Exposed:
    """A library metric as a ``Registry`` exposes it: without the ``_created`` series of counters and
    histograms (in the 0.0.4 text format each would be one more gauge family, which nothing here reads)."""

    def __init__(self, lib: MetricWrapperBase) -> None:
        self.lib = lib

    def describe(self) -> Iterable[Metric]:
        return self.lib.describe()

    def collect(self) -> Iterator[Metric]:
        for family in self.lib.collect():
            if family.type in ("counter", "histogram"):
                created = f"{family.name}_created"
                family.samples = [s for s in family.samples if s.name != created]
            yield family


_LIBRARY_CLASSES = {
    "counter": prometheus_client.Counter,
    "gauge": prometheus_client.Gauge,
    "histogram": prometheus_client.Histogram,
}


_M = TypeVar("_M", bound=_Metric)


class Registry:
    def __init__(self) -> None:
        self._registry = prometheus_client.CollectorRegistry(auto_describe=True)
        self._names: set[str] = set()
        self._lock = threading.Lock()

    def _add(self, cls: type[_M], name: str, help_text: str, labels: Sequence[str], **kwargs: Any) -> _M:
        labels = tuple(labels)
        if problems := promtool_problems(cls.kind, name, help_text, labels):
            raise MetricNameError(
                f"{cls.kind} {name!r} breaks the naming rules of `promtool check metrics`: {'; '.join(problems)}"
            )
        lib_cls = _LIBRARY_CLASSES[cls.kind]
        with self._lock:
            if name in self._names:
                raise ValueError(f"metric {name} registered twice")
            lib = lib_cls(name, help_text, labels, registry=None, **kwargs)
            self._registry.register(_Exposed(lib))  # raises on a clash of series names
            self._names.add(name)
        return cls(lib, name, help_text, labels)

    def counter(self, name: str, help_text: str, labels: Sequence[str] = ()) -> Counter:
        """``name`` is the exposed name and ends in ``_total``."""
        return self._add(Counter, name, help_text, labels)

    def gauge(self, name: str, help_text: str, labels: Sequence[str] = ()) -> Gauge:
        return self._add(Gauge, name, help_text, labels)

    def histogram(
        self,
        name: str,
        help_text: str,
        labels: Sequence[str] = (),
        buckets: Iterable[float] = LATENCY_BUCKETS,
    ) -> Histogram:
        # The library adds the +Inf bucket.
        return self._add(Histogram, name, help_text, labels, buckets=sorted(float(b) for b in buckets))

    def render(self) -> str:
        return prometheus_client.generate_latest(self._registry).decode()


def parse_samples(text: str) -> dict[tuple[str, Labels], float]:
    """Parses exposition text back into ``{(sample name, labels): value}``, labels sorted by name (for
    the proxy's relay and tests). Sample names are as exposed: ``x_total``, ``x_bucket``, ``x_sum``."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
