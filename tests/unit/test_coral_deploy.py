"""What ships for Coral devices agrees with itself: the udev rules, the unit's device policy, its groups.

A USB Accelerator that udev gives to plugdev is still unusable when the unit's
device cgroup does not allow /dev/bus/usb, or when the service user is not in
plugdev; the same holds for /dev/apex_N. Both files are parsed here and
checked against each other and against the ids the backend looks for.
"""
from __future__ import annotations

import re

import pytest

from edge_infer.backends.edgetpu_sysfs import USB_IDS

from ..conftest import REPO

RULES = REPO / "deploy" / "udev" / "65-edge-infer-coral.rules"
UNIT = REPO / "deploy" / "systemd" / "edge-infer.service"
_PAIR = re.compile(r'\s*([A-Z_]+(?:\{[^}]*\})?)\s*(==|!=|\+=|:=|=)\s*"([^"]*)"\s*(?:,|$)')


def parse_rules(text: str) -> list[dict[str, tuple[str, str]]]:
    """Each rule line as {key: (operator, value)}; raises on a line that is not key-op-"value" pairs."""
    rules = []
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        pos, rule = 0, {}
        while pos < len(line):
            m = _PAIR.match(line, pos)
            assert m, f"{RULES.name}:{n}: cannot parse {line[pos:]!r}"
            rule[m.group(1)] = (m.group(2), m.group(3))
            pos = m.end()
        rules.append(rule)
    return rules


def unit_settings(text: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        if "=" in line and not line.lstrip().startswith(("#", "[")):
            key, value = line.split("=", 1)
            out.setdefault(key.strip(), []).append(value.strip())
    return out


@pytest.fixture(scope="module")
def rules():
    return parse_rules(RULES.read_text())


@pytest.fixture(scope="module")
def unit():
    return unit_settings(UNIT.read_text())


def _usb_rule(rules, vendor, product):
    return [r for r in rules if r.get("SUBSYSTEM") == ("==", "usb")
            and r.get("ATTRS{idVendor}") == ("==", vendor) and r.get("ATTRS{idProduct}") == ("==", product)]


def test_both_usb_ids_and_the_apex_node_have_a_rule(rules):
    assert set(USB_IDS) == {("1a6e", "089a"), ("18d1", "9302")}
    for vendor, product in USB_IDS:
        assert len(_usb_rule(rules, vendor, product)) == 1, f"no udev rule for {vendor}:{product}"
    assert [r for r in rules if r.get("SUBSYSTEM") == ("==", "apex")], "no udev rule for /dev/apex_N"


def test_every_rule_gives_read_write_to_a_group_the_service_has_and_nobody_else(rules, unit):
    groups = {g for line in unit["SupplementaryGroups"] for g in line.split()} | set(unit.get("Group", []))
    for rule in rules:
        op, group = rule["GROUP"]
        assert op in ("=", ":=") and group in groups, (rule, groups)
        assert rule["MODE"] == ("=", "0660"), rule     # group read-write, no access for others


def test_the_units_device_policy_opens_what_the_rules_grant(rules, unit):
    assert unit["DevicePolicy"] == ["closed"]
    assert unit.get("PrivateDevices", ["no"]) == ["no"], "PrivateDevices=yes would hide the accelerator nodes"
    allowed = {tuple(v.split()) for v in unit["DeviceAllow"]}
    if any(r.get("SUBSYSTEM") == ("==", "usb") for r in rules):
        # libusb opens /dev/bus/usb/BBB/DDD, a new node after the re-enumeration: the whole major
        assert ("char-usb_device", "rw") in allowed, allowed
    if any(r.get("SUBSYSTEM") == ("==", "apex") for r in rules):
        assert ("/dev/apex_0", "rw") in allowed and ("char-apex", "rw") in allowed, allowed
    # libusb and udev report hot-plug (the accelerator re-enumerating after its firmware loads) over netlink
    assert "AF_NETLINK" in unit["RestrictAddressFamilies"][0].split()


def test_the_parser_catches_a_broken_rule():
    with pytest.raises(AssertionError, match="cannot parse"):
        parse_rules('SUBSYSTEM=="usb", ATTRS{idVendor}=="18d1" MODE="0660"\n')
    assert parse_rules('# a comment\nSUBSYSTEM=="apex", MODE="0660", GROUP="plugdev"\n') == [
        {"SUBSYSTEM": ("==", "apex"), "MODE": ("=", "0660"), "GROUP": ("=", "plugdev")}]
