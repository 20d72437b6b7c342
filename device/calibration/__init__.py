"""``edge-infer calibrate``: choose the offload score and threshold from labelled data.

A tool, never imported by the device service. Its modules, in the order a calibration runs:

- :mod:`.data`       labelled images (IDX, .npz, class folders) and the cloud's answers (its
                     model, run here, or a predictions file)
- :mod:`.fitting`    the temperature and the learned router, fitted on validation (pure)
- :mod:`.curves`     offload curves and operating points: hybrid accuracy against the share
                     offloaded, AUC, the paired bootstrap (pure)
- :mod:`.threshold`  the target and the threshold that meets it on a curve (pure)
- :mod:`.guarantee`  ``--risk``: a threshold certified for the target with a finite-sample
                     guarantee (exact binomial tests, fixed-sequence over a fixed grid; pure)
- :mod:`.perclass`   a threshold per predicted class, fitted cross-fitted and kept only when it
                     beats the single threshold beyond noise (pure)
- :mod:`.compare`    every score through the same procedure: fit, choose its threshold on
                     validation, report on test, pick the one to deploy (pure)
- :mod:`.report`     the policy snippet, calibration.json and the printed table
- :mod:`.plot`       offload_curve.png (matplotlib: the ``calibrate`` extra)
- :mod:`.command`    the command line: arguments, the run, what it writes

The scores themselves (names, scorers) are the runtime's, :mod:`edge_infer.scores`, and the
router file is :mod:`edge_infer.router`: what calibrate measures is what the device computes.

Conventions: a *score* is a confidence per input, higher = more confident; the device
offloads an input when ``score < threshold``. Offloading input i replaces the edge answer
by the cloud answer, so the hybrid accuracy at a threshold is
``mean(where(score < t, cloud_ok, edge_ok))``.
"""
from ..errors import EdgeInferError


class CalibrateError(EdgeInferError):
    """A user-facing problem with the inputs; the message says what to do."""

    exit_code = 2
