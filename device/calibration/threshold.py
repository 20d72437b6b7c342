"""The target a threshold must meet on validation, and the threshold that meets it on an
offload curve. Pure."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from .curves import OffloadCurve, OperatingPoint


TARGET_KINDS = ("cloud", "accuracy", "max_offload_share")


@dataclass(frozen=True)
class Target:
    """What the threshold must achieve on validation.

    ``cloud``: hybrid accuracy >= the cloud model's (``value`` is that accuracy);
    ``accuracy``: hybrid accuracy >= ``value``; both with the least offloading.
    ``max_offload_share``: offload at most ``value`` of the inputs, with the best accuracy.
    """
    kind: str
    value: float
    tolerance: float = 0.0    # cloud target only: value = cloud accuracy - tolerance

    def __post_init__(self) -> None:
        if self.kind not in TARGET_KINDS:
            raise ValueError(f"unknown target kind {self.kind!r}; choose one of {', '.join(TARGET_KINDS)}")
        if not (0.0 <= self.value <= 1.0):
            raise ValueError(f"target value must be between 0 and 1, got {self.value}")

    @property
    def is_accuracy(self) -> bool:
        return self.kind in ("cloud", "accuracy")

    def describe(self) -> str:
        if self.kind == "cloud" and self.tolerance:
            return (f"reach the cloud model's validation accuracy minus {self.tolerance * 100:.2f} pp "
                    f"({self.value:.4f}) with the least offloading")
        if self.kind == "cloud":
            return f"reach the cloud model's validation accuracy ({self.value:.4f}) with the least offloading"
        if self.kind == "accuracy":
            return f"reach accuracy {self.value:.4f} with the least offloading"
        return f"best accuracy offloading at most {self.value:.1%} of the inputs"

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "value": self.value, "tolerance": self.tolerance, "description": self.describe()}


def resolve_target(kind: str, value: float | None, cloud_val_accuracy: float, tolerance: float = 0.0) -> Target:
    if kind == "cloud":
        if not 0.0 <= tolerance < 1.0:
            raise ValueError(f"tolerance must be between 0 and 1 (accuracy points, e.g. 0.0025), got {tolerance}")
        return Target("cloud", max(cloud_val_accuracy - tolerance, 0.0), tolerance)
    if value is None:
        raise ValueError(f"target {kind} needs a value")
    return Target(kind, float(value))


def select_threshold(curve: OffloadCurve, target: Target) -> OperatingPoint | None:
    """The operating point that meets ``target`` (see :class:`Target`); None if none does."""
    if target.is_accuracy:
        ok = np.flatnonzero(curve.accuracy >= target.value - 1e-12)
        return None if len(ok) == 0 else curve.point(int(ok[0]))
    within = np.flatnonzero(curve.offloaded <= target.value * curve.n + 1e-9)
    if len(within) == 0:   # cannot happen: offloading nothing is always within budget
        return None
    best = within[np.argmax(curve.accuracy[within])]   # first = least offloaded among equals
    return curve.point(int(best))
