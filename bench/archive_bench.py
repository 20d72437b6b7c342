#!/usr/bin/env python3
"""Hard-example archive at scale: does what the archive holds slow its writes? In one run.

    .venv/bin/python bench/archive_bench.py [--items 100000] [--beyond 20000] [--batch 32] [--repeats 3]

An archive (device/archive.py, the file the link worker writes on each correction) is filled
from empty to --items samples (Fashion-MNIST-sized PNG payloads, ~530 bytes) with its
bound set to --items, then --beyond more are written, so each flush also evicts the
oldest rows. The cost of a flush of --batch samples is timed per band of the fill
(the first 10%, the middle, the last 10% before the bound, and past the bound, evicting),
min/median/max over --repeats runs, with two ratios: last 10% / first 10% (goal: about 1,
i.e. per-insert cost does not grow with what is stored) and past the bound / first 10%
(the eviction's own price: one delete per insert, a constant). Then a full export read
(read_archive) of the --items samples.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from edge_infer.archive import ArchivedSample, HardExampleArchive, read_archive  # noqa: E402
from edge_infer.preprocess import encode_png  # noqa: E402
from edge_infer.tools.datasets import load_fashion_mnist  # noqa: E402


def samples(payloads: list[bytes], start: int, n: int) -> list[ArchivedSample]:
    now = time.time()
    return [ArchivedSample(f"s{i:08d}", now, now - 5, now, "fmnist-edge:1.0.0", i % 10, 0.6, (i + 1) % 10, 0.97,
                           "fmnist-cloud:1.0.0", "low_confidence", "image/png", payloads[i % len(payloads)])
            for i in range(start, start + n)]


def one_run(tmp: Path, payloads: list[bytes], items: int, beyond: int, batch: int) -> dict[str, list[float]]:
    """us per sample of each flush, by band of the fill."""
    arch = HardExampleArchive(tmp / "archive.db", max_items=items, max_bytes=1 << 40)
    arch.open()
    bands: dict[str, list[float]] = {"first 10%": [], "middle 10%": [], "last 10%": [], "past the bound": []}
    try:
        for start in range(0, items + beyond, batch):
            n = min(batch, items + beyond - start)
            for s in samples(payloads, start, n):
                arch.put(s)
            t0 = time.perf_counter()
            arch.flush()
            us = (time.perf_counter() - t0) / n * 1e6
            if start < items * 0.1:
                bands["first 10%"].append(us)
            elif items * 0.45 <= start < items * 0.55:
                bands["middle 10%"].append(us)
            elif items * 0.9 <= start < items:
                bands["last 10%"].append(us)
            elif start >= items:
                bands["past the bound"].append(us)
        held = arch.totals()
    finally:
        arch.close()
    assert held.items == items, f"the archive holds {held.items}, its bound is {items}"
    t0 = time.perf_counter()
    read = sum(1 for _ in read_archive(tmp / "archive.db"))
    bands["export read"] = [(time.perf_counter() - t0) / read * 1e6]
    bands["file MB"] = [(tmp / "archive.db").stat().st_size / 1e6]
    return bands


def mmm(xs: list[float]) -> str:
    return f"{min(xs):7.1f} / {statistics.median(xs):7.1f} / {max(xs):7.1f}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--items", type=int, default=100_000, help="the archive's bound (archive.max_items)")
    ap.add_argument("--beyond", type=int, default=20_000, help="samples written past the bound (evicting)")
    ap.add_argument("--batch", type=int, default=32, help="samples per flush")
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    images = load_fashion_mnist("t10k").images[:500]
    payloads = [encode_png(im) for im in images]
    print(f"archive bound {a.items:,} items, {a.beyond:,} more written past it, flushes of {a.batch}, "
          f"payloads {np.mean([len(p) for p in payloads]):.0f} B; {a.repeats} runs", flush=True)
    runs = []
    for r in range(a.repeats):
        with tempfile.TemporaryDirectory(prefix="archive-bench-") as d:
            t0 = time.monotonic()
            runs.append(one_run(Path(d), payloads, a.items, a.beyond, a.batch))
            print(f"run {r + 1}: {time.monotonic() - t0:.0f} s", flush=True)
    print(f"{'flush cost, us per sample':<28} {'min / median / max of the runs medians':>40}")
    medians = {k: [statistics.median(run[k]) for run in runs] for k in runs[0]}
    for k, v in medians.items():
        if k in ("export read", "file MB"):
            continue
        print(f"{k:<28} {mmm(v):>40}")
    for band in ("last 10%", "past the bound"):
        ratio = [x / first for x, first in zip(medians[band], medians["first 10%"])]
        print(f"{band + ' / first 10%':<28} {mmm(ratio):>40}  (x)")
    print(f"{'export read, us per sample':<28} {mmm(medians['export read']):>40}")
    print(f"{'archive file, MB':<28} {mmm(medians['file MB']):>40}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
