import logging

from edge_infer.logsetup import setup_logging


def test_stderr_outside_systemd(monkeypatch, capsys):
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    monkeypatch.delenv("INVOCATION_ID", raising=False)
    try:
        assert setup_logging("INFO") == "stderr"
        logging.getLogger("edge_infer.x").info("hello %s", "there")
        assert "INFO edge_infer.x: hello there" in capsys.readouterr().err
    finally:
        logging.getLogger().handlers.clear()


def test_journal_under_systemd_with_structured_fields(monkeypatch):
    from systemd.journal import JournalHandler
    monkeypatch.setenv("INVOCATION_ID", "0123")
    try:
        assert setup_logging("INFO", fields={"EDGE_INFER_DEVICE": "dev-1"}) == "journal"
        (handler,) = logging.getLogger().handlers
        assert isinstance(handler, JournalHandler)
        assert handler._extra["EDGE_INFER_DEVICE"] == "dev-1"
    finally:
        logging.getLogger().handlers.clear()
