import importlib.util
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_configuration_reference_is_up_to_date():
    spec = importlib.util.spec_from_file_location("gen", REPO / "scripts" / "gen_config_docs.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    assert (REPO / "docs" / "configuration.md").read_text() == gen.render(), \
        "docs/configuration.md is stale: run scripts/gen_config_docs.py > docs/configuration.md"
