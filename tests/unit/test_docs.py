import importlib.util
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    return gen


def test_configuration_reference_is_up_to_date():
    gen = _script("gen_config_docs")
    assert (REPO / "docs" / "configuration.md").read_text() == gen.render(), \
        "docs/configuration.md is stale: run scripts/gen_config_docs.py > docs/configuration.md"


def test_outbox_states_diagrams_are_up_to_date():
    gen = _script("gen_state_docs")
    for name in gen.FILES:
        text = (REPO / name).read_text()
        assert text.count(gen.BEGIN) == 1 and text.count(gen.END) == 1, f"{name}: states markers missing"
        assert gen.update(text, name) == text, f"{name} is stale: run scripts/gen_state_docs.py"


def test_outbox_states_diagram_shows_every_transition():
    """Each edge of storeschema.TRANSITIONS is on a line of the diagram, with its reason."""
    from edge_infer.storeschema import TRANSITION_REASONS, TRANSITIONS

    lines = _script("gen_state_docs").render().splitlines()
    for source, targets in TRANSITIONS.items():
        for target in targets:
            for why in TRANSITION_REASONS[source, target]:
                assert any(line.endswith(why) and f" -> {target.value} " in line
                           and source.value in line.split(" -> ")[0].split(", ") for line in lines), (source, target)
