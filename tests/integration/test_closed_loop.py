"""The closed loop on real parts: corrections archived on the device, exported, a retrained edge model,
and that model judged on a fresh stream through the loop again.

Real Mosquitto, the shipped cloud model in a real worker, the device service with the archive
on. The device sees a shifted stream: shirts (class 6, the edge model's worst class: 68.8%
on test) four times as frequent as in the data, drawn from the train split; the new model is
then compared with the old one on a disjoint shifted stream from the test split, each run by
a device service against the same worker.
"""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from edge_infer import cli
from edge_infer.config import load_device_config
from edge_infer.modelcard import load_card, verified_model_bytes
from edge_infer.preprocess import encode_png
from edge_infer.service import EdgeService
from edge_infer.tools.acceptance import paired_diff
from edge_infer.tools.runmodel import edge_logits

from ..conftest import EDGE_CARD, MODELS, device_toml, drained, unique, wait_for

pytestmark = pytest.mark.integration

THRESHOLD = 0.9678          # the shipped config's (chosen on validation by edge-infer calibrate)
SHIFTED_CLASS, SHIFT = 6, 4.0
STREAM = 3000
CLOUD_PREDICTIONS = MODELS / "fmnist-cloud-v1" / "predictions.npz"


def shifted(labels: np.ndarray, n: int, seed: int) -> np.ndarray:
    """n distinct indices, the shifted class SHIFT times as likely as each other class."""
    w = np.where(labels == SHIFTED_CLASS, SHIFT, 1.0)
    return np.random.default_rng(seed).choice(len(labels), n, replace=False, p=w / w.sum())


def stream(svc: EdgeService, images: np.ndarray) -> list:
    sent = [svc.classify(im) for im in images]
    svc.flush()   # stored first: until the writer has committed them, the outbox looks drained
    wait_for(lambda: drained(svc.store), timeout=60, what="every offloaded sample corrected")
    return [svc.result(r.sample_id) for r in sent]


def figures(results: list, truth: np.ndarray) -> dict[str, np.ndarray]:
    return {"kept": np.array([not r.offloaded for r in results]),
            "edge_ok": np.array([r.edge_label == y for r, y in zip(results, truth)]),
            "hybrid_ok": np.array([r.label == y for r, y in zip(results, truth)])}


def test_archived_corrections_make_an_edge_model_that_keeps_more_of_a_shifted_stream(tmp_path, broker, worker,
                                                                                        fmnist):
    toml = device_toml(tmp_path, broker.port, policy=f"threshold = {THRESHOLD}",
                       archive="enabled = true\nmax_items = 5000")
    cfg = load_device_config(toml)
    train, test = fmnist["train"], fmnist["test"]

    # 1. the device archives what it offloaded, with the cloud's corrections
    svc = EdgeService(cfg)
    svc.start()
    try:
        wait_for(svc.link.connected.is_set, what="device connected")
        idx = shifted(train.labels, STREAM, seed=16)
        stream(svc, train.images[idx])
        corrected = svc.counters.get("corrected")
        assert corrected > 500, "the shifted stream should offload many inputs at the shipped threshold"
        wait_for(lambda: svc.archive.totals().items == corrected, timeout=10, what="every correction archived")
        assert svc.status()["archive"]["items"] == corrected
        export = tmp_path / "dev1.npz"
        assert cli.main(["archive", "export", "--config", str(toml), "--out", str(export)]) == 0   # while it runs
    finally:
        svc.stop()
    with np.load(export, allow_pickle=False) as z:
        assert len(z["cloud_label"]) == corrected and z["images"].shape == (corrected, 28, 28)
        assert (z["offload_reason"] == "below_threshold").all() and (z["edge_confidence"] < THRESHOLD).all()
        assert str(z["device_id"]) == cfg.device_id

    # 2. retrain: accepted, a new version with its card, ready for the model-update playbook
    new_dir = tmp_path / "fmnist-edge-v1.1"
    report_file = tmp_path / "retrain.json"
    rc = cli.main(["retrain", "--edge-card", str(EDGE_CARD), "--archive", str(export), "--out", str(new_dir),
                   "--threshold", str(THRESHOLD), "--cloud-predictions", str(CLOUD_PREDICTIONS), "--no-progress",
                   "--report", str(report_file)])
    report = json.loads(report_file.read_text())
    assert rc == 0, report["decision"]["why"]
    new_card = load_card(new_dir / "card.json")
    verified_model_bytes(new_card)
    old_card = load_card(EDGE_CARD)
    assert new_card.version == "1.1.0" and new_card.labels == old_card.labels
    assert new_card.input == old_card.input and new_card.output == old_card.output
    card_json = json.loads((new_dir / "card.json").read_text())
    assert card_json["training"]["method"] == "head fine-tune from the hard-example archive"
    assert card_json["training"]["archive"]["samples"] == corrected
    assert card_json["metrics"]["test_accuracy"] > 0.89
    assert report["health_probe"]["offloaded_by_new"], "the rollout's health gate needs its probe offloaded"

    # 3. a fresh shifted stream (the test split: no image of it was trained or judged on), old and new model
    #    each on a device service against the same worker, at the same threshold
    held = shifted(test.labels, STREAM, seed=61)
    measured = {}
    for name, card in (("old", EDGE_CARD), ("new", new_dir / "card.json")):
        c = dataclasses.replace(cfg, device_id=unique(name), state_dir=tmp_path / f"state-{name}",
                                model=dataclasses.replace(cfg.model, card=card),
                                archive=dataclasses.replace(cfg.archive, enabled=False))
        with EdgeService(c) as s:
            wait_for(s.link.connected.is_set, what="device connected")
            measured[name] = figures(stream(s, test.images[held]), test.labels[held])
    old, new = measured["old"], measured["new"]
    kept = paired_diff(old["kept"], new["kept"])
    hybrid = paired_diff(old["hybrid_ok"], new["hybrid_ok"])
    edge = paired_diff(old["edge_ok"], new["edge_ok"])

    # the whole original test split, unshifted (the models as the device runs them; the cloud's shipped answers)
    with np.load(CLOUD_PREDICTIONS) as z:
        cloud_ok = z["test_logits"].argmax(1) == test.labels
    full = {}
    for name, card in (("old", old_card), ("new", new_card)):
        logits = edge_logits(card, test.images, progress=False)
        p = np.exp(logits - logits.max(1, keepdims=True))
        k = p.max(1) / p.sum(1) >= THRESHOLD
        e = logits.argmax(1) == test.labels
        full[name] = {"kept": k, "edge_ok": e, "hybrid_ok": np.where(k, e, cloud_ok)}
    full_kept = paired_diff(full["old"]["kept"], full["new"]["kept"])
    full_hybrid = paired_diff(full["old"]["hybrid_ok"], full["new"]["hybrid_ok"])
    print(json.dumps({"archive": corrected, "shifted_test_stream": {
        "kept": kept.to_dict(), "hybrid_accuracy": hybrid.to_dict(), "edge_accuracy": edge.to_dict()},
        "test_split": {"kept": full_kept.to_dict(), "hybrid_accuracy": full_hybrid.to_dict(),
                       "edge_accuracy": paired_diff(full["old"]["edge_ok"], full["new"]["edge_ok"]).to_dict()}},
        indent=1))

    # More inputs kept at the same threshold: by at least 3 points, where only the inputs whose decision
    # changed count (an exact McNemar test: chance cannot produce this many more gained than lost) ...
    assert kept.diff >= 0.03 and kept.p_better < 1e-6, kept
    # ... and the answers are not worse for it: hybrid accuracy's lower 95% bound within half a point
    assert hybrid.low >= -0.005, hybrid
    assert edge.low >= -0.01, edge
    # on the original distribution it does not keep less, nor answer worse beyond noise
    assert full_kept.low >= -0.005 and full_hybrid.low >= -0.005, (full_kept, full_hybrid)


def test_the_archive_is_off_unless_enabled_and_exports_the_bytes_as_sent(tmp_path, broker, worker, fmnist, caplog):
    images = fmnist["test"].images[:30]
    for d in ("off", "on"):
        (tmp_path / d).mkdir()
    off = load_device_config(device_toml(tmp_path / "off", broker.port, policy="threshold = 1.0"))
    with EdgeService(off) as svc:   # threshold 1.0: everything is offloaded and corrected
        wait_for(svc.link.connected.is_set, what="device connected")
        stream(svc, images)
        assert svc.counters.get("corrected") == 30 and svc.archive is None and "archive" not in svc.status()
    assert not off.archive_path.exists()

    toml = device_toml(tmp_path / "on", broker.port, policy="threshold = 1.0", archive="enabled = true")
    cfg = load_device_config(toml)
    pngs = [encode_png(im) for im in images]
    with EdgeService(cfg) as svc:
        wait_for(svc.link.connected.is_set, what="device connected")
        results = stream(svc, pngs)
        wait_for(lambda: svc.archive.totals().items == 30, timeout=10, what="archived")
    out = tmp_path / "export.npz"
    assert cli.main(["archive", "export", "--config", str(toml), "--out", str(out), "--originals"]) == 0
    assert (out.stat().st_mode & 0o777) == 0o600
    with np.load(out, allow_pickle=False) as z:
        order = [list(z["sample_id"]).index(r.sample_id) for r in results]
        offsets = z["payload_offsets"]
        assert [z["payload"][offsets[i]:offsets[i + 1]].tobytes() for i in order] == pngs
        assert (z["content_type"] == "image/png").all()
        assert np.array_equal(z["images"][order], images)
        assert z["cloud_label"][order].tolist() == [r.label for r in results]
        assert z["edge_label"][order].tolist() == [r.edge_label for r in results]
    assert cli.main(["archive", "wipe", "--config", str(toml)]) == 2          # asks for --yes
    assert cli.main(["archive", "wipe", "--config", str(toml), "--yes"]) == 0
    assert cli.main(["archive", "export", "--config", str(toml), "--out", str(out)]) == 0
    with np.load(out, allow_pickle=False) as z:
        assert z["images"].shape == (0, 28, 28)
    # turned off with the file left: the start says how to export or wipe it, and leaves it alone
    with EdgeService(dataclasses.replace(cfg, archive=dataclasses.replace(cfg.archive, enabled=False))):
        pass
    assert "archive is disabled but" in caplog.text and "edge-infer archive wipe --yes" in caplog.text
    assert cfg.archive_path.exists()
