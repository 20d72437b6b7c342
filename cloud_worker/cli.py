"""``edge-infer-cloud-worker``: run the large model on offloaded samples."""
from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
from pathlib import Path

from edge_infer.errors import EdgeInferError
from edge_infer.identity import check_tls_identity, worker_cn
from edge_infer.tomlcfg import ConfigError

log = logging.getLogger("edge_infer_cloud")


def cmd_run(args: argparse.Namespace) -> int:
    from edge_infer.logsetup import setup_logging

    from .config import load_worker_config
    from .worker import CloudWorker
    try:
        cfg = load_worker_config(args.config)
    except ConfigError as exc:
        setup_logging(identifier="edge-infer-cloud-worker")
        log.error("invalid configuration %s: %s", args.config, exc)
        return 2
    if args.worker_id:
        from dataclasses import replace
        cfg = replace(cfg, worker=replace(cfg.worker, id=args.worker_id))
    setup_logging(cfg.log_level, identifier="edge-infer-cloud-worker")
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    if cfg.worker.switch_interval_us:
        # Process-wide, so set here where the process starts. Each time the model thread comes
        # back from onnxruntime it needs the GIL, and with Python's 5 ms interval it waited up to
        # that long behind the intake and reply threads: a worker's GIL, not its model, was then
        # the limit under a backlog (bench/fleet_sim.py compares the two).
        sys.setswitchinterval(cfg.worker.switch_interval_us / 1e6)
    worker = CloudWorker(cfg)
    try:
        # The broker names the worker by its certificate's CN (worker:<id>) and its ACL grants the
        # status topic of that id only: refuse to run with another worker's certificate (exit 2).
        check_tls_identity(cfg.mqtt.tls, worker_cn(worker.worker_id), setting="[worker] id (or --worker-id)")
        worker.start()
    except EdgeInferError as exc:
        log.error("cannot start: %s", exc)   # exit 2 where the operator must act: no restart loop
        return exc.exit_code
    except Exception as exc:
        log.error("cannot start: %s", exc)
        return 1
    try:
        stop.wait()
    finally:
        worker.stop()
    return 0


def cmd_check_config(args: argparse.Namespace) -> int:
    from edge_infer.modelcard import load_card, verified_model_bytes

    from .config import load_worker_config
    try:
        cfg = load_worker_config(args.config)
        card = load_card(cfg.model.card)
        verified_model_bytes(card)
        if cfg.metrics.enabled:
            from edge_infer.metrics import require_prometheus
            require_prometheus()   # what the start refuses, refused here first
    except EdgeInferError as exc:
        print(f"{args.config}: INVALID: {exc}", file=sys.stderr)
        return exc.exit_code
    print(f"{args.config}: OK (model {card.model_id}, group {cfg.worker.group}, broker {cfg.mqtt.host}:{cfg.mqtt.port})")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    """Accuracy of the cloud model on a labelled set (the demo's cloud-only figure)."""
    import time

    from edge_infer.tools.datasets import DEFAULT_FMNIST_DIR, fashion_mnist_splits, load_npz

    from .model import CloudModel
    model = CloudModel(args.card)
    if args.photos:
        return _evaluate_photos(model, Path(args.photos))
    if args.npz:
        data = load_npz(args.npz)
    else:
        data = fashion_mnist_splits(args.data or DEFAULT_FMNIST_DIR)[args.split]
    if args.limit:
        data = data.subset(slice(0, args.limit))
    t0 = time.perf_counter()
    pred = model.predict_fitted(data.images)
    seconds = time.perf_counter() - t0
    acc = float((pred == data.labels).mean()) if len(data) else 0.0
    out = {"model": model.card.model_id, "runtime": model.runtime, "images": len(data), "accuracy": acc,
           "images_per_s": len(data) / seconds if seconds else None}
    if args.predictions:
        import numpy as np
        np.save(args.predictions, pred)
        out["predictions"] = args.predictions
    print(json.dumps(out))
    return 0


def _evaluate_photos(model, folder: Path) -> int:
    """Each photo's label and confidence, decoded and preprocessed as a sample would be."""
    from edge_infer.preprocess import ImageError, decode_image
    from edge_infer.tools.photos import list_photos
    photos = list_photos(folder, model.card.labels)
    rows = []
    for photo in photos:
        try:
            pixels = decode_image(photo.path.read_bytes()).pixels
        except (OSError, ImageError) as exc:
            rows.append({"file": str(photo.path), "error": str(exc)})
            continue
        labels, confs = model.predict([pixels])
        rows.append({"file": str(photo.path), "truth": photo.label, "label": int(labels[0]),
                     "label_name": model.card.labels[int(labels[0])], "confidence": round(float(confs[0]), 4)})
    scored = [r for r in rows if r.get("truth") is not None]
    acc = sum(r["label"] == r["truth"] for r in scored) / len(scored) if scored else None
    print(json.dumps({"model": model.card.model_id, "runtime": model.runtime, "images": len(rows),
                      "scored": len(scored), "accuracy": acc, "photos": rows}))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="edge-infer-cloud-worker", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="run a worker")
    r.add_argument("--config", "-c", default="/etc/edge-infer/cloud-worker.toml")
    r.add_argument("--worker-id", default="", help="overrides [worker] id (systemd passes the instance name)")
    r.set_defaults(func=cmd_run)
    c = sub.add_parser("check-config", help="validate a worker config and its model")
    c.add_argument("config")
    c.set_defaults(func=cmd_check_config)
    e = sub.add_parser("evaluate", help="accuracy of the cloud model on a labelled set")
    e.add_argument("--card", required=True)
    e.add_argument("--data", help="Fashion-MNIST IDX folder (default: the Debian package's)")
    e.add_argument("--split", default="test", choices=["train", "val", "test"])
    e.add_argument("--npz", help="an .npz with 'images' and 'labels' instead")
    e.add_argument("--photos", help="a folder of photos instead (edge_infer.tools.photos: labels from foolbox-style "
                                    "names or class folders); prints each photo's label")
    e.add_argument("--limit", type=int, default=0)
    e.add_argument("--predictions", help="write the predicted labels here (.npy)")
    e.set_defaults(func=cmd_evaluate)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
