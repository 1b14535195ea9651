#!/usr/bin/env python
"""`--method auto` against every fusion method, on members of three kinds.

Member sets (N = 3, trained here, exported with the legacy torch.onnx exporter), for an MLP 40-100-100-10 and a
1-D CNN on MNIST-1D (scored on 20000 generated held-out sequences; benchmarks/reconstruction.py's generator),
and a transformer encoder classifier over the 8 rows of scikit-learn's digits (benchmarks/edge.py's model):
  - independent: three seeds from scratch (Adam, lr 1e-3);
  - fine-tunes: one base model trained here (Adam), then fine-tuned three times with different seeds (Adam,
    lr 3e-4, other batch orders), every layer trained;
  - frozen: the same, with the first half of the layers frozen (their tensors identical in every member).

Every method (nt, average, weight-matching, ot) and auto fuse each set; the result is scored before and
after E = 3 epochs of fine-tuning with the default recipe (`onnxfuse.fuse(members, method, data=train,
val=heldout, training={"epochs": E})`). Target (issue 20): auto within 0.3 pp of the best method of each set,
with and without fine-tuning, and no method crashes.

    python benchmarks/auto_method.py           # about 30 minutes on 2 CPU cores
    python benchmarks/auto_method.py --quick --out /tmp/q   # the MLP sets only, 1000 sequences, 2 member epochs

Writes benchmarks/results/auto_method.md and auto_method.json.
"""
from __future__ import annotations

import datetime
import tempfile
import traceback
from pathlib import Path

import numpy as np

import reconstruction as r     # benchmarks/reconstruction.py
from _common import (AFTER, BEFORE, ENSEMBLE, cli, digits, export, fit, md_table, mnist1d, mnist1d_heldout, pct,
                     stamp, transformer, write_results)
import onnxfuse  # noqa: E402  (the checkout's: _common puts it first on sys.path)

METHODS = ("nt", "average", "weight-matching", "ot")
KINDS = ("independent", "fine-tunes", "frozen")
EPOCHS = 3


def train(net, x, y, seed: int, epochs: int, lr: float, frozen: int = 0):
    """Adam on (x, y); the first `frozen` parameter tensors (in definition order) are not trained."""
    import torch
    torch.manual_seed(seed)
    params = list(net.parameters())
    for p in params[:frozen]:
        p.requires_grad_(False)
    fit(net, x, y, epochs, lr, 100, params=[p for p in params if p.requires_grad])
    for p in params:
        p.requires_grad_(True)
    return net


def members(kind: str, factory, x, y, epochs: int, folder: Path, tag: str, export) -> list[str]:
    import copy
    if kind == "independent":
        nets = [train(factory(), x, y, seed, epochs, 1e-3) for seed in range(3)]
    else:
        base = train(factory(), x, y, 100, epochs, 1e-3)
        frozen = len(list(base.parameters())) // 2 if kind == "frozen" else 0
        nets = [train(copy.deepcopy(base), x, y, seed, max(2, epochs // 3), 3e-4, frozen) for seed in range(3)]
    return [export(net, folder / f"{tag}_{kind}_{i}.onnx") for i, net in enumerate(nets)]


def families(quick: bool, folder: Path) -> list[dict]:
    import torch
    torch.set_num_threads(1)
    x, y, _, _ = mnist1d()
    if quick:
        x, y = x[:1000], y[:1000]
    xh, yh = mnist1d_heldout(1000 if quick else r.HELDOUT, r.HELDOUT_SEED)
    out = []
    for kind_name in (("mlp",) if quick else ("mlp", "cnn")):
        factory, shape = r.nets()[kind_name]
        train_npz, val_npz = folder / f"m1d_{kind_name}_train.npz", folder / f"m1d_{kind_name}_val.npz"
        np.savez(train_npz, x=x.reshape(-1, *shape), y=y)
        np.savez(val_npz, x=xh.reshape(-1, *shape), y=yh)
        out.append({"family": f"MNIST-1D {kind_name.upper()}", "factory": factory, "x": x.reshape(-1, *shape),
                    "y": y, "epochs": 2 if quick else 20, "train": str(train_npz), "val": str(val_npz),
                    "export": lambda net, path, shape=shape: r.export_member(net, shape, path)})
    if not quick:
        (ttr, ytr), (tva, yva) = digits((8, 8))
        train_npz, val_npz = folder / "tok_train.npz", folder / "tok_val.npz"
        np.savez(train_npz, x=ttr, y=ytr)
        np.savez(val_npz, x=tva, y=yva)
        out.append({"family": "transformer (digits rows)", "factory": transformer, "x": ttr, "y": ytr,
                    "epochs": 6, "train": str(train_npz), "val": str(val_npz),
                    "export": lambda net, path: export(net, torch.zeros(2, 8, 8), path)})
    return out


def run_set(paths: list[str], train: str, val: str, log) -> dict:
    acc = lambda s, key: s["accuracy"][key]["accuracy"]
    row = {"members": None, "ensemble": None, "untuned": {}, "tuned": {}, "errors": {}}
    for method in METHODS + ("auto",):
        for epochs, where in ((0, "untuned"), (EPOCHS, "tuned")):
            try:
                s = onnxfuse.fuse(paths, method, data=train, val=val, training={"epochs": epochs}).summary
            except Exception as exc:                      # a crash is a result here: it is what we count
                row["errors"][f"{method} E={epochs}"] = f"{type(exc).__name__}: {exc}"
                log(traceback.format_exc())
                continue
            row["members"] = [acc(s, Path(p).name) for p in paths]
            row["ensemble"] = acc(s, ENSEMBLE)
            row[where][method] = acc(s, AFTER if epochs else BEFORE)
            if method == "auto":
                row.setdefault("auto", {})[where] = {"chose": s["auto"]["method"], "why": s["auto"]["why"],
                                                     "regime": s["auto"]["regime"]}
            log(f"    {method:<16} E={epochs}: {row[where][method]:.4f}")
    for where in ("untuned", "tuned"):
        scores = {m: v for m, v in row[where].items() if m != "auto"}
        if scores and "auto" in row[where]:
            row.setdefault("regret_pp", {})[where] = round(100 * (max(scores.values()) - row[where]["auto"]), 2)
    return row


def markdown(rows: list[dict]) -> str:
    lines = ["# `--method auto` against every fusion method", "",
             f"`python benchmarks/auto_method.py`, {datetime.date.today()}. N = 3 "
             f"members per set; held-out accuracy (%) before fine-tuning (E = 0) and after E = {EPOCHS} epochs with "
             "the default recipe. Regret: the best method's accuracy minus auto's (target <= 0.3 pp).", ""]
    table = []
    for r in rows:
        regret = r.get("regret_pp", {})
        table.append([r["family"], r["kind"], pct(max(r["members"] or [0])), pct(r["ensemble"]),
                      *(pct(r[where].get(m)) for m in (*METHODS, "auto") for where in ("untuned", "tuned")),
                      " / ".join(r.get("auto", {}).get(w, {}).get("chose", "-") for w in ("untuned", "tuned")),
                      regret.get("untuned", "-"), regret.get("tuned", "-")])
    lines += md_table(["family", "members", "best member", "ensemble",
                       *(f"{m} E={e}" for m in (*METHODS, "auto") for e in (0, EPOCHS)),
                       f"auto chose (E=0 / E={EPOCHS})", "regret E=0", f"regret E={EPOCHS}"],
                      table, "llrr" + "r" * (2 * len(METHODS) + 2) + "lrr")
    errors = [(r["family"], r["kind"], k, v) for r in rows for k, v in r["errors"].items()]
    regrets = [v for r in rows for v in r.get("regret_pp", {}).values()]
    lines += ["", f"Crashes: {len(errors)}." + "".join(f"\n- {f} {k}, {m}: {e}" for f, k, m, e in errors),
              "", f"auto within 0.3 pp of the best method in {sum(v <= 0.3 for v in regrets)} of {len(regrets)} "
              f"comparisons (worst regret {max(regrets, default=0):.2f} pp).", "", "Why auto chose what it chose:", ""]
    for r in rows:
        for where, a in r.get("auto", {}).items():
            lines.append(f"- {r['family']}, {r['kind']}, {where}: {a['chose']} ({a['why']})")
    return "\n".join(lines) + "\n"


def main():
    args = cli(__doc__, "the MLP sets only, 1000 training and 1000 held-out sequences, 2 member epochs").parse_args()
    st = stamp()
    log = lambda m: print(m, flush=True)  # noqa: E731
    rows = []
    with tempfile.TemporaryDirectory(prefix="onnxfuse-auto-") as tmp:
        folder = Path(tmp)
        for fam in families(args.quick, folder):
            for kind in KINDS:
                tag = fam["family"].split()[-1].lower().strip("()")
                paths = members(kind, fam["factory"], fam["x"], fam["y"], fam["epochs"], folder, tag, fam["export"])
                log(f"{fam['family']}, {kind}:")
                rows.append({"family": fam["family"], "kind": kind, **run_set(paths, fam["train"], fam["val"], log)})
    text = markdown(rows)
    print(text)
    write_results(args.out, "auto_method", text, {"rows": rows}, st)


if __name__ == "__main__":
    main()
