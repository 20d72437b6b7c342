"""The whole calibration on arrays: every score fitted on validation, its threshold chosen
there for the target, reported on the untouched test split, and the score to deploy picked.
Pure numpy, no I/O: :func:`calibrate_arrays` is what ``edge-infer calibrate`` runs once the
models have answered."""
from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from ..router import RouterParams
from ..scores import SCORES, ScoreParams, make_scorer
from .curves import (
    BootstrapDiff, OffloadCurve, OperatingPoint, auc, bootstrap_kept_difference, evaluate_threshold, kept_share_at,
    offload_curve, oracle_score,
)
from .fitting import (
    DEFAULT_TRAINING, RouterTraining, cross_fit_router, fit_temperature, nll, router_labels, train_router,
)
from .guarantee import EXACT_SCORES, Guarantee, certify_threshold
from .threshold import Target, resolve_target, select_threshold

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- records

@dataclass(frozen=True)
class Split:
    """One labelled split: edge logits (N, C), true labels, and the cloud's predicted labels."""
    logits: np.ndarray
    labels: np.ndarray
    cloud_pred: np.ndarray

    def __post_init__(self) -> None:
        if self.logits.ndim != 2 or not (len(self.logits) == len(self.labels) == len(self.cloud_pred)):
            raise ValueError(f"split arrays disagree: logits {self.logits.shape}, labels {self.labels.shape}, "
                             f"cloud predictions {self.cloud_pred.shape}")

    @property
    def edge_ok(self) -> np.ndarray:
        return self.logits.argmax(axis=1) == self.labels

    @property
    def cloud_ok(self) -> np.ndarray:
        return self.cloud_pred == self.labels

    def __len__(self) -> int:
        return len(self.labels)


@dataclass(frozen=True)
class ScoreResult:
    """One score, its threshold chosen on validation and what that threshold does on test."""
    score: str
    val: OperatingPoint | None            # None: the target is unreachable on validation
    test: OperatingPoint | None
    val_best: OperatingPoint              # the best accuracy this score can reach on validation
    test_best: OperatingPoint
    test_kept_at_target: float | None     # reading the test curve itself at the test target (optimistic)
    val_auc: float | None                 # how well the score ranks edge-correct above edge-wrong
    test_auc: float | None
    #: with --risk: the certified threshold (``val``/``test`` are then its points) and the point
    #: estimate it replaced (the threshold that just reaches the target on validation)
    guarantee: Guarantee | None = None
    point_val: OperatingPoint | None = None
    point_test: OperatingPoint | None = None

    def to_dict(self, target: Target | None = None) -> dict[str, Any]:
        gap = None
        if self.val is not None and self.test is not None:
            gap = {"accuracy": round(self.test.accuracy - self.val.accuracy, 6),
                   "kept_share": round(self.test.kept_share - self.val.kept_share, 6)}
        extra: dict[str, Any] = {}
        if self.guarantee is not None:
            extra = {"guarantee": self.guarantee.to_dict(target), "point_estimate": {
                "validation": None if self.point_val is None else self.point_val.to_dict(),
                "test": None if self.point_test is None else self.point_test.to_dict()}}
        return {
            "score": self.score,
            "validation": None if self.val is None else self.val.to_dict(),
            "test": None if self.test is None else self.test.to_dict(),
            "gap_test_minus_validation": gap,
            **extra,
            "best_reachable": {"validation": self.val_best.to_dict(), "test": self.test_best.to_dict()},
            "test_curve_kept_share_at_target": None if self.test_kept_at_target is None
            else round(self.test_kept_at_target, 6),
            "auc_edge_correct": {"validation": self.val_auc, "test": self.test_auc},
        }


@dataclass(frozen=True)
class OracleResult:
    """A perfect router that offloads exactly the inputs the cloud fixes (an upper bound)."""
    val_kept_at_target: float | None
    test_kept_at_target: float | None
    test_best: OperatingPoint

    def to_dict(self) -> dict[str, Any]:
        return {"validation_kept_share_at_target": self.val_kept_at_target,
                "test_kept_share_at_target": self.test_kept_at_target, "test_best": self.test_best.to_dict()}


@dataclass(frozen=True, eq=False)
class Calibration:
    target: Target
    test_target_accuracy: float | None
    edge_accuracy: dict[str, float]          # split -> accuracy
    cloud_accuracy: dict[str, float]
    temperature: float
    router: RouterParams | None
    router_note: str
    results: dict[str, ScoreResult]
    curves: dict[str, dict[str, OffloadCurve]]   # score -> split -> curve
    chosen: str | None
    oracle: OracleResult
    sizes: dict[str, int]
    values: dict[str, dict[str, np.ndarray]]      # score -> split -> per-input score (val: cross-fitted router)
    oracle_curves: dict[str, OffloadCurve]        # split -> the oracle router's curve
    val_gain: dict[str, BootstrapDiff]            # kept share vs max_softmax on validation, with its noise
    risk: float | None = None                     # --risk: thresholds certified at this risk in all
    risk_candidates: tuple[str, ...] = ()         # the scores the choice was made among (Bonferroni over them)

    @property
    def chosen_result(self) -> ScoreResult | None:
        return None if self.chosen is None else self.results[self.chosen]


# ----------------------------------------------------------------------------- the procedure

def evaluate_score(name: str, val_score: np.ndarray, test_score: np.ndarray, val_edge_ok: np.ndarray,
                   val_cloud_ok: np.ndarray, test_edge_ok: np.ndarray, test_cloud_ok: np.ndarray,
                   target: Target, test_target_accuracy: float | None = None) -> tuple[ScoreResult, OffloadCurve,
                                                                                        OffloadCurve]:
    """Choose the threshold on validation, apply it to test. ``test_target_accuracy``: the
    accuracy the test curve is read at (the cloud's test accuracy for a cloud target)."""
    val_curve = offload_curve(val_score, val_edge_ok, val_cloud_ok)
    test_curve = offload_curve(test_score, test_edge_ok, test_cloud_ok)
    val_point = select_threshold(val_curve, target)
    test_point = None if val_point is None else evaluate_threshold(test_score, test_edge_ok, test_cloud_ok,
                                                                   val_point.threshold)
    kept = None
    if target.is_accuracy:
        kept = kept_share_at(test_curve, target.value if test_target_accuracy is None else test_target_accuracy)
    result = ScoreResult(
        score=name, val=val_point, test=test_point, val_best=val_curve.best(), test_best=test_curve.best(),
        test_kept_at_target=kept, val_auc=auc(val_score, val_edge_ok), test_auc=auc(test_score, test_edge_ok),
    )
    return result, val_curve, test_curve


def choose_score(val_points: Mapping[str, OperatingPoint | None], target: Target,
                 order: Iterable[str] = SCORES, gains: Mapping[str, "BootstrapDiff"] | None = None,
                 reference: str = "max_softmax") -> str | None:
    """The score to deploy: most kept on the device on validation at an accuracy target; best
    validation accuracy within an offload budget (then most kept). Ties go to the earlier,
    simpler score in ``order``. None when no score meets the target.

    With ``gains`` (paired bootstrap of each score's kept share minus the reference's), a score
    other than the reference is chosen only if its whole 95% interval is above zero: a gain
    within noise does not justify deploying a more complex score."""
    best_name, best_key = None, None
    for name in order:
        p = val_points.get(name)
        if p is None:
            continue
        if gains is not None and name != reference and val_points.get(reference) is not None:
            g = gains.get(name)
            if g is None or not g.significant:
                continue
        key = (p.kept_share,) if target.is_accuracy else (round(p.accuracy, 12), p.kept_share)
        if best_key is None or key > best_key:
            best_name, best_key = name, key
    return best_name


def calibrate_arrays(val: Split, test: Split, target_kind: str = "cloud", target_value: float | None = None,
                     scores: Iterable[str] = SCORES, router_cfg: RouterTraining = DEFAULT_TRAINING,
                     folds: int = 5, seed: int = 0, resamples: int = 300, tolerance: float = 0.0,
                     risk: float | None = None) -> Calibration:
    """Fit the temperature and the router on ``val``, choose a threshold per score on ``val``
    for the target, report each on ``test``, and pick the score to deploy. ``tolerance``: for the
    cloud target, how far below the cloud's accuracy is acceptable (accuracy points).

    ``risk``: instead of the point estimate, each score's threshold is certified
    (:mod:`.guarantee`): the target holds on the population with probability >= 1 - risk. The
    score is then chosen among those with nothing fitted on validation
    (:data:`~.guarantee.EXACT_SCORES`), each tested at risk / their number (Bonferroni: the
    choice among them is made on the same data)."""
    scores = tuple(scores)
    unknown = [s for s in scores if s not in SCORES]
    if unknown:
        raise ValueError(f"unknown score(s) {', '.join(unknown)}; choose from {', '.join(SCORES)}")
    if risk is not None and not 0.0 < risk < 1.0:
        raise ValueError(f"--risk must be between 0 and 1 (0.05: 95% confidence), got {risk}")
    if risk is not None and target_kind == "max_offload_share":
        raise ValueError("--risk applies to an accuracy target (--target cloud, --target-accuracy), not to "
                         "--max-offload-share")
    if val.logits.shape[1] != test.logits.shape[1]:
        raise ValueError("validation and test logits have different class counts")
    cloud_val = float(val.cloud_ok.mean())
    target = resolve_target(target_kind, target_value, cloud_val, tolerance)
    test_target = float(test.cloud_ok.mean()) - target.tolerance if target.kind == "cloud" else (
        target.value if target.is_accuracy else None)

    temperature = fit_temperature(val.logits, val.labels)
    log.info("temperature fitted on validation: %.4f (NLL %.4f -> %.4f)", temperature,
             nll(val.logits, val.labels), nll(val.logits, val.labels, temperature))
    params = ScoreParams(temperature=temperature)
    score_values: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    router: RouterParams | None = None
    router_note = "not requested"
    for name in scores:
        if name != "router":
            f = make_scorer(name, params)
            score_values[name] = (f(val.logits), f(test.logits))
            continue
        y = router_labels(val.edge_ok, val.cloud_ok, router_cfg.target)
        minority = int(min(y.sum(), len(y) - y.sum()))
        if minority < 2 * folds:
            router_note = (f"skipped: only {minority} validation inputs of the rarer kind for target "
                           f"{router_cfg.target!r}; a router needs at least {2 * folds} (more labelled data)")
            log.warning("router %s", router_note)
            continue
        oof = cross_fit_router(val.logits, y, router_cfg, temperature, folds=folds, seed=seed)
        router = train_router(val.logits, y, router_cfg, temperature, meta={
            "model": router_cfg.model, "hidden": router_cfg.hidden if router_cfg.model == "mlp" else 0,
            "l2": router_cfg.l2, "trained_on": len(y), "cross_fit_folds": folds, "seed": seed})
        score_values[name] = (oof, make_scorer("router", ScoreParams(router=router))(test.logits))
        router_note = (f"{router_cfg.model} on {', '.join(router_cfg.features)}; target {router_cfg.target}; "
                       f"validation scores are {folds}-fold cross-fitted, the deployed router is refit on all "
                       f"{len(y)} validation inputs")

    results: dict[str, ScoreResult] = {}
    curves: dict[str, dict[str, OffloadCurve]] = {}
    candidates = tuple(s for s in SCORES if s in score_values and (risk is None or s in EXACT_SCORES))
    level = None if risk is None else risk / max(1, len(candidates))
    for name, (sv, st) in score_values.items():
        res, cv, ct = evaluate_score(name, sv, st, val.edge_ok, val.cloud_ok, test.edge_ok, test.cloud_ok,
                                     target, test_target)
        if risk is not None:
            res = certified_result(res, sv, st, val, test, target, risk, level)
        results[name] = res
        curves[name] = {"val": cv, "test": ct}

    ov = offload_curve(oracle_score(val.edge_ok, val.cloud_ok), val.edge_ok, val.cloud_ok)
    ot = offload_curve(oracle_score(test.edge_ok, test.cloud_ok), test.edge_ok, test.cloud_ok)
    oracle = OracleResult(
        val_kept_at_target=kept_share_at(ov, target.value) if target.is_accuracy else None,
        test_kept_at_target=kept_share_at(ot, test_target) if test_target is not None else None,
        test_best=ot.best())
    val_gain: dict[str, BootstrapDiff] = {}
    if target.is_accuracy and "max_softmax" in score_values and len(score_values) > 1 and resamples > 0:
        val_gain = bootstrap_kept_difference(
            {k: v for k, (v, _) in score_values.items()}, val.edge_ok, val.cloud_ok, reference="max_softmax",
            resamples=resamples, seed=seed, target_accuracy=None if target.kind == "cloud" else target.value,
            accuracy_offset=target.tolerance)
    chosen = choose_score({k: r.val for k, r in results.items()}, target, order=candidates,
                          gains=val_gain if val_gain else None)
    return Calibration(
        target=target, test_target_accuracy=test_target,
        edge_accuracy={"val": float(val.edge_ok.mean()), "test": float(test.edge_ok.mean())},
        cloud_accuracy={"val": cloud_val, "test": float(test.cloud_ok.mean())},
        temperature=temperature, router=router, router_note=router_note, results=results, curves=curves,
        chosen=chosen, oracle=oracle, sizes={"val": len(val), "test": len(test)},
        values={k: {"val": v, "test": t} for k, (v, t) in score_values.items()},
        oracle_curves={"val": ov, "test": ot}, val_gain=val_gain, risk=risk,
        risk_candidates=candidates if risk is not None else ())


def certified_result(res: ScoreResult, val_score: np.ndarray, test_score: np.ndarray, val: Split, test: Split,
                     target: Target, risk: float, level: float | None) -> ScoreResult:
    """``res`` with its point-estimate threshold replaced by the certified one (kept as ``point_*``)."""
    g = certify_threshold(res.score, val_score, val.edge_ok, val.cloud_ok, target, risk, level)
    v = t = None
    if g.threshold is not None:
        v = evaluate_threshold(val_score, val.edge_ok, val.cloud_ok, g.threshold)
        t = evaluate_threshold(test_score, test.edge_ok, test.cloud_ok, g.threshold)
    return replace(res, val=v, test=t, guarantee=g, point_val=res.val, point_test=res.test)
