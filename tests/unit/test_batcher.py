"""The cloud worker's dynamic batching policy and queue, and its execution-provider choice."""
from __future__ import annotations

import threading
import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

from edge_infer_cloud.batcher import BatchPolicy, BatchQueue, batch_size_to_run, size_bucket
from edge_infer_cloud.model import ProviderError, session_providers


def test_a_lone_sample_runs_at_once_with_the_default_policy():
    assert batch_size_to_run(1, 0.0, BatchPolicy()) == 1


def test_a_backlog_makes_full_batches():
    assert batch_size_to_run(100, 0.0, BatchPolicy(max_batch_size=32)) == 32


def test_a_partial_batch_waits_out_the_queue_delay_unless_it_is_a_preferred_size():
    p = BatchPolicy(max_batch_size=32, max_queue_delay_us=2000, preferred_batch_sizes=(4, 8))
    assert batch_size_to_run(3, 100, p) == 0        # waits for more
    assert batch_size_to_run(3, 2000, p) == 3       # waited long enough
    assert batch_size_to_run(8, 100, p) == 8        # a preferred size runs at once
    assert batch_size_to_run(32, 0, p) == 32


@given(st.integers(0, 500), st.floats(0, 1e7), st.integers(1, 64), st.floats(0, 1e6))
def test_never_more_than_queued_or_the_maximum_and_never_stuck_past_the_delay(queued, waited, size, delay):
    p = BatchPolicy(max_batch_size=size, max_queue_delay_us=delay)
    n = batch_size_to_run(queued, waited, p)
    assert 0 <= n <= min(queued, size)
    if queued and waited >= delay:
        assert n == min(queued, size)


def test_policy_refuses_nonsense():
    for kw in ({"max_batch_size": 0}, {"max_queue_delay_us": -1}, {"max_batch_size": 4, "preferred_batch_sizes": (8,)}):
        with pytest.raises(ValueError):
            BatchPolicy(**kw)


def test_size_buckets_are_powers_of_two():
    assert [size_bucket(n) for n in (1, 2, 3, 4, 7, 8, 31, 32, 33)] == \
        ["1", "2-3", "2-3", "4-7", "4-7", "8-15", "16-31", "32-63", "32-63"]


def test_queue_hands_out_what_waits_and_a_late_batch_after_its_delay():
    q: BatchQueue[int] = BatchQueue(BatchPolicy(max_batch_size=4))
    assert q.take(timeout=0.01) == []
    for i in range(10):
        q.put(i)
    assert [q.take(0), q.take(0), q.take(0)] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    q = BatchQueue(BatchPolicy(max_batch_size=4, max_queue_delay_us=50_000))
    q.put(1)
    assert q.take(timeout=0.001) == []               # still inside its delay
    t0 = time.monotonic()
    assert q.take(timeout=1.0) == [1]                # released by the delay, not the timeout
    assert time.monotonic() - t0 < 0.5


def test_a_taker_wakes_when_an_item_arrives_and_when_closed():
    q: BatchQueue[str] = BatchQueue(BatchPolicy())
    got: list[list[str]] = []
    t = threading.Thread(target=lambda: got.append(q.take(timeout=5)))
    t.start()
    time.sleep(0.05)
    q.put("x")
    t.join(2)
    assert got == [["x"]]
    t = threading.Thread(target=lambda: got.append(q.take(timeout=5)))
    t.start()
    q.close()
    t.join(2)
    assert not t.is_alive() and got[-1] == []


def test_providers_keep_the_configured_order_and_end_with_the_cpu():
    avail = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    assert session_providers(["tensorrt", "cuda"], avail, 1) == [
        ("TensorrtExecutionProvider", {"device_id": 1}), ("CUDAExecutionProvider", {"device_id": 1}),
        "CPUExecutionProvider"]
    assert session_providers(["cpu"], avail) == ["CPUExecutionProvider"]
    assert session_providers(["tensorrt"], avail, 0, "/var/cache/trt") == [
        ("TensorrtExecutionProvider", {"device_id": 0, "trt_engine_cache_enable": True,
                                       "trt_engine_cache_path": "/var/cache/trt"}), "CPUExecutionProvider"]


def test_a_gpu_provider_this_build_lacks_is_an_error_not_a_silent_cpu_run():
    with pytest.raises(ProviderError, match="no cuda execution provider.*onnxruntime-gpu"):
        session_providers(["cuda"], ["CPUExecutionProvider"])
