"""models/recipes/fmnist/_arch.py: every edge network train_cascade.py can train (--arch) stays
under the 10,000-parameter budget, counted as Keras counts (BatchNorm's four per channel included).

The count comes from each arch's steps, so the budget is checked without TensorFlow; where
TensorFlow is installed (the training venv) the built Keras model must agree with it.
"""
from __future__ import annotations

import importlib.util
import sys

import pytest

from ..conftest import REPO

RECIPES = REPO / "models" / "recipes" / "fmnist"
MAX_PARAMS = 10_000


@pytest.fixture(scope="module")
def arch():
    spec = importlib.util.spec_from_file_location("_arch", RECIPES / "_arch.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_v1_count_matches_the_shipped_card(arch):
    # the step counter reproduces fmnist-edge-v1's own figure (its card and models/README.md)
    import json
    card = json.loads((REPO / "models" / "fmnist-edge-v1" / "card.json").read_text())
    assert arch.param_count("v1") == card["params"]


@pytest.mark.parametrize("name", ["v1", "sep80", "sep96r", "sep128"])
def test_every_arch_is_under_budget(arch, name):
    assert name in arch.ARCHS
    assert 0 < arch.param_count(name) < MAX_PARAMS


def test_only_known_steps(arch):
    known = {"conv", "pw", "dw", "dwres", "pool"}
    for name, steps in arch.SPECS.items():
        assert {s[0] for s in steps} <= known, name


def test_unknown_arch_is_refused(arch):
    with pytest.raises(SystemExit):
        arch.builder("nope")


def test_keras_agrees_where_tensorflow_is_installed(arch, monkeypatch):
    tf = pytest.importorskip("tensorflow")
    monkeypatch.syspath_prepend(str(RECIPES))   # v1's builder is train_edge.build_model
    for name in arch.ARCHS:
        model = arch.builder(name)(tf)
        assert model.count_params() == arch.param_count(name), name
        assert model.output_shape == (None, 10), name
    sys.modules.pop("train_edge", None)
