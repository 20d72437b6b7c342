"""models/recipes/fmnist/compile_edgetpu.py up to the compiler, and past it with a stand-in compiler.

edgetpu_compiler runs only on x86-64 Debian/Ubuntu with Coral's apt repository; here it is absent,
so the recipe must stop with the install commands and exit 3, writing nothing. A stand-in compiler
(it writes what a partial compile looks like to the file reader, and a log in the real compiler's
format) checks the rest: the card it writes loads with the runtime's own reader and names the CPU
fallback.
"""
from __future__ import annotations

import importlib.util
import json
import os
import stat
import subprocess
import sys
import textwrap

import pytest

from edge_infer.modelcard import load_card, verified_model_bytes

from ..conftest import CLOUD_CARD, EDGE_CARD, REPO

RECIPE = REPO / "models" / "recipes" / "fmnist" / "compile_edgetpu.py"

LOG = """\
Edge TPU Compiler version 16.0.384591198
Input: model.tflite
Output: model_edgetpu.tflite

Operator                       Count      Status

CONV_2D                        3          Mapped to Edge TPU
CONV_2D                        1          Operation is otherwise supported, but not mapped due to some unspecified limitation
DEPTHWISE_CONV_2D              2          Mapped to Edge TPU
MAX_POOL_2D                    2          Mapped to Edge TPU
FULLY_CONNECTED                1          Mapped to Edge TPU
MEAN                           1          Mapped to Edge TPU
"""


def _run(*args, path: str, timeout: int = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": path}
    return subprocess.run([sys.executable, str(RECIPE), *args], capture_output=True, text=True, env=env,
                          timeout=timeout, cwd=REPO)


def _fake_compiler(folder, *, fail: bool = False):
    """An executable named edgetpu_compiler that takes the real one's -s -o DIR MODEL arguments."""
    folder.mkdir(exist_ok=True)
    exe = folder / "edgetpu_compiler"
    exe.write_text(textwrap.dedent(f"""\
        #!{sys.executable}
        import sys
        from pathlib import Path
        sys.path.insert(0, {str(REPO)!r})
        from tests.edgetpu_fakes import with_first_op_on_the_edgetpu
        args = sys.argv[1:]
        if {fail!r}:
            print("Internal compiler error. Aborting!")
            sys.exit(1)
        out, src = Path(args[args.index("-o") + 1]), Path(args[-1])
        (out / (src.stem + "_edgetpu.tflite")).write_bytes(with_first_op_on_the_edgetpu(src.read_bytes()))
        (out / (src.stem + "_edgetpu.log")).write_text({LOG!r})
        print("Edge TPU Compiler version 16.0.384591198")
        print("Model compiled successfully in 41 ms.")
        print("Number of Edge TPU subgraphs: 1")
        print("Total number of operations: 10")
        """))
    exe.chmod(exe.stat().st_mode | stat.S_IXUSR)
    return folder


def test_without_edgetpu_compiler_it_says_how_to_install_it_and_writes_nothing(tmp_path):
    out = tmp_path / "out"
    empty = tmp_path / "empty-path"
    empty.mkdir()
    p = _run("--out", str(out), path=str(empty))
    assert p.returncode == 3, p.stderr
    for needle in ("edgetpu_compiler is not installed here (no edgetpu_compiler on PATH", "x86-64 Debian or Ubuntu",
                   "coral-edgetpu-stable main", "apt-get install edgetpu-compiler", "Nothing was written"):
        assert needle in p.stderr, needle
    assert "Traceback" not in p.stderr and not out.exists()


def test_with_a_compiler_it_writes_the_model_its_log_and_a_card_the_runtime_reads(tmp_path):
    out = tmp_path / "fmnist-edge-v1-edgetpu"
    bin_dir = _fake_compiler(tmp_path / "bin")
    p = _run("--out", str(out), path=f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    assert p.returncode == 0, p.stderr
    assert "model_edgetpu.tflite: compiled for the Edge TPU: 1 Edge TPU segment(s)" in p.stdout
    assert "WARNING: most of the model stays on the CPU" in p.stderr   # the stand-in maps one op of ten
    assert sorted(f.name for f in out.iterdir()) == ["card.json", "model_edgetpu.log", "model_edgetpu.tflite"]
    card = load_card(out / "card.json")
    assert verified_model_bytes(card) == (out / "model_edgetpu.tflite").read_bytes()
    cpu = load_card(EDGE_CARD)
    assert (card.name, card.format, card.labels, card.input, card.output) == (
        "fmnist-edge-edgetpu", "tflite", cpu.labels, cpu.input, cpu.output)
    raw = json.loads((out / "card.json").read_text())
    assert raw["accelerator"] == "edgetpu" and raw["fallback_card"] == "../fmnist-edge-v1/card.json"
    assert raw["compiled_from"] == {"card": "../fmnist-edge-v1/card.json", "sha256": cpu.sha256}
    assert raw["edgetpu"] == {"compiler": "16.0.384591198", "subgraphs": 1, "operations": 10, "ops_on_edgetpu": 9,
                              "ops_on_cpu": 1, "segments": 1, "not_mapped": {
                                  "CONV_2D": "Operation is otherwise supported, but not mapped due to some "
                                             "unspecified limitation"}}


def test_a_failing_compiler_is_exit_1_with_its_output(tmp_path):
    bin_dir = _fake_compiler(tmp_path / "bin", fail=True)
    p = _run("--out", str(tmp_path / "out"), path=f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    assert p.returncode == 1 and "Internal compiler error" in p.stderr and not (tmp_path / "out").exists()


def test_a_source_that_is_not_a_full_integer_tflite_model_is_exit_2(tmp_path):
    bin_dir = _fake_compiler(tmp_path / "bin")
    p = _run("--source-card", str(CLOUD_CARD), "--out", str(tmp_path / "out"), path=str(bin_dir))
    assert p.returncode == 2 and "the Edge TPU runs full-integer TFLite models" in p.stderr, p.stderr


@pytest.fixture
def recipe(monkeypatch):
    monkeypatch.syspath_prepend(str(RECIPE.parent))
    spec = importlib.util.spec_from_file_location("compile_edgetpu", RECIPE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_compiler_report_parser(recipe):
    assert recipe.parse_compiler_report(LOG + "Number of Edge TPU subgraphs: 2\n") == {
        "compiler": "16.0.384591198", "subgraphs": 2, "ops_on_edgetpu": 9, "ops_on_cpu": 1,
        "not_mapped": {"CONV_2D": "Operation is otherwise supported, but not mapped due to some unspecified "
                                  "limitation"}}
    assert recipe.parse_compiler_report("nothing useful") == {}
