"""Interleaved rounds and their summaries: medians, same-round ratios, min-max."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass


def orders(names: Sequence[str], rounds: int) -> list[list[str]]:
    """The contenders' order in each round, rotated: A B C D, B C D A, C D A B, …"""
    names = list(names)
    return [names[r % len(names) :] + names[: r % len(names)] for r in range(rounds)]


@dataclass(frozen=True)
class Spread:
    """A median with the smallest and largest value it was taken from."""

    median: float
    low: float
    high: float

    @classmethod
    def of(cls, values: Sequence[float]) -> Spread:
        return cls(statistics.median(values), min(values), max(values))

    def as_dict(self) -> dict[str, float]:
        return {"median": self.median, "min": self.low, "max": self.high}

    @classmethod
    def from_dict(cls, values: dict[str, float]) -> Spread:
        """The spread :meth:`as_dict` gave (as stored in the results)."""
        return cls(values["median"], values["min"], values["max"])

    def text(self, digits: int = 2, sign: bool = False) -> str:
        style = f"{'+' if sign else ''}.{digits}f"
        return f"{self.median:{style}} [{self.low:{style}}, {self.high:{style}}]"


def ratios(values: Sequence[float], baseline: Sequence[float]) -> Spread | None:
    """Same-round ratios ``values[i] / baseline[i]`` (rounds where the baseline is 0 left out)."""
    found = [v / b for v, b in zip(values, baseline, strict=True) if b]
    return Spread.of(found) if found else None


def differences(values: Sequence[float], baseline: Sequence[float]) -> Spread:
    """Same-round differences ``values[i] - baseline[i]``."""
    return Spread.of([v - b for v, b in zip(values, baseline, strict=True)])


def compare(
    samples: dict[str, list[float]], cost_baseline: str | None, ratio_baseline: str | None
) -> dict[str, dict[str, Spread]]:
    """For each contender's requests/s per round: the median, the same-round ratio to
    ``ratio_baseline`` and the µs per request over ``cost_baseline`` (absent baselines: None)."""
    summary: dict[str, dict[str, Spread]] = {}
    for name, values in samples.items():
        entry = {"per_second": Spread.of(values)}
        ratio = ratios(values, samples[ratio_baseline]) if ratio_baseline in samples else None
        if ratio is not None:
            entry["ratio"] = ratio
        if cost_baseline in samples and all(values) and all(samples[cost_baseline]):
            entry["cost_us"] = differences(
                [1e6 / v for v in values], [1e6 / v for v in samples[cost_baseline]]
            )
        summary[name] = entry
    return summary
