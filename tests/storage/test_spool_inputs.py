"""Spool entries as they appear on real devices: links, FIFOs, directories, files still being written,
and the durability of the commit that precedes a move to done/."""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace

import pytest

from edge_infer.tools.localbroker import free_port
from edge_infer.preprocess import encode_png
from edge_infer.service import EdgeService

from ..conftest import device_toml, wait_for
from ..integration.helpers import device_config

pytestmark = pytest.mark.storage


@pytest.fixture
def spool_service(tmp_path):
    spool = tmp_path / "spool"
    cfg = device_config(tmp_path, free_port(), spool=spool)
    cfg = replace(cfg, spool=replace(cfg.spool, settle_s=1.0))
    svc = EdgeService(cfg)
    svc.start(connect=False)
    yield svc, spool
    svc.stop()


def test_links_fifos_and_directories_are_never_opened(tmp_path, spool_service, fmnist, caplog):
    svc, spool = spool_service
    secret = tmp_path / "outside.png"
    secret.write_bytes(encode_png(fmnist["test"].images[0]))
    os.symlink(secret, spool / "link.png")
    os.mkfifo(spool / "pipe.png")
    (spool / "subdir").mkdir()
    (spool / "subdir" / "inner.png").write_bytes(encode_png(fmnist["test"].images[1]))
    (spool / "ok.png").write_bytes(encode_png(fmnist["test"].images[2]))
    wait_for(lambda: (spool / "done" / "ok.png").exists() and (spool / "failed" / "pipe.png.error").exists()
             and (spool / "failed" / "link.png.error").exists(), what="spool handled every entry")
    time.sleep(0.3)   # a few more scans: nothing is reported twice
    assert (spool / "failed" / "link.png").is_symlink()           # the link moved, its target untouched
    assert secret.exists()
    assert "symbolic link" in (spool / "failed" / "link.png.error").read_text()
    assert "FIFO" in (spool / "failed" / "pipe.png.error").read_text()
    assert svc.counters.get("spool_rejected_not_regular") == 2
    assert svc.counters.get("spool_ignored_dirs") == 1
    assert (spool / "subdir" / "inner.png").exists()             # left alone
    assert sum("ignoring directory subdir" in r.getMessage() for r in caplog.records) == 1
    assert svc.flush() and [r.source for r in svc.store.all_results()] == ["ok.png"]


def test_a_file_still_being_written_is_read_once_it_is_complete(spool_service, fmnist):
    svc, spool = spool_service
    data = encode_png(fmnist["test"].images[3])
    with open(spool / "slow.png", "wb") as f:      # a producer writing in place, not renaming
        f.write(data[: len(data) // 2])
        f.flush()
        wait_for(lambda: svc.counters.get("spool_deferred_incomplete") >= 1, what="the partial file deferred")
        assert not (spool / "failed" / "slow.png").exists()
        f.write(data[len(data) // 2:])
    wait_for(lambda: (spool / "done" / "slow.png").exists(), what="the completed file classified")
    assert svc.flush() and len(svc.store.all_results()) == 1


def test_a_file_that_stays_broken_goes_to_failed_after_settling(spool_service):
    svc, spool = spool_service
    (spool / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    wait_for(lambda: (spool / "failed" / "bad.png.error").exists(), timeout=10, what="moved after settle_s")
    assert svc.counters.get("spool_rejected") == 1


@pytest.mark.skipif(shutil.which("strace") is None, reason="strace is installed by scripts/setup.sh dev")
def test_the_commit_before_a_move_to_done_is_synced_to_disk(tmp_path, fmnist):
    """A file in done/ means its result survives a power cut: the WAL is synced before the rename."""
    spool = tmp_path / "spool"
    spool.mkdir()
    cfg = device_toml(tmp_path, free_port(), spool=f'dir = "{spool}"\npoll_interval_s = 0.05')
    trace = tmp_path / "strace.log"
    proc = subprocess.Popen(["strace", "-f", "-y", "-qq", "-e", "trace=fsync,fdatasync,rename,renameat,renameat2",
                             "-o", str(trace), sys.executable, "-m", "edge_infer", "run", "--config", str(cfg)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        time.sleep(3)   # model loaded, store open, spool watched
        for i, im in enumerate(fmnist["test"].images[:100]):
            (spool / f".{i}.png").write_bytes(encode_png(im))
            os.rename(spool / f".{i}.png", spool / f"{i:03d}.png")
        wait_for(lambda: len(list((spool / "done").glob("*.png"))) == 100, timeout=60, what="spool drained")
    finally:
        # SIGTERM to the traced service (strace itself would only detach)
        children = open(f"/proc/{proc.pid}/task/{proc.pid}/children").read().split()
        for pid in children:
            os.kill(int(pid), signal.SIGTERM)
        proc.wait(timeout=30)
    events = []
    for line in trace.read_text().splitlines():
        if re.search(r"f(data)?sync\(\d+<[^>]*edge-infer\.db-wal>", line):
            events.append("sync")
        elif "rename" in line and "/done/" in line:
            events.append("move")
    moves = events.count("move")
    assert moves == 100, events[:20]
    # every move to done/ comes after a WAL sync, and each chunk's moves follow their own sync
    assert events[0] == "sync", events[:10]
    chunks = [e for i, e in enumerate(events) if e == "move" and events[i - 1] == "sync"]
    assert len(chunks) >= 100 // 32
