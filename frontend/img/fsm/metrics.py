"""In-process Prometheus-style metrics of the FSM engine (counters and histograms with labels), a `snapshot()`
for tests and the CLI, and `exposition()` in the Prometheus text format. No dependency."""

from __future__ import annotations

import bisect
import threading
from dataclasses import dataclass, field

ACTION_BUCKETS = (0.5, 1, 2.5, 5, 10, 30, 60, 150, 300, 600, 1200)
TRANSITION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)

Labels = tuple[tuple[str, str], ...]


@dataclass
class _Histogram:
    buckets: tuple[float, ...]
    counts: list[int] = field(default_factory=list)
    total: float = 0.0
    n: int = 0

    def observe(self, value: float) -> None:
        if not self.counts:
            self.counts = [0] * len(self.buckets)
        i = bisect.bisect_left(self.buckets, value)
        if i < len(self.counts):
            self.counts[i] += 1
        self.total += value
        self.n += 1


class _Family:
    def __init__(
        self, name: str, help_: str, kind: str, label_names: tuple[str, ...], buckets: tuple[float, ...] = ()
    ) -> None:
        self.name, self.help, self.kind, self.label_names, self.buckets = (
            name,
            help_,
            kind,
            label_names,
            buckets,
        )
        self.counters: dict[Labels, float] = {}
        self.histograms: dict[Labels, _Histogram] = {}

    def _key(self, labels: dict[str, str]) -> Labels:
        return tuple((k, str(labels.get(k, ""))) for k in self.label_names)


class Registry:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._families: dict[str, _Family] = {}

    def counter(self, name: str, help_: str, label_names: tuple[str, ...]) -> None:
        self._families.setdefault(name, _Family(name, help_, "counter", label_names))

    def histogram(
        self, name: str, help_: str, label_names: tuple[str, ...], buckets: tuple[float, ...]
    ) -> None:
        self._families.setdefault(name, _Family(name, help_, "histogram", label_names, buckets))

    def inc(self, name: str, labels: dict[str, str], value: float = 1.0) -> None:
        fam = self._families[name]
        key = fam._key(labels)
        with self._lock:
            fam.counters[key] = fam.counters.get(key, 0.0) + value

    def observe(self, name: str, labels: dict[str, str], value: float) -> None:
        fam = self._families[name]
        key = fam._key(labels)
        with self._lock:
            fam.histograms.setdefault(key, _Histogram(fam.buckets)).observe(value)

    def snapshot(self) -> dict[str, list[dict[str, object]]]:
        """{metric: [{"labels": {...}, "value": n} | {"labels": {...}, "count": n, "sum": s}]}"""
        out: dict[str, list[dict[str, object]]] = {}
        with self._lock:
            for fam in self._families.values():
                rows: list[dict[str, object]] = []
                for key, v in fam.counters.items():
                    rows.append({"labels": dict(key), "value": v})
                for key, h in fam.histograms.items():
                    rows.append({"labels": dict(key), "count": h.n, "sum": h.total})
                out[fam.name] = rows
        return out

    def value(self, name: str, **labels: str) -> float:
        """Sum of a counter's (or a histogram's count) over the series matching the given labels."""
        total = 0.0
        for row in self.snapshot().get(name, []):
            lab = row["labels"]
            assert isinstance(lab, dict)
            if all(lab.get(k) == v for k, v in labels.items()):
                v = row["value"] if "value" in row else row["count"]
                assert isinstance(v, int | float)
                total += v
        return total

    def exposition(self) -> str:
        lines: list[str] = []
        with self._lock:
            for fam in self._families.values():
                lines.append(f"# HELP {fam.name} {fam.help}")
                lines.append(f"# TYPE {fam.name} {fam.kind}")
                for key, v in sorted(fam.counters.items()):
                    lines.append(f"{fam.name}{_fmt_labels(key)} {_num(v)}")
                for key, h in sorted(fam.histograms.items()):
                    cum = 0
                    for bound, c in zip(h.buckets, h.counts or [0] * len(h.buckets), strict=True):
                        cum += c
                        lines.append(f"{fam.name}_bucket{_fmt_labels(key, ('le', _num(bound)))} {cum}")
                    lines.append(f"{fam.name}_bucket{_fmt_labels(key, ('le', '+Inf'))} {h.n}")
                    lines.append(f"{fam.name}_sum{_fmt_labels(key)} {_num(h.total)}")
                    lines.append(f"{fam.name}_count{_fmt_labels(key)} {h.n}")
        return "\n".join(lines) + "\n"

    def reset(self) -> None:
        with self._lock:
            for fam in self._families.values():
                fam.counters.clear()
                fam.histograms.clear()


def _esc(v: str) -> str:
    return v.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _fmt_labels(key: Labels, extra: tuple[str, str] | None = None) -> str:
    items = [*key, extra] if extra else list(key)
    if not items:
        return ""
    return "{" + ",".join(f'{k}="{_esc(v)}"' for k, v in items) + "}"


def _num(v: float) -> str:
    return repr(int(v)) if float(v).is_integer() else repr(float(v))


REGISTRY = Registry()
REGISTRY.counter(
    "fsm_action_count", "A count of action (run) completions.", ("action", "resource", "status", "kind")
)
REGISTRY.histogram(
    "fsm_action_duration_seconds",
    "Time spent performing an action (run).",
    ("action", "resource", "status", "kind"),
    ACTION_BUCKETS,
)
REGISTRY.counter(
    "fsm_transition_count",
    "A count of transition (step) attempts.",
    ("action", "state", "resource", "status"),
)
REGISTRY.histogram(
    "fsm_transition_duration_seconds",
    "Time spent in a transition (step) attempt.",
    ("action", "state", "resource", "status"),
    TRANSITION_BUCKETS,
)

snapshot = REGISTRY.snapshot
exposition = REGISTRY.exposition
value = REGISTRY.value
