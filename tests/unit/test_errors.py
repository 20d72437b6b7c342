"""One error root: every error edge-infer raises for an operator has an exit code, and the CLIs map it once."""
from __future__ import annotations

import importlib
import inspect
import pkgutil

import edge_infer
import edge_infer_cloud
from edge_infer.errors import EdgeInferError


def _own_exception_classes():
    for pkg in (edge_infer, edge_infer_cloud):
        for info in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + "."):
            if info.name.endswith(("__main__", ".tensorrt", ".edgetpu")):
                continue
            module = importlib.import_module(info.name)
            for name, obj in vars(module).items():
                if inspect.isclass(obj) and issubclass(obj, BaseException) and obj.__module__ == info.name:
                    yield info.name, name, obj


def test_every_error_class_of_the_project_is_under_the_one_root():
    found = list(_own_exception_classes())
    assert len(found) >= 10
    outside = [f"{mod}.{name}" for mod, name, cls in found
               if not issubclass(cls, EdgeInferError) and not name.startswith("_")]
    assert outside == []


def test_errors_the_operator_must_fix_exit_2_and_passing_ones_are_marked_transient():
    from edge_infer.errors import StoreError, StoreUnavailable
    from edge_infer.modelcard import ModelCardError
    from edge_infer.tomlcfg import ConfigError
    assert ConfigError("x").exit_code == ModelCardError("x").exit_code == 2
    assert StoreError("x", kind="corrupt").exit_code == 2
    assert StoreUnavailable("x").transient and StoreUnavailable("x").exit_code == 1


def test_the_cli_turns_an_error_into_one_line_and_its_exit_code(tmp_path, capsys):
    from edge_infer.cli import main
    assert main(["status", "--config", str(tmp_path / "missing.toml")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "missing.toml" in err and "Traceback" not in err
