"""``[policy] class_thresholds``: the config table, its check against the card's labels, and the
offload decision that applies it."""
from __future__ import annotations

import pytest

from edge_infer.config import ClassThresholdTable, PolicyConfig, parse_device_config
from edge_infer.policy import OffloadPolicy
from edge_infer.tomlcfg import ConfigError, describe

LABELS = ("t-shirt/top", "trouser", "pullover", "shirt")


def policy_table(**policy) -> PolicyConfig:
    return parse_device_config({"device_id": "d", "model": {"card": "card.json"}, "policy": policy}).policy


def test_the_table_maps_label_names_to_their_thresholds():
    p = policy_table(threshold=0.9, class_thresholds={"shirt": 0.99, "t-shirt/top": 0.95})
    assert p.class_thresholds.entries == (("shirt", 0.99), ("t-shirt/top", 0.95))
    # the classes it does not name keep `threshold`
    assert p.class_thresholds.for_labels(LABELS, p.threshold) == (0.95, 0.9, 0.9, 0.99)


def test_no_table_means_one_threshold_for_every_class():
    p = policy_table(threshold=0.8)
    assert not p.class_thresholds and p.class_thresholds.for_labels(LABELS, 0.8) == ()
    assert policy_table(class_thresholds={}).class_thresholds.for_labels(LABELS, 0.8) == ()


def test_a_name_that_is_not_a_label_is_an_error_naming_it_and_the_labels():
    table = policy_table(class_thresholds={"shirt": 0.99, "jackets": 0.5, "Trouser": 0.7}).class_thresholds
    with pytest.raises(ConfigError) as exc:
        table.for_labels(LABELS, 0.9, source="models/x/card.json")
    msg = str(exc.value)
    assert "'jackets', 'Trouser' are not labels of models/x/card.json" in msg
    assert "'t-shirt/top', 'trouser', 'pullover', 'shirt'" in msg and "'shirt' are" not in msg
    with pytest.raises(ConfigError, match="'jackets' is not a label"):
        ClassThresholdTable((("jackets", 0.5),)).for_labels(LABELS, 0.9)


@pytest.mark.parametrize("value,want", [
    ({"shirt": 1.5}, "policy.class_thresholds.'shirt' = 1.5: must be between 0.0 and 1.0"),
    ({"shirt": -0.1}, "must be between 0.0 and 1.0"),
    ({"shirt": float("nan")}, "must be between 0.0 and 1.0"),
    ({"shirt": "high"}, "policy.class_thresholds.'shirt': expected a number between 0 and 1, got 'high'"),
    ({"shirt": True}, "expected a number"),
    ([0.9, 0.8], "policy.class_thresholds: expected a table of class name = threshold"),
    (0.9, "expected a table"),
])
def test_bad_tables_name_the_key(value, want):
    with pytest.raises(ConfigError) as exc:
        policy_table(class_thresholds=value)
    assert want in str(exc.value)


def test_the_reference_documents_the_option():
    rows = {key: (tp, default, help_) for key, tp, default, help_ in describe(PolicyConfig, "policy")}
    tp, default, help_ = rows["policy.class_thresholds"]
    assert tp == "a table: class name = number" and "label names" in help_ and "check-config" in help_


def test_the_decision_holds_each_class_to_its_own_threshold():
    p = OffloadPolicy(0.9, class_thresholds=(0.95, 0.9, 0.9, 0.99))
    assert p.threshold_for(3) == 0.99 and p.threshold_for(1) == 0.9 and p.threshold_for(None) == 0.9
    assert p.wants(0.97, 1.0, label=3).reason == "below_threshold"     # a shirt at 0.97 goes to the cloud
    assert p.wants(0.97, 1.0, label=1).reason == "confident"           # a trouser at 0.97 stays
    assert p.wants(0.97, 1.0).reason == "confident"                    # no label: the single threshold
    assert p.threshold_for(7) == 0.9                                   # out of the table: the single threshold


def test_without_a_table_the_label_changes_nothing():
    p = OffloadPolicy(0.9, audit_rate=0.5)
    for label in (None, 0, 3):
        assert p.wants(0.89, 0.9, label=label).reason == "below_threshold"
        assert p.wants(0.91, 0.9, label=label).reason == "confident"
        assert p.wants(0.91, 0.1, label=label).reason == "audit"
