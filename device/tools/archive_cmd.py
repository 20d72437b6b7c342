"""``edge-infer archive``: the device's hard-example archive (docs/closed-loop.md).

    edge-infer archive info   --config /etc/edge-infer/edge-infer.toml
    edge-infer archive export --config /etc/edge-infer/edge-infer.toml --out archive.npz [--originals]
    edge-infer archive wipe   --config /etc/edge-infer/edge-infer.toml --yes

All three work beside the running service: export reads the archive read-only, wipe
deletes through SQLite's own locking. Exit 0: done; 1: no archive there; 2: refused.
"""
from __future__ import annotations

import argparse
import json
import logging
import sqlite3
import sys
import time
from pathlib import Path

import numpy as np

from ..errors import EdgeInferError

log = logging.getLogger(__name__)

DEFAULT_CONFIG = "/etc/edge-infer/edge-infer.toml"


def add_archive_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="action", required=True)
    i = sub.add_parser("info", help="how many samples and bytes the archive holds")
    e = sub.add_parser("export", help="write the archive as one portable .npz (images fitted to the model's input, "
                                      "the edge and cloud answers)")
    e.add_argument("--out", type=Path, required=True, help="the .npz to write (mode 0600; replaced atomically)")
    e.add_argument("--originals", action="store_true",
                   help="also the samples' bytes as they were sent (larger; for other models' input sizes)")
    w = sub.add_parser("wipe", help="delete every archived sample and rewrite the file (no image left in it)")
    w.add_argument("--yes", action="store_true", help="really delete")
    for q in (i, e, w):
        q.add_argument("--config", "-c", default=DEFAULT_CONFIG)


def run_archive(args: argparse.Namespace) -> int:
    from ..config import load_device_config
    cfg = load_device_config(args.config)
    path = cfg.archive_path
    if not path.exists():
        state = "enabled" if cfg.archive.enabled else "disabled ([archive] enabled = false)"
        print(f"no archive at {path} (the archive is {state}; it is written once corrections arrive)",
              file=sys.stderr)
        return 1
    try:
        if args.action == "info":
            return _info(cfg, path)
        if args.action == "export":
            return _export(cfg, path, args.out, args.originals)
        return _wipe(path, args.yes)
    except sqlite3.Error as exc:
        raise EdgeInferError(f"archive {path} cannot be read: {exc}", exit_code=2) from None


def _info(cfg, path: Path) -> int:
    from ..archive import archive_totals
    t = archive_totals(path)
    print(json.dumps({"device": cfg.device_id, "archive": str(path), "enabled": cfg.archive.enabled,
                      "items": t.items, "bytes": t.bytes, "max_items": cfg.archive.max_items,
                      "max_bytes": cfg.archive.max_bytes}, indent=2))
    return 0


def _export(cfg, path: Path, out: Path, originals: bool) -> int:
    from ..archive import read_archive
    from ..modelcard import load_card
    from ..preprocess import ImageError, Preprocessor, decode_image
    from .archivefile import write_export

    card = load_card(cfg.model.card)
    pre = Preprocessor(card.input)
    shape = (card.input.height, card.input.width) + (() if card.input.channels == 1 else (3,))
    cols: dict[str, list] = {k: [] for k in ("images", "cloud_label", "cloud_confidence", "edge_label",
                                             "edge_confidence", "model_id", "cloud_model_id", "offload_reason",
                                             "sample_id", "created_at", "corrected_at")}
    payloads: list[bytes] = []
    types: list[str] = []
    skipped = 0
    for s in read_archive(path):
        try:
            fitted = pre.fit(decode_image(s.payload, expected_type=s.content_type).pixels)
        except ImageError as exc:
            skipped += 1
            log.warning("archived sample %s does not decode (%s); not exported", s.sample_id, exc)
            continue
        if not 0 <= s.cloud_label < len(card.labels):
            skipped += 1
            continue
        for key, value in (("images", fitted), ("cloud_label", s.cloud_label), ("cloud_confidence", s.cloud_confidence),
                           ("edge_label", s.edge_label), ("edge_confidence", s.edge_confidence),
                           ("model_id", s.model_id), ("cloud_model_id", s.cloud_model_id or ""),
                           ("offload_reason", s.offload_reason or ""), ("sample_id", s.sample_id),
                           ("created_at", s.created_at),
                           ("corrected_at", s.corrected_at if s.corrected_at is not None else np.nan)):
            cols[key].append(value)
        if originals:
            payloads.append(s.payload)
            types.append(s.content_type)
    n = len(cols["sample_id"])
    rows = {
        "images": np.asarray(cols["images"], np.uint8).reshape((n, *shape)),
        "cloud_label": np.asarray(cols["cloud_label"], np.int64),
        "cloud_confidence": np.asarray(cols["cloud_confidence"], np.float32),
        "edge_label": np.asarray(cols["edge_label"], np.int64),
        "edge_confidence": np.asarray(cols["edge_confidence"], np.float32),
        **{k: np.asarray(cols[k], dtype=str) for k in ("model_id", "cloud_model_id", "offload_reason", "sample_id")},
        "created_at": np.asarray(cols["created_at"], np.float64),
        "corrected_at": np.asarray(cols["corrected_at"], np.float64),
    }
    extra = None
    if originals:
        offsets = np.concatenate([[0], np.cumsum([len(p) for p in payloads])]).astype(np.int64)
        extra = (np.frombuffer(b"".join(payloads), np.uint8), offsets, np.asarray(types, dtype=str))
    t0 = time.monotonic()
    write_export(out, rows, labels=card.labels, device_id=cfg.device_id, originals=extra)
    print(f"exported {n} archived sample(s) of device {cfg.device_id} to {out} ({out.stat().st_size} bytes, "
          f"{time.monotonic() - t0:.1f}s)" + (f"; {skipped} skipped (not decodable)" if skipped else ""))
    return 0


def _wipe(path: Path, yes: bool) -> int:
    from ..archive import archive_totals, wipe_archive
    if not yes:
        t = archive_totals(path)
        print(f"this deletes the {t.items} archived sample(s) ({t.bytes} bytes of images) in {path}; export them "
              "first if they are needed (`edge-infer archive export`), then run again with --yes", file=sys.stderr)
        return 2
    n = wipe_archive(path)
    print(f"wiped {n} archived sample(s) from {path}")
    return 0
