#!/usr/bin/env bash
# Every GPU check of issue 17 in one run, on a GPU machine without network (docs/backends.md, "TensorRT").
#
#   bench/gpu_check.sh WHEEL_DIR [OUT_DIR] [gpu_check.py options...]
#   bench/gpu_check.sh - "$OUT"                   # "-": everything is installed already (no wheels)
#
# WHEEL_DIR: what bench/gpu_wheels.sh downloaded (TensorRT's bindings and libraries, onnxruntime-gpu, paho-mqtt,
# ai-edge-litert, ...), installed with pip --no-index. This repository is installed too (not editable: the isolated
# inference child runs `python -I`, which ignores PYTHONPATH). OUT_DIR (default $OUT, else bench/results) gets
# gpu_check.json (also printed) and gpu_check.log. Budget: about 5 to 8 minutes on one GPU (engine builds
# dominate); GPU_CHECK_TIMEOUT (default 540 s) bounds the measuring part.
set -uo pipefail
cd "$(dirname "$0")/.."
WHEELS=${1:?usage: bench/gpu_check.sh WHEEL_DIR|- [OUT_DIR] [gpu_check.py options]}
OUT_DIR=${2:-${OUT:-bench/results}}
shift $(( $# >= 2 ? 2 : 1 ))
PY=${PYTHON:-python3}
mkdir -p "$OUT_DIR"
exec > >(tee "$OUT_DIR/gpu_check.log") 2>&1

echo "== $(date -Is) $(uname -m) $($PY --version 2>&1)"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || echo "nvidia-smi: not found or failed"

echo "== install"
if [ "$WHEELS" != "-" ]; then
  ls "$WHEELS"/*.whl >/dev/null || { echo "no wheels in $WHEELS"; exit 3; }
  # onnxruntime and onnxruntime-gpu are one module: the CPU build left in place would shadow the GPU one
  if ls "$WHEELS"/onnxruntime_gpu-*.whl >/dev/null 2>&1; then $PY -m pip uninstall -y -q onnxruntime || true; fi
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir "$WHEELS"/*.whl || exit 3
fi
$PY -m pip install -q --no-index --no-deps --no-build-isolation --no-cache-dir . || exit 3
# onnxruntime's TensorRT provider dlopens libnvinfer: the wheel keeps it in tensorrt_libs, CUDA in nvidia/*/lib
SITE=$($PY -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
LIBS=""
for d in "$SITE"/tensorrt_libs "$SITE"/nvidia/*/lib; do [ -d "$d" ] && LIBS="$LIBS:$d"; done
export LD_LIBRARY_PATH="${LIBS#:}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export PYTHONUNBUFFERED=1
$PY -m pip list 2>/dev/null | grep -i -E "tensorrt|onnxruntime|cuda|numpy|litert|paho|edge-infer" || true

echo "== measure"
timeout "${GPU_CHECK_TIMEOUT:-540}" $PY bench/gpu_check.py --out "$OUT_DIR/gpu_check.json" "$@"
rc=$?
echo "== $(date -Is) wrote $OUT_DIR/gpu_check.json (exit $rc)"
exit $rc
