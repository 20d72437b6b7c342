"""``edge-infer``: the device service and its tools."""
from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
from pathlib import Path

from .tomlcfg import ConfigError

log = logging.getLogger("edge_infer")


def _load(path: str):
    from .config import load_device_config
    return load_device_config(path)


def cmd_check_config(args: argparse.Namespace) -> int:
    from .modelcard import ModelCardError, load_card, verified_model_bytes
    try:
        cfg = _load(args.config)
        card = load_card(cfg.model.card)
        verified_model_bytes(card)
    except (ConfigError, ModelCardError) as exc:
        print(f"{args.config}: INVALID: {exc}", file=sys.stderr)
        return 2
    print(f"{args.config}: OK (device {cfg.device_id}, model {card.model_id}, threshold {cfg.policy.threshold}, "
          f"broker {cfg.mqtt.host}:{cfg.mqtt.port})")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from .logsetup import setup_logging
    from .service import EdgeService
    try:
        cfg = _load(args.config)
    except ConfigError as exc:
        setup_logging()
        log.error("invalid configuration %s: %s", args.config, exc)
        return 2
    setup_logging(cfg.log_level)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    service = EdgeService(cfg)
    try:
        service.start()
    except Exception as exc:
        log.error("cannot start: %s", exc)
        return 1
    try:
        stop.wait()
    finally:
        service.stop()
    return 0


def cmd_classify(args: argparse.Namespace) -> int:
    """Classify files with the local model only (no broker, no offload): a quick check on a device."""
    from dataclasses import replace

    from .logsetup import setup_logging
    from .preprocess import ImageError
    from .service import EdgeService
    import tempfile

    setup_logging("WARNING")
    cfg = _load(args.config)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = replace(cfg, state_dir=Path(tmp), policy=replace(cfg.policy, offload=False),
                      spool=replace(cfg.spool, dir=None))
        svc = EdgeService(cfg)
        svc.start(connect=False)
        rc = 0
        try:
            for name in args.images:
                try:
                    r = svc.classify_bytes(Path(name).read_bytes(), source=name)
                except (OSError, ImageError) as exc:
                    print(json.dumps({"source": name, "error": str(exc)}))
                    rc = 1
                    continue
                low = r.confidence < cfg.policy.threshold
                print(json.dumps({"source": name, "label": r.label, "label_name": r.label_name,
                                  "confidence": round(r.confidence, 4), "would_offload": low}))
        finally:
            svc.stop()
    return rc


def cmd_backends(args: argparse.Namespace) -> int:
    from .backends import available
    for name, state in available().items():
        print(f"{name}: {state}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo
    return run_demo(args)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="edge-infer", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="run the service (what systemd starts)")
    r.add_argument("--config", "-c", default="/etc/edge-infer/edge-infer.toml")
    r.set_defaults(func=cmd_run)
    c = sub.add_parser("check-config", help="validate a config file and its model without starting")
    c.add_argument("config")
    c.set_defaults(func=cmd_check_config)
    k = sub.add_parser("classify", help="classify image files with the local model only")
    k.add_argument("--config", "-c", default="/etc/edge-infer/edge-infer.toml")
    k.add_argument("images", nargs="+")
    k.set_defaults(func=cmd_classify)
    b = sub.add_parser("backends", help="list inference backends and whether they load here")
    b.set_defaults(func=cmd_backends)
    from .demo import add_demo_arguments
    d = sub.add_parser("demo", help="the whole loop on this machine: broker, cloud worker, device, test set")
    add_demo_arguments(d)
    d.set_defaults(func=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
