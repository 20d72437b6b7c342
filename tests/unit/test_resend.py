"""The adaptive resend wait (device/resend.py)."""
import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from edge_infer.resend import ResendPolicy, RoundTrips, resend_after

P = ResendPolicy(ceiling_s=120.0, floor_s=10.0)


def test_until_enough_round_trips_are_seen_the_configured_wait_holds():
    assert resend_after(np.full(P.min_samples - 1, 0.01), P) == 120.0


def test_fast_round_trips_give_the_floor_and_slow_ones_a_multiple_of_their_p99():
    assert resend_after(np.full(100, 0.02), P) == 10.0
    rt = np.r_[np.full(95, 1.0), np.full(5, 4.0)]     # p99 ~4 s: a worker with a backlog
    assert resend_after(rt, P) == 32.0
    assert resend_after(np.full(100, 60.0), P) == 120.0


@given(st.lists(st.floats(0, 1e4), min_size=0, max_size=300))
def test_always_within_floor_and_ceiling(values):
    w = resend_after(np.array(values), P)
    assert P.floor_s <= w <= P.ceiling_s


def test_round_trips_keep_only_the_latest():
    r = RoundTrips(size=4)
    for v in (1, 2, 3, 4, 5, -1):
        r.add(v)
    assert r.array().tolist() == [2, 3, 4, 5]
