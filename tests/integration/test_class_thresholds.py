"""``[policy] class_thresholds`` on the device with the real model: each predicted class is held to
its own threshold, and a name that is not a label of the card stops the start and check-config."""
from __future__ import annotations

import contextlib
import io
from dataclasses import replace

import pytest

from edge_infer.cli import main
from edge_infer.config import ClassThresholdTable
from edge_infer.service import EdgeService
from edge_infer.tomlcfg import ConfigError
from edge_infer.tools.localbroker import free_port

from ..conftest import EDGE_CARD
from .helpers import device_config

pytestmark = pytest.mark.integration


def with_table(cfg, threshold: float, table: dict[str, float]):
    return replace(cfg, policy=replace(cfg.policy, threshold=threshold,
                                       class_thresholds=ClassThresholdTable(tuple(table.items()))))


def test_each_predicted_class_is_held_to_its_own_threshold(tmp_path, fmnist):
    # no broker: offloaded samples wait in the outbox, which is all this test needs
    cfg = with_table(device_config(tmp_path, free_port()), 0.0, {"shirt": 1.0, "pullover": 0.9})
    svc = EdgeService(cfg)
    svc.start()
    try:
        results = [svc.classify(im) for im in fmnist["test"].images[:300]]
        labels = svc.card.labels
        for r in results:
            own = {"shirt": 1.0, "pullover": 0.9}.get(labels[r.label], 0.0)
            assert r.offloaded == (r.confidence < own), (labels[r.label], r.confidence)
            assert r.offload_reason == ("below_threshold" if r.offloaded else None)
        by_class = {name: [r for r in results if labels[r.label] == name] for name in ("shirt", "pullover")}
        assert by_class["shirt"] and any(r.offloaded for r in by_class["shirt"])
        assert not any(r.offloaded for r in results if labels[r.label] not in ("shirt", "pullover"))
        svc.flush()
        assert svc.store.outbox_counts()["queued"] == sum(r.offloaded for r in results)
    finally:
        svc.stop()


def test_an_unknown_class_name_stops_the_service_and_check_config(tmp_path):
    cfg = with_table(device_config(tmp_path, free_port()), 0.9, {"shirt": 0.99, "jackets": 0.5})
    with pytest.raises(ConfigError, match="'jackets' is not a label of .*card.json; its labels are: 't-shirt/top'"):
        EdgeService(cfg)
    path = tmp_path / "edge-infer.toml"
    path.write_text(f'device_id = "d"\nstate_dir = "{tmp_path / "state"}"\n[model]\ncard = "{EDGE_CARD}"\n'
                    '[policy]\nthreshold = 0.9\nclass_thresholds = { "shirt" = 0.99, "jackets" = 0.5 }\n')
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        assert main(["check-config", str(path)]) == 2
    assert "INVALID" in err.getvalue() and "'jackets' is not a label" in err.getvalue()
    path.write_text(path.read_text().replace(', "jackets" = 0.5', ""))
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        assert main(["check-config", str(path)]) == 0
    assert "per-class thresholds for 1 class(es)" in out.getvalue()
