"""The Coral Edge TPU: libedgetpu as a TFLite delegate, through ai-edge-litert or tflite-runtime.

A model compiled by edgetpu_compiler (``*_edgetpu.tflite``) holds one custom
operator, ``edgetpu-custom-op``, per segment the compiler mapped to the Edge
TPU; the delegate in ``libedgetpu.so.1`` runs those on the device, the
interpreter runs whatever is left on the CPU. What the file holds is read from
the file itself (:mod:`.tflitemodel`) before anything is loaded: a model with
no Edge TPU operator is refused, one that would run mostly on the CPU is loaded
with a loud WARNING.

The delegate is loaded with the runtime's own ``load_delegate(library,
{"device": ...})``, the way Coral documents it; the real pycoral, where it is
installed from Coral's Debian packages, only lists the devices for the error
messages (the PyPI project named ``pycoral`` is unrelated and never imported).
Nothing here is imported at module load: the package, the configuration and
the tests work on machines without libedgetpu.

Failures say what to check, because each has a known field cause: the library
is not installed (exit 2); no device answers at the selector (USB id, port,
group, udev rules; the PCIe node, its driver, another process holding it:
``transient`` but exit 2, so a start without a fallback does not loop); the
model was not compiled, or was compiled for a newer runtime (exit 2).
"""
from __future__ import annotations

import ctypes
import importlib
import importlib.util
import logging
import re
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..modelcard import ModelCard
from ..tomlcfg import ConfigError, in_range, one_of, option
from . import BackendError, TensorSpec, invoke_each
from .edgetpu_sysfs import ApexThermal, EdgeTpuDevice, find_edgetpus, read_apex_thermal
from .tflite_cpu import RUNTIMES, TFLiteCPUBackend, load_interpreter_module
from .tflitemodel import EDGETPU_CUSTOM_OP, ModelOps, inspect_model

log = logging.getLogger(__name__)

DEFAULT_LIBRARY = "libedgetpu.so.1"
#: libedgetpu's own selector grammar (edgetpu_delegate_for_custom_op_tflite_plugin.cc)
_SELECTOR = re.compile(r"(usb|pci)?(:(0|[1-9][0-9]{0,2}))?")
#: [backend.edgetpu] performance -> libedgetpu's "Performance" option values
_PERFORMANCE = {"low": "Low", "medium": "Medium", "high": "High", "max": "Max"}
#: where Coral's Debian packages put Python modules (python3-pycoral); the PyPI "pycoral" never lands there
_CORAL_DIST_PACKAGES = ("/usr/lib/python3/dist-packages/",)

INSTALL_LIBRARY = (
    "install the Edge TPU runtime from Coral's apt repository (coral-edgetpu-stable; docs/backends.md): "
    "`apt-get install libedgetpu1-std` (or libedgetpu1-max for the full clock: a USB Accelerator then runs hot); "
    "the Dev Board's Mendel Linux ships it; or point backend.edgetpu.library at the file")
USB_HINT = ("USB Accelerator: `lsusb` must list 1a6e:089a (before first use) or 18d1:9302 (after); use a USB 3 "
            "port or a powered hub, and a data cable; the service user needs the plugdev group and the udev rules "
            "(deploy/udev/65-edge-infer-coral.rules, then replug it)")
PCI_HINT = ("PCIe/M.2: /dev/apex_0 must exist (the gasket-dkms driver: `lsmod | grep apex`) and be read-write for "
            "the service user (udev rules, plugdev group); only one process may hold it, so stop any other user "
            "of it (`fuser -v /dev/apex_0`)")


def _device_selector(value: str) -> str | None:
    if _SELECTOR.fullmatch(value):
        return None
    if value.startswith("/dev/apex_"):
        return f'name the device, not its node: "pci:{value.removeprefix("/dev/apex_")}"'
    return 'must be "" (the first Edge TPU found), "usb", "usb:N", "pci", "pci:N" or ":N" (N counts from 0)'


@dataclass(frozen=True, kw_only=True)
class Options:
    """``[backend.edgetpu]``."""

    device: str = option("", help='which Edge TPU: "" (the first found), "usb", "usb:N", "pci", "pci:N" or ":N" '
                                  "(N counts from 0 in libedgetpu's enumeration order)", check=_device_selector)
    runtime: str = option("auto", help="TFLite runtime that loads the delegate: auto (ai-edge-litert, then "
                                       "tflite-runtime), ai-edge-litert or tflite-runtime",
                          check=one_of("auto", *RUNTIMES))
    library: str = option(DEFAULT_LIBRARY, help="the Edge TPU delegate library: a name the dynamic linker finds "
                                                "(libedgetpu1-std/-max install libedgetpu.so.1) or a path")
    performance: str = option("", help='the Edge TPU clock: "" (the library\'s default), "low", "medium", "high" '
                                       'or "max"; needs an indexed device ("usb:0", "pci:0"), libedgetpu ignores '
                                       "it otherwise", check=one_of("", *_PERFORMANCE))
    num_threads: int = option(1, help="interpreter threads for the operators left on the CPU",
                              check=in_range(1, 64))
    allow_cpu_only: bool = option(False, help="load a model that has no Edge TPU operator (not compiled by "
                                              "edgetpu_compiler) anyway, all on the CPU beside the delegate: "
                                              "for testing the delegate path, never for production")

    def __post_init__(self) -> None:
        if self.performance and ":" not in self.device:
            raise ConfigError(f"backend.edgetpu.performance = {self.performance!r} needs an indexed device "
                              f'(device = "usb:0", "pci:0" or ":0"; it is {self.device!r}): libedgetpu applies '
                              "it only when opening a device by index")

    def delegate_options(self) -> dict[str, str]:
        """What load_delegate passes to libedgetpu's tflite_plugin_create_delegate."""
        opts = {"device": self.device}
        if self.performance:
            opts["Performance"] = _PERFORMANCE[self.performance]
        return opts


def check_library(library: str) -> None:
    """The delegate library loads and is a TFLite delegate plugin; BackendError (exit 2) saying what to install.

    The same dlopen the runtime's load_delegate does, done first, because its own failure (OSError, or an
    AttributeError for a library without the plugin functions) leaves tracebacks from its finalizer on stderr.
    """
    try:
        lib = ctypes.CDLL(library)
    except OSError as exc:
        raise BackendError(f"the Edge TPU library {library} cannot be loaded ({exc}); {INSTALL_LIBRARY}") from None
    missing = [f for f in ("tflite_plugin_create_delegate", "tflite_plugin_destroy_delegate") if not hasattr(lib, f)]
    if missing:
        raise BackendError(f"{library} is not a TFLite delegate library (it lacks {', '.join(missing)}); "
                           f"backend.edgetpu.library must name libedgetpu: {INSTALL_LIBRARY}")


def coral_pycoral_devices() -> list[dict] | None:
    """pycoral's ``list_edge_tpus()`` where Coral's python3-pycoral is installed, else None.

    Only a pycoral found in Debian's dist-packages is imported: the PyPI project of that name is unrelated
    code, and importing a module runs it.
    """
    spec = importlib.util.find_spec("pycoral")
    origin = (spec.origin or "") if spec else ""
    if not origin.startswith(_CORAL_DIST_PACKAGES):
        return None
    try:
        edgetpu = importlib.import_module("pycoral.utils.edgetpu")
        return list(edgetpu.list_edge_tpus())
    except Exception as exc:   # a broken pycoral must not hide the real error message
        log.debug("pycoral present but list_edge_tpus failed: %s", exc)
        return None


def _seen(devices: tuple[EdgeTpuDevice, ...]) -> str:
    return "; ".join(d.describe() for d in devices) if devices else "no Edge TPU (no USB 1a6e:089a or 18d1:9302, no /dev/apex_*)"


def device_not_found_message(options: Options, detail: str, devices: tuple[EdgeTpuDevice, ...],
                             pycoral: list[dict] | None = None) -> str:
    """The operator's line when libedgetpu opened no device at the selector (pure: the caller looks)."""
    selector = repr(options.device) if options.device else "'' (the first Edge TPU found)"
    hints = [h for kind, h in (("usb", USB_HINT), ("pci", PCI_HINT)) if options.device.startswith(kind)] \
        or [USB_HINT, PCI_HINT]
    listed = f"; pycoral lists {pycoral}" if pycoral is not None else ""
    return (f"no Edge TPU could be opened at device {selector}: {detail}. Seen now: "
            f"{_seen(devices)}{listed}. Check: " + ". ".join(hints))


def open_delegate(module: Any, options: Options, *, sysfs: str = "/sys", dev: str = "/dev") -> Any:
    """The runtime's ``load_delegate`` on the configured library and device, or BackendError naming what to check."""
    try:
        return module.load_delegate(options.library, options.delegate_options())
    except ValueError as exc:
        # libedgetpu returns no delegate without a message when it opens no device: the text is the runtime's
        # "Failed to load delegate from libedgetpu.so.1", so the kernel's view says why.
        detail = " ".join(str(exc).split()) or "Failed to load delegate"
        message = device_not_found_message(options, detail, find_edgetpus(sysfs, dev), coral_pycoral_devices())
        # transient: the device may come back (replugged, released by another process), so a fallback may retry
        # it; exit 2 all the same: a start without a fallback must not loop on restarts.
        raise BackendError(message, transient=True, exit_code=2) from None
    except OSError as exc:   # the library vanished between check_library and here
        raise BackendError(f"the Edge TPU library {options.library} cannot be loaded ({exc}); "
                           f"{INSTALL_LIBRARY}") from None


def check_compiled(card: ModelCard, ops: ModelOps, options: Options) -> None:
    """Refuse a model with no Edge TPU operator; WARN when most of it would run on the CPU."""
    if not ops.compiled_for_edgetpu:
        if options.allow_cpu_only:
            log.warning("%s: %s; backend.edgetpu.allow_cpu_only = true loads it anyway: the Edge TPU does "
                        "nothing for this model", card.file, ops.summary())
            return
        raise BackendError(
            f"{card.file}: backend edgetpu needs a model compiled by edgetpu_compiler, and this one is "
            f"{ops.summary()}. Compile it (`edgetpu_compiler {card.file.name}` writes "
            f"{card.file.stem}_edgetpu.tflite; models/recipes/fmnist/compile_edgetpu.py, docs/backends.md) and "
            "point [model] card at the compiled model's card, or run this model with backend = \"tflite-cpu\"")
    if ops.mostly_cpu:
        heavy = f"; heavy operators on the CPU: {', '.join(ops.heavy_cpu_ops)}" if ops.heavy_cpu_ops else ""
        log.warning("%s: most of this model runs on the CPU, not the Edge TPU: %d of %d operator nodes (%.0f%%) "
                    "stay on the CPU%s (%s). See edgetpu_compiler's log (*_edgetpu.log) for why each was not "
                    "mapped (dynamic shapes, float tensors, unsupported operators) and recompile", card.file,
                    ops.cpu_ops, ops.operators, 100 * ops.cpu_share, heavy, ops.summary())
    else:
        log.info("%s: %s", card.file, ops.summary())


def load_failure_hint(text: str, library: str) -> str:
    """What to do when the interpreter refused the model with the delegate (the runtime's message in ``text``)."""
    if "unresolved custom op" in text and EDGETPU_CUSTOM_OP in text:
        return (f"The delegate did not take the Edge TPU operators: backend.edgetpu.library ({library}) must be "
                "Coral's libedgetpu.")
    if "runtime version" in text or "EdgeTpuDelegateForCustomOp" in text:
        return ("The model was compiled for a newer Edge TPU runtime than this libedgetpu: upgrade libedgetpu1-std "
                "(or -max), or recompile with edgetpu_compiler --min_runtime_version set to this runtime's version.")
    return "Is it a TFLite model for this runtime's version?"


def probe(options: Options) -> str:
    """"ai-edge-litert 2.3.0 + libedgetpu.so.1; seen: ...": the runtime and library load here (no device opened)."""
    _, runtime = load_interpreter_module(options.runtime)
    check_library(options.library)
    # Only sysfs is read: opening the device could take it from a running service (PCIe allows one holder).
    return f"{runtime} + {options.library}; Edge TPUs seen: {_seen(find_edgetpus())}"


def edgetpu_health(options: Options, sysfs: str = "/sys") -> tuple[ApexThermal, ...]:
    """Temperature and throttling of the PCIe Edge TPU(s) ``options`` can select, for the status.

    Pure sysfs reads (no device opened), so the supervising process can call it while an isolated child holds
    the device: ``pci:N`` -> apex_N; ``pci``, ``""`` or ``:N`` -> every apex device; ``usb``/``usb:N`` -> ()
    (a USB Accelerator reports no temperature).
    """
    if options.device.startswith("usb"):
        return ()
    records = read_apex_thermal(sysfs)
    if options.device.startswith("pci:"):
        return tuple(r for r in records if r.name == f"apex_{options.device.removeprefix('pci:')}")
    return records


def telemetry(options: Options, sysfs: str = "/sys") -> list[dict[str, Any]]:
    """The status's accelerator readings (the registry's optional telemetry hook)."""
    return [r.as_status() for r in edgetpu_health(options, sysfs)]


def _closed(*_: object) -> Any:
    raise BackendError("the edgetpu backend is closed")


class EdgeTpuBackend:
    name = "edgetpu"
    #: compiled Edge TPU models have a fixed batch of one
    max_batch = 1

    def __init__(self, card: ModelCard, model_bytes: bytes, options: Options, module: Any, runtime: str,
                 delegate: Any, ops: ModelOps) -> None:
        self.runtime = f"{runtime} + {options.library} ({options.device or 'first Edge TPU'})"
        self.ops = ops
        try:
            self._interp = module.Interpreter(model_content=model_bytes, experimental_delegates=[delegate],
                                              num_threads=options.num_threads)
            self._interp.allocate_tensors()
        except (ValueError, RuntimeError) as exc:
            text = " ".join(str(exc).split())
            raise BackendError(f"{runtime} with {options.library} cannot load {card.file}: {text} "
                               f"{load_failure_hint(text, options.library)}") from None
        # The delegate must outlive the interpreter that uses it: keep it, and drop it last in close().
        self._delegate = delegate
        (inp,) = self._interp.get_input_details()
        (out,) = self._interp.get_output_details()
        TFLiteCPUBackend._check(card, inp, out)
        self.input = TensorSpec(tuple(int(d) for d in inp["shape"]), np.dtype(inp["dtype"]).name)
        self.output = TensorSpec(tuple(int(d) for d in out["shape"]), np.dtype(out["dtype"]).name)
        self._in_index, self._out_index = inp["index"], out["index"]
        self._set, self._invoke, self._get = self._interp.set_tensor, self._interp.invoke, self._interp.get_tensor
        log.info("loaded %s on %s: %s", card.model_id, self.runtime, ops.summary())

    def invoke(self, tensor: np.ndarray) -> np.ndarray:
        self._set(self._in_index, tensor)
        try:
            self._invoke()
        except RuntimeError as exc:
            # A USB transfer error usually aborts the whole process inside libedgetpu (hence isolation);
            # the ones that come back as an exception mean the device is gone or wedged.
            raise BackendError(f"the Edge TPU failed during invoke ({' '.join(str(exc).split())}); it may have "
                               "been unplugged or reset", transient=True) from None
        return self._get(self._out_index)

    def invoke_batch(self, tensor: np.ndarray) -> np.ndarray:
        return invoke_each(self, tensor)

    def close(self) -> None:
        self._set = self._invoke = self._get = _closed
        self._interp = None  # type: ignore[assignment]
        self._delegate = None   # after the interpreter: destroying it releases the device


def create(card: ModelCard, model_bytes: bytes, options: Options) -> EdgeTpuBackend:
    if card.format != "tflite":
        raise BackendError(f"backend edgetpu runs .tflite models compiled by edgetpu_compiler; {card.path} "
                           f"describes a {card.format} model")
    module, runtime = load_interpreter_module(options.runtime)
    check_library(options.library)
    try:
        ops = inspect_model(model_bytes, "the file")
    except BackendError as exc:
        raise BackendError(f"backend edgetpu cannot load {card.file}: {exc}") from None
    check_compiled(card, ops, options)
    delegate = open_delegate(module, options)
    return EdgeTpuBackend(card, model_bytes, options, module, runtime, delegate, ops)
