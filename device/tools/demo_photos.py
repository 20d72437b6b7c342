"""``edge-infer demo --models imagenet``: the whole loop on photos, with the EfficientNet-Lite pair.

The same local loop as the Fashion-MNIST demo (a local Mosquitto, a cloud worker
process, the device service), with EfficientNet-Lite0 int8 on the device and
Lite2 in the cloud. Each photo goes in as its file's bytes, as a camera's
JPEG would: the device decodes it (EXIF orientation applied), resizes and
crops it as its card says, and offloads the original bytes when unsure. The
cloud-only figures come from the worker's own ``evaluate --photos``.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .demo import LocalLoop, _default_models_dir, _finish, local_loop, wait_for_corrections
from .photos import FOOLBOX_INSTALL, Photo, foolbox_photos_dir, list_photos

EDGE_MODEL = "imagenet-edge-lite0-v1"
CLOUD_MODEL = "imagenet-cloud-lite2-v1"
#: Not calibrated: 20 photos cannot choose a threshold. A deployment runs `edge-infer calibrate`
#: on its own labelled photos (a folder per class) and puts the result in its [policy].
DEFAULT_PHOTO_THRESHOLD = 0.5


def run_photo_demo(args: argparse.Namespace) -> int:
    from ..logsetup import setup_logging
    from ..modelcard import ModelCardError, load_card
    from .localbroker import BrokerError

    setup_logging("WARNING")
    models = args.models_dir or _default_models_dir()
    edge_card, cloud_card = models / EDGE_MODEL / "card.json", models / CLOUD_MODEL / "card.json"
    try:
        labels = load_card(edge_card).labels
        load_card(cloud_card)
    except ModelCardError as exc:
        print(f"error: {exc}; run from the repository root or pass --models-dir "
              "(models/recipes/imagenet/README.md builds the pair)", file=sys.stderr)
        return 2
    folder = args.photos or foolbox_photos_dir()
    if folder is None:
        print(f"error: no photos: pass --photos DIR, or install the 20 default ones: {FOOLBOX_INSTALL}",
              file=sys.stderr)
        return 2
    photos = list_photos(folder, labels, foolbox_only=args.photos is None)[:args.images]
    if not photos:
        print(f"error: no JPEG/PNG/BMP photos in {folder}", file=sys.stderr)
        return 2
    threshold = args.threshold if args.threshold is not None else DEFAULT_PHOTO_THRESHOLD
    print(f"{len(photos)} photos from {folder}; threshold {threshold} (not calibrated: see "
          "docs/calibration.md)", file=sys.stderr)

    ev = subprocess.run([sys.executable, "-m", "edge_infer_cloud", "evaluate", "--card", str(cloud_card),
                         "--photos", str(folder)], capture_output=True, text=True, check=True)
    cloud_eval = json.loads(ev.stdout.strip().splitlines()[-1])
    cloud_by_file = {row["file"]: row for row in cloud_eval["photos"]}
    try:
        with tempfile.TemporaryDirectory(prefix="edge-infer-demo-") as tmp_s, \
                local_loop(Path(tmp_s), edge_card=edge_card, cloud_card=cloud_card, threshold=threshold,
                           workers=args.workers) as loop:
            report = _classify_photos(loop, photos, args.timeout, None if not args.no_progress else False)
    except BrokerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for row in report["per_image"]:
        cloud = cloud_by_file.get(row["file"], {})
        row["cloud"], row["cloud_name"] = cloud.get("label"), cloud.get("label_name")
    report |= {"threshold": threshold, "photos_dir": str(folder), "cloud_model": cloud_eval["model"],
               "cloud_only_accuracy": cloud_eval["accuracy"], **_accuracies(report["per_image"])}
    return _finish(report, args.out, _print_photo_report)


def _classify_photos(loop: LocalLoop, photos: list[Photo], timeout: float, show: bool | None) -> dict:
    service = loop.service
    ids = []
    t0 = time.perf_counter()
    for photo in photos:
        ids.append(service.classify(photo.path.read_bytes(), source=photo.path.name).sample_id)
    took = time.perf_counter() - t0
    service.flush()
    wait_for_corrections(service, timeout, show)
    rows = []
    for photo, sid in zip(photos, ids):
        r = service.result(sid)
        assert r is not None
        rows.append({"file": str(photo.path), "truth": photo.label,
                     "truth_name": service.card.labels[photo.label] if photo.label is not None else None,
                     "edge": r.edge_label, "edge_name": service.card.labels[r.edge_label],
                     "edge_confidence": round(r.edge_confidence, 4), "offloaded": r.offloaded,
                     "final": r.label, "final_name": r.label_name, "origin": r.origin})
    offloaded = sum(r["offloaded"] for r in rows)
    corrected = sum(r["origin"] == "cloud" for r in rows)
    return {"images": len(rows), "edge_model": service.card.model_id, "runtime": service.backend.runtime,
            "kept_on_device_share": round(1 - offloaded / len(rows), 4), "offloaded": offloaded,
            "corrections_received": corrected,
            "corrections_changed_label": sum(r["origin"] == "cloud" and r["final"] != r["edge"] for r in rows),
            "offloaded_without_correction": offloaded - corrected,
            "device_ms_per_photo": round(took / len(rows) * 1000, 2), "per_image": rows,
            "device_counters": service.counters.snapshot()}


def _accuracies(rows: list[dict]) -> dict:
    scored = [r for r in rows if r["truth"] is not None]
    if not scored:
        return {"scored": 0, "edge_only_accuracy": None, "hybrid_accuracy": None}

    def acc(key: str) -> float:
        return round(sum(r[key] == r["truth"] for r in scored) / len(scored), 4)
    return {"scored": len(scored), "edge_only_accuracy": acc("edge"), "hybrid_accuracy": acc("final")}


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x:.0%}"


def _print_photo_report(r: dict) -> None:
    print(f"\n  {'photo':<22} {'truth':<24} {'edge (confidence)':<34} {'sent':<5} {'cloud':<24} final")
    for row in r["per_image"]:
        edge = f"{row['edge_name'][:24]} ({row['edge_confidence']:.2f})"
        print(f"  {Path(row['file']).name[:22]:<22} {(row['truth_name'] or '?')[:24]:<24} {edge:<34} "
              f"{'yes' if row['offloaded'] else 'no':<5} {(row['cloud_name'] or '-')[:24]:<24} "
              f"{row['final_name'][:24]}{' (cloud)' if row['origin'] == 'cloud' else ''}")
    print()
    rows = [("photos", f"{r['images']} ({r['scored']} labelled) from {r['photos_dir']}"),
            ("threshold", f"{r['threshold']:.2f} (not calibrated)"),
            ("edge-only accuracy", f"{_pct(r['edge_only_accuracy'])}  ({r['edge_model']}, {r['runtime']})"),
            ("cloud-only accuracy", f"{_pct(r['cloud_only_accuracy'])}  ({r['cloud_model']})"),
            ("hybrid accuracy", _pct(r["hybrid_accuracy"])),
            ("kept on device", f"{r['kept_on_device_share']:.0%}"),
            ("offloaded", f"{r['offloaded']}"),
            ("corrections received", f"{r['corrections_received']} ({r['corrections_changed_label']} changed the "
                                     "label)"),
            ("device time", f"{r['device_ms_per_photo']} ms per photo (decode, resize, crop, model)")]
    for k, v in rows:
        print(f"  {k:<22} {v}")
