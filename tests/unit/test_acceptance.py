"""The acceptance rule of `edge-infer retrain` (device/tools/acceptance.py, retrain.acceptance_criteria): pure."""
from __future__ import annotations

from math import comb

import numpy as np
import pytest

from edge_infer.tools.acceptance import (Criterion, binomial_sf, clopper_pearson, decide, judge, paired_diff)
from edge_infer.tools.retrain import Settings, acceptance_criteria, bump_version, outcomes, split_archive


def pair(n: int, gained: int, lost: int, both: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Paired outcomes: ``gained`` inputs only the new model has, ``lost`` only the old one, ``both`` both."""
    old, new = np.zeros(n, bool), np.zeros(n, bool)
    new[:gained] = True
    old[gained:gained + lost] = True
    old[gained + lost:gained + lost + both] = new[gained + lost:gained + lost + both] = True
    return old, new


def test_binomial_tail_is_exact():
    for n, k, p in ((27, 19, 0.5), (10, 0, 0.3), (10, 11, 0.3), (50, 20, 0.37), (1, 1, 0.5)):
        want = sum(comb(n, j) * p ** j * (1 - p) ** (n - j) for j in range(k, n + 1))
        assert binomial_sf(k, n, p) == pytest.approx(want, rel=1e-9, abs=1e-15)


def test_clopper_pearson_bounds():
    assert clopper_pearson(5, 20, 0.025) == pytest.approx((0.0866, 0.4910), abs=1e-4)   # textbook 95% interval
    assert clopper_pearson(0, 10, 0.05) == pytest.approx((0.0, 1 - 0.05 ** 0.1))
    assert clopper_pearson(10, 10, 0.05) == pytest.approx((0.05 ** 0.1, 1.0))
    assert clopper_pearson(0, 0, 0.05) == (0.0, 1.0)


def test_paired_difference_counts_only_the_inputs_that_changed():
    old, new = pair(1000, gained=30, lost=10, both=500)
    d = paired_diff(old, new)
    assert (d.gained, d.lost, d.n) == (30, 10, 1000)
    assert d.diff == pytest.approx(0.02) and d.low < 0.02 < d.high
    assert d.p_better == pytest.approx(sum(comb(40, j) for j in range(30, 41)) / 2 ** 40)
    same = paired_diff(*pair(1000, 0, 0, both=700))
    assert (same.diff, same.low, same.high, same.p_better) == (0.0, 0.0, 0.0, 1.0)
    with pytest.raises(ValueError):
        paired_diff(np.ones(3, bool), np.ones(4, bool))


def test_better_needs_more_than_noise():
    assert not judge(Criterion("x", *pair(400, 3, 1), "better")).passed             # p = 0.31
    assert not judge(Criterion("x", *pair(400, 19, 15), "better")).passed           # more, but p = 0.30
    assert judge(Criterion("x", *pair(400, 19, 8), "better")).passed                # p = 0.026
    assert not judge(Criterion("x", *pair(400, 8, 19), "better")).passed            # significant the wrong way


def test_not_worse_is_judged_by_the_lower_bound_against_the_tolerance():
    assert judge(Criterion("x", *pair(5000, 2, 4, both=4700), "not_worse", 0.005)).passed
    assert not judge(Criterion("x", *pair(5000, 2, 40, both=4700), "not_worse", 0.005)).passed
    # on a small set even an equal score is not "not worse" at a tight tolerance: the bound says how sure
    assert not judge(Criterion("x", *pair(50, 5, 5, both=30), "not_worse", 0.01)).passed
    assert judge(Criterion("x", *pair(50, 5, 5, both=30), "not_worse", 0.3)).passed


def test_decision_accepts_only_when_every_check_holds_and_one_is_a_gain():
    gain = Criterion("kept", *pair(400, 40, 0), "better")
    fine = Criterion("acc", *pair(5000, 2, 4, both=4000), "not_worse", 0.005)
    worse = Criterion("acc", *pair(5000, 2, 60, both=4000), "not_worse", 0.005)
    assert decide([gain, fine]).accepted
    d = decide([gain, worse])
    assert not d.accepted and [c.name for c in d.failed] == ["acc"] and "WORSE" in d.failed[0].says()
    with pytest.raises(ValueError, match="better"):
        decide([fine])


def test_outcomes_at_a_threshold():
    logits = np.log(np.array([[0.98, 0.01, 0.01], [0.6, 0.3, 0.1], [0.05, 0.9, 0.05]]))
    truth = np.array([0, 1, 0])
    o = outcomes(logits, truth, 0.95, cloud_ok=np.array([True, True, False]))
    assert o.kept.tolist() == [True, False, False] and o.edge_ok.tolist() == [True, False, False]
    assert o.hybrid_ok.tolist() == [True, True, False]
    # without the cloud's correctness (the archive: the truth is the cloud's answer) an offloaded input counts right
    assert outcomes(logits, truth, 0.5, None).hybrid_ok.tolist() == [True, False, False]


def _outcomes(kept, ok):
    from edge_infer.tools.retrain import Outcomes
    kept, ok = np.asarray(kept, bool), np.asarray(ok, bool)
    return Outcomes(kept, ok, np.where(kept, ok, True))


def test_a_model_that_merely_keeps_everything_is_refused():
    """Keeping more of the archived traffic is the gain only while what is kept agrees with the cloud."""
    n = 400
    old = {"held_out": _outcomes(np.zeros(n), np.r_[np.ones(300), np.zeros(100)]),
           "val": _outcomes(np.r_[np.ones(3000), np.zeros(2000)], np.ones(5000))}
    reckless = {"held_out": _outcomes(np.ones(n), np.r_[np.ones(300), np.zeros(100)]),   # keeps its 100 errors
                "val": old["val"]}
    s = Settings(threshold=0.9)
    d = decide(acceptance_criteria(old, reckless, np.zeros(n, bool), s, "hybrid accuracy"))
    assert not d.accepted and [c.name for c in d.failed] == ["held-out archive: hybrid answer = the cloud's"]
    careful = {"held_out": _outcomes(np.r_[np.ones(100), np.zeros(300)], np.r_[np.ones(300), np.zeros(100)]),
               "val": old["val"]}
    assert decide(acceptance_criteria(old, careful, np.zeros(n, bool), s, "hybrid accuracy")).accepted


def test_audited_inputs_must_not_be_offloaded_more():
    n = 400
    audit = np.r_[np.zeros(300, bool), np.ones(100, bool)]   # the last 100 were confident, audited
    old = {"held_out": _outcomes(audit, np.ones(n)), "val": _outcomes(np.ones(5000), np.ones(5000))}
    moved = {"held_out": _outcomes(np.r_[np.ones(60), np.zeros(240), np.zeros(100)], np.ones(n)),   # doubt moved
             "val": old["val"]}
    d = decide(acceptance_criteria(old, moved, audit, Settings(threshold=0.9), "hybrid accuracy"))
    assert not d.accepted and [c.name for c in d.failed] == ["held-out archive (audited, confident): kept on the device"]


def test_split_and_version():
    train, held = split_archive(100, 0.3, seed=1)
    assert len(held) == 30 and len(train) == 70 and not set(train) & set(held)
    assert np.array_equal(split_archive(100, 0.3, seed=1)[1], held)
    assert bump_version("1.0.0") == "1.1.0" and bump_version("2.9") == "2.10" and bump_version("v1") == "v1.1"
