"""Inference isolation: the configured backend runs in a supervised child process.

libedgetpu aborts the whole process on a USB fault, and a hung transfer never
returns; in-process, either takes the service down with its store writer and
MQTT link. Here the model lives in a child (``isolated_child.py``) started with
a fresh interpreter (``python -I -m``: spawned, so none of the service's threads
or locks are forked into it), and :class:`IsolatedBackend` speaks the Backend
protocol for it, so the classifier and the invoke guard do not know:

- input and output tensors pass through a memfd both processes map (one copy
  in, one copy out); the control channel is a SOCK_SEQPACKET socket pair
  (``G`` n -> ``D``), which also tells the supervisor when the child is gone;
- an invoke that finds the child dead, or that gets no answer within
  ``model.invoke_timeout_s`` (the child is then killed), is retried once on a
  fresh child when one can start at once, else raises :class:`BackendUnavailable`
  (the classifier answers from the fallback or fails the input);
- a supervisor thread watches the child while it is idle, and starts a fresh
  one after a failure: at once after the first, then with an exponential
  backoff (``model.restart_min_s`` doubling up to ``restart_max_s``,
  :func:`edge_infer.failover.restart_delay`), forever; a child that answers
  resets the backoff;
- :meth:`problem` says since when and why it cannot answer (None while a child
  is up), for the status, the fallback and the watchdog.
"""
from __future__ import annotations

import json
import logging
import mmap
import os
import pickle
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..failover import Problem, restart_delay
from ..modelcard import ModelCard
from . import BackendError, TensorSpec, invoke_chunked, invoke_each
from .isolated_child import DONE, ERROR, FAILED, GO, QUIT, READY, Layout, LoadRequest

log = logging.getLogger(__name__)

CHILD_MODULE = "edge_infer.backends.isolated_child"
_RECV_MAX = 64 * 1024
#: how long a child that was told to quit, or whose socket closed, gets to exit before it is killed
_EXIT_WAIT_S = 2.0


@dataclass(frozen=True)
class IsolationSettings:
    """The ``[model]`` keys that drive isolation (see docs/backends.md, "Isolation and fallback")."""

    invoke_timeout_s: float = 5.0
    start_timeout_s: float = 60.0
    restart_min_s: float = 0.5
    restart_max_s: float = 30.0
    #: the child's own log level (its lines go to the service's stderr, hence the journal)
    log_level: str = "WARNING"


class BackendUnavailable(BackendError):
    """The isolated backend has no child that can answer now (it died, hung or cannot start)."""

    transient = True


class _ChildGone(Exception):
    """The child cannot answer any more; ``str()`` says why, for the operator."""


class _Child:
    """One child process: its control socket, the shared tensors, its exit status."""

    def __init__(self, popen: subprocess.Popen, sock: socket.socket) -> None:
        self.popen = popen
        self.sock = sock
        self.pid = popen.pid
        self.retired = False
        self.answered = 0
        self.ready: dict[str, Any] = {}
        self.layout: Layout | None = None
        self._shm: mmap.mmap | None = None
        self.inputs: np.ndarray | None = None
        self.outputs: np.ndarray | None = None
        self._poll = select.poll()
        self._poll.register(sock, select.POLLIN)

    @classmethod
    def start(cls, request: LoadRequest, timeout: float, cancel_fd: int, cancelled) -> "_Child":
        """Spawn a child and wait for its model: ready, or BackendError with what the child said."""
        parent, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            popen = subprocess.Popen([sys.executable, "-I", "-m", CHILD_MODULE, str(theirs.fileno())],
                                     pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL)
        except OSError as exc:
            parent.close()
            raise BackendError(f"cannot start the inference child ({sys.executable}): {exc}", transient=True) from None
        finally:
            theirs.close()   # only the child holds that end now: its exit closes the channel
        child = cls(popen, parent)
        try:
            child._handshake(request, timeout, cancel_fd, cancelled)
        except BaseException:
            child.kill()
            child.close()
            raise
        return child

    def _handshake(self, request: LoadRequest, timeout: float, cancel_fd: int, cancelled) -> None:
        self.sock.sendall(pickle.dumps(request))
        poll = select.poll()
        poll.register(self.sock, select.POLLIN)
        poll.register(cancel_fd, select.POLLIN)
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise BackendError(f"the inference child (pid {self.pid}) did not load the model within "
                                   f"{timeout:g}s (model.start_timeout_s); killed it", transient=True)
            fds = {fd for fd, _ in poll.poll(left * 1000)}
            if cancelled():
                raise BackendError("stopping", transient=True)
            if self.sock.fileno() in fds:
                break
            if cancel_fd in fds:
                _drain(cancel_fd)   # poked for something else: keep waiting for the model
        try:
            msg, fds, _flags, _addr = socket.recv_fds(self.sock, _RECV_MAX, 1)
        except OSError:
            msg, fds = b"", []
        if not msg:
            raise BackendError(f"the inference child (pid {self.pid}) {self.exit_reason()} while loading the "
                               "model (its last lines are in the journal)", transient=True)
        if msg[:1] == FAILED:
            err = json.loads(msg[1:])
            raise BackendError(err["message"], exit_code=err.get("exit_code"), transient=err.get("transient"))
        if msg[:1] != READY or len(fds) != 1:
            for fd in fds:
                os.close(fd)
            raise BackendError(f"the inference child (pid {self.pid}) sent {msg[:20]!r}, not its model", transient=True)
        self.ready = json.loads(msg[1:])
        self.layout = Layout.from_json(self.ready["layout"])
        try:
            self._shm = mmap.mmap(fds[0], self.layout.size)
        finally:
            os.close(fds[0])
        self.inputs, self.outputs = self.layout.views(self._shm)

    def run(self, tensor: np.ndarray, timeout: float) -> np.ndarray:
        """The child runs the model on ``tensor`` (at most ``layout.capacity`` inputs); a copy of its outputs."""
        n = len(tensor)
        self.inputs[:n] = tensor
        try:
            self.sock.send(GO + bytes((n,)))
        except OSError:
            raise _ChildGone(f"{self.exit_reason()} (its channel closed)") from None
        if not self._poll.poll(timeout * 1000):
            self.kill()
            raise _ChildGone(f"did not answer within {timeout:g}s (model.invoke_timeout_s), so it was killed")
        try:
            msg = self.sock.recv(_RECV_MAX)
        except OSError:
            msg = b""
        if msg == DONE:
            self.answered += 1
            return self.outputs[:n].copy()
        if not msg:
            raise _ChildGone(self.exit_reason())
        if msg[:1] == ERROR:   # the backend raised: the child is fine, the error is the input's
            err = json.loads(msg[1:])
            raise BackendError(err["message"], exit_code=err.get("exit_code"), transient=err.get("transient"))
        self.kill()
        raise _ChildGone(f"sent {msg[:20]!r} instead of an answer, so it was killed")

    def exit_reason(self) -> str:
        """'died of SIGABRT', 'was killed by SIGKILL', 'exited with status 1' (waits briefly for the exit)."""
        try:
            rc = self.popen.wait(_EXIT_WAIT_S)
        except subprocess.TimeoutExpired:
            self.kill()
            return "closed its channel but did not exit, so it was killed"
        if rc >= 0:
            return f"exited with status {rc}"
        try:
            name = signal.Signals(-rc).name
        except ValueError:
            name = f"signal {-rc}"
        return f"was killed by {name}" if -rc in (signal.SIGKILL, signal.SIGTERM) else f"died of {name}"

    def kill(self) -> None:
        if self.popen.poll() is None:
            try:
                self.popen.kill()
            except ProcessLookupError:
                pass

    def quit(self) -> None:
        """Ask it to exit (the model is released by its own close()); killed if it does not."""
        try:
            self.sock.send(QUIT)
        except OSError:
            pass
        try:
            self.popen.wait(_EXIT_WAIT_S)
        except subprocess.TimeoutExpired:
            self.kill()

    def close(self) -> None:
        """Reap it and release the socket and the mapping (only the supervisor thread calls this)."""
        try:
            self.popen.wait(_EXIT_WAIT_S)
        except subprocess.TimeoutExpired:
            self.kill()
            self.popen.wait()
        self.sock.close()
        self.inputs = self.outputs = None
        if self._shm is not None:
            try:
                self._shm.close()
            except BufferError:   # an output copy never holds it; a caller's view would: freed with it
                pass
            self._shm = None


class IsolatedBackend:
    """A backend (the Backend protocol) whose model runs in a supervised child process."""

    isolated = True

    def __init__(self, name: str, card: ModelCard, options: Any, settings: IsolationSettings, *,
                 counters: Any = None) -> None:
        self.name = name
        self.runtime = "isolated, not started"
        # what the card says until a child reports the loaded model's own specs
        self.input = TensorSpec(tuple(card.input.shape), card.input.dtype)
        self.output = TensorSpec((1, len(card.labels)), card.output.dtype)
        self.max_batch = 1
        self.settings = settings
        self._request = LoadRequest(name, card.path, options, settings.log_level)
        self._counters = counters
        self._cv = threading.Condition()
        self._child: _Child | None = None
        self._retired: list[_Child] = []
        self._starting = False
        self._starts_done = 0         # start attempts finished, either way (an input waits for one at most)
        self._failures = 0            # failed children in a row (a child that answers resets it)
        self._failed_at = 0.0
        self._problem: Problem | None = Problem(time.monotonic(), "not started")
        self._start_error: BackendError | None = None
        self._last_logged = ""
        self._children = 0
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._wake_r = self._wake_w = -1
        self._round_started = 0.0
        self._in_use: _Child | None = None
        self._chunk = 1
        #: time.monotonic() when a child last answered or came up (None: never)
        self.healthy_at: float | None = None

    # ------------------------------------------------------------ lifecycle
    def start(self) -> None:
        """Start the supervisor and wait for the first child: ready, or the BackendError it failed with.

        After a failure the supervisor keeps trying (with backoff) until close():
        a caller with a fallback keeps the object, one without closes it.
        """
        if self._thread is not None:
            raise RuntimeError("IsolatedBackend.start() called twice")
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._problem = Problem(time.monotonic(), "starting")
        self._thread = threading.Thread(target=self._run, name=f"isolated-{self.name}", daemon=True)
        self._thread.start()
        with self._cv:
            self._cv.wait_for(lambda: self._child is not None or self._start_error is not None or self._stopping,
                              self.settings.start_timeout_s + 5.0)
            if self._child is None:
                raise self._start_error or BackendError(
                    f"the inference child for backend {self.name} did not start", transient=True)

    def close(self) -> None:
        """Stop the supervisor and the child (it releases the model). Safe to call twice."""
        with self._cv:
            if self._stopping:
                return
            self._stopping = True
            self._cv.notify_all()
        if self._thread is None:
            return
        self._poke()
        self._thread.join(self.settings.start_timeout_s + 10.0)
        self.runtime = "closed"

    def __enter__(self) -> "IsolatedBackend":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------ what the service reads
    def problem(self) -> Problem | None:
        """Since when and why no child can answer; None while one is up."""
        return self._problem

    def stuck_for(self) -> float:
        """Seconds the current run has waited on the child (bounded by model.invoke_timeout_s, then killed)."""
        started = self._round_started
        return time.monotonic() - started if started else 0.0

    @property
    def pid(self) -> int | None:
        child = self._child
        return child.pid if child is not None else None

    # ------------------------------------------------------------ invoking
    def invoke(self, tensor: np.ndarray) -> np.ndarray:
        return self._run_inputs(tensor)

    def invoke_batch(self, tensor: np.ndarray) -> np.ndarray:
        if self.max_batch == 1:
            return invoke_each(self, tensor)
        return invoke_chunked(self._run_inputs, tensor, self._chunk)

    def _run_inputs(self, tensor: np.ndarray) -> np.ndarray:
        child = self._ready_child()
        try:
            out = self._run_on(child, tensor)
        except _ChildGone as gone:
            first = f"the inference child (pid {child.pid}) {gone}"
            self._retire(child, first)
            # The input in flight: once more, on a fresh child, if one can start at once.
            try:
                child = self._ready_child()
            except BackendUnavailable as exc:
                raise BackendUnavailable(f"{first}; no fresh child could take the input ({exc})") from None
            self._inc("inference_retries")
            try:
                out = self._run_on(child, tensor)
            except _ChildGone as again:
                self._retire(child, f"the inference child (pid {child.pid}) {again}")
                raise BackendUnavailable(f"{first}; the input was retried on a fresh child, which {again}") from None
        if self._failures:
            with self._cv:
                self._failures = 0
        self.healthy_at = time.monotonic()
        return out

    def _run_on(self, child: _Child, tensor: np.ndarray) -> np.ndarray:
        layout = child.layout
        self._round_started = time.monotonic()
        try:
            if tensor.shape[1:] != layout.in_shape or tensor.dtype != layout.in_dtype or \
                    not 0 < len(tensor) <= layout.capacity:
                raise BackendError(f"input {tensor.shape} {tensor.dtype} does not fit the model's "
                                   f"{(-1, *layout.in_shape)} {layout.in_dtype} (at most {layout.capacity} at a time)")
            return child.run(tensor, self.settings.invoke_timeout_s)
        finally:
            self._round_started = 0.0
            self._in_use = None
            if child.retired:
                self._poke()   # the watch saw it go meanwhile: it may be reaped now

    def _ready_child(self) -> _Child:
        """The child that answers: the current one, or the next one if it starts now (waited for, one
        attempt at most: a failing accelerator must not hold an input for every retry); else BackendUnavailable."""
        deadline = time.monotonic() + self.settings.start_timeout_s + 1.0
        with self._cv:
            starts = self._starts_done
            while True:
                if self._stopping:
                    raise BackendError(f"the isolated {self.name} backend is closed")
                if self._child is not None:
                    self._in_use = self._child   # not reaped (its socket closed) under a running invoke
                    return self._child
                now = time.monotonic()
                due = self._failed_at + self._delay()
                if self._starts_done > starts or (not self._starting and due > now):
                    reason = self._problem.reason if self._problem else "not running"
                    raise BackendUnavailable(f"backend {self.name} cannot answer: {reason}; the next start of its "
                                             f"inference child is in {due - now:.1f}s")
                if now >= deadline:
                    raise BackendUnavailable(f"backend {self.name}: no inference child came up within "
                                             f"{self.settings.start_timeout_s:g}s (model.start_timeout_s)")
                self._cv.wait(min(deadline - now, max(due - now, 0.05)))

    def _delay(self) -> float:
        return restart_delay(self._failures, self.settings.restart_min_s, self.settings.restart_max_s)

    # ------------------------------------------------------------ the supervisor thread
    def _run(self) -> None:
        poll = select.poll()
        poll.register(self._wake_r, select.POLLIN)
        try:
            while True:
                self._reap()
                with self._cv:
                    if self._stopping:
                        break
                    child = self._child
                    wait = None if child is not None else self._failed_at + self._delay() - time.monotonic()
                if child is not None:
                    # Idle watch: HUP on its socket means it is gone (eventmask 0 reads nothing, so the
                    # invoking thread still gets every answer).
                    poll.register(child.sock, 0)
                    events = poll.poll()
                    poll.unregister(child.sock)
                    self._drain()
                    if any(fd == child.sock.fileno() for fd, _ in events):
                        self._retire(child, f"the inference child (pid {child.pid}) {child.exit_reason()}")
                elif wait > 0:
                    poll.poll(wait * 1000)
                    self._drain()
                else:
                    self._start_child()
        finally:
            with self._cv:
                child, self._child = self._child, None
                self._stopping = True
                self._cv.notify_all()
            if child is not None:
                child.quit()
                self._retired.append(child)
            self._reap()
            os.close(self._wake_r)
            os.close(self._wake_w)

    def _start_child(self) -> None:
        with self._cv:
            self._starting = True
        try:
            child = _Child.start(self._request, self.settings.start_timeout_s, self._wake_r, lambda: self._stopping)
        except BackendError as exc:
            with self._cv:
                self._starting = False
                self._starts_done += 1
                self._start_error = exc
                self._fail(str(exc))
                if self._child is None:
                    self.runtime = "isolated: no child running"
                delay = self._delay()
                self._cv.notify_all()
            self._inc("backend_start_failures")
            # A missing accelerator is retried for hours: its message once, not every restart_max_s.
            if str(exc) != self._last_logged and not self._stopping:
                self._last_logged = str(exc)
                log.warning("backend %s: cannot start its inference child: %s (next try in %.1fs, then every "
                            "%gs at most)", self.name, exc, delay, self.settings.restart_max_s)
            return
        ready = child.ready
        with self._cv:
            self._starting = False
            self._starts_done += 1
            if self._stopping:
                self._retired.append(child)
                return
            self._child = child
            self._children += 1
            self.runtime = f"{ready['runtime']}, isolated in pid {child.pid}"
            self.input = TensorSpec(tuple(ready["input"][0]), ready["input"][1])
            self.output = TensorSpec(tuple(ready["output"][0]), ready["output"][1])
            self.max_batch = int(ready["max_batch"])
            self._chunk = max(1, min(self.max_batch, child.layout.capacity))
            self._problem = None
            self._start_error = None
            self.healthy_at = time.monotonic()
            self._cv.notify_all()
        self._last_logged = ""
        if self._children > 1:
            self._inc("backend_restarts")
        log.info("backend %s: inference child (pid %d) is up: %s", self.name, child.pid, self.runtime)

    def _retire(self, child: _Child, reason: str) -> None:
        """``child`` is finished: counted and logged once (the invoking thread and the watch may both see it)."""
        with self._cv:
            if child.retired:
                return
            child.retired = True
            if self._child is child:
                self._child = None
            self._retired.append(child)
            self._fail(reason)
            self.runtime = f"{child.ready.get('runtime', self.name)}, isolated: no child running"
            delay = self._delay()
            self._cv.notify_all()
        child.kill()
        self._inc("backend_child_failures")
        log.warning("backend %s: %s; %s", self.name, reason,
                    "starting a fresh one now" if delay == 0 else f"next start in {delay:.1f}s")
        self._poke()

    def _fail(self, reason: str) -> None:
        """Under the lock: one more failure in a row; the problem keeps its first time."""
        now = time.monotonic()
        self._failures += 1
        self._failed_at = now
        self._problem = Problem(self._problem.since if self._problem else now, reason)

    def _reap(self) -> None:
        with self._cv:
            # Closing a socket another thread polls would not wake that poll: the invoking
            # thread's child waits until it is done with it.
            done = [c for c in self._retired if c is not self._in_use]
            self._retired = [c for c in self._retired if c is self._in_use]
        for child in done:
            child.close()

    def _poke(self) -> None:
        try:
            os.write(self._wake_w, b"x")
        except (BlockingIOError, OSError):
            pass   # already poked, or closed (stopped)

    def _drain(self) -> None:
        _drain(self._wake_r)

    def _inc(self, name: str) -> None:
        if self._counters is not None:
            self._counters.inc(name)


def _drain(fd: int) -> None:
    """Empty a non-blocking wake pipe."""
    try:
        while os.read(fd, 512):
            pass
    except BlockingIOError:
        pass
