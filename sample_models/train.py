"""Regenerate the small sample models and data used by onnxfuse's tests and examples.

Run from the repository root:

    python sample_models/train.py            # writes next to this script
    python sample_models/train.py --out DIR  # writes somewhere else

What it does (deterministically, in a few seconds on CPU):

* loads scikit-learn's bundled ``digits`` dataset (8x8 images, 10 classes),
  scales pixels to [0, 1] and makes a fixed stratified 70/30 split;
  writes ``digits_{train,val}.npz`` (x: float32 (N, 64), y: int64) and
  ``digits_images_{train,val}.npz`` (same samples, x: (N, 1, 8, 8));
* trains three MLPs and three small CNNs (seeds 0, 1, 2), deliberately
  under-trained so that averaging members visibly helps;
* exports ``digits_mlp_{0,1,2}.onnx`` with the legacy TorchScript exporter
  and ``digits_cnn_{0,1,2}.onnx`` with the dynamo exporter, both with a
  dynamic batch dimension, input ``x`` and output ``logits``;
* checks every file with ``onnx.checker`` (full_check) and onnxruntime
  against the torch outputs on the validation set.
"""

import argparse
import logging
import os
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

SEEDS = (0, 1, 2)


def mlp():
    return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))


def cnn():
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(16 * 2 * 2, 32), nn.ReLU(), nn.Linear(32, 10),
    )


def train(make, seed, x, y, epochs, batch=64, lr=1e-3):
    """Minibatch Adam; the seed fixes both the initial weights and the batch order."""
    torch.manual_seed(seed)
    model = make()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=gen).split(batch):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    return model.eval()


def accuracy(logits, y):
    return float((logits.argmax(1) == y).float().mean())


def check_onnx(path, model, x_val):
    onnx.checker.check_model(path, full_check=True)
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    (got,) = sess.run(["logits"], {"x": x_val.numpy()})
    with torch.no_grad():
        want = model(x_val).numpy()
    diff = float(np.abs(got - want).max())
    assert got.shape == want.shape and diff <= 1e-4, (path, diff)
    return diff


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.path.dirname(os.path.abspath(__file__)))
    out = ap.parse_args().out
    os.makedirs(out, exist_ok=True)
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    # Quieten known, harmless exporter noise (legacy-exporter deprecation, missing torchvision).
    warnings.simplefilter("ignore", DeprecationWarning)
    warnings.simplefilter("ignore", FutureWarning)
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)

    # --- data -------------------------------------------------------------
    digits = load_digits()
    x_all = (digits.data / 16.0).astype(np.float32)
    y_all = digits.target.astype(np.int64)
    x_tr, x_va, y_tr, y_va = train_test_split(
        x_all, y_all, test_size=0.3, stratify=y_all, random_state=0)
    for name, x, y in (("train", x_tr, y_tr), ("val", x_va, y_va)):
        np.savez(os.path.join(out, f"digits_{name}.npz"), x=x, y=y)
        np.savez(os.path.join(out, f"digits_images_{name}.npz"), x=x.reshape(-1, 1, 8, 8), y=y)
    print(f"data: {len(y_tr)} train / {len(y_va)} val samples")

    y_tr_t, y_va_t = torch.from_numpy(y_tr), torch.from_numpy(y_va)
    kinds = {
        # name: (constructor, input shape, epochs, Adam lr) -- short on purpose
        "mlp": (mlp, (-1, 64), 6, 3e-3),
        "cnn": (cnn, (-1, 1, 8, 8), 6, 1e-3),
    }
    for kind, (make, shape, epochs, lr) in kinds.items():
        xt = torch.from_numpy(x_tr.reshape(shape))
        xv = torch.from_numpy(x_va.reshape(shape))
        logits = []
        for seed in SEEDS:
            model = train(make, seed, xt, y_tr_t, epochs, lr=lr)
            with torch.no_grad():
                logits.append(model(xv))
            path = os.path.join(out, f"digits_{kind}_{seed}.onnx")
            if kind == "mlp":  # legacy TorchScript exporter
                torch.onnx.export(
                    model, xv[:2], path, dynamo=False, input_names=["x"], output_names=["logits"],
                    dynamic_axes={"x": {0: "batch"}, "logits": {0: "batch"}}, opset_version=17)
            else:  # new (torch.export based) exporter; default external_data=True
                torch.onnx.export(  # writes the weights to digits_cnn_{seed}.onnx.data
                    model, (xv[:2],), path, dynamo=True, input_names=["x"], output_names=["logits"],
                    dynamic_shapes=({0: torch.export.Dim("batch")},), verbose=False)
            diff = check_onnx(path, model, xv)
            print(f"{kind} member {seed}: val acc {accuracy(logits[-1], y_va_t):.4f}  "
                  f"(onnx max abs diff {diff:.1e})")
        for k in (2, 3):
            ens = torch.stack(logits[:k]).mean(0)
            print(f"{kind} ensemble of members 0..{k - 1} (mean logits): val acc {accuracy(ens, y_va_t):.4f}")


if __name__ == "__main__":
    main()
