#!/usr/bin/env python3
"""Compile the shipped int8 edge model for the Coral Edge TPU: models/fmnist-edge-v1-edgetpu/.

    python models/recipes/fmnist/compile_edgetpu.py            # where edgetpu_compiler is installed
    python -m edge_infer.backends.tflitemodel models/fmnist-edge-v1-edgetpu/model_edgetpu.tflite

Writes, beside the other model folders:

    fmnist-edge-v1-edgetpu/
      model_edgetpu.tflite   what edgetpu_compiler made from fmnist-edge-v1/model.tflite
      model_edgetpu.log      the compiler's per-operator table (what was mapped, and why not)
      card.json              the same input/output/labels as the CPU model's card, "accelerator": "edgetpu",
                             "fallback_card": "../fmnist-edge-v1/card.json" (the CPU model that answers while
                             the Edge TPU is missing), and what the compiler mapped ("edgetpu")

edgetpu_compiler exists only for x86-64 Debian/Ubuntu (Coral's apt repository, package
edgetpu-compiler); it does not run on ARM devices or here. Where it is missing this script says
how to install it and stops before writing anything. Compile on such a machine and copy the folder.

Exit status: 0 compiled and the card written; 1 the compiler failed or mapped nothing to the Edge TPU;
2 the source card or model is unusable (not full-integer, already compiled, sha256 mismatch);
3 edgetpu_compiler is not installed (or this is not x86-64).
"""
from __future__ import annotations

import argparse
import json
import platform
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import _data  # this folder's helpers (the script's folder is on sys.path)
from edge_infer.backends.tflitemodel import inspect_model
from edge_infer.errors import EdgeInferError
from edge_infer.modelcard import load_card, verified_model_bytes

SOURCE_CARD = _data.MODELS_DIR / "fmnist-edge-v1" / "card.json"
OUT_DIR = _data.MODELS_DIR / "fmnist-edge-v1-edgetpu"
EXIT_COMPILE_FAILED, EXIT_BAD_SOURCE, EXIT_NO_COMPILER = 1, 2, 3

INSTALL = """\
edgetpu_compiler is not installed here ({why}). It runs only on x86-64 Debian or Ubuntu. There, as root:

    curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg | gpg --dearmor -o /usr/share/keyrings/coral-edgetpu.gpg
    echo "deb [signed-by=/usr/share/keyrings/coral-edgetpu.gpg] https://packages.cloud.google.com/apt coral-edgetpu-stable main" \\
        > /etc/apt/sources.list.d/coral-edgetpu.list
    apt-get update && apt-get install edgetpu-compiler

then run this script again there (with this repository and edge_infer installed), and copy
{out} to the devices' model folder. Nothing was written."""


class RecipeError(Exception):
    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


def find_compiler(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        why = f"no {name} on PATH"
        if platform.machine() not in ("x86_64", "AMD64"):
            why += f"; this machine is {platform.machine()}, and there is no edgetpu_compiler for it"
        raise RecipeError(INSTALL.format(why=why, out=OUT_DIR), EXIT_NO_COMPILER)
    return path


def check_source(card_path: Path) -> tuple[object, bytes]:
    try:
        card = load_card(card_path)
        if card.format != "tflite" or {card.input.dtype, card.output.dtype} - {"int8", "uint8"}:
            raise RecipeError(f"{card_path}: the Edge TPU runs full-integer TFLite models; this card describes a "
                              f"{card.format} model with {card.input.dtype} input and {card.output.dtype} output "
                              "(export int8 with a representative data set: train_edge.py)", EXIT_BAD_SOURCE)
        model = verified_model_bytes(card)
        ops = inspect_model(model, str(card.file))
    except EdgeInferError as exc:
        raise RecipeError(str(exc), EXIT_BAD_SOURCE) from None
    if ops.compiled_for_edgetpu:
        raise RecipeError(f"{card.file} is already compiled for the Edge TPU: {ops.summary()}", EXIT_BAD_SOURCE)
    return card, model


_TABLE_ROW = re.compile(r"^(\S+)\s+(\d+)\s+(\S.*?)\s*$")


def parse_compiler_report(text: str) -> dict:
    """What edgetpu_compiler's summary and per-operator table say (its stdout or its .log file)."""
    out: dict = {}
    version = re.search(r"Edge TPU Compiler version (\S+)", text)
    if version:
        out["compiler"] = version.group(1)
    for key, pattern in (("subgraphs", r"Number of Edge TPU subgraphs: (\d+)"),
                         ("operations", r"Total number of operations: (\d+)")):
        m = re.search(pattern, text)
        if m:
            out[key] = int(m.group(1))
    mapped, cpu, reasons = 0, 0, {}
    for line in text.splitlines():
        m = _TABLE_ROW.match(line.strip())
        if not m or not m.group(1).isupper():
            continue
        op, count, status = m.group(1), int(m.group(2)), m.group(3)
        if status.startswith("Mapped to Edge TPU"):
            mapped += count
        else:
            cpu += count
            reasons[op] = status
    if mapped or cpu:
        out.update(ops_on_edgetpu=mapped, ops_on_cpu=cpu)
    if reasons:
        out["not_mapped"] = reasons
    return out


def compile_model(compiler: str, source: Path, workdir: Path, min_runtime: int | None) -> tuple[Path, str]:
    cmd = [compiler, "-s", "-o", str(workdir)]
    if min_runtime is not None:
        cmd += ["--min_runtime_version", str(min_runtime)]
    p = subprocess.run([*cmd, str(source)], capture_output=True, text=True, timeout=600)
    compiled = workdir / f"{source.stem}_edgetpu.tflite"
    if p.returncode != 0 or not compiled.exists():
        raise RecipeError(f"{' '.join(cmd)} {source} failed (exit {p.returncode}):\n{p.stdout}{p.stderr}",
                          EXIT_COMPILE_FAILED)
    return compiled, p.stdout + p.stderr


def edgetpu_card(source_card: Path, model: Path, report: dict, source_sha: str) -> dict:
    src = json.loads(source_card.read_text())
    card = {k: src[k] for k in ("schema", "params", "labels", "input", "output") if k in src}
    card.update(
        name=f"{src['name']}-edgetpu", version=src["version"], role=src.get("role", "edge"), format="tflite",
        file=model.name, sha256=_data.sha256_file(model),
        accelerator="edgetpu",
        # the CPU model answers while the Edge TPU is missing or failing ([model] fallback = "cpu")
        fallback_card=f"../{source_card.parent.name}/{source_card.name}",
        compiled_from={"card": f"../{source_card.parent.name}/{source_card.name}", "sha256": source_sha},
        edgetpu=report,
        metrics={},   # measured on a device: tests/hardware/test_edgetpu_hw.py, models/recipes/fmnist/evaluate.py
    )
    return card


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--source-card", type=Path, default=SOURCE_CARD, help="the int8 CPU model's card")
    p.add_argument("--out", type=Path, default=OUT_DIR, help="the folder to write (replaced)")
    p.add_argument("--compiler", default="edgetpu_compiler", help="the compiler's name or path")
    p.add_argument("--min-runtime-version", type=int, default=None,
                   help="oldest libedgetpu runtime the model must load on (edgetpu_compiler -m)")
    args = p.parse_args(argv)
    try:
        card, model = check_source(args.source_card)
        compiler = find_compiler(args.compiler)
        with tempfile.TemporaryDirectory() as tmp:
            work = Path(tmp)
            source = work / card.file.name
            source.write_bytes(model)
            compiled, output = compile_model(compiler, source, work, args.min_runtime_version)
            log_file = compiled.with_suffix(".log")
            report = parse_compiler_report(output + (log_file.read_text() if log_file.exists() else ""))
            ops = inspect_model(compiled.read_bytes(), str(compiled))
            if not ops.compiled_for_edgetpu:
                raise RecipeError(f"edgetpu_compiler mapped nothing to the Edge TPU ({ops.summary()}):\n{output}",
                                  EXIT_COMPILE_FAILED)
            report["segments"] = ops.edgetpu_ops
            args.out.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(compiled, args.out / compiled.name)
            if log_file.exists():
                shutil.copyfile(log_file, args.out / log_file.name)
        _data.write_json(args.out / "card.json",
                         edgetpu_card(args.source_card, args.out / compiled.name, report, card.sha256))
        written = load_card(args.out / "card.json")       # the runtime's reader accepts what was written
        verified_model_bytes(written)
    except RecipeError as exc:
        print(f"compile_edgetpu: {exc}", file=sys.stderr)
        return exc.code
    print(f"{args.out / compiled.name}: {ops.summary()}")
    if ops.mostly_cpu:
        print("WARNING: most of the model stays on the CPU; see model_edgetpu.log", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
