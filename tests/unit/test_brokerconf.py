"""Rendering the shipped broker files (edge_infer.tools.brokerconf); the broker itself: test_security.py."""
from __future__ import annotations

import re

import pytest

from edge_infer.tools.brokerconf import BrokerConfError, main, render_acl, render_conf

from ..conftest import REPO

SHIPPED = REPO / "deploy" / "mosquitto"
ACL = (SHIPPED / "edge-infer.acl").read_text()
CONF = (SHIPPED / "edge-infer-tls.conf").read_text()


def rules(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def test_without_workers_or_readers_only_the_device_patterns_remain():
    assert rules(render_acl(ACL)) == ["pattern write edge-infer/%u/samples", "pattern write edge-infer/%u/results",
                                      "pattern write edge-infer/%u/status", "pattern read edge-infer/%u/corrections"]


def test_one_block_per_worker_and_reader_with_their_names_and_the_prefix():
    text = render_acl(ACL, prefix="acme/fleet", workers=["w1", "w2"], readers=["dash"])
    r = rules(text)
    assert [x for x in r if x.startswith("user ")] == ["user worker:w1", "user worker:w2", "user reader:dash"]
    assert "topic write acme/fleet/_workers/w2/status" in r and "topic deny acme/fleet/worker:w1/#" in r
    assert all(re.match(r"^(user \S+|(pattern|topic) (read|write|deny) acme/fleet/\S+)$", x) for x in r), r
    assert "{" not in "".join(r)
    # each block's comments appear once, not once per worker
    assert text.count("Every device's samples") == 1


def test_names_that_would_break_a_topic_are_refused():
    for bad in ("w/1", "w+", "#", "a b", ""):
        with pytest.raises(BrokerConfError):
            render_acl(ACL, workers=[bad])
    with pytest.raises(BrokerConfError):
        render_acl(ACL, prefix="a/#")


def test_render_conf_replaces_named_options_and_refuses_unknown_ones():
    out = render_conf(CONF, {"listener": "18883 127.0.0.1", "acl_file": "/tmp/x.acl"}, extra="user root")
    assert "listener 18883 127.0.0.1" in rules(out) and "acl_file /tmp/x.acl" in rules(out)
    assert rules(out)[-1] == "user root"
    assert len(rules(out)) == len(rules(CONF)) + 1
    with pytest.raises(BrokerConfError, match="password_file"):
        render_conf(CONF, {"password_file": "/x"})


def test_the_shipped_tls_config_keeps_its_security_options():
    options = dict(line.split(None, 1) for line in rules(CONF))
    for key, value in {"require_certificate": "true", "use_identity_as_username": "true",
                       "use_username_as_clientid": "true", "allow_anonymous": "false", "listener": "8883"}.items():
        assert options[key] == value
    for key in ("cafile", "certfile", "keyfile", "crlfile", "acl_file", "max_packet_size"):
        assert key in options
    assert "password_file" not in options and "allow_anonymous true" not in CONF


def test_the_command_line_reads_the_workers_of_a_pki_directory(tmp_path, capsys):
    for w in ("w1", "w2"):
        (tmp_path / "workers" / w).mkdir(parents=True)
        (tmp_path / "workers" / w / "cert.pem").write_text("x")
    (tmp_path / "readers" / "gate").mkdir(parents=True)
    (tmp_path / "readers" / "gate" / "cert.pem").write_text("x")
    assert main(["acl", str(SHIPPED / "edge-infer.acl"), "--pki", str(tmp_path), "--reader", "r"]) == 0
    r = rules(capsys.readouterr().out)
    assert [x for x in r if x.startswith("user ")] == ["user worker:w1", "user worker:w2", "user reader:r",
                                                       "user reader:gate"]
    assert main(["conf", str(SHIPPED / "edge-infer-tls.conf"), "--set", "nonsense=1"]) == 2
