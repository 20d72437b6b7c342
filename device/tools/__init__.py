"""Tools around the runtime, never imported by the service: the demo, the local broker, the
labelled data sets, running a model over a data set, and progress bars. ``edge-infer
calibrate`` is its own package, :mod:`edge_infer.calibration`.

Progress bars need the ``tools`` extra (tqdm); without it the tools print one summary line
per loop instead.
"""
