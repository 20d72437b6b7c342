"""Old home of the scores and the router, kept only until device/service.py imports them from
their new homes: :mod:`edge_infer.scores` (score names, softmax, scorers) and
:mod:`edge_infer.router` (the learned router and its file). Import from those; this module
goes once nothing imports it."""
from .router import (  # noqa: F401
    ACTIVATIONS, FEATURES, ROUTER_FORMAT, ROUTER_TARGETS, ROUTER_VERSION, DenseLayer, FittedRouter, RouterFileError,
    RouterParams, feature_width, load_router, router_forward, router_from_dict, router_to_dict, save_router,
)
from .scores import (  # noqa: F401
    SCORES, Scorer, ScoreParams, as_score_logits, make_scorer, max_prob, normalized_confidence_entropy,
    router_features, softmax, top2_margin,
)
