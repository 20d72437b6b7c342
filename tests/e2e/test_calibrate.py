"""``edge-infer calibrate`` on the shipped models and data (run through its own parser)."""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from edge_infer.calibration.command import add_calibrate_arguments, run_calibrate
from edge_infer.modelcard import load_card
from edge_infer.preprocess import encode_png
from edge_infer.router import load_router
from edge_infer.scores import SCORES, ScoreParams, make_scorer
from edge_infer.tools.datasets import fashion_mnist_splits
from edge_infer.tools.runmodel import edge_logits

from ..conftest import CLOUD_CARD, EDGE_CARD, REPO

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

pytestmark = pytest.mark.e2e

CLOUD_PREDICTIONS = CLOUD_CARD.parent / "predictions.npz"
EDGE_PREDICTIONS = EDGE_CARD.parent / "predictions.npz"


def calibrate(*argv: str | Path) -> tuple[int, str, str]:
    p = argparse.ArgumentParser(prog="edge-infer calibrate")
    add_calibrate_arguments(p)
    args = p.parse_args([str(a) for a in argv])
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = run_calibrate(args)
    return rc, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("calibration")
    rc, stdout, stderr = calibrate("--edge-card", EDGE_CARD, "--cloud-predictions", CLOUD_PREDICTIONS,
                                   "--out", out, "--no-progress")
    return out, rc, stdout, stderr


def read_policy(path: Path) -> dict:
    return tomllib.loads(path.read_text())


def test_full_calibration_writes_the_snippet_the_report_and_the_plot(full_run):
    out, rc, stdout, stderr = full_run
    assert rc == 0, stdout + stderr
    policy = read_policy(out / "policy.toml")
    assert set(policy) == {"policy"}
    p = policy["policy"]
    report = json.loads((out / "calibration.json").read_text())
    per_class = report["class_thresholds"]
    assert per_class["score"] == p["score"] and per_class["note"]
    assert set(p) == ({"score", "threshold", "temperature", "router_file"} if p["score"] == "router"
                      else {"score", "threshold", "temperature"}) | ({"class_thresholds"} if per_class["chosen"]
                                                                       else set())
    assert report["guarantee"] is None                        # no --risk: the point estimate, as before
    assert p["score"] in SCORES and 0.0 < p["threshold"] <= 1.0 and p["temperature"] > 0
    assert report["sizes"] == {"val": 5000, "test": 10000}
    assert report["chosen"]["score"] == p["score"] and report["chosen"]["threshold"] == p["threshold"]
    assert set(report["scores"]) == set(SCORES)
    # the target is the cloud's validation accuracy, computed here from its shipped predictions
    z = np.load(CLOUD_PREDICTIONS)
    cloud_val = float((z["val_logits"].argmax(1) == z["val_labels"]).mean())
    assert report["target"]["kind"] == "cloud" and report["target"]["value"] == pytest.approx(cloud_val)
    for name, s in report["scores"].items():
        assert s["validation"]["accuracy"] >= cloud_val - 1e-9, name
        assert s["gap_test_minus_validation"]["accuracy"] == pytest.approx(
            s["test"]["accuracy"] - s["validation"]["accuracy"], abs=1e-5)
    # the chosen score keeps the most on validation among the reference and the scores that beat it
    # beyond noise (a gain inside the bootstrap interval does not justify a more complex score)
    kept = {k: s["validation"]["kept_share"] for k, s in report["scores"].items()
            if k == "max_softmax" or (s["validation_gain_vs_max_softmax"] or {}).get("significant")}
    assert kept[p["score"]] == max(kept.values())
    with Image.open(out / "offload_curve.png") as im:
        assert im.format == "PNG" and im.width >= 800 and im.height >= 300
    if p["score"] == "router":
        assert p["router_file"] == "router.json"    # relative to the config file's folder
        load_router(out / p["router_file"])
    else:
        assert not (out / "router.json").exists()
    assert "kept" in stdout and "wrote" in stdout


@pytest.mark.parametrize("pick", [None, "router"])
def test_the_snippet_is_a_device_config_policy(tmp_path, pick):
    """Pasted into a device config, with router.json beside it, the device's own loader accepts it."""
    from edge_infer.config import load_device_config
    out = tmp_path / "cal"
    args = ["--edge-card", EDGE_CARD, "--cloud-predictions", CLOUD_PREDICTIONS, "--limit", "1500", "--out", out,
            "--no-progress", "--no-plot"] + (["--pick", pick] if pick else [])
    rc, o, e = calibrate(*args)
    assert rc == 0, o + e
    etc = tmp_path / "etc"
    etc.mkdir()
    snippet = (out / "policy.toml").read_text()
    (etc / "edge-infer.toml").write_text(f'device_id = "cal"\nstate_dir = "{tmp_path / "state"}"\n'
                                         f'[model]\ncard = "{EDGE_CARD}"\n' + snippet)
    p = read_policy(out / "policy.toml")["policy"]
    if p["score"] == "router":
        (etc / "router.json").write_bytes((out / "router.json").read_bytes())
    cfg = load_device_config(etc / "edge-infer.toml")
    assert cfg.policy.score == p["score"] and cfg.policy.threshold == p["threshold"]
    assert cfg.policy.temperature == p["temperature"]
    if pick == "router":
        assert cfg.policy.router_file == etc / "router.json"
        router = load_router(cfg.policy.router_file)
        report = json.loads((out / "calibration.json").read_text())
        assert router.meta["trained_on"] == report["sizes"]["val"]


def test_the_edge_path_matches_the_reference_evaluation():
    card = load_card(EDGE_CARD)
    test = fashion_mnist_splits()["test"]
    ours = edge_logits(card, test.images[:2000], progress=False)
    ref = np.load(EDGE_PREDICTIONS)["test_logits"][:2000]
    np.testing.assert_allclose(ours, ref, atol=1e-5)


@pytest.mark.parametrize("score", SCORES)
def test_each_scores_test_numbers_are_what_the_device_interface_does_with_its_threshold(full_run, score):
    """The device takes (score, threshold, temperature, router) and make_scorer: it must reproduce the report."""
    out, rc, _, _ = full_run
    assert rc == 0
    report = json.loads((out / "calibration.json").read_text())
    s = report["scores"][score]
    router = None
    if score == "router":
        if not (out / "router.json").exists():   # written only when the router is chosen: refit the same way
            rc2, o, e = calibrate("--edge-card", EDGE_CARD, "--cloud-predictions", CLOUD_PREDICTIONS, "--out",
                                  out / "router-pick", "--no-progress", "--no-plot", "--pick", "router")
            assert rc2 == 0, o + e
            assert read_policy(out / "router-pick" / "policy.toml")["policy"]["threshold"] == \
                s["validation"]["threshold"]
            router = load_router(out / "router-pick" / "router.json")
        else:
            router = load_router(out / "router.json")
    f = make_scorer(score, ScoreParams(temperature=report["temperature"], router=router))
    e = np.load(EDGE_PREDICTIONS)
    c = np.load(CLOUD_PREDICTIONS)
    conf = f(e["test_logits"])
    off = conf < s["validation"]["threshold"]
    labels = e["test_labels"]
    hybrid = np.where(off, c["test_logits"].argmax(1), e["test_logits"].argmax(1))
    assert s["test"]["offloaded"] == int(off.sum())
    assert s["test"]["accuracy"] == pytest.approx(float((hybrid == labels).mean()), abs=1e-6)


def test_running_the_cloud_model_gives_the_same_answers_as_its_predictions_file(tmp_path):
    rc, out, err = calibrate("--edge-card", EDGE_CARD, "--cloud-card", CLOUD_CARD, "--limit", "800",
                             "--out", tmp_path, "--no-plot", "--no-progress", "--scores", "max_softmax,margin")
    assert rc == 0, out + err
    report = json.loads((tmp_path / "calibration.json").read_text())
    z = np.load(CLOUD_PREDICTIONS)
    for split in ("val", "test"):
        want = float((z[f"{split}_logits"][:800].argmax(1) == z[f"{split}_labels"][:800]).mean())
        assert report["cloud_only_accuracy"][split] == pytest.approx(want)
    assert report["sizes"] == {"val": 800, "test": 800}
    assert report["inputs"]["cloud"]["runtime"].startswith("onnxruntime")
    assert not (tmp_path / "offload_curve.png").exists()


def test_an_offload_budget_is_respected_on_validation(tmp_path):
    rc, out, err = calibrate("--edge-card", EDGE_CARD, "--cloud-predictions", CLOUD_PREDICTIONS, "--limit", "2000",
                             "--max-offload-share", "0.1", "--out", tmp_path, "--no-progress", "--no-plot")
    assert rc == 0, out + err
    report = json.loads((tmp_path / "calibration.json").read_text())
    assert report["target"]["kind"] == "max_offload_share"
    for s in report["scores"].values():
        assert s["validation"]["offloaded_share"] <= 0.1
    assert report["chosen"]["validation"]["offloaded_share"] <= 0.1
    assert (tmp_path / "policy.toml").exists()


def test_an_unreachable_accuracy_writes_the_report_but_no_snippet(tmp_path):
    (tmp_path / "policy.toml").write_text("stale")
    rc, _, err = calibrate("--edge-card", EDGE_CARD, "--cloud-predictions", CLOUD_PREDICTIONS, "--limit", "1000",
                           "--target-accuracy", "0.999", "--out", tmp_path, "--no-progress", "--no-plot")
    assert rc == 1
    assert "no score meets the target" in err and "Lower --target-accuracy" in err
    assert not (tmp_path / "policy.toml").exists()
    report = json.loads((tmp_path / "calibration.json").read_text())
    assert report["chosen"] is None and report["best_on_validation"] is None


def test_pick_writes_the_snippet_for_the_requested_score(tmp_path):
    rc, out, err = calibrate("--edge-card", EDGE_CARD, "--cloud-predictions", CLOUD_PREDICTIONS, "--limit", "1500",
                             "--pick", "router", "--out", tmp_path, "--no-progress", "--no-plot")
    assert rc == 0, out + err
    p = read_policy(tmp_path / "policy.toml")["policy"]
    assert p["score"] == "router" and p["router_file"] == "router.json"
    r = load_router(tmp_path / p["router_file"])
    assert r.num_classes == 10 and r.meta["trained_on"] == 1500 and r.meta["cross_fit_folds"] == 5


def write_class_folders(root: Path, images: np.ndarray, labels: np.ndarray, names: dict[int, str]) -> None:
    for i, (im, y) in enumerate(zip(images, labels)):
        d = root / names[int(y)]
        d.mkdir(parents=True, exist_ok=True)
        (d / f"{i:05d}.png").write_bytes(encode_png(im))


def test_class_folders_and_an_npz_test_set(tmp_path, fmnist):
    val = fmnist["val"]
    # folder names: a label's slug, the exact label, or the label index
    labels = load_card(EDGE_CARD).labels
    names = {i: (str(i) if i % 3 == 0 else labels[i] if i % 3 == 1 else labels[i].replace("/", "_").upper())
             for i in range(10)}
    assert "/" not in "".join(names.values())
    write_class_folders(tmp_path / "val", val.images[:600], val.labels[:600], names)
    test = fmnist["test"]
    np.savez(tmp_path / "test.npz", images=test.images[:500], labels=test.labels[:500])
    rc, out, err = calibrate("--edge-card", EDGE_CARD, "--cloud-card", CLOUD_CARD, "--data", tmp_path / "val",
                             "--test-data", tmp_path / "test.npz", "--out", tmp_path / "out", "--no-progress")
    assert rc == 0, out + err
    report = json.loads((tmp_path / "out" / "calibration.json").read_text())
    assert report["sizes"] == {"val": 600, "test": 500}
    assert report["inputs"]["data"]["validation"].startswith("class folders")
    # the folder images give the same edge accuracy as the arrays they were written from
    e = np.load(EDGE_PREDICTIONS)
    assert report["edge_only_accuracy"]["test"] == pytest.approx(
        float((e["test_logits"][:500].argmax(1) == e["test_labels"][:500]).mean()))
    assert (tmp_path / "out" / "offload_curve.png").exists()


@pytest.mark.parametrize("case", ["shuffled_predictions", "unknown_folder", "bad_score", "missing_card", "npy_rows",
                                  "cloud_labels"])
def test_errors_tell_the_user_what_to_do(tmp_path, case):
    args = ["--edge-card", EDGE_CARD, "--cloud-predictions", CLOUD_PREDICTIONS, "--out", tmp_path / "o",
            "--no-progress", "--no-plot", "--limit", "200"]
    if case == "shuffled_predictions":
        z = dict(np.load(CLOUD_PREDICTIONS))
        z["val_labels"] = np.roll(z["val_labels"], 1)
        np.savez(tmp_path / "p.npz", **z)
        args[3] = tmp_path / "p.npz"
        want = "other images or in another order"
    elif case == "unknown_folder":
        (tmp_path / "data" / "jackets").mkdir(parents=True)
        args += ["--data", tmp_path / "data"]
        want = "'jackets' is not a label of the edge card"
    elif case == "bad_score":
        args += ["--scores", "max_softmax,confidence"]
        want = "--scores: unknown confidence"
    elif case == "missing_card":
        args[1] = tmp_path / "nope.json"
        want = "not found"
    elif case == "cloud_labels":
        import shutil
        shutil.copytree(CLOUD_CARD.parent, tmp_path / "cloud")
        card = json.loads(CLOUD_CARD.read_text())
        card["labels"] = card["labels"][::-1]
        (tmp_path / "cloud" / "card.json").write_text(json.dumps(card))
        args[2:4] = ["--cloud-card", tmp_path / "cloud" / "card.json"]
        want = "the cloud card's labels differ from the edge card's"
    else:
        np.save(tmp_path / "p.npy", np.zeros(10, dtype=np.int64))
        args[3] = tmp_path / "p.npy"
        want = "10 rows, expected 15000"
    rc, out, err = calibrate(*args)
    assert rc == 2, out + err
    assert want in err and "Traceback" not in err


def test_runs_as_a_process(tmp_path):
    code = ("import argparse, sys; from edge_infer.calibration.command import add_calibrate_arguments, run_calibrate; "
            "p = argparse.ArgumentParser(); add_calibrate_arguments(p); sys.exit(run_calibrate(p.parse_args()))")
    p = subprocess.run([sys.executable, "-c", code, "--edge-card", str(EDGE_CARD), "--cloud-predictions",
                        str(CLOUD_PREDICTIONS), "--limit", "1000", "--out", str(tmp_path), "--no-progress"],
                       capture_output=True, text=True, timeout=300, cwd=REPO, check=False)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "calibrate took" in p.stdout and "edge val: 1000/1000" in p.stderr
    assert read_policy(tmp_path / "policy.toml")["policy"]["score"] in SCORES


# ----------------------------------------------------------------------------- --risk

def exact_lower_tail(k: int, n: int, p: Fraction) -> Fraction:
    return sum((Fraction(math.comb(n, j)) * p ** j * (1 - p) ** (n - j) for j in range(k + 1)), Fraction(0))


@pytest.fixture(scope="module")
def risk_runs(tmp_path_factory):
    """The same 3,000 validation images, with and without --risk (tolerance 0.5 pp)."""
    runs = {}
    for name, extra in (("point", []), ("risk", ["--risk", "0.05"])):
        out = tmp_path_factory.mktemp(f"cal-{name}")
        rc, o, e = calibrate("--edge-card", EDGE_CARD, "--cloud-predictions", CLOUD_PREDICTIONS, "--limit", "3000",
                             "--tolerance", "0.005", "--out", out, "--no-progress", "--no-plot", *extra)
        assert rc == 0, o + e
        runs[name] = (out, o, json.loads((out / "calibration.json").read_text()),
                      read_policy(out / "policy.toml")["policy"])
    return runs


def test_risk_certifies_a_threshold_more_conservative_than_the_point_estimate(risk_runs):
    _, _, point, p_point = risk_runs["point"]
    out, stdout, report, p = risk_runs["risk"]
    g = report["guarantee"]
    assert g["risk"] == 0.05 and g["candidates"] == ["max_softmax", "margin", "entropy"]
    assert g["level_per_score"] == pytest.approx(0.05 / 3) and g["exact"]
    assert "95% confidence" in g["statement"] and "the cloud's - 0.50 pp" in g["statement"]
    assert p["threshold"] == g["threshold"] == report["chosen"]["threshold"] and p["score"] in g["candidates"]
    assert "# guarantee: with 95% confidence" in (out / "policy.toml").read_text()
    s = report["scores"][p["score"]]
    assert s["point_estimate"]["validation"] == point["scores"][p["score"]]["validation"]
    assert s["validation"]["kept_share"] <= s["point_estimate"]["validation"]["kept_share"]
    assert report["chosen"]["validation"]["kept_share"] < point["chosen"]["validation"]["kept_share"]
    assert not report["class_thresholds"]["chosen"] and "not with --risk" in report["class_thresholds"]["note"]
    assert "guarantee (--risk 0.05)" in stdout and "the point estimate (no --risk) would keep" in stdout

    # the claim, checked from the shipped predictions with exact rational arithmetic: at the threshold,
    # the kept inputs the edge gets wrong and the cloud right are few enough that P(Bin(n, 0.005) <= k)
    # is at most the level
    e, c = np.load(EDGE_PREDICTIONS), np.load(CLOUD_PREDICTIONS)
    score = make_scorer(p["score"], ScoreParams(temperature=report["temperature"]))
    n = 3000
    kept = score(e["val_logits"][:n]) >= p["threshold"]
    labels = e["val_labels"][:n]
    fix = (e["val_logits"][:n].argmax(1) != labels) & (c["val_logits"][:n].argmax(1) == labels)
    k = int((kept & fix).sum())
    assert k == s["guarantee"]["losses_on_validation"]
    assert exact_lower_tail(k, n, Fraction(5, 1000)) <= Fraction(0.05) / 3
    # and what the device does with the threshold on test is the report's test point
    t_kept = score(e["test_logits"][:n]) >= p["threshold"]
    hybrid = np.where(t_kept, e["test_logits"][:n].argmax(1), c["test_logits"][:n].argmax(1))
    assert report["chosen"]["test"]["accuracy"] == pytest.approx(float((hybrid == e["test_labels"][:n]).mean()))
    assert g["test_hybrid_minus_cloud_accuracy"] == pytest.approx(
        report["chosen"]["test"]["accuracy"] - report["cloud_only_accuracy"]["test"], abs=1e-6)
    # what the device's audits should read: edge and cloud agreeing on the kept inputs
    agree = e["test_logits"][:n].argmax(1)[t_kept] == c["test_logits"][:n].argmax(1)[t_kept]
    assert report["chosen"]["kept_agreement"]["test"] == pytest.approx(float(agree.mean()))
    assert "expected audit_agreement" in stdout


def test_risk_without_a_tolerance_certifies_nothing_and_says_what_to_do(tmp_path):
    (tmp_path / "policy.toml").write_text("stale")
    rc, _, err = calibrate("--edge-card", EDGE_CARD, "--cloud-predictions", CLOUD_PREDICTIONS, "--limit", "1000",
                           "--risk", "0.05", "--out", tmp_path, "--no-progress", "--no-plot", "--scores",
                           "max_softmax")
    assert rc == 1
    assert "no threshold can be certified" in err and "--tolerance" in err and "Traceback" not in err
    assert not (tmp_path / "policy.toml").exists()
    report = json.loads((tmp_path / "calibration.json").read_text())
    assert report["chosen"] is None and report["scores"]["max_softmax"]["guarantee"]["certified"] is False


@pytest.mark.parametrize("extra,want", [
    (["--max-offload-share", "0.2"], "--risk applies to an accuracy target"),
    (["--tolerance", "0.005", "--class-thresholds", "on"], "cannot be combined with --risk"),
])
def test_risk_refuses_what_it_cannot_guarantee(tmp_path, extra, want):
    rc, out, err = calibrate("--edge-card", EDGE_CARD, "--cloud-predictions", CLOUD_PREDICTIONS, "--limit", "500",
                             "--risk", "0.05", "--out", tmp_path, "--no-progress", "--no-plot", "--scores",
                             "max_softmax", *extra)
    assert rc == 2, out + err
    assert want in err


# ----------------------------------------------------------------------------- per-class thresholds

def test_class_thresholds_on_writes_a_table_that_the_device_loads_and_applies(tmp_path):
    from edge_infer.config import load_device_config
    from edge_infer.policy import OffloadPolicy
    out = tmp_path / "cal"
    rc, o, e = calibrate("--edge-card", EDGE_CARD, "--cloud-predictions", CLOUD_PREDICTIONS, "--limit", "2000",
                         "--tolerance", "0.0025", "--class-thresholds", "on", "--scores", "max_softmax,margin",
                         "--pick", "max_softmax", "--out", out, "--no-progress", "--no-plot")
    assert rc == 0, o + e
    card = load_card(EDGE_CARD)
    p = read_policy(out / "policy.toml")["policy"]
    assert list(p["class_thresholds"]) == list(card.labels)
    report = json.loads((out / "calibration.json").read_text())
    pc = report["class_thresholds"]
    assert pc["chosen"] and "as requested" in pc["note"] and pc["thresholds"] == p["class_thresholds"]
    assert report["chosen"]["class_thresholds"] == p["class_thresholds"]
    assert "per-class thresholds on max_softmax" in o
    # pasted into a device config, the device's loader accepts it and holds each class to its threshold
    etc = tmp_path / "etc"
    etc.mkdir()
    (etc / "edge-infer.toml").write_text(f'device_id = "cal"\nstate_dir = "{tmp_path / "state"}"\n'
                                         f'[model]\ncard = "{EDGE_CARD}"\n' + (out / "policy.toml").read_text())
    cfg = load_device_config(etc / "edge-infer.toml")
    table = cfg.policy.class_thresholds.for_labels(card.labels, cfg.policy.threshold)
    assert table == tuple(p["class_thresholds"][x] for x in card.labels)
    policy = OffloadPolicy(cfg.policy.threshold, class_thresholds=table)
    ev, cp = np.load(EDGE_PREDICTIONS), np.load(CLOUD_PREDICTIONS)
    logits, labels = ev["test_logits"][:2000], ev["test_labels"][:2000]
    conf = make_scorer("max_softmax")(logits)
    pred = logits.argmax(1)
    off = np.array([policy.wants(float(x), 1.0, int(y)).offload for x, y in zip(conf, pred)])
    hybrid = np.where(off, cp["test_logits"][:2000].argmax(1), pred)
    assert report["chosen"]["test"]["offloaded"] == int(off.sum())
    assert report["chosen"]["test"]["accuracy"] == pytest.approx(float((hybrid == labels).mean()), abs=1e-6)
