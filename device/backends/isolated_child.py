"""The inference child: loads one backend and runs it for its supervisor (``isolated.py``).

Started as ``python -I -m edge_infer.backends.isolated_child FD`` (a fresh
interpreter: none of the service's threads, locks or sockets come along), with
FD one end of a SOCK_SEQPACKET socket pair. The wire, one message each:

- supervisor -> child, once: the pickled :class:`LoadRequest`;
- child -> supervisor, once: ``R`` + JSON (the model's tensor specs, runtime,
  batch capacity) with a memfd (SCM_RIGHTS) that holds the input slots then the
  output slots; or ``F`` + JSON (the error: message, exit code, transient);
- then per run: ``G`` + n (inputs already in the memfd) -> ``D`` (outputs written
  to the memfd) or ``E`` + JSON (a Python error in the backend; the child stays);
- ``Q``, or the socket closing: the child exits.

A crash of the accelerator's library (libedgetpu aborts on USB faults) ends
only this process; the supervisor sees the socket close and the exit signal.
"""
from __future__ import annotations

import json
import logging
import mmap
import os
import pickle
import signal
import socket
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

LOAD_MAX = 1 << 20
READY, FAILED, GO, DONE, ERROR, QUIT = b"R", b"F", b"G", b"D", b"E", b"Q"
#: largest number of inputs in one run through the shared memory (the n of ``G`` is one byte)
CAPACITY_MAX = 64
#: the memfd's input slots are sized for at most this many bytes in all (more inputs go in turns)
SLOTS_BYTES = 8 << 20
FAILPOINT_ENV = "EDGE_INFER_TEST_FAILPOINT"


@dataclass(frozen=True)
class LoadRequest:
    backend: str
    card: Path
    options: Any
    log_level: str = "WARNING"


@dataclass(frozen=True)
class Layout:
    """Where the tensors lie in the shared memory: ``capacity`` input slots, then as many output slots."""

    in_shape: tuple[int, ...]     # one input, without the batch dimension
    in_dtype: str
    out_shape: tuple[int, ...]
    out_dtype: str
    capacity: int

    @property
    def in_bytes(self) -> int:
        return int(np.prod(self.in_shape, dtype=np.int64)) * np.dtype(self.in_dtype).itemsize * self.capacity

    @property
    def out_offset(self) -> int:
        return -(-self.in_bytes // 64) * 64   # outputs start on a cache line

    @property
    def size(self) -> int:
        out = int(np.prod(self.out_shape, dtype=np.int64)) * np.dtype(self.out_dtype).itemsize * self.capacity
        return self.out_offset + max(out, 1)

    def views(self, buffer: Any) -> tuple[np.ndarray, np.ndarray]:
        inputs = np.ndarray((self.capacity, *self.in_shape), self.in_dtype, buffer=buffer)
        outputs = np.ndarray((self.capacity, *self.out_shape), self.out_dtype, buffer=buffer, offset=self.out_offset)
        return inputs, outputs

    def to_json(self) -> dict[str, Any]:
        return {"in_shape": list(self.in_shape), "in_dtype": self.in_dtype, "out_shape": list(self.out_shape),
                "out_dtype": self.out_dtype, "capacity": self.capacity}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "Layout":
        return cls(tuple(d["in_shape"]), d["in_dtype"], tuple(d["out_shape"]), d["out_dtype"], int(d["capacity"]))


def layout_for(in_shape: tuple[int, ...], in_dtype: str, out_shape: tuple[int, ...], out_dtype: str,
               max_batch: int) -> Layout:
    item = max(1, int(np.prod(in_shape[1:], dtype=np.int64)) * np.dtype(in_dtype).itemsize)
    capacity = max(1, min(CAPACITY_MAX, max(1, max_batch), SLOTS_BYTES // item))
    return Layout(tuple(in_shape[1:]), in_dtype, tuple(out_shape[1:]), out_dtype, capacity)


class Failpoints:
    """Tests only, from ``EDGE_INFER_TEST_FAILPOINT`` (comma-separated), read when the child starts:

    - ``child_hang_when=PATH``: an invoke that finds PATH removes it and never returns (a hung USB transfer);
    - ``child_abort_when=PATH``: an invoke that finds PATH removes it and aborts the process (libedgetpu's
      ``Abort. Deadline exceeded``);
    - ``child_missing_while=PATH``: while PATH exists, loading fails as for an absent accelerator, and a
      running child aborts at its next invoke (unplugged mid-run).

    Anything else is ignored (the guard's ``hang_invoke_after=N`` is the in-process one).
    """

    def __init__(self, value: str) -> None:
        self.hang_when = self.abort_when = self.missing_while = None
        for part in value.split(","):
            key, _, path = part.partition("=")
            if path and key in ("child_hang_when", "child_abort_when", "child_missing_while"):
                setattr(self, key.removeprefix("child_"), Path(path))
        self.active = any(p is not None for p in (self.hang_when, self.abort_when, self.missing_while))

    @classmethod
    def from_env(cls) -> "Failpoints":
        return cls(os.environ.get(FAILPOINT_ENV, ""))

    def check_load(self) -> None:
        if self.missing_while is not None and self.missing_while.exists():
            from . import BackendError
            raise BackendError(f"test failpoint: no accelerator while {self.missing_while} exists", transient=True)

    def before_invoke(self) -> None:
        if self.missing_while is not None and self.missing_while.exists():
            log.warning("test failpoint: the accelerator is gone (%s exists); aborting", self.missing_while)
            os.abort()
        if _consume(self.abort_when):
            log.warning("test failpoint: aborting in invoke (%s)", self.abort_when)
            os.abort()
        if _consume(self.hang_when):
            log.warning("test failpoint: invoke hangs now (%s)", self.hang_when)
            threading.Event().wait()


def _consume(path: Path | None) -> bool:
    if path is None:
        return False
    try:
        path.unlink()
    except FileNotFoundError:
        return False
    return True


def error_json(exc: BaseException) -> bytes:
    return json.dumps({"message": str(exc) or type(exc).__name__, "type": type(exc).__name__,
                       "exit_code": getattr(exc, "exit_code", None), "transient": getattr(exc, "transient", None)}
                      ).encode()


def _load(request: LoadRequest, failpoints: Failpoints):
    from . import create_backend
    from ..modelcard import load_card, verified_model_bytes
    failpoints.check_load()
    card = load_card(request.card)
    backend = create_backend(request.backend, card, verified_model_bytes(card), request.options)
    try:
        # The first run allocates; a model that cannot run should fail here, not on the first input.
        shape = tuple(1 if d == -1 else d for d in backend.input.shape)
        backend.invoke(np.zeros(shape, backend.input.dtype))
    except BaseException:
        backend.close()
        raise
    return backend


def serve(sock: socket.socket) -> int:
    request = pickle.loads(sock.recv(LOAD_MAX))   # from the supervisor, which started this process
    logging.getLogger().setLevel(request.log_level)
    failpoints = Failpoints.from_env()
    try:
        backend = _load(request, failpoints)
    except Exception as exc:  # every load failure goes to the supervisor, which says it to the operator
        sock.send(FAILED + error_json(exc))
        return 0
    layout = layout_for(backend.input.shape, backend.input.dtype, backend.output.shape, backend.output.dtype,
                        backend.max_batch)
    fd = os.memfd_create("edge-infer-tensors", os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, layout.size)
        shm = mmap.mmap(fd, layout.size)
        ready = {"name": backend.name, "runtime": backend.runtime, "max_batch": backend.max_batch,
                 "input": [list(backend.input.shape), backend.input.dtype],
                 "output": [list(backend.output.shape), backend.output.dtype], "layout": layout.to_json(),
                 "pid": os.getpid()}
        socket.send_fds(sock, [READY + json.dumps(ready).encode()], [fd])
    finally:
        os.close(fd)
    inputs, outputs = layout.views(shm)
    one = inputs[:1]
    invoke, invoke_batch = backend.invoke, backend.invoke_batch
    recv, send = sock.recv, sock.send
    check = failpoints.before_invoke if failpoints.active else None
    while True:
        msg = recv(16)
        if not msg or msg[:1] != GO:
            break   # QUIT, or the supervisor is gone
        n = msg[1]
        try:
            if check is not None:
                check()
            out = invoke(one) if n == 1 else invoke_batch(inputs[:n])
            outputs[:n] = out.reshape((n, *layout.out_shape))
        except Exception as exc:
            send(ERROR + error_json(exc))
            continue
        send(DONE)
    backend.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # The supervisor decides when this process ends: a terminal's Ctrl-C or systemd's SIGTERM to the
    # whole unit must not kill the model under an input the service is finishing.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logging.basicConfig(level=os.environ.get("EDGE_INFER_CHILD_LOG_LEVEL", "WARNING"),
                        format=f"edge-infer inference child [{os.getpid()}] %(levelname)s %(name)s: %(message)s")
    with socket.socket(fileno=int(argv[0])) as sock:
        return serve(sock)


if __name__ == "__main__":
    sys.exit(main())
