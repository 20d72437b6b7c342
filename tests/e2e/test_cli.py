"""The command lines, run as real processes."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

from edge_infer.preprocess import encode_png

from ..conftest import CLOUD_CARD, EDGE_CARD, REPO, device_toml, unique, wait_for

pytestmark = pytest.mark.e2e


def run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout, cwd=REPO)


def test_demo_runs_the_whole_loop_on_real_models(tmp_path):
    out = tmp_path / "demo.json"
    p = run("-m", "edge_infer", "demo", "--images", "300", "--paced", "20", "--out", str(out), "--no-progress",
            timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    r = json.loads(out.read_text())
    assert r["images"] == 300
    assert r["offloaded"] > 0 and r["corrections_received"] == r["offloaded"]
    assert r["kept_on_device_share"] == pytest.approx(1 - r["offloaded"] / 300, abs=1e-4)
    assert r["hybrid_accuracy"] >= r["edge_only_accuracy"]
    assert r["correction_latency_ms"]["p50"] is not None
    paced = r["correction_latency_paced_ms"]
    assert paced["inputs"] == 20 and paced["p50"] is not None
    # an integrator subscribed to the results topic saw every final result (the paced inputs too)
    assert r["results_seen_by_subscriber"]["final"] == 300 + 20
    assert r["results_seen_by_subscriber"]["provisional"] == r["offloaded"] + 20
    assert "hybrid accuracy" in p.stdout and "kept on device" in p.stdout


def test_check_config_verdicts(tmp_path):
    good = device_toml(tmp_path, 1883)
    p = run("-m", "edge_infer", "check-config", str(good))
    assert p.returncode == 0 and "OK" in p.stdout
    bad = tmp_path / "bad.toml"
    bad.write_text(good.read_text().replace("[mqtt]\nport = 1883", "[mqtt]\nport = 1883\nprot = 1"))
    p = run("-m", "edge_infer", "check-config", str(bad))
    assert p.returncode == 2 and "unknown key 'mqtt.prot'" in p.stderr
    p = run("-m", "edge_infer_cloud", "check-config", str(REPO / "deploy" / "config" / "cloud-worker.toml"))
    assert p.returncode == 2 and "not found" in p.stderr   # the installed path does not exist here
    w = tmp_path / "w.toml"
    w.write_text(f'[model]\ncard = "{CLOUD_CARD}"\n')
    assert run("-m", "edge_infer_cloud", "check-config", str(w)).returncode == 0


def test_tampered_model_is_refused(tmp_path):
    import shutil
    d = tmp_path / "m"
    shutil.copytree(EDGE_CARD.parent, d)
    data = bytearray((d / "model.tflite").read_bytes())
    data[-1] ^= 0xFF
    (d / "model.tflite").write_bytes(bytes(data))
    cfg = device_toml(tmp_path, 1883)
    cfg.write_text(cfg.read_text().replace(str(EDGE_CARD), str(d / "card.json")))
    p = run("-m", "edge_infer", "check-config", str(cfg))
    assert p.returncode == 2 and "sha256" in p.stderr and "Reinstall" in p.stderr


def test_run_serves_the_spool_and_the_last_will_reports_a_crash(tmp_path, broker, recorder_factory, fmnist):
    spool = tmp_path / "spool"
    dev = unique("cli")
    cfg = device_toml(tmp_path, broker.port, device_id=dev, spool=f'dir = "{spool}"\npoll_interval_s = 0.05')
    status_topic, results_topic = f"edge-infer/{dev}/status", f"edge-infer/{dev}/results"
    rec = recorder_factory(status_topic, results_topic)
    proc = subprocess.Popen([sys.executable, "-m", "edge_infer", "run", "--config", str(cfg)],
                            stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: any(s["state"] == "online" for s in rec.json(status_topic)), what="online status")
        (spool / ".x").write_bytes(encode_png(fmnist["test"].images[0]))
        os.rename(spool / ".x", spool / "img.png")
        wait_for(lambda: (spool / "done" / "img.png").exists(), what="spool file classified")
        wait_for(lambda: any(r["source"] == "img.png" for r in rec.results(results_topic)), what="result published")
        st = run("-m", "edge_infer", "status", "--config", str(cfg))      # beside the running service
        assert st.returncode == 0, st.stderr
        report = json.loads(st.stdout)
        assert report["device"] == dev and report["results"] == 1 and report["results_unpublished"] == 0
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        # keepalive 30 s is too slow for a test; the broker notices the closed socket at once
        wait_for(lambda: rec.json(status_topic)[-1]["state"] == "offline", timeout=30, what="last will")
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def test_run_stops_cleanly_on_sigterm_and_reports_bad_config(tmp_path, broker, recorder_factory):
    dev = unique("cli")
    cfg = device_toml(tmp_path, broker.port, device_id=dev)
    rec = recorder_factory(f"edge-infer/{dev}/status")
    proc = subprocess.Popen([sys.executable, "-m", "edge_infer", "run", "--config", str(cfg)],
                            stderr=subprocess.PIPE, text=True)
    wait_for(lambda: any(s["state"] == "online" for s in rec.json(f"edge-infer/{dev}/status")))
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=20) == 0
    assert rec.json(f"edge-infer/{dev}/status")[-1]["state"] == "offline"

    bad = tmp_path / "bad.toml"
    bad.write_text(cfg.read_text().replace("[mqtt]", "[mqtt]\nport_number = 3"))
    p = run("-m", "edge_infer", "run", "--config", str(bad))
    assert p.returncode == 2 and "mqtt.port_number" in p.stderr


def test_classify_and_backends_commands(tmp_path, fmnist):
    img = tmp_path / "coat.png"
    img.write_bytes(encode_png(fmnist["test"].images[0]))
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    cfg = device_toml(tmp_path, 1883)
    p = run("-m", "edge_infer", "classify", "--config", str(cfg), str(img), str(bad))
    assert p.returncode == 1                          # one input failed
    lines = [json.loads(x) for x in p.stdout.splitlines()]
    assert lines[0]["source"] == str(img) and lines[0]["label"] == int(fmnist["test"].labels[0])
    assert 0 < lines[0]["confidence"] <= 1 and "would_offload" in lines[0]
    assert lines[1]["source"] == str(bad) and "not a decodable image" in lines[1]["error"]
    p = run("-m", "edge_infer", "backends")
    assert p.returncode == 0 and "tflite-cpu: ok (ai-edge-litert" in p.stdout
    p = run("-m", "edge_infer", "calibrate", "--help")    # a tool subcommand, loaded only when used
    assert p.returncode == 0 and "--edge-card" in p.stdout and "edge-infer calibrate" in p.stdout


def test_run_with_a_missing_model_exits_2_with_one_clear_line(tmp_path):
    cfg = device_toml(tmp_path, 1883)
    cfg.write_text(cfg.read_text().replace(str(EDGE_CARD), str(tmp_path / "nope" / "card.json")))
    p = run("-m", "edge_infer", "run", "--config", str(cfg))
    assert p.returncode == 2
    assert "model card" in p.stderr and "not found" in p.stderr and "Traceback" not in p.stderr


def _with_backend(cfg, card, backend: str, table: str = "") -> None:
    text = cfg.read_text().replace(f'card = "{EDGE_CARD}"', f'card = "{card}"\nbackend = "{backend}"')
    cfg.write_text(text + (f"[backend.{backend}]\n{table}\n" if table else ""))


def _without(tmp_path, module: str) -> dict:
    """An environment in which ``import module`` fails, as on a device without that runtime."""
    shadow = tmp_path / f"no-{module}" / module
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text(f"raise ImportError({f'No module named {module!r} (hidden by the test)'!r})\n")
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(shadow.parent),
                                                                      os.environ.get("PYTHONPATH")]))}


def test_check_config_and_run_refuse_an_unknown_backend_with_exit_2(tmp_path):
    cfg = device_toml(tmp_path, 1883)
    _with_backend(cfg, EDGE_CARD, "tflite-gpu")
    for command in (["check-config", str(cfg)], ["run", "--config", str(cfg)]):
        p = run("-m", "edge_infer", *command)
        assert p.returncode == 2, p.stderr
        assert "model.backend = 'tflite-gpu': unknown backend (did you mean 'tflite-cpu'?)" in p.stderr
        assert "Traceback" not in p.stderr


def test_check_config_refuses_a_backend_that_does_not_run_the_cards_format(tmp_path):
    cfg = device_toml(tmp_path, 1883)
    _with_backend(cfg, EDGE_CARD, "onnxruntime")
    p = run("-m", "edge_infer", "check-config", str(cfg))
    assert p.returncode == 2 and "backend onnxruntime runs onnx models" in p.stderr and "tflite-cpu" in p.stderr


def test_a_missing_runtime_stops_check_config_and_run_with_exit_2(tmp_path):
    cfg = device_toml(tmp_path, 1883)
    _with_backend(cfg, CLOUD_CARD, "onnxruntime", 'providers = ["CPUExecutionProvider"]')
    assert run("-m", "edge_infer", "check-config", str(cfg)).returncode == 0
    env = _without(tmp_path, "onnxruntime")
    for command in (["check-config", str(cfg)], ["run", "--config", str(cfg)]):
        p = subprocess.run([sys.executable, "-m", "edge_infer", *command], capture_output=True, text=True,
                           timeout=120, cwd=REPO, env=env)
        assert p.returncode == 2, p.stderr
        assert "onnxruntime is not installed" in p.stderr and "edge-infer[onnx]" in p.stderr
        assert "Traceback" not in p.stderr


def test_classify_with_the_onnxruntime_backend_answers_as_the_cloud_worker(tmp_path, fmnist):
    from edge_infer_cloud.model import CloudModel
    images = fmnist["test"].images[:20]
    files = []
    for i, im in enumerate(images):
        files.append(tmp_path / f"{i}.png")
        files[-1].write_bytes(encode_png(im))
    cfg = device_toml(tmp_path, 1883)
    _with_backend(cfg, CLOUD_CARD, "onnxruntime", "intra_op_threads = 1")
    p = run("-m", "edge_infer", "check-config", str(cfg))
    assert p.returncode == 0 and "on onnxruntime (onnxruntime " in p.stdout, p.stderr
    p = run("-m", "edge_infer", "classify", "--config", str(cfg), *map(str, files))
    assert p.returncode == 0, p.stderr
    labels = [json.loads(x)["label"] for x in p.stdout.splitlines()]
    assert labels == CloudModel(CLOUD_CARD).predict_fitted(images).tolist()
