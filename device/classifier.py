"""The classifier: model card + preprocessing + backend + confidence score -> a frozen inference.

Owns the backend (through its invoke guard) and, with ``[model] fallback =
"cpu"``, the fallback model that answers while an isolated backend is missing
or failing (``failover.BackendState``); knows nothing of offloading, the store
or the network.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from .backends import BackendError, create_backend
from .backends.guard import InvokeGuard
from .backends.isolated import BackendUnavailable, IsolatedBackend, IsolationSettings
from .config import ModelConfig, PolicyConfig
from .errors import InferenceUnavailable
from .failover import BackendState, Problem, change_message, state_of
from .modelcard import ModelCard, ModelCardError, load_card, verified_model_bytes
from .preprocess import Preprocessor
from .router import load_router
from .scores import Prediction, ScoreParams, as_score_logits, dequantize, make_scorer, top1, views_score_logits
from .stats import Counters

log = logging.getLogger(__name__)

#: the backend a fallback model runs on (in the service's process: the CPU runtime does not abort it)
FALLBACK_BACKEND = "tflite-cpu"


def blank_input(card: ModelCard) -> np.ndarray:
    """A batch of one black image of the model's size and colour: the first invoke, which allocates."""
    inp = card.input
    shape = (1, inp.height, inp.width) if inp.channels == 1 else (1, inp.height, inp.width, inp.channels)
    return np.zeros(shape, np.uint8)


@dataclass(frozen=True)
class Inference:
    label: int
    confidence: float
    #: the model-sized image the model saw (uint8, as the card says)
    fitted: np.ndarray
    #: the registry name of the backend that answered, and whether it was the fallback
    backend: str = ""
    fallback: bool = False
    #: the model that answered (the fallback's card when it did)
    model_id: str = ""


@dataclass(frozen=True)
class _Engine:
    """One model on one backend: its card, its preprocessing, its invoke guard."""

    card: ModelCard
    pre: Preprocessor
    guard: InvokeGuard
    backend: str
    fallback: bool


class Classifier:
    def __init__(self, model: ModelConfig, policy: PolicyConfig, backend_options: Any = None, *,
                 fallback_options: Any = None, counters: Counters | None = None) -> None:
        """``backend_options``: the backend's own ``Options`` (``DeviceConfig.backend_options``);
        ``None`` takes its defaults, with the deprecated ``[model]`` runtime/num_threads for tflite-cpu.
        ``fallback_options``: the tflite-cpu ``Options`` for the fallback model (``None``: defaults)."""
        self._model_cfg = model
        if backend_options is None and model.legacy_options():
            from .backends.tflite_cpu import Options
            backend_options = Options(**model.legacy_options())
        self._backend_options = backend_options
        self._fallback_options = fallback_options
        self.counters = counters if counters is not None else Counters()
        self.card: ModelCard = load_card(model.card)
        self.pre = Preprocessor(self.card.input)
        # max_softmax has a fast path (top1); the other scores go through the shared scorer.
        self._scorer = None
        if policy.score != "max_softmax":
            router = load_router(policy.router_file) if policy.score == "router" else None
            self._scorer = make_scorer(policy.score, ScoreParams(temperature=policy.temperature, router=router))
        self._guard: InvokeGuard | None = None
        self._primary: _Engine | None = None
        self._fallback: _Engine | None = None
        self._isolated: IsolatedBackend | None = None
        self._state = BackendState.HEALTHY
        self._state_lock = threading.Lock()
        self._out_since: float | None = None
        self._answers_at_change = 0

    def start(self) -> None:
        """Check the model file against its card, load it on the backend, run one warm-up invoke.

        Raises BackendError (exit 2) for a backend that does not run this card's format, a
        runtime that is not installed, or a model the card does not describe; and, for an
        isolated backend with no fallback, for one that cannot load (a missing accelerator).
        With a fallback it starts degraded instead, and keeps retrying the backend.
        """
        if self._guard is not None:
            raise RuntimeError("Classifier.start() called twice")
        # The fallback first: a bad fallback card stops the start before the accelerator is claimed.
        fallback = self._start_fallback() if self._model_cfg.fallback == "cpu" else None
        try:
            backend = self._start_primary(has_fallback=fallback is not None)
        except BaseException:
            if fallback is not None:
                fallback.guard.close()
            raise
        self._guard = InvokeGuard(backend)
        self._primary = _Engine(self.card, self.pre, self._guard, self._model_cfg.backend, False)
        self._fallback = fallback
        self._observe()

    def _start_primary(self, *, has_fallback: bool) -> Any:
        m = self._model_cfg
        if not m.isolated:
            backend = create_backend(m.backend, self.card, verified_model_bytes(self.card), self._backend_options)
            try:
                # The first call allocates, and a model that cannot run should fail here, not on the first input.
                backend.invoke(self.pre.batch(blank_input(self.card)))
            except BaseException:
                backend.close()
                raise
            return backend
        verified_model_bytes(self.card)   # a corrupt file is the operator's, before any child is started
        settings = IsolationSettings(invoke_timeout_s=m.invoke_timeout_s, start_timeout_s=m.start_timeout_s,
                                     restart_min_s=m.restart_min_s, restart_max_s=m.restart_max_s,
                                     log_level=logging.getLevelName(logging.getLogger().getEffectiveLevel()))
        backend = IsolatedBackend(m.backend, self.card, self._backend_options, settings, counters=self.counters)
        self._isolated = backend
        try:
            backend.start()   # the child loads the model and runs it once
        except BackendError as exc:
            if not has_fallback:
                backend.close()
                self._isolated = None
                if exc.exit_code == 2:
                    raise
                # Nothing could answer: exit 2, so that systemd does not restart the service in a loop.
                raise BackendError(f"{exc} (backend {m.backend}, at start; with no [model] fallback the service "
                                   "cannot answer: fix this, or set fallback = \"cpu\")", exit_code=2) from exc
            # Started degraded: the state change logs it; the supervisor keeps retrying the backend.
        return backend

    def _start_fallback(self) -> _Engine:
        path = self._model_cfg.fallback_card or self.card.fallback_card
        if path is None:
            raise ModelCardError(f'model.fallback = "cpu" needs the CPU model\'s card: set [model] fallback_card, '
                                 f'or "fallback_card" in {self.card.path}')
        card = load_card(path)
        if card.labels != self.card.labels:
            raise ModelCardError(f"fallback card {card.path} has other labels than {self.card.path}: a fallback "
                                 "must answer with the same classes")
        backend = create_backend(FALLBACK_BACKEND, card, verified_model_bytes(card), self._fallback_options)
        pre = Preprocessor(card.input)
        try:
            backend.invoke(pre.batch(blank_input(card)))
        except BaseException:
            backend.close()
            raise
        log.info("fallback model %s loaded on %s (%s): it answers while backend %s cannot", card.model_id,
                 FALLBACK_BACKEND, backend.runtime, self._model_cfg.backend)
        return _Engine(card, pre, InvokeGuard(backend), FALLBACK_BACKEND, True)

    def close(self) -> None:
        if self._guard is not None:
            self._guard.close()
            self._guard = None
        elif self._isolated is not None:
            self._isolated.close()
        self._isolated = None
        if self._fallback is not None:
            self._fallback.guard.close()
            self._fallback = None

    def __enter__(self) -> "Classifier":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def backend(self):
        return self._guard.backend if self._guard is not None else None

    @property
    def runtime(self) -> str:
        return self._guard.backend.runtime if self._guard is not None else ""

    # ------------------------------------------------------------ health
    def stuck_for(self) -> float:
        """Seconds the current invoke has run beyond what supervision allows (the watchdog's measure).

        An isolated backend bounds its own waits (the child is killed after model.invoke_timeout_s,
        a fresh one waited for up to model.start_timeout_s): those count only past their deadlines."""
        if self._guard is None:
            return 0.0
        stuck = self._guard.stuck_for()
        if self._isolated is not None:
            stuck = max(self._isolated.stuck_for(), stuck - self.recovery_budget_s())
        if self._fallback is not None:
            stuck = max(stuck, self._fallback.guard.stuck_for())
        return stuck

    def recovery_budget_s(self) -> float:
        """How long one input may legitimately wait while an isolated backend recovers (0 in-process)."""
        m = self._model_cfg
        return 2 * m.invoke_timeout_s + m.start_timeout_s if self._isolated is not None else 0.0

    def problem(self) -> Problem | None:
        return self._isolated.problem() if self._isolated is not None else None

    def state(self) -> BackendState:
        """The backend's state now (logging a change once)."""
        return self._observe()

    def health(self) -> tuple[bool, str]:
        """False once the backend is lost (failing past model.failure_grace_s with no fallback)."""
        state = self._observe()
        if state is not BackendState.LOST:
            return True, "ok"
        p = self.problem()
        return False, (f"inference backend {self._model_cfg.backend} failing for "
                       f"{time.monotonic() - p.since:.0f}s (model.failure_grace_s = "
                       f"{self._model_cfg.failure_grace_s:g}) with no fallback: {p.reason}" if p else "inference lost")

    def status(self) -> dict[str, Any]:
        """The status message's "inference" fields."""
        state = self._observe()
        p = self.problem()
        iso = self._isolated
        healthy_at = iso.healthy_at if iso is not None else None
        if state is BackendState.HEALTHY:
            since_healthy = 0.0
        else:
            since_healthy = round(time.monotonic() - healthy_at, 1) if healthy_at is not None else None
        fb = self._fallback
        return {"state": state.value, "backend": self._model_cfg.backend, "isolated": iso is not None,
                "reason": p.reason if p else None,
                "since_healthy_s": since_healthy,
                "fallback": f"{fb.card.model_id} on {fb.backend}" if fb else None,
                "fallback_answers": self.counters.get("fallback_answers"),
                "child_pid": iso.pid if iso is not None else None}

    def _observe(self) -> BackendState:
        p = self.problem()
        if p is None and self._state is BackendState.HEALTHY:
            return self._state
        now = time.monotonic()
        new = state_of(p, now, has_fallback=self._fallback is not None, grace_s=self._model_cfg.failure_grace_s)
        with self._state_lock:
            old = self._state
            if new is old:
                return new
            self._state = new
            answers = self.counters.get("fallback_answers")
            out_for = now - self._out_since if self._out_since is not None else None
            if new is BackendState.HEALTHY:
                self._out_since = None
            elif old is BackendState.HEALTHY:
                self._out_since = p.since if p else now
            since_change, self._answers_at_change = answers - self._answers_at_change, answers
        fb = self._fallback
        message = change_message(old, new, backend=self._model_cfg.backend,
                                 fallback=f"{fb.card.model_id} on {fb.backend}" if fb else None,
                                 reason=p.reason if p else "", grace_s=self._model_cfg.failure_grace_s,
                                 out_for_s=out_for, fallback_answers=since_change)
        log.log(logging.ERROR if new is BackendState.LOST else logging.WARNING, "%s", message)
        return new

    # ------------------------------------------------------------ inference
    def _engine(self) -> _Engine:
        """The primary, unless it cannot answer now and a fallback can."""
        if self._primary is None:
            raise RuntimeError("the classifier is not started: call EdgeService.start() first")
        if self._fallback is not None and self.problem() is not None:
            self._observe()
            return self._fallback
        return self._primary

    def _unavailable(self, exc: BackendUnavailable) -> _Engine:
        """The primary failed this input: the fallback answers it, or the input fails with what to do."""
        self._observe()
        if self._fallback is None:
            self.counters.inc("inference_unavailable")
            raise InferenceUnavailable(f"{exc}. No fallback is configured ([model] fallback = \"none\"): this input "
                                       "was not answered; submit it again") from None
        return self._fallback

    def infer(self, pixels: np.ndarray) -> Inference:
        """One uint8 image (any size and mode the preprocessor fits) -> label, confidence score."""
        engine = self._engine()
        try:
            fitted = engine.pre.fit(pixels)
            pred = self._predict(engine, fitted)
        except BackendUnavailable as exc:
            engine = self._unavailable(exc)
            fitted = engine.pre.fit(pixels)
            pred = self._predict(engine, fitted)
        if engine.fallback:
            self.counters.inc("fallback_answers")
        elif self._state is not BackendState.HEALTHY:
            self._observe()
        return Inference(pred.label, pred.confidence, fitted, engine.backend, engine.fallback, engine.card.model_id)

    def _predict(self, engine: _Engine, fitted: np.ndarray) -> Prediction:
        views = engine.card.input.views
        if not views:
            return self._score(engine.guard.invoke(engine.pre.batch(fitted[None])), engine.card)
        tensor = engine.pre.views_tensor(fitted)
        if engine.guard.max_batch >= len(views):
            raw = engine.guard.invoke_batch(tensor)
            outputs = [raw[i:i + 1] for i in range(len(views))]
        else:
            outputs = [engine.guard.invoke(tensor[i:i + 1]) for i in range(len(views))]
        combined = views_score_logits(outputs, engine.card.output)
        if self._scorer is None:   # max_softmax of log(mean p) is the top mean probability
            label = int(combined.argmax())
            return Prediction(label, float(np.exp(combined[label])))
        return Prediction(int(combined.argmax()), float(self._scorer(combined.reshape(1, -1))[0]))

    def infer_many(self, images: list[np.ndarray]) -> list[Inference]:
        """Many images, in order: batches of the backend's ``max_batch`` where it batches
        (onnxruntime on a dynamic-batch model), one invoke each otherwise; the same labels either way."""
        if self._guard is None:
            raise RuntimeError("the classifier is not started: call EdgeService.start() first")
        if self._guard.max_batch == 1 or len(images) < 2 or self.card.input.views:
            return [self.infer(im) for im in images]
        step = self._guard.max_batch
        out: list[Inference] = []
        for start in range(0, len(images), step):
            chunk = images[start:start + step]
            engine = self._engine()
            if engine.guard.max_batch < len(chunk):
                out.extend(self.infer(im) for im in chunk)
                continue
            try:
                fitted = [engine.pre.fit(im) for im in chunk]
                raw = engine.guard.invoke_batch(engine.pre.batch(fitted))   # the lock is held one batch at a time
            except BackendUnavailable as exc:
                engine = self._unavailable(exc)
                fitted = [engine.pre.fit(im) for im in chunk]
                raw = engine.guard.invoke_batch(engine.pre.batch(fitted))
            if engine.fallback:
                self.counters.inc("fallback_answers", len(chunk))
            for i, f in enumerate(fitted):
                pred = self._score(raw[i:i + 1], engine.card)
                out.append(Inference(pred.label, pred.confidence, f, engine.backend, engine.fallback,
                                     engine.card.model_id))
        return out

    def _score(self, raw: np.ndarray, card: ModelCard) -> Prediction:
        if self._scorer is None:
            return top1(raw, card.output)
        values = as_score_logits(dequantize(raw, card.output), card.output.kind).reshape(1, -1)
        return Prediction(int(values.argmax()), float(self._scorer(values)[0]))
