#!/usr/bin/env bash
# Download the wheels bench/gpu_check.sh installs on a GPU machine that has no network.
#
#   bench/gpu_wheels.sh DIR              # download into DIR (several hundred MB: TensorRT's libraries, onnxruntime-gpu)
#   bench/gpu_wheels.sh --dry-run DIR    # resolve every pin for the target and print what would come, download nothing
#
# The target is the machine the wheels are for, not this one; the defaults are this workplace's H200 image
# (Python 3.12, x86-64 manylinux, CUDA 13 user space already installed: cuda-bindings, nvidia-cuda-runtime,
# cudnn-cu13, cublas). Override with the variables below. A Jetson needs none of this: JetPack 6 has
# TensorRT 10.3 (apt python3-libnvinfer) and CUDA 12.6; only cuda-python comes from pip there.
#
#   PY_VERSION   3.12          target interpreter (cp312)
#   CUDA_MAJOR   13            tensorrt-cu13 / tensorrt-cu12
#   TRT_VERSION  10.16.1.11    TensorRT 10: what onnxruntime-gpu's TensorRT provider links (libnvinfer.so.10), and the
#                              API the device backend keeps to (10.3 on JetPack); 11.x tests the device backend alone
#   ORT_VERSION  1.31.1        onnxruntime-gpu: its PyPI wheel (255.6 MB) is a CUDA 13 build (its [cuda] extra pins
#                              nvidia-cuda-runtime~=13.0, [cudnn] nvidia-cudnn-cu13); which TensorRT major its
#                              TensorRT provider links is not read here: gpu_check.py records whether it starts
#   CUDA_PYTHON  ""            a cuda-python pin (e.g. "12.9.10" for CUDA 12); "" = the target already has cuda-bindings
#   NVIDIA_INDEX_URL ""        NVIDIA's own package index: PyPI has only source stubs of tensorrt-cu1x-libs, the real
#                              wheels are on NVIDIA's index (pass its URL here; this repository names no hosts)
set -euo pipefail

DRY=0
if [ "${1:-}" = "--dry-run" ]; then DRY=1; shift; fi
DIR=${1:?usage: bench/gpu_wheels.sh [--dry-run] DIR}
PY_VERSION=${PY_VERSION:-3.12}
CUDA_MAJOR=${CUDA_MAJOR:-13}
TRT_VERSION=${TRT_VERSION:-10.16.1.11}
ORT_VERSION=${ORT_VERSION:-1.31.1}
CUDA_PYTHON=${CUDA_PYTHON:-}
PIP=${PIP:-python3 -m pip}

# what the target lacks (the rest of edge-infer's runtime, numpy and pillow, is on the image); one version of each
WANT=(
  "tensorrt-cu${CUDA_MAJOR}-bindings==${TRT_VERSION}"
  "tensorrt-cu${CUDA_MAJOR}-libs==${TRT_VERSION}"
  "onnxruntime-gpu==${ORT_VERSION}"
  "paho-mqtt>=2.1,<3"
  "ai-edge-litert==2.3.0"        # the TFLite CPU model: the fallback and the labels the GPU is compared with
  "backports.strenum"            # ai-edge-litert needs it; its other needs (flatbuffers, protobuf, ml_dtypes) are there
)
[ -n "$CUDA_PYTHON" ] && WANT+=("cuda-python==${CUDA_PYTHON}" "cuda-bindings==${CUDA_PYTHON}")

TARGET=(--only-binary=:all: --python-version "$PY_VERSION" --implementation cp
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
        --platform manylinux2014_x86_64)
INDEX=()
[ -n "${NVIDIA_INDEX_URL:-}" ] && INDEX=(--extra-index-url "$NVIDIA_INDEX_URL")

mkdir -p "$DIR"
if [ "$DRY" = 1 ]; then
  # resolve without downloading the wheels (pip reads their metadata only), and say what each would be
  report="$DIR/gpu_wheels_report.json"
  $PIP install --dry-run --ignore-installed --no-deps --quiet --report "$report" --target "$DIR/.dry" \
      "${TARGET[@]}" "${INDEX[@]}" "${WANT[@]}" || {
    echo "gpu_wheels: not every pin resolves for Python $PY_VERSION x86-64 (tensorrt-cu${CUDA_MAJOR}-libs needs" \
         "NVIDIA_INDEX_URL: PyPI has only its source stub)" >&2; exit 1; }
  python3 - "$report" <<'EOF'
import json, sys
for item in json.load(open(sys.argv[1]))["install"]:
    print(f'{item["metadata"]["name"]}=={item["metadata"]["version"]}  {item["download_info"]["url"].rsplit("/", 1)[-1]}')
EOF
  exit 0
fi
# --no-deps: the image has numpy, protobuf, flatbuffers, packaging; a second numpy would break the install there
$PIP download --no-deps "${TARGET[@]}" "${INDEX[@]}" -d "$DIR" "${WANT[@]}"
ls -l "$DIR"
du -sh "$DIR"
