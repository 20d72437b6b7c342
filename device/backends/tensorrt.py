"""TensorRT on an NVIDIA GPU: a Jetson (JetPack 6: TensorRT 10.3, CUDA 12.6, Python 3.10) or an x86-64 host.

The card names an ONNX model (``"format": "onnx"``, the same file the
onnxruntime backend runs); this backend builds a TensorRT engine from it, or
loads the engine it built before from ``engine_cache_dir``. The cache file's
name is a digest of everything that makes an engine valid (:class:`EngineKey`:
the model's sha256, the TensorRT version, the GPU's name and compute
capability, the precision, the input shapes and the workspace), so a JetPack
upgrade or another GPU builds a fresh engine instead of loading one that
TensorRT would refuse or, worse, run slower.

**Precision is the model file's.** The network is strongly typed, the only
kind TensorRT 11 builds (its FP16/INT8 builder flags and the INT8 calibrator
are removed; the calibrator is deprecated since 10.1) and one TensorRT 10.3
builds the same way: an ONNX file with float32 weights makes an FP32 engine,
float16 weights an FP16 one, QuantizeLinear/DequantizeLinear nodes an INT8 one
(explicit quantization). models/recipes/fmnist/export_trt_onnx.py makes the
three files and their cards; ``[backend.tensorrt] precision`` says which one
the configuration means and is checked against the file (:mod:`.onnxgraph`
reads it without TensorRT), so a card pointing at the wrong file is refused
rather than run at another precision.

**Static shapes, buffers allocated once.** The engine has one optimization
profile per batch size it runs, each fixed (min = opt = max): batch 1, and
``max_batch`` when it is above 1 and the model's batch dimension is dynamic.
Each profile has its own execution context with its device and page-locked
host buffers, allocated and bound (``set_tensor_address``) at load; an invoke
copies in, ``execute_async_v3``, copies out on one CUDA stream. A batch shorter
than ``max_batch`` is padded to it (one run of the big profile costs less than
several of the small one on a GPU).

Only API common to TensorRT 10.3 and 11 is used: ``Builder``,
``create_network``, ``OnnxParser``, ``create_builder_config``,
``set_memory_pool_limit``, optimization profiles, ``build_serialized_network``,
``Runtime.deserialize_cuda_engine``, the named-tensor API (``num_io_tensors``,
``get_tensor_name/shape/dtype/mode``) and ``execute_async_v3``. Device memory
and the stream come from cuda-python's runtime bindings (``cuda.bindings.runtime``,
or ``cuda.cudart`` in older releases). Neither is imported at module load.

Failures name the fix: TensorRT or cuda-python not installed (exit 2); no
usable GPU (``transient``, exit 2 like a missing Edge TPU: with ``[model]
fallback = "cpu"`` the card's ``fallback_card`` answers, without one the start
stops with this line); an ONNX file TensorRT cannot parse or build (exit 2).
"""
from __future__ import annotations

import ctypes
import hashlib
import importlib
import importlib.metadata
import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..modelcard import ModelCard
from ..tomlcfg import in_range, one_of, option
from . import BackendError, TensorSpec, invoke_chunked
from .onnxgraph import PRECISIONS, OnnxGraph, inspect_onnx

log = logging.getLogger(__name__)

DEFAULT_CACHE_DIR = "/var/lib/edge-infer/tensorrt"
INSTALL_TENSORRT = (
    "on a Jetson, JetPack 6's TensorRT Python bindings: `apt-get install python3-libnvinfer` (TensorRT 10.3 for "
    "the system Python 3.10; a venv needs --system-site-packages to see it); on an x86-64 host, `pip install "
    "tensorrt-cu12` (docs/backends.md, 'TensorRT')")
INSTALL_CUDA_PYTHON = ("install cuda-python for the CUDA major version TensorRT uses: `pip install 'cuda-python>=12.6,<13'` "
                       "for CUDA 12 (JetPack 6, tensorrt-cu12)")
GPU_HINT = ("check the GPU and its driver: `nvidia-smi` (x86-64) or `tegrastats` and `ls -l /dev/nvhost-* /dev/nvmap` "
            "(Jetson); the service user needs the video group, and the unit's DeviceAllow= the GPU's nodes")


def _cache_dir(value: str) -> str | None:
    if value and not os.path.isabs(value):
        return f"must be an absolute path (or \"\" for no cache), not {value!r}"
    return None


@dataclass(frozen=True, kw_only=True)
class Options:
    """``[backend.tensorrt]``."""

    precision: str = option("auto", help='the engine\'s precision, which is the ONNX file\'s under strong typing: '
                                         '"auto" (whatever the card\'s file is), or "fp32", "fp16", "int8" to have '
                                         "it checked (the card must then name that file: model_fp16.onnx, "
                                         "model_qdq.onnx)", check=one_of("auto", *PRECISIONS))
    max_batch: int = option(1, help="most inputs one run takes: 1 builds a batch-1 engine only; N > 1 adds a "
                                    "second static profile of N (for a model with a dynamic batch dimension)",
                            check=in_range(1, 4096))
    engine_cache_dir: str = option(DEFAULT_CACHE_DIR, help="where built engines are kept, one file per model, "
                                   "TensorRT version, GPU, precision and shape (\"\": none, build at every start); "
                                   "must be writable by the service (the unit's StateDirectory is)",
                                   check=_cache_dir)
    workspace_mib: int = option(256, help="most GPU memory TensorRT's builder may use for scratch space while it "
                                          "times kernels, in MiB", check=in_range(16, 65536))
    device: int = option(0, help="CUDA device index (a Jetson has one GPU: 0)", check=in_range(0, 64))


# ----------------------------------------------------------------------------- the engine cache (pure)

@dataclass(frozen=True)
class EngineKey:
    """Everything an engine depends on; a change in any field builds a new one."""

    model_sha256: str
    tensorrt: str                    # "10.3.0.30"
    gpu: str                         # "Orin", "NVIDIA H200"
    compute_capability: str          # "8.7", "9.0"
    precision: str                   # fp32, fp16, int8
    #: the input shape of each optimization profile, e.g. ((1, 1, 28, 28), (64, 1, 28, 28))
    shapes: tuple[tuple[int, ...], ...]
    workspace_mib: int

    def digest(self) -> str:
        text = json.dumps(asdict(self), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["shapes"] = [list(s) for s in self.shapes]
        return d


def engine_path(cache_dir: str | Path, key: EngineKey, model_name: str) -> Path:
    """``<cache_dir>/<model>-<precision>-<first 16 hex of the key's digest>.engine``."""
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in model_name)[:64] or "model"
    return Path(cache_dir) / f"{safe}-{key.precision}-{key.digest()[:16]}.engine"


def profile_shapes(input_dims: tuple[int, ...], dynamic_batch: bool, max_batch: int) -> tuple[tuple[int, ...], ...]:
    """The static input shape of each profile: batch 1, and ``max_batch`` where the batch dimension allows it."""
    one = (1, *input_dims[1:])
    if dynamic_batch and max_batch > 1:
        return one, (max_batch, *input_dims[1:])
    return (one,)


def check_precision(graph: OnnxGraph, wanted: str, card: ModelCard) -> str:
    """The model's precision; BackendError (exit 2) when ``wanted`` is not "auto" and differs."""
    have = graph.precision
    if wanted not in ("auto", have):
        what = {"int8": "QuantizeLinear/DequantizeLinear nodes (model_qdq.onnx)",
                "fp16": "float16 weights (model_fp16.onnx)", "fp32": "float32 weights only (model.onnx)"}
        raise BackendError(f"backend.tensorrt.precision = {wanted!r}, but {card.file} is a {have} model: a strongly "
                           f"typed engine has the file's precision, and {wanted} needs a file with "
                           f"{what[wanted]}. Point [model] card at that model's card (models/fmnist-edge-v1-trt/: "
                           "card.json fp32, card_fp16.json, card_int8.json), or set precision = \"auto\"")
    return have


def check_io(card: ModelCard, graph: OnnxGraph) -> tuple[tuple[int, ...], bool]:
    """The card describes the graph's one input and output. Returns the input dims (batch as in the card) and
    whether the batch dimension is dynamic; BackendError (exit 2) otherwise."""
    if len(graph.inputs) != 1 or len(graph.outputs) != 1:
        raise BackendError(f"{card.file}: has {len(graph.inputs)} inputs and {len(graph.outputs)} outputs; a card "
                           "describes a model with one of each")
    (inp,), (out,) = graph.inputs, graph.outputs
    spec = card.input
    rest_ok = len(inp.dims) == len(spec.shape) and all(
        d == c for d, c in zip(inp.dims[1:], spec.shape[1:]))
    batch_ok = inp.batch_is_dynamic or inp.dims[:1] == (1,)
    if inp.dtype != spec.dtype or not rest_ok or not batch_ok:
        raise BackendError(f"{card.file}: input is {inp.dims} {inp.dtype}, but the card says {spec.shape} "
                           f"{spec.dtype}; the card does not describe this model")
    classes = len(card.labels)
    last = out.dims[-1] if out.dims else None
    if out.dtype != card.output.dtype or len(out.dims) != 2 or (isinstance(last, int) and last != classes):
        raise BackendError(f"{card.file}: output is {out.dims} {out.dtype}, but the card says (N, {classes}) "
                           f"{card.output.dtype} ({classes} labels)")
    return tuple(spec.shape), inp.batch_is_dynamic


# ----------------------------------------------------------------------------- the runtimes, imported lazily

def import_tensorrt() -> tuple[Any, str]:
    """``tensorrt`` (JetPack's python3-libnvinfer, the tensorrt-cu1x metapackage), or ``tensorrt_bindings``: the same
    module from the standalone tensorrt-cu1x-bindings wheel installed without its metapackage."""
    first: ImportError | None = None
    for name in ("tensorrt", "tensorrt_bindings"):
        try:
            trt = importlib.import_module(name)
            break
        except ImportError as exc:
            first = first or exc
        except OSError as exc:   # the wheel's libnvinfer found no libcudart or driver
            raise BackendError(f"TensorRT is installed but its libraries do not load ({exc}); {GPU_HINT}") from None
    else:
        raise BackendError(f"TensorRT's Python bindings are not installed ({first}); install them: "
                           f"{INSTALL_TENSORRT}") from None
    return trt, f"TensorRT {getattr(trt, '__version__', 'unknown')}"


def import_cudart() -> tuple[Any, str]:
    errors = []
    for name in ("cuda.bindings.runtime", "cuda.cudart"):   # cuda-python >= 12.6.1 (13: only the first); older
        try:
            module = importlib.import_module(name)
            break
        except ImportError as exc:
            errors.append(f"{name}: {exc}")
    else:
        raise BackendError(f"cuda-python is not installed ({'; '.join(errors)}): the TensorRT backend allocates "
                           f"GPU memory with it; {INSTALL_CUDA_PYTHON}") from None
    version = "unknown"
    for dist in ("cuda-python", "cuda-bindings"):
        try:
            version = importlib.metadata.version(dist)
            break
        except importlib.metadata.PackageNotFoundError:
            continue
    return module, f"cuda-python {version}"


@dataclass(frozen=True)
class Gpu:
    index: int
    name: str
    compute_capability: str
    memory_mib: int

    def describe(self) -> str:
        return f"GPU {self.index}: {self.name} (compute capability {self.compute_capability}, {self.memory_mib} MiB)"


class _Cuda:
    """The handful of CUDA runtime calls the backend makes, each checked; errors are BackendError."""

    def __init__(self, cudart: Any) -> None:
        self.rt = cudart
        self.ok = cudart.cudaError_t.cudaSuccess

    def call(self, what: str, result: Any, *, transient: bool = True) -> Any:
        err, *value = result if isinstance(result, tuple) else (result,)
        if err != self.ok:
            try:
                text = self.rt.cudaGetErrorString(err)[1].decode(errors="replace")
            except Exception:   # the error string itself is best effort
                text = str(err)
            raise BackendError(f"CUDA {what} failed: {text} ({err}); {GPU_HINT}", transient=transient, exit_code=2)
        return value[0] if len(value) == 1 else tuple(value)

    def gpu(self, index: int) -> Gpu:
        try:
            result = self.rt.cudaGetDeviceCount()
        except Exception as exc:   # cuda-python raises when it cannot load the CUDA runtime or driver library
            raise BackendError(f"the CUDA runtime does not load ({exc}); {GPU_HINT}", transient=True,
                               exit_code=2) from None
        count = self.call("cudaGetDeviceCount", result)
        if count == 0:
            raise BackendError(f"no CUDA GPU found; {GPU_HINT}", transient=True, exit_code=2)
        if index >= count:
            raise BackendError(f"backend.tensorrt.device = {index}, but this machine has {count} CUDA GPU(s) "
                               f"(0..{count - 1})")
        props = self.call("cudaGetDeviceProperties", self.rt.cudaGetDeviceProperties(index))
        name = props.name
        name = name.split(b"\0", 1)[0].decode(errors="replace") if isinstance(name, bytes) else str(name)
        return Gpu(index, name.strip(), f"{props.major}.{props.minor}", int(props.totalGlobalMem) >> 20)


def probe(options: Options) -> str:
    """"TensorRT 10.3.0 + cuda-python 12.6.2; GPU 0: Orin (...)": the runtimes load and a GPU answers (device
    queries only: no model, no engine, no allocation)."""
    _, trt_runtime = import_tensorrt()
    cudart, cuda_runtime = import_cudart()
    gpu = _Cuda(cudart).gpu(options.device)
    return f"{trt_runtime} + {cuda_runtime}; {gpu.describe()}"


# ----------------------------------------------------------------------------- building and loading

class _Logger:
    """A TensorRT logger that keeps the errors (for the exception) and sends the rest to logging."""

    def __init__(self, trt: Any) -> None:
        sev = trt.ILogger.Severity
        outer = self

        class Logger(trt.ILogger):   # type: ignore[misc, name-defined]
            def __init__(self) -> None:
                trt.ILogger.__init__(self)

            def log(self, severity: Any, msg: str) -> None:
                if severity in (sev.INTERNAL_ERROR, sev.ERROR):
                    outer.errors.append(msg)
                    log.error("TensorRT: %s", msg)
                elif severity == sev.WARNING:
                    log.warning("TensorRT: %s", msg)
                elif severity == sev.INFO:
                    log.debug("TensorRT: %s", msg)

        self.errors: list[str] = []
        self.trt_logger = Logger()

    def last_errors(self) -> str:
        return "; ".join(self.errors[-3:]) or "no error message from TensorRT"


def numpy_dtype(trt: Any, dtype: Any) -> np.dtype:
    """A TensorRT DataType as numpy's (the names of trt.DataType are the same in 10 and 11)."""
    names = {"FLOAT": "float32", "HALF": "float16", "INT8": "int8", "UINT8": "uint8", "INT32": "int32",
             "INT64": "int64", "BOOL": "bool"}
    for name, np_name in names.items():
        if dtype == getattr(trt.DataType, name, None):
            return np.dtype(np_name)
    raise BackendError(f"the engine has a tensor of TensorRT type {dtype}, which no card describes")


def _network_flags(trt: Any) -> int:
    # STRONGLY_TYPED exists from TensorRT 9; in 11 every network is strongly typed (the flag may be gone)
    flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    return 0 if flag is None else 1 << int(flag)


def build_engine(trt: Any, logger: _Logger, card: ModelCard, model_bytes: bytes, input_name: str,
                 shapes: tuple[tuple[int, ...], ...], workspace_mib: int, *, dynamic: bool) -> bytes:
    """The serialized engine of ``model_bytes``, strongly typed; one static profile per shape where the batch
    dimension is dynamic (a static model's one shape needs none)."""
    builder = trt.Builder(logger.trt_logger)
    network = builder.create_network(_network_flags(trt))
    parser = trt.OnnxParser(network, logger.trt_logger)
    if not parser.parse(model_bytes):
        found = [parser.get_error(i) for i in range(parser.num_errors)]
        errors = "; ".join(e.desc() if hasattr(e, "desc") else str(e) for e in found) or logger.last_errors()
        raise BackendError(f"TensorRT cannot load {card.file}: its ONNX parser refused it ({errors}). Is it an "
                           "ONNX model of an opset this TensorRT reads? Check it with `polygraphy inspect model`")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_mib << 20)
    for shape in shapes if dynamic else ():
        profile = builder.create_optimization_profile()
        profile.set_shape(input_name, shape, shape, shape)
        config.add_optimization_profile(profile)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise BackendError(f"TensorRT could not build an engine for {card.file} ({logger.last_errors()}); with "
                           "'out of memory' raise backend.tensorrt.workspace_mib or lower max_batch")
    return bytes(plan)


def write_engine(path: Path, plan: bytes, key: EngineKey) -> None:
    """The engine and its key beside it (``.json``, for people), each replaced atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    for target, data in ((path, plan), (path.with_suffix(".json"),
                                        (json.dumps(key.as_dict(), indent=2) + "\n").encode())):
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, target)


@dataclass
class _Profile:
    """One static shape: its execution context and the buffers bound to it."""

    batch: int
    context: Any
    host_in: np.ndarray
    host_out: np.ndarray
    device_in: int
    device_out: int
    pinned: list[int] = field(default_factory=list)


def _closed(*_: object) -> Any:
    raise BackendError("the tensorrt backend is closed")


class TensorRTBackend:
    name = "tensorrt"

    def __init__(self, card: ModelCard, model_bytes: bytes, options: Options) -> None:
        trt, trt_runtime = import_tensorrt()
        cudart, _ = import_cudart()
        try:
            graph = inspect_onnx(model_bytes, "the file")
        except BackendError as exc:
            raise BackendError(f"backend tensorrt cannot load {card.file}: {exc}") from None
        precision = check_precision(graph, options.precision, card)
        dims, dynamic = check_io(card, graph)
        self._cuda = _Cuda(cudart)
        gpu = self._cuda.gpu(options.device)
        self._cuda.call("cudaSetDevice", cudart.cudaSetDevice(options.device))
        shapes = profile_shapes(dims, dynamic, options.max_batch)
        key = EngineKey(model_sha256=hashlib.sha256(model_bytes).hexdigest(), tensorrt=trt.__version__, gpu=gpu.name,
                        compute_capability=gpu.compute_capability, precision=precision, shapes=shapes,
                        workspace_mib=options.workspace_mib)
        self._logger = _Logger(trt)
        self.engine_file = engine_path(options.engine_cache_dir, key, card.name) if options.engine_cache_dir else None
        self.cache_hit, self.build_s = False, 0.0
        self._profiles: list[_Profile] = []
        self._stream = None
        self._trt_runtime = None
        in_name = graph.inputs[0].name
        engine = self._load_cached(trt) if self.engine_file else None
        if engine is None:
            t0 = time.perf_counter()
            plan = build_engine(trt, self._logger, card, model_bytes, in_name, shapes, options.workspace_mib,
                                dynamic=dynamic)
            self.build_s = time.perf_counter() - t0
            log.info("built the TensorRT engine for %s (%s, %s) in %.1f s", card.model_id, precision,
                     " and ".join("x".join(map(str, s)) for s in shapes), self.build_s)
            if self.engine_file:
                try:
                    write_engine(self.engine_file, plan, key)
                except OSError as exc:   # a read-only cache costs the next start a build, not this one
                    log.warning("cannot keep the TensorRT engine in %s (%s): the next start builds it again; "
                                "make backend.tensorrt.engine_cache_dir writable for the service",
                                options.engine_cache_dir, exc.strerror or exc)
            engine = self._runtime(trt).deserialize_cuda_engine(plan)
            if engine is None:
                raise BackendError(f"TensorRT could not load the engine it just built for {card.file} "
                                   f"({self._logger.last_errors()})")
        self._engine = engine
        self.precision, self.key, self.gpu = precision, key, gpu
        self.runtime = f"{trt_runtime} {precision} on {gpu.name} (sm {gpu.compute_capability})"
        try:
            self._bind(trt, card, shapes)
        except BaseException:
            self.close()
            raise
        self.max_batch = shapes[-1][0]
        batch = -1 if self.max_batch > 1 else 1
        self.input = TensorSpec((batch, *dims[1:]), card.input.dtype)
        self.output = TensorSpec((batch, len(card.labels)), card.output.dtype)
        log.info("loaded %s on %s: engine %s (%s), batches of up to %d", card.model_id, self.runtime,
                 self.engine_file or "not cached", "from the cache" if self.cache_hit else "built", self.max_batch)

    def _runtime(self, trt: Any) -> Any:
        # kept: the runtime must outlive the engines it deserializes
        if self._trt_runtime is None:
            self._trt_runtime = trt.Runtime(self._logger.trt_logger)
        return self._trt_runtime

    def _load_cached(self, trt: Any) -> Any:
        path = self.engine_file
        assert path is not None
        try:
            plan = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            log.warning("cannot read the cached TensorRT engine %s (%s); building it", path, exc.strerror or exc)
            return None
        try:
            engine = self._runtime(trt).deserialize_cuda_engine(plan)
        except Exception as exc:   # some releases raise on a foreign plan instead of returning None
            self._logger.errors.append(str(exc))
            engine = None
        if engine is None:   # damaged, or written by a TensorRT the key did not tell apart
            log.warning("the cached TensorRT engine %s does not load (%s); building it again", path,
                        self._logger.last_errors())
            return None
        self.cache_hit = True
        return engine

    def _bind(self, trt: Any, card: ModelCard, shapes: tuple[tuple[int, ...], ...]) -> None:
        engine, cuda, rt = self._engine, self._cuda, self._cuda.rt
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        if len(inputs) != 1 or len(outputs) != 1:
            raise BackendError(f"{card.file}: the engine has {len(inputs)} inputs and {len(outputs)} outputs")
        (self._in_name,), (self._out_name,) = inputs, outputs
        in_dtype = numpy_dtype(trt, engine.get_tensor_dtype(self._in_name))
        out_dtype = numpy_dtype(trt, engine.get_tensor_dtype(self._out_name))
        if in_dtype.name != card.input.dtype or out_dtype.name != card.output.dtype:
            raise BackendError(f"{card.file}: the engine takes {in_dtype.name} and gives {out_dtype.name}, but the "
                               f"card says {card.input.dtype} and {card.output.dtype}")
        self._stream = cuda.call("cudaStreamCreate", rt.cudaStreamCreate())
        stream = int(self._stream)
        for index, shape in enumerate(shapes):
            context = engine.create_execution_context()
            if context is None:
                raise BackendError(f"TensorRT could not create an execution context for {card.file} "
                                   f"({self._logger.last_errors()}); the GPU may be out of memory", transient=True,
                                   exit_code=2)
            if index:
                context.set_optimization_profile_async(index, stream)
            if -1 in tuple(engine.get_tensor_shape(self._in_name)):
                context.set_input_shape(self._in_name, shape)
            out_shape = tuple(context.get_tensor_shape(self._out_name))
            if len(out_shape) != 2 or out_shape != (shape[0], len(card.labels)):
                raise BackendError(f"{card.file}: output for {shape[0]} input(s) is {out_shape}; the card has "
                                   f"{len(card.labels)} labels")
            profile = _Profile(shape[0], context, *self._host(shape, in_dtype, out_shape, out_dtype), 0, 0)
            self._profiles.append(profile)
            profile.pinned = [profile.host_in.ctypes.data, profile.host_out.ctypes.data]
            profile.device_in = cuda.call("cudaMalloc", rt.cudaMalloc(profile.host_in.nbytes))
            profile.device_out = cuda.call("cudaMalloc", rt.cudaMalloc(profile.host_out.nbytes))
            context.set_tensor_address(self._in_name, int(profile.device_in))
            context.set_tensor_address(self._out_name, int(profile.device_out))
        self._run_profile = self._run

    def _host(self, shape: tuple[int, ...], in_dtype: np.dtype, out_shape: tuple[int, ...],
              out_dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
        """Page-locked host buffers (cudaMallocHost), so the copies are DMA, not staged."""
        arrays = []
        for shp, dt in ((shape, in_dtype), (out_shape, out_dtype)):
            nbytes = int(np.prod(shp)) * dt.itemsize
            ptr = self._cuda.call("cudaMallocHost", self._cuda.rt.cudaMallocHost(nbytes))
            raw = (ctypes.c_uint8 * nbytes).from_address(int(ptr))
            arrays.append(np.frombuffer(raw, dtype=dt).reshape(shp))
        return arrays[0], arrays[1]

    def _run(self, profile: _Profile, tensor: np.ndarray) -> np.ndarray:
        cuda, rt = self._cuda, self._cuda.rt
        n = len(tensor)
        if n < profile.batch:   # padded to the profile's static batch
            profile.host_in[n:] = 0
        profile.host_in[:n] = tensor
        stream = self._stream
        h2d, d2h = rt.cudaMemcpyKind.cudaMemcpyHostToDevice, rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
        cuda.call("cudaMemcpyAsync", rt.cudaMemcpyAsync(profile.device_in, profile.host_in.ctypes.data,
                                                        profile.host_in.nbytes, h2d, stream))
        if not profile.context.execute_async_v3(int(stream)):
            raise BackendError(f"TensorRT failed during invoke ({self._logger.last_errors()}); the GPU may have been "
                               "reset", transient=True)
        cuda.call("cudaMemcpyAsync", rt.cudaMemcpyAsync(profile.host_out.ctypes.data, profile.device_out,
                                                        profile.host_out.nbytes, d2h, stream))
        cuda.call("cudaStreamSynchronize", rt.cudaStreamSynchronize(stream))
        return profile.host_out[:n].copy()   # the pinned buffer is the next run's: hand out a fresh array

    def _check(self, tensor: np.ndarray, most: int) -> None:
        if tensor.dtype.name != self.input.dtype or tensor.shape[1:] != self.input.shape[1:] or not \
                1 <= len(tensor) <= most:
            raise BackendError(f"the tensorrt backend takes (1..{most}, {', '.join(map(str, self.input.shape[1:]))}) "
                               f"{self.input.dtype}, not {tensor.shape} {tensor.dtype}")

    def invoke(self, tensor: np.ndarray) -> np.ndarray:
        self._check(tensor, 1)
        return self._run_profile(self._profiles[0], tensor)

    def _invoke_max(self, tensor: np.ndarray) -> np.ndarray:
        if len(tensor) == 1:
            return self._run_profile(self._profiles[0], tensor)
        return self._run_profile(self._profiles[-1], tensor)

    def invoke_batch(self, tensor: np.ndarray) -> np.ndarray:
        self._check(tensor, len(tensor) or 1)
        return invoke_chunked(self._invoke_max, tensor, self.max_batch)

    def close(self) -> None:
        self._run_profile = _closed
        rt = self._cuda.rt if getattr(self, "_cuda", None) else None
        if rt is not None and self._stream is not None:
            rt.cudaStreamSynchronize(self._stream)   # nothing in flight touches the buffers freed below
        for profile in self._profiles:
            profile.context = None
            profile.host_in = profile.host_out = np.zeros(0)   # the views die before the memory they view
            if rt is not None:
                for ptr in (profile.device_in, profile.device_out):
                    if ptr:
                        rt.cudaFree(ptr)
                for ptr in profile.pinned:
                    rt.cudaFreeHost(ptr)
        self._profiles = []
        self._engine = self._trt_runtime = None
        if rt is not None and self._stream is not None:
            rt.cudaStreamDestroy(self._stream)
        self._stream = None


def create(card: ModelCard, model_bytes: bytes, options: Options) -> TensorRTBackend:
    if card.format != "onnx":
        raise BackendError(f"backend tensorrt builds engines from .onnx models; {card.path} describes a "
                           f"{card.format} model (models/recipes/fmnist/export_trt_onnx.py exports the edge model)")
    return TensorRTBackend(card, model_bytes, options)
