"""``edge-infer``: the device service and its tools."""
from __future__ import annotations

import argparse
import importlib
import json
import logging
import signal
import sys
import threading
from pathlib import Path

from .errors import EdgeInferError
from .tomlcfg import ConfigError

log = logging.getLogger("edge_infer")


def _load(path: str):
    from .config import load_device_config
    return load_device_config(path)


def cmd_check_config(args: argparse.Namespace) -> int:
    """The config, the model card and file, and the backend: known, runs the card's format, its runtime
    installed here (probed, no model loaded: a running service may hold the accelerator)."""
    from .backends import check_backend
    from .modelcard import load_card, verified_model_bytes
    try:
        cfg = _load(args.config)
        card = load_card(cfg.model.card)
        verified_model_bytes(card)
        cfg.policy.class_thresholds.for_labels(card.labels, cfg.policy.threshold, str(card.path))   # names = labels
        runtime = check_backend(cfg.model.backend, cfg.backend_options, card)
        fallback = _check_fallback(cfg, card)
        from .identity import check_tls_identity
        check_tls_identity(cfg.mqtt.tls, cfg.device_id)   # what the start refuses, refused here first
        if cfg.metrics.enabled:
            from .metrics import require_prometheus
            require_prometheus()   # likewise: prometheus_client installed
    except EdgeInferError as exc:
        print(f"{args.config}: INVALID: {exc}", file=sys.stderr)
        return exc.exit_code
    isolated = ", isolated" if cfg.model.isolated else ""
    views = f", {len(card.input.views)} test-time views per input" if card.input.views else ""
    print(f"{args.config}: OK (device {cfg.device_id}, model {card.model_id} on {cfg.model.backend} ({runtime}"
          f"{isolated}){fallback}{views}, threshold {cfg.policy.threshold}"
          + (f", per-class thresholds for {len(cfg.policy.class_thresholds.entries)} class(es)"
             if cfg.policy.class_thresholds else "")
          + f", broker {cfg.mqtt.host}:{cfg.mqtt.port})")
    return 0


def _check_fallback(cfg, card) -> str:
    """With [model] fallback = "cpu": its card, model file and runtime, as for the model itself."""
    if cfg.model.fallback == "none":
        return ""
    from .backends import check_backend
    from .classifier import FALLBACK_BACKEND
    from .modelcard import ModelCardError, load_card, verified_model_bytes
    path = cfg.model.fallback_card or card.fallback_card
    if path is None:
        raise ModelCardError(f'model.fallback = "cpu" needs the CPU model\'s card: set [model] fallback_card, or '
                             f'"fallback_card" in {card.path}')
    fb = load_card(path)
    verified_model_bytes(fb)
    if fb.labels != card.labels:
        raise ModelCardError(f"fallback card {fb.path} has other labels than {card.path}")
    runtime = check_backend(FALLBACK_BACKEND, cfg.backend.get(FALLBACK_BACKEND), fb)
    return f", fallback {fb.model_id} on {FALLBACK_BACKEND} ({runtime})"


def status_line(service) -> str:
    st = service.status()
    ob = st["outbox"]
    c = st["counters"]
    inf = st["inference"]
    inference = "" if inf["state"] == "healthy" else (
        f" | inference {inf['state'].upper()}: {inf['reason']}"
        + (f"; fallback answered {inf['fallback_answers']}" if inf["fallback"] else ""))
    return (f"model {st['model']} on {st['backend']}{inference} | broker {'connected' if st['broker_connected'] else 'DISCONNECTED'}"
            f" | outbox {ob['queued']} queued, {ob['inflight']} in flight, {ob['delivered']} awaiting correction"
            f" | offload {st['offload_rate']:.1%} of {c.get('classified', 0)}, corrected {c.get('corrected', 0)}")


def cmd_run(args: argparse.Namespace) -> int:
    from .logsetup import setup_logging
    from .sdnotify import Notifier
    from .service import EdgeService
    notifier = Notifier()
    try:
        cfg = _load(args.config)
    except ConfigError as exc:
        setup_logging()
        log.error("invalid configuration %s: %s", args.config, exc)
        notifier.status(f"invalid configuration: {exc}")
        return 2
    handler = setup_logging(cfg.log_level, fields={"EDGE_INFER_DEVICE": cfg.device_id})
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        service = EdgeService(cfg)
        service.start()
    except EdgeInferError as exc:
        # Exit 2 where the operator must act (model card, router, backend, store): a restart would
        # fail the same way, and the unit's RestartPreventExitStatus=2 stops the loop.
        log.error("cannot start: %s", exc)
        notifier.status(f"cannot start: {exc}")
        return exc.exit_code
    except Exception as exc:
        log.error("cannot start: %s", exc)
        notifier.status(f"cannot start: {exc}")
        return 1
    # READY once the model is loaded and answering; the broker may still be unreachable.
    notifier.ready(status_line(service))
    log.info("notify via %s, logging to %s, watchdog %s", notifier.via, handler,
             f"{notifier.watchdog_s:.0f}s" if notifier.watchdog_s else "off")
    wd = notifier.watchdog_s
    tick = min(wd / 3, 5.0) if wd else 5.0
    max_invoke_s = wd / 2 if wd else 10.0
    reported = False
    try:
        while not stop.wait(tick):
            ok, why = service.healthy(max_invoke_s)
            if ok:
                notifier.watchdog()
                reported = False
            elif not reported:
                # No ping: systemd's WatchdogSec= kills and restarts us.
                log.error("watchdog: %s; no longer pinging systemd so that it restarts the service", why)
                reported = True
            notifier.status(status_line(service) if ok else f"UNHEALTHY: {why}")
    finally:
        notifier.stopping("stopping: finishing the current input, flushing the outbox state")
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


def cmd_status(args: argparse.Namespace) -> int:
    """What the device's store holds, read directly (works while the service runs, and offline)."""
    import sqlite3

    from . import dbfile
    from .store import Store
    cfg = _load(args.config)
    db = cfg.store_path
    if not db.exists():
        print(f"no state database at {db}: the service has not run with this config yet", file=sys.stderr)
        return 1
    store = Store(db)
    try:
        store.open(requeue=False)   # read-only: never touch a running service's in-flight rows
        audit = store.audit()
        report = {"device": cfg.device_id, "database": str(db), "outbox": store.outbox_counts(),
                  "results": audit["results"], "offloaded": audit["offloaded"],
                  "corrected": audit["corrected_results"], "results_unpublished": store.unpublished_count()}
    except sqlite3.Error as exc:
        raise dbfile.classify(exc, db) from None   # one line and its exit code, from main()
    finally:
        store.close()
    print(json.dumps(report, indent=2))
    return 0


def cmd_reset_store(args: argparse.Namespace) -> int:
    """Move the state database aside (kept, renamed) so that the next start begins with an empty store."""
    from . import dbfile
    cfg = _load(args.config)
    db = cfg.store_path
    if not db.exists():
        print(f"no state database at {db}: nothing to reset", file=sys.stderr)
        return 1
    if not args.yes:
        print(f"this moves {db} aside: its unpublished results and queued samples will not be sent. Stop the "
              "service first (systemctl stop edge-infer), then run again with --yes", file=sys.stderr)
        return 2
    aside = dbfile.move_aside(db, "reset")
    print(f"moved {db} to {aside}; the next start creates an empty store")
    return 0


def cmd_backends(args: argparse.Namespace) -> int:
    """Each registered backend: whether it can run here (default options), the formats it runs."""
    from .backends import REGISTRY, available
    for name, state in available().items():
        entry = REGISTRY[name]
        print(f"{name}: {state}\n    {entry.summary}; runs {', '.join(entry.formats)} models; "
              f"options: [backend.{name}]")
    return 0


#: Subcommands whose modules (and arguments) load only when they run: the service's
#: start and `check-config` should not pay for importing the demo and calibration tools.
TOOLS = {
    "calibrate": ("choose the offload score and threshold from labelled data", ".calibration.command",
                  "add_calibrate_arguments", "run_calibrate"),
    "demo": ("the whole loop on this machine: broker, cloud worker, device, test set", ".tools.demo",
             "add_demo_arguments", "run_demo"),
    "pki": ("the fleet's certificates: CA, broker, devices, workers; rotation and revocation", ".tools.pki",
            "add_pki_arguments", "run_pki"),
    "inspect-model": ("which operators of a .tflite model run on the Edge TPU and which on the CPU",
                      ".backends.tflitemodel", "add_arguments", "run"),
    "archive": ("the hard-example archive: info, export (one .npz per device), wipe", ".tools.archive_cmd",
                "add_archive_arguments", "run_archive"),
    "retrain": ("fine-tune the edge model's head on archive exports; write a new version only if it is better",
                ".tools.retrain", "add_retrain_arguments", "run_retrain"),
}


def run_tool(name: str, argv: list[str]) -> int:
    help, module, add_arguments, run = TOOLS[name]
    mod = importlib.import_module(module, __package__)
    parser = argparse.ArgumentParser(prog=f"edge-infer {name}", description=help)
    getattr(mod, add_arguments)(parser)
    return getattr(mod, run)(parser.parse_args(argv))


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
    st = sub.add_parser("status", help="outbox and results held in the device's store (no broker needed)")
    st.add_argument("--config", "-c", default="/etc/edge-infer/edge-infer.toml")
    st.set_defaults(func=cmd_status)
    rs = sub.add_parser("reset-store", help="move the state database aside (after damage) so the next start is "
                                            "fresh")
    rs.add_argument("--config", "-c", default="/etc/edge-infer/edge-infer.toml")
    rs.add_argument("--yes", action="store_true", help="really move it (stop the service first)")
    rs.set_defaults(func=cmd_reset_store)
    b = sub.add_parser("backends", help="list inference backends and whether they load here")
    b.set_defaults(func=cmd_backends)
    for name, (help, *_) in TOOLS.items():
        sub.add_parser(name, help=help, add_help=False)   # listed here, parsed by run_tool
    return p


def main(argv: list[str] | None = None) -> int:
    """Every command's own errors end it here, as one line and their exit code (2: the operator must act)."""
    argv = sys.argv[1:] if argv is None else argv
    name = argv[0] if argv else ""
    try:
        if name in TOOLS:
            return run_tool(name, argv[1:])
        args = build_parser().parse_args(argv)
        return args.func(args)
    except EdgeInferError as exc:
        print(f"edge-infer {name}: {exc}", file=sys.stderr)
        return exc.exit_code


if __name__ == "__main__":
    sys.exit(main())
