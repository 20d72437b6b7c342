"""The offload decision. Pure: inputs and state in, frozen decision and new state out.

Three parts, applied in order:

1. the threshold on the configured confidence score (below it: offload);
2. an audit rate: a small random share of *confident* inputs is offloaded
   too, so the fleet measures the edge model's real accuracy on the inputs it
   keeps and notices drift;
3. an offload budget (samples per minute, bytes per hour) as token buckets:
   beyond it the local result stands and the skip is counted.
"""
from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass(frozen=True)
class Decision:
    offload: bool
    #: "confident", "below_threshold", "audit", "offload_disabled", "budget_samples", "budget_bytes"
    reason: str


@dataclass(frozen=True)
class BudgetState:
    samples: float        # tokens left in the samples-per-minute bucket
    bytes: float          # tokens left in the bytes-per-hour bucket
    at: float             # when they were last refilled (monotonic seconds)


@dataclass(frozen=True)
class OffloadPolicy:
    threshold: float
    enabled: bool = True
    audit_rate: float = 0.0
    #: 0 = no limit
    max_samples_per_minute: int = 0
    max_bytes_per_hour: int = 0
    #: a threshold per predicted class (by label index) instead of ``threshold``; empty: ``threshold`` for all
    class_thresholds: tuple[float, ...] = ()

    @property
    def has_budget(self) -> bool:
        return bool(self.max_samples_per_minute or self.max_bytes_per_hour)

    def initial_budget(self, now: float) -> BudgetState:
        return BudgetState(float(self.max_samples_per_minute), float(self.max_bytes_per_hour), now)

    def threshold_for(self, label: int | None) -> float:
        """The threshold an input predicted as ``label`` is held to."""
        if label is not None and 0 <= label < len(self.class_thresholds):
            return self.class_thresholds[label]
        return self.threshold

    def wants(self, confidence: float, u: float, label: int | None = None) -> Decision:
        """Step 1 and 2. ``u`` is a uniform random number in [0, 1) (the audit draw); ``label``: the
        predicted class, for per-class thresholds."""
        if not self.enabled:
            return Decision(False, "offload_disabled")
        if confidence < self.threshold_for(label):
            return Decision(True, "below_threshold")
        if u < self.audit_rate:
            return Decision(True, "audit")
        return Decision(False, "confident")

    def admit(self, state: BudgetState, now: float, nbytes: int) -> tuple[bool, str, BudgetState]:
        """Step 3: take one sample of ``nbytes`` from the budget, if it has room."""
        elapsed = max(0.0, now - state.at)
        samples, byts = state.samples, state.bytes
        if self.max_samples_per_minute:
            samples = min(float(self.max_samples_per_minute), samples + elapsed * self.max_samples_per_minute / 60.0)
        if self.max_bytes_per_hour:
            byts = min(float(self.max_bytes_per_hour), byts + elapsed * self.max_bytes_per_hour / 3600.0)
        refilled = replace(state, samples=samples, bytes=byts, at=now)
        if self.max_samples_per_minute and samples < 1.0:
            return False, "budget_samples", refilled
        if self.max_bytes_per_hour and byts < nbytes:
            return False, "budget_bytes", refilled
        return True, "", replace(refilled, samples=samples - 1.0 if self.max_samples_per_minute else samples,
                                 bytes=byts - nbytes if self.max_bytes_per_hour else byts)



@dataclass(frozen=True)
class OffloadPlan:
    send: bool
    #: why it is offloaded ("below_threshold", "audit"), or why not although it was wanted ("budget_samples",
    #: "budget_bytes"); None when the model was confident or offloading is off
    reason: str | None
    budget: BudgetState


def plan_offload(policy: OffloadPolicy, wants: Decision, budget: BudgetState, now: float,
                 payload_size: int) -> OffloadPlan:
    """Whether a sample the policy wants to offload fits the budget. No clock, RNG or I/O: the caller passes them."""
    if not wants.offload:
        return OffloadPlan(False, None, budget)
    if not policy.has_budget:
        return OffloadPlan(True, wants.reason, budget)
    ok, why, budget = policy.admit(budget, now, payload_size)
    return OffloadPlan(ok, wants.reason if ok else why, budget)
