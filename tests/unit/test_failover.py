"""The pure parts of isolation and fallback: the restart schedule, the states, their messages, the config."""
import pytest

from edge_infer.config import ModelConfig
from edge_infer.failover import BackendState, Problem, change_message, restart_delay, state_of
from edge_infer.modelcard import ModelCardError, parse_card
from edge_infer.tomlcfg import ConfigError

from ..conftest import EDGE_CARD


def test_restart_delay_is_immediate_once_then_doubles_to_the_cap():
    delays = [restart_delay(n, 0.5, 30.0) for n in range(0, 12)]
    assert delays[:2] == [0.0, 0.0]                      # a child that had answered: restart at once
    assert delays[2:9] == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0]
    assert all(d == 30.0 for d in delays[8:])
    assert restart_delay(10_000, 0.5, 30.0) == 30.0      # no overflow after days of a missing accelerator


@pytest.mark.parametrize("fallback, age, want", [
    (True, 0.0, BackendState.DEGRADED), (True, 1e6, BackendState.DEGRADED),
    (False, 10.0, BackendState.RECOVERING), (False, 60.0, BackendState.RECOVERING),
    (False, 60.5, BackendState.LOST),
])
def test_state_of_a_problem(fallback, age, want):
    assert state_of(Problem(100.0, "x"), 100.0 + age, has_fallback=fallback, grace_s=60.0) is want


def test_no_problem_is_healthy_whatever_else():
    for fb in (True, False):
        assert state_of(None, 1e9, has_fallback=fb, grace_s=1.0) is BackendState.HEALTHY


def test_change_messages_say_what_happens_and_what_to_do():
    kw = dict(backend="edgetpu", fallback="fmnist-edge:1 on tflite-cpu", reason="USB transfer error",
              grace_s=60.0, out_for_s=12.3, fallback_answers=40)
    degraded = change_message(BackendState.HEALTHY, BackendState.DEGRADED, **kw)
    assert "DEGRADED" in degraded and "USB transfer error" in degraded and "fmnist-edge:1 on tflite-cpu" in degraded
    back = change_message(BackendState.DEGRADED, BackendState.HEALTHY, **kw)
    assert "answers again after 12.3s" in back and "40 input(s)" in back
    lost = change_message(BackendState.RECOVERING, BackendState.LOST, **{**kw, "fallback": None})
    assert "LOST" in lost and "60s" in lost and 'fallback = "cpu"' in lost


def test_isolate_defaults_to_the_registry_accelerator_flag():
    assert ModelConfig(card=EDGE_CARD).isolated is False                       # tflite-cpu
    assert ModelConfig(card=EDGE_CARD, backend="edgetpu").isolated is True     # an accelerator
    assert ModelConfig(card=EDGE_CARD, backend="edgetpu", isolate=False).isolated is False
    assert ModelConfig(card=EDGE_CARD, isolate=True).isolated is True


def test_fallback_config_is_checked():
    with pytest.raises(ConfigError, match="needs model.isolate = true"):
        ModelConfig(card=EDGE_CARD, fallback="cpu")
    with pytest.raises(ConfigError, match='fallback = "none"'):
        ModelConfig(card=EDGE_CARD, isolate=True, fallback_card=EDGE_CARD)
    with pytest.raises(ConfigError, match="restart_min_s"):
        ModelConfig(card=EDGE_CARD, restart_min_s=40.0)
    assert ModelConfig(card=EDGE_CARD, backend="edgetpu", fallback="cpu").fallback == "cpu"


def _card(**extra):
    import json
    data = json.loads(EDGE_CARD.read_text())
    data.update(extra)
    return data


def test_card_fallback_card_is_relative_to_the_card(tmp_path):
    card = parse_card(_card(fallback_card="../fmnist-edge-v1/card.json"), tmp_path / "tpu" / "card.json")
    assert card.fallback_card == tmp_path / "tpu" / ".." / "fmnist-edge-v1" / "card.json"
    assert parse_card(_card(), tmp_path / "card.json").fallback_card is None


@pytest.mark.parametrize("value, match", [
    (3, "must be a path"), ("", "must be a path"), ("/abs/card.json", "relative"), ("card.json", "the card itself"),
])
def test_card_fallback_card_refused(tmp_path, value, match):
    with pytest.raises(ModelCardError, match=match):
        parse_card(_card(fallback_card=value), tmp_path / "card.json")


def test_check_config_checks_the_fallback_card(tmp_path, capsys):
    from edge_infer.cli import main
    cfg = tmp_path / "edge-infer.toml"
    base = f'device_id = "d"\nstate_dir = "{tmp_path}"\n[model]\ncard = "{EDGE_CARD}"\nisolate = true\nfallback = "cpu"\n'
    cfg.write_text(base + f'fallback_card = "{EDGE_CARD}"\n')
    assert main(["check-config", str(cfg)]) == 0
    assert "fallback fmnist-edge:1.0.0 on tflite-cpu" in capsys.readouterr().out
    cfg.write_text(base)                                   # the shipped card names no fallback
    assert main(["check-config", str(cfg)]) == 2
    assert 'needs the CPU model\'s card' in capsys.readouterr().err
    cfg.write_text(base + f'fallback_card = "{tmp_path / "nope.json"}"\n')
    assert main(["check-config", str(cfg)]) == 2
    assert "not found" in capsys.readouterr().err


def test_a_fallback_with_other_labels_stops_the_start_before_the_backend_is_claimed(tmp_path):
    import json

    from edge_infer.classifier import Classifier
    from edge_infer.config import PolicyConfig
    data = json.loads(EDGE_CARD.read_text())
    data["labels"] = [f"class-{i}" for i in range(len(data["labels"]))]
    data["file"] = str(EDGE_CARD.parent / data["file"])
    other = tmp_path / "card.json"
    other.write_text(json.dumps(data))
    clf = Classifier(ModelConfig(card=EDGE_CARD, isolate=True, fallback="cpu", fallback_card=other), PolicyConfig())
    with pytest.raises(ModelCardError, match="other labels") as err:
        clf.start()
    assert err.value.exit_code == 2 and clf.backend is None and clf.problem() is None   # no child was started
