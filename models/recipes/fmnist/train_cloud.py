#!/usr/bin/env python3
"""Train the cloud Fashion-MNIST classifier (PyTorch, CPU) and export it to ONNX.

Reproducible: every random draw is seeded (weights, shuffling, augmentation) and
deterministic algorithms are enforced. The checkpoint is selected on the
validation split; the test split is never looked at here (models/recipes/fmnist/evaluate.py
measures it through onnxruntime).

    .venv-train/bin/python models/recipes/fmnist/train_cloud.py            # train + export
    .venv-train/bin/python models/recipes/fmnist/train_cloud.py --bench     # time one epoch's worth of steps

Outputs: models/fmnist-cloud-v1/model.onnx and card.json (metrics filled in by
models/recipes/fmnist/evaluate.py), plus checkpoints/logs under models/.cache/ (git-ignored).
"""
from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import _data  # this folder's helpers (the script's folder is on sys.path)

OUT_DIR = _data.MODELS_DIR / "fmnist-cloud-v1"
SEED = 20261124


def conv_bn(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class Residual(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.body = nn.Sequential(conv_bn(c, c), conv_bn(c, c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class CloudNet(nn.Module):
    """A small ResNet-9-style network (after the DAWNBench CIFAR-10 ResNet-9), scaled to 28x28x1.

    28x28 -> conv(c) -> conv(2c)+pool -> res(2c)      14x14
          -> conv(4c)+pool -> res(4c)                  7x7
          -> conv(8c)+pool                             3x3
          -> global max pool -> linear(10) -> logits
    Input: (N, 1, 28, 28) float32, already normalised: (pixel/255 - mean) / std.
    """

    def __init__(self, c: int = 32, num_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            conv_bn(1, c),
            conv_bn(c, 2 * c), nn.MaxPool2d(2), Residual(2 * c),
            conv_bn(2 * c, 4 * c), nn.MaxPool2d(2), Residual(4 * c),
            conv_bn(4 * c, 8 * c), nn.MaxPool2d(2),
            nn.AdaptiveMaxPool2d(1),
        )
        self.fc = nn.Linear(8 * c, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.features(x), 1))


def augment(x: torch.Tensor, gen: torch.Generator, pad: int = 2) -> torch.Tensor:
    """Random crop with `pad` px zero padding (in normalised units: the padded value is
    the normalised black pixel) and random horizontal flip, per sample."""
    n, _, h, w = x.shape
    black = x.amin()  # pixel 0 after normalisation, same for the whole dataset
    xp = F.pad(x, (pad, pad, pad, pad), value=float(black))
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
    rows = (torch.arange(h)[None, :] + dy[:, None])  # (n, h)
    cols = (torch.arange(w)[None, :] + dx[:, None])  # (n, w)
    flip = torch.rand(n, generator=gen) < 0.5
    cols = torch.where(flip[:, None], cols.flip(1), cols)
    idx_n = torch.arange(n)[:, None, None]
    out = xp[:, 0][idx_n, rows[:, :, None], cols[:, None, :]]
    return out.unsqueeze(1).contiguous()


def to_tensor(images: np.ndarray, mean: float, std: float) -> torch.Tensor:
    x = images.astype(np.float32) / 255.0
    x = (x - mean) / std
    return torch.from_numpy(x).unsqueeze(1).contiguous()


@torch.no_grad()
def predict_logits(model: nn.Module, x: torch.Tensor, batch: int = 1000) -> torch.Tensor:
    model.eval()
    return torch.cat([model(x[i:i + batch]) for i in range(0, len(x), batch)])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--width", type=int, default=24, help="base channel count c")
    ap.add_argument("--max-lr", type=float, default=0.1)
    ap.add_argument("--weight-decay", type=float, default=5e-4)
    ap.add_argument("--label-smoothing", type=float, default=0.1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=SEED)
    ap.add_argument("--out-dir", type=Path, default=OUT_DIR,
                    help="where model.onnx and card.json go (default: %(default)s)")
    ap.add_argument("--bench", action="store_true", help="time 50 training steps and exit")
    ap.add_argument("--export-only", action="store_true",
                    help="skip training: export the checkpoint kept in models/.cache/cloud_best.pt")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    torch.use_deterministic_algorithms(True)

    data = _data.splits()
    train, val = data["train"], data["val"]
    mean = float(train.images.astype(np.float64).mean() / 255.0)
    std = float((train.images.astype(np.float64) / 255.0).std())
    print(f"train mean={mean:.6f} std={std:.6f}", flush=True)
    x_train = to_tensor(train.images, mean, std)
    y_train = torch.from_numpy(train.labels)
    x_val = to_tensor(val.images, mean, std)
    y_val = torch.from_numpy(val.labels)

    model = CloudNet(args.width)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"CloudNet(c={args.width}): {n_params:,} parameters", flush=True)

    steps_per_epoch = len(x_train) // args.batch_size  # drop the ragged last batch
    # no weight decay on BatchNorm / bias parameters
    decay = [p for n, p in model.named_parameters() if p.ndim > 1]
    no_decay = [p for n, p in model.named_parameters() if p.ndim <= 1]
    opt = torch.optim.SGD(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.max_lr, momentum=0.9, nesterov=True,
    )
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=args.max_lr, epochs=args.epochs, steps_per_epoch=steps_per_epoch,
        pct_start=0.25, div_factor=10.0, final_div_factor=100.0,
    )
    gen = torch.Generator().manual_seed(args.seed)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=args.label_smoothing)

    if args.bench:
        model.train()
        t0 = time.perf_counter()
        for _ in range(50):
            idx = torch.randint(0, len(x_train), (args.batch_size,), generator=gen)
            xb = augment(x_train[idx], gen)
            loss = loss_fn(model(xb), y_train[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        dt = time.perf_counter() - t0
        print(f"50 steps: {dt:.1f} s -> {dt / 50 * steps_per_epoch:.0f} s per epoch", flush=True)
        return

    _data.CACHE_DIR.mkdir(parents=True, exist_ok=True)
    ckpt_path = _data.CACHE_DIR / "cloud_best.pt"
    history_path = _data.CACHE_DIR / "cloud_train_history.json"
    if args.export_only:
        saved = _data.read_json(history_path)
        export(args, ckpt_path, mean, std, n_params, saved["train_seconds"])
        return
    best_acc, best_epoch = -1.0, -1
    history = []
    t_start = time.perf_counter()
    for epoch in range(1, args.epochs + 1):
        model.train()
        t0 = time.perf_counter()
        perm = torch.randperm(len(x_train), generator=gen)
        total_loss = 0.0
        for step in range(steps_per_epoch):
            idx = perm[step * args.batch_size:(step + 1) * args.batch_size]
            xb = augment(x_train[idx], gen)
            loss = loss_fn(model(xb), y_train[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total_loss += float(loss.detach())
        logits = predict_logits(model, x_val)
        val_acc = float((logits.argmax(1) == y_val).float().mean())
        elapsed = time.perf_counter() - t_start
        history.append({"epoch": epoch, "loss": total_loss / steps_per_epoch, "val_acc": val_acc,
                        "epoch_s": time.perf_counter() - t0})
        print(f"epoch {epoch:2d}/{args.epochs} loss {total_loss / steps_per_epoch:.4f} "
              f"val_acc {val_acc:.4f} ({time.perf_counter() - t0:.0f} s, total {elapsed:.0f} s)", flush=True)
        if val_acc > best_acc:  # model selection on validation only
            best_acc, best_epoch = val_acc, epoch
            torch.save(model.state_dict(), ckpt_path)
    train_seconds = time.perf_counter() - t_start
    print(f"best val_acc {best_acc:.4f} at epoch {best_epoch}; training took {train_seconds:.0f} s", flush=True)
    _data.write_json(history_path, {
        "args": {k: str(v) for k, v in vars(args).items()}, "history": history, "best_epoch": best_epoch, "best_val_acc": best_acc,
        "train_seconds": train_seconds,
        "torch": torch.__version__, "python": platform.python_version(), "cpu_threads": args.threads,
    })
    export(args, ckpt_path, mean, std, n_params, train_seconds)


def export(args, ckpt_path: Path, mean: float, std: float, n_params: int, train_seconds: float) -> None:
    """Export the selected checkpoint to ONNX (dynamic batch), check it, write the card."""
    model = CloudNet(args.width)
    model.load_state_dict(torch.load(ckpt_path, weights_only=True))
    model.eval()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    onnx_path = args.out_dir / "model.onnx"
    x_val = to_tensor(_data.splits()["val"].images, mean, std)
    example = x_val[:4]
    batch = torch.export.Dim("batch", min=1, max=4096)
    torch.onnx.export(
        model, (example,), str(onnx_path), dynamo=True, external_data=False,
        input_names=["input"], output_names=["logits"],
        dynamic_shapes={"x": {0: batch}},
    )

    # ---- verify onnxruntime against PyTorch ----
    import onnx
    import onnxruntime as ort

    onnx.checker.check_model(str(onnx_path))
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    inp, out = sess.get_inputs()[0], sess.get_outputs()[0]
    print(f"ONNX input {inp.name} {inp.shape} {inp.type}; output {out.name} {out.shape} {out.type}")
    assert inp.name == "input" and out.name == "logits", (inp.name, out.name)
    max_diff = 0.0
    for n in (1, 7, 1000):
        xb = x_val[:n]
        ref = predict_logits(model, xb).numpy()
        got = sess.run(["logits"], {"input": xb.numpy()})[0]
        max_diff = max(max_diff, float(np.abs(ref - got).max()))
    print(f"onnxruntime vs PyTorch: max |diff| = {max_diff:.2e}")
    assert max_diff < 1e-3, max_diff

    card = {
        "schema": 1,
        "name": "fmnist-cloud",
        "version": "1.0.0",
        "role": "cloud",
        "format": "onnx",
        "file": "model.onnx",
        "sha256": _data.sha256_file(onnx_path),
        "params": int(n_params),
        "labels": _data.LABELS,
        "input": {
            "shape": [-1, 1, 28, 28],
            "layout": "NCHW",
            "dtype": "float32",
            "color": "L",
            "pixel_scale": 255.0,
            "mean": mean,
            "std": std,
        },
        "output": {"kind": "logits", "dtype": "float32"},
        "metrics": {},  # filled in by models/recipes/fmnist/evaluate.py
        "training": {
            "script": "models/recipes/fmnist/train_cloud.py",
            "seed": args.seed,
            "framework": f"torch {torch.__version__}",
            "epochs": args.epochs,
            "train_seconds": round(train_seconds, 1),
            "dataset": _data.DATASET_DESCRIPTION,
        },
        "license": "MIT (data); model weights: same as this repository",
    }
    card_path = args.out_dir / "card.json"
    _data.write_card(card_path, card)
    print(f"wrote {onnx_path} ({onnx_path.stat().st_size:,} bytes) and {card_path}")


if __name__ == "__main__":
    main()
