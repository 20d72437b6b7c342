"""The edge network variants train_cascade.py can train (--arch), all under the 10,000-parameter
budget (Keras count_params, BatchNorm included) and built from Edge-TPU ops only (Conv2D,
DepthwiseConv2D, ReLU, MaxPool, residual Add, GlobalAveragePooling, Dense; BatchNorm folds into
the convs, ReLU into their outputs).

v1 spends 4,608 of its 9,882 parameters on one full 3x3 conv 16->32; a depthwise-separable
block does the same step for ~800, which leaves room for width where the classes are told
apart (before the global average pooling) and for more spatial steps at 14x14 and 7x7.

- v1:     fmnist-edge-v1's network (train_edge.build_model), 9,882 parameters.
- sep80:  separable blocks throughout, one at 28x28, 80 channels before pooling, 9,834.
- sep96r: the 28x28 stem only (v1's compute there), 40 channels at 14x14 and 96 at 7x7, with
          residual depthwise steps (x + DW(x)) that widen the receptive field for ~1.3k each, 9,946.
- sep128: as sep96r at 14x14, one 1x1 expansion to 128 channels last (MobileNet's last layer), 9,698.

Every arch but v1 is a list of steps (SPECS), so its parameter count is known without TensorFlow
(param_count; the unit test checks the budget with it, and against Keras where TensorFlow is).
"""
from __future__ import annotations

from collections.abc import Callable

# a step: ("conv", f) 3x3 conv to f channels, ("pw", f) 1x1 conv, ("dw",) 3x3 depthwise,
# ("dwres",) x + DW(x), ("pool",) 2x2 max pool; each conv is followed by BatchNorm and ReLU.
# The head is always GlobalAveragePooling -> Dense(10) logits.
Step = tuple
SPECS: dict[str, tuple[Step, ...]] = {
    # v1's network as steps, only for param_count (it is built by train_edge.build_model)
    "v1": (("conv", 16), ("pool",), ("conv", 32), ("pool",), ("dw",), ("pw", 32), ("dw",), ("pw", 64)),
    "sep80": (("conv", 16), ("dw",), ("pw", 32), ("pool",), ("dw",), ("pw", 48), ("pool",),
              ("dw",), ("pw", 80), ("dw",)),
    "sep96r": (("conv", 16), ("pool",), ("dw",), ("pw", 40), ("dwres",), ("pool",),
               ("dw",), ("pw", 96), ("dwres",), ("dwres",)),
    "sep128": (("conv", 16), ("pool",), ("dw",), ("pw", 40), ("dwres",), ("pool",),
               ("dwres",), ("dw",), ("pw", 128)),
}
ARCHS = tuple(SPECS)
NUM_CLASSES = 10
BN_PARAMS = 4   # gamma, beta, moving mean, moving variance: Keras counts all four


def param_count(arch: str) -> int:
    """Keras count_params of ``arch``, from its steps (BatchNorm included)."""
    c, n = 1, 0
    for step in SPECS[arch]:
        kind = step[0]
        if kind in ("conv", "pw"):
            f = step[1]
            n += (9 if kind == "conv" else 1) * c * f + BN_PARAMS * f
            c = f
        elif kind in ("dw", "dwres"):
            n += 9 * c + BN_PARAMS * c
        elif kind != "pool":
            raise ValueError(f"unknown step {step!r}")
    return n + c * NUM_CLASSES + NUM_CLASSES


def _from_spec(arch: str) -> Callable:
    def build_model(tf, batch_size: int | None = None):
        L = tf.keras.layers

        def bn_relu(x):
            return L.ReLU()(L.BatchNormalization()(x))

        inp = L.Input(shape=(28, 28, 1), batch_size=batch_size, name="image")
        x = inp
        for step in SPECS[arch]:
            kind = step[0]
            if kind == "conv":
                x = bn_relu(L.Conv2D(step[1], 3, padding="same", use_bias=False)(x))
            elif kind == "pw":
                x = bn_relu(L.Conv2D(step[1], 1, use_bias=False)(x))
            elif kind == "dw":
                x = bn_relu(L.DepthwiseConv2D(3, padding="same", use_bias=False)(x))
            elif kind == "dwres":
                x = L.Add()([x, bn_relu(L.DepthwiseConv2D(3, padding="same", use_bias=False)(x))])
            elif kind == "pool":
                x = L.MaxPooling2D(2)(x)
            else:
                raise ValueError(f"unknown step {step!r}")
        x = L.GlobalAveragePooling2D()(x)
        out = L.Dense(NUM_CLASSES, name="logits")(x)   # logits: no softmax
        return tf.keras.Model(inp, out, name=f"fmnist_edge_{arch}")

    return build_model


def builder(arch: str) -> Callable:
    """The build_model(tf, batch_size=None) of ``arch``."""
    if arch == "v1":
        from train_edge import build_model   # the same network as fmnist-edge-v1
        return build_model
    if arch in SPECS:
        return _from_spec(arch)
    raise SystemExit(f"unknown --arch {arch!r}; choose from {', '.join(ARCHS)}")
