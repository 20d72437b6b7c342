"""``edge-infer retrain`` refuses: corrections that teach nothing, too few of them, bad inputs (nothing written)."""
from __future__ import annotations

import json

import numpy as np
import pytest

from edge_infer import cli
from edge_infer.tools.archivefile import write_export
from edge_infer.tools.datasets import FMNIST_LABELS

from ..conftest import EDGE_CARD

pytestmark = pytest.mark.e2e


def export(path, images: np.ndarray, labels: np.ndarray, *, names=FMNIST_LABELS, device="dev-1") -> None:
    n = len(labels)
    write_export(path, {
        "images": images.astype(np.uint8), "cloud_label": labels.astype(np.int64),
        "cloud_confidence": np.full(n, 0.9, np.float32), "edge_label": labels.astype(np.int64),
        "edge_confidence": np.full(n, 0.5, np.float32), "model_id": np.full(n, "fmnist-edge:1.0.0"),
        "cloud_model_id": np.full(n, "fmnist-cloud:1.0.0"), "offload_reason": np.full(n, "below_threshold"),
        "sample_id": np.array([f"s{i}" for i in range(n)]), "created_at": np.arange(n, dtype=np.float64),
        "corrected_at": np.arange(n, dtype=np.float64)}, labels=names, device_id=device)


def retrain(*argv) -> int:
    return cli.main(["retrain", "--edge-card", str(EDGE_CARD), "--threshold", "0.9678", "--no-progress",
                     *map(str, argv)])


def test_random_corrections_are_not_made_into_a_model(tmp_path, fmnist, capsys):
    rng = np.random.default_rng(7)
    pick = rng.choice(len(fmnist["train"]), 800, replace=False)
    export(tmp_path / "a.npz", fmnist["train"].images[pick], rng.integers(0, 10, 800))
    out = tmp_path / "new"
    rc = retrain("--archive", tmp_path / "a.npz", "--out", out, "--report", tmp_path / "r.json")
    assert rc == 1 and not out.exists()
    assert "not accepted" in capsys.readouterr().err
    report = json.loads((tmp_path / "r.json").read_text())
    assert not report["decision"]["accepted"] and report["decision"]["why"]
    assert not list(tmp_path.glob(".retrain-*"))   # the staged folder is gone too


def test_duplicate_exports_count_once_and_too_few_samples_are_refused(tmp_path, fmnist, capsys):
    imgs, labels = fmnist["train"].images[:40], fmnist["train"].labels[:40]
    export(tmp_path / "a.npz", imgs, labels)
    export(tmp_path / "b.npz", imgs, labels)   # the same device collected twice
    assert retrain("--archive", tmp_path / "a.npz", tmp_path / "b.npz", "--out", tmp_path / "new") == 1
    assert "40 archived sample(s) are too few" in capsys.readouterr().err


def test_bad_inputs_exit_2(tmp_path, fmnist, capsys):
    export(tmp_path / "other.npz", fmnist["train"].images[:50], fmnist["train"].labels[:50],
           names=tuple(f"class {i}" for i in range(10)))
    assert retrain("--archive", tmp_path / "other.npz", "--out", tmp_path / "new") == 2
    assert "other labels" in capsys.readouterr().err
    (tmp_path / "exists").mkdir()
    assert retrain("--archive", tmp_path / "other.npz", "--out", tmp_path / "exists") == 2
    assert "exists" in capsys.readouterr().err
    (tmp_path / "junk.npz").write_bytes(b"junk")
    assert retrain("--archive", tmp_path / "junk.npz", "--out", tmp_path / "new") == 2
    assert "cannot read the archive export" in capsys.readouterr().err
