"""Logging to the journal with structured fields when under systemd, to stderr otherwise."""
from __future__ import annotations

import logging
import os
import sys


def setup_logging(level: str = "INFO", identifier: str = "edge-infer", fields: dict[str, str] | None = None) -> str:
    """Configure the root logger; returns which handler was chosen ("journal" or "stderr").

    Under systemd with systemd-python installed, records go to the journal with
    structured fields (``fields``, e.g. EDGE_INFER_DEVICE, on every record, plus
    the logger name and code location), so ``journalctl EDGE_INFER_DEVICE=...``
    filters a fleet's logs. Otherwise plain stderr, which journald captures too.
    """
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.setLevel(level)
    handler: logging.Handler | None = None
    kind = "stderr"
    if os.environ.get("JOURNAL_STREAM") or os.environ.get("INVOCATION_ID"):
        try:
            from systemd.journal import JournalHandler  # systemd-python, the [systemd] extra

            handler = JournalHandler(SYSLOG_IDENTIFIER=identifier, **(fields or {}))
            kind = "journal"
        except ImportError:
            handler = None
    if handler is None:
        handler = logging.StreamHandler(sys.stderr)
        # journald adds its own timestamps; plain runs want them.
        fmt = "%(levelname)s %(name)s: %(message)s" if os.environ.get("JOURNAL_STREAM") else \
            "%(asctime)s %(levelname)s %(name)s: %(message)s"
        handler.setFormatter(logging.Formatter(fmt))
    root.addHandler(handler)
    logging.getLogger("PIL").setLevel(logging.WARNING)
    return kind
