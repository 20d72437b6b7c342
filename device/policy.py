"""The offload decision. Pure: a confidence in, a frozen decision out."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Decision:
    offload: bool
    reason: str   # "confident", "below_threshold", "offload_disabled"


@dataclass(frozen=True)
class ThresholdPolicy:
    threshold: float
    enabled: bool = True

    def decide(self, confidence: float) -> Decision:
        if confidence >= self.threshold:
            return Decision(False, "confident")
        if not self.enabled:
            return Decision(False, "offload_disabled")
        return Decision(True, "below_threshold")
