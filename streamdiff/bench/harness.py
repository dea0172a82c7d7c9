"""A small benchmark harness: interleaved rounds, warm-up, medians, ratios, a text table and a JSON dict.

Configurations are measured A B C, C B A, A B C ... in one run (the order flips every round so a slow drift of the
host hits every configuration alike), after warm-up calls that are not timed. Each round times ``calls`` calls of a
configuration and records seconds per item (an item is usually one output frame). The figure reported is the median
over rounds; ratios are taken between medians. Typical use::

    cases = [Case("sequential", run_sequential), Case("stream-batch", run_batched)]
    results = run_interleaved(cases, rounds=5, calls=3, warmup=2)
    comparison = Comparison("stream-batch", results, baseline="sequential")
    print(format_table([comparison]))
    json.dumps(comparison.to_dict())

Speed is measured here, never asserted: callers compare the figures with targets through :class:`Check`.
"""

from __future__ import annotations

import json
import logging
import math
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from ..errors import ConfigError

logger = logging.getLogger(__name__)

Clock = Callable[[], float]


@dataclass(frozen=True)
class Case:
    """One configuration: ``step()`` does one timed unit of work producing ``items`` items (frames).

    ``setup()`` runs untimed before each of the configuration's rounds (e.g. to switch a shared module's memory
    format); ``warmup`` overrides the harness's warm-up count for this case (``0`` for a very slow baseline).
    """

    name: str
    step: Callable[[], Any]
    items: int = 1
    setup: Callable[[], None] | None = None
    warmup: int | None = None


@dataclass
class CaseResult:
    """The timings of one configuration: seconds per item, one value per round."""

    name: str
    seconds: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.seconds) if self.seconds else math.nan

    @property
    def per_second(self) -> float:
        """Items (frames) per second at the median."""
        median = self.median
        return 1.0 / median if median > 0 else math.inf

    def to_dict(self) -> dict[str, Any]:
        return {
            "seconds_per_item": self.median,
            "items_per_second": self.per_second,
            "rounds": list(self.seconds),
            "min": min(self.seconds) if self.seconds else math.nan,
            "max": max(self.seconds) if self.seconds else math.nan,
        }


def run_interleaved(
    cases: Sequence[Case], rounds: int = 5, calls: int = 1, warmup: int = 1, clock: Clock = time.perf_counter
) -> list[CaseResult]:
    """Time every case in ``rounds`` interleaved rounds of ``calls`` calls each, after untimed warm-up calls.

    Returns one :class:`CaseResult` per case, in the order given. ``clock`` is injectable for tests.
    """
    if not cases:
        raise ConfigError("run_interleaved needs at least one case")
    names = [case.name for case in cases]
    if len(set(names)) != len(names):
        raise ConfigError(f"case names {names} are not unique")
    for label, value, low in (("rounds", rounds, 1), ("calls", calls, 1), ("warmup", warmup, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ConfigError(f"{label}={value!r} must be an integer >= {low}")
    for case in cases:
        if case.items < 1:
            raise ConfigError(f"case {case.name!r} has items={case.items}; it must be >= 1")
        if case.setup is not None:
            case.setup()
        for _ in range(warmup if case.warmup is None else case.warmup):
            case.step()
    results = {case.name: CaseResult(case.name, []) for case in cases}
    for round_index in range(rounds):
        order = cases if round_index % 2 == 0 else list(reversed(cases))
        for case in order:
            if case.setup is not None:
                case.setup()
            start = clock()
            for _ in range(calls):
                case.step()
            elapsed = clock() - start
            results[case.name].seconds.append(elapsed / (calls * case.items))
            logger.debug("round %d %s: %.4f s/item", round_index, case.name, results[case.name].seconds[-1])
    return [results[case.name] for case in cases]


@dataclass(frozen=True)
class Check:
    """A measured figure against its target: ``value >= target`` (or ``<=`` when ``higher_is_better`` is False)."""

    what: str
    value: float
    target: float
    higher_is_better: bool = True

    @property
    def met(self) -> bool:
        if math.isnan(self.value):
            return False
        return self.value >= self.target if self.higher_is_better else self.value <= self.target

    @property
    def shortfall(self) -> float:
        """How far from the target as a fraction of it (0 when met)."""
        if self.met or self.target == 0:
            return 0.0
        return abs(self.target - self.value) / abs(self.target)

    def to_dict(self) -> dict[str, Any]:
        op = ">=" if self.higher_is_better else "<="
        return {"what": self.what, "value": self.value, "target": f"{op} {self.target:g}", "met": self.met}


@dataclass
class Comparison:
    """Results of several configurations measured together; ratios are against ``baseline``.

    ``metrics`` holds other per-case numbers (PSNR, U-Net calls per frame, ...): ``{case: {metric: value}}``.
    """

    name: str
    results: list[CaseResult]
    baseline: str
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    checks: list[Check] = field(default_factory=list)
    note: str = ""

    def __post_init__(self) -> None:
        if self.baseline not in {r.name for r in self.results}:
            raise ConfigError(f"baseline {self.baseline!r} is not one of {[r.name for r in self.results]}")

    def result(self, name: str) -> CaseResult:
        for result in self.results:
            if result.name == name:
                return result
        raise ConfigError(f"no case {name!r} in comparison {self.name!r}; cases: {[r.name for r in self.results]}")

    def speedup(self, name: str, over: str | None = None) -> float:
        """How many times the frames/s of ``over`` (the baseline by default) case ``name`` reaches."""
        return self.result(over or self.baseline).median / self.result(name).median

    def to_dict(self) -> dict[str, Any]:
        cases = {}
        for result in self.results:
            entry = result.to_dict()
            entry["speedup_vs_baseline"] = self.speedup(result.name)
            entry.update(self.metrics.get(result.name, {}))
            cases[result.name] = entry
        return {
            "baseline": self.baseline,
            "cases": cases,
            "checks": [check.to_dict() for check in self.checks],
            "note": self.note,
        }


def _number(value: float) -> str:
    if isinstance(value, float) and (math.isnan(value) or math.isinf(value)):
        return str(value)
    return f"{value:.4g}"


def format_table(comparisons: Sequence[Comparison], title: str = "") -> str:
    """A short plain-text table: per case median s/frame, frames/s, speedup and extra metrics; then the checks."""
    lines = [title] if title else []
    for comparison in comparisons:
        metric_names = sorted({m for values in comparison.metrics.values() for m in values})
        header = ["case", "s/frame", "frames/s", f"x {comparison.baseline}", *metric_names]
        rows = [header]
        for result in comparison.results:
            extra = comparison.metrics.get(result.name, {})
            rows.append(
                [
                    result.name,
                    _number(result.median),
                    _number(result.per_second),
                    _number(comparison.speedup(result.name)),
                    *(_number(extra[m]) if m in extra else "-" for m in metric_names),
                ]
            )
        widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
        lines.append(f"[{comparison.name}]")
        for row in rows:
            lines.append("  " + "  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
        for check in comparison.checks:
            status = "met" if check.met else f"SHORT by {check.shortfall:.0%}"
            op = ">=" if check.higher_is_better else "<="
            lines.append(f"  check: {check.what} = {_number(check.value)} (target {op} {check.target:g}): {status}")
        if comparison.note:
            lines.append(f"  note: {comparison.note}")
    return "\n".join(lines)


def _strict(value: Any) -> Any:
    """``value`` with every NaN or infinite float replaced by None (strict JSON has no such numbers)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _strict(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strict(v) for v in value]
    return value


def report_dict(comparisons: Sequence[Comparison], **meta: Any) -> dict[str, Any]:
    """The JSON-ready report: ``meta`` (command, threads, model...) plus every comparison by name.

    Non-finite numbers (an identical image's PSNR, a failed measurement) become None.
    """
    return _strict({**meta, "comparisons": {c.name: c.to_dict() for c in comparisons}})


def write_json(report: Any, target: str) -> None:
    """Write ``report`` as indented JSON to the file ``target`` (``"-"``: standard output)."""
    text = json.dumps(report, indent=2)
    if target == "-":
        print(text)
    else:
        Path(target).write_text(text + "\n")
