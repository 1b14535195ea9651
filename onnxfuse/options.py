"""Typed options and results of a fusion: `FuseOptions` (what `fuse` is asked), `FusionReport` (what it did).

An option field that the command line offers carries its help in its metadata (`option(...)`); the CLI
generates its click options from those fields, so a new field is one new line here.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Callable


def option(default, help: str, **cli) -> Any:
    """A dataclass field that the CLI offers as `--name` with this help. `cli` hints for the generated option:
    choices (or a function that returns them), min / max (min_open, max_open), metavar, type (when the default
    is None), multiple, directory, cli_default (the CLI's default, when it differs), auto (a positive number or
    the word 'auto'), needs_data (a fine-tuning option: setting it without --data is a usage error)."""
    if isinstance(default, (list, dict, set)):
        raise TypeError("option defaults must be immutable")
    return field(default=default, metadata={"help": help, **cli})


def cli_fields(cls) -> list:
    """The fields of an options dataclass that the command line offers (those with help)."""
    return [f for f in fields(cls) if "help" in f.metadata]


def _importance_names() -> tuple[str, ...]:
    from .select import IMPORTANCE
    return tuple(IMPORTANCE)


@dataclass
class FuseOptions:
    """Everything `onnxfuse.fuse` is asked to do besides the models (see its docstring).

    `kept`, for experiments with the selection (methods that select neurons: nt, prune): a function
    `(analysis, scores, n) -> {group id: kept wide channels}` used instead of the top-k of `scores` (the
    `importance` of every channel of every prunable group, in wide numbering: member m, channel c -> m*W + c).
    """
    method: str = "nt"
    keep: float | None = option(None, "Fraction of the wide model's neurons to keep in every layer (default 1/N: "
                                      "the original width).", metavar="FRACTION", min=0, max=1, min_open=True,
                                type=float)
    output: Any = None
    force: bool = False
    data: Any = None
    val: Any = None
    training: Any = None                 # TrainOptions fields as a dict (e.g. {"epochs": 3}), or TrainOptions
    progress: bool = False
    calibrate: Any = option(None, "Reconstruct without training: refit every layer that consumes pruned neurons by "
                                  "least squares so the fused model reproduces the wide model (the ensemble) on "
                                  "these inputs (labels unused). Fine-tuning with --data, if given, starts from "
                                  "the result; for a single epoch, --lr 0.005 keeps more of the reconstruction than "
                                  "the default rate.", metavar="CALIB.npz", type=str)
    calib_samples: int = option(2048, "How many samples of --calibrate to use (a fixed random subset if it has "
                                      "more).", min=1)
    quantize: str | None = option(None, "Write the edge version of the result: int8 (static QDQ, per-channel "
                                        "weights, activations calibrated on --calibrate, else on --data; dynamic for "
                                        "MatMul/Gemm-only graphs without either) or fp16 (float32 inputs and outputs "
                                        "kept). See `onnxfuse quantize --help`.", choices=("int8", "fp16"))
    quantize_exclude: tuple = option((), "A node to keep in float when quantizing to int8 (repeat for several).",
                                     metavar="NODE", multiple=True)
    soup: int | None = option(None, "After fine-tuning, fine-tune K copies of the result for --soup-epochs more "
                                    "epochs with seeds --seed+1 .. --seed+K (other batch orders) and write their "
                                    "weight average, a model soup (needs --data).", metavar="K", min=2, type=int)
    soup_mode: str = option("uniform", "greedy: copies in order of held-out accuracy (--val, else the held-out "
                                       "slice of --data), each kept only if the soup's does not drop.",
                            choices=("uniform", "greedy"))
    soup_epochs: int | None = option(None, "Epochs of each soup copy (default: --epochs).", metavar="E", min=1,
                                     type=int)
    soup_average_every: int | None = option(None, "Periodic model averaging: every E' epochs the copies are "
                                                  "averaged and continue from the average (each round a short "
                                                  "fine-tuning at the start's rate); default: only at the end.",
                                            metavar="E'", min=1, type=int)
    soup_batchnorm: str = option("keep", "BatchNorm statistics of the soup: keep the copies' average, or "
                                         "reestimate them on --data (benchmarks/soup_batchnorm.py: no clear gain).",
                                 choices=("keep", "reestimate"))
    importance: str | Callable = option("magnitude", "How neurons are ranked for transplantation and pruning "
                                                     "(onnxfuse.select.IMPORTANCE).", choices=_importance_names)
    kept: Callable | None = None


# keys of a FusionReport that stay in its dict when None (they say "could not be compared")
_NONE_IS_AN_ANSWER = {"beats_best_member"}


@dataclass
class FusionReport:
    """What a fusion (or finetune, quantize, soup) did; `to_dict()` is the `--json` summary (unset fields are
    left out)."""
    method: str
    members: list
    keep: float | None = None
    groups: list | None = None
    fixed_groups: list | None = None
    parameters: dict | None = None
    auto: dict | None = None
    reconstruction: dict | None = None
    exact: bool | None = None
    outputs: dict | None = None
    deviation: dict | None = None
    accuracy: dict | None = None
    training: dict | None = None
    beats_best_member: bool | None = None
    versus_best_member: dict | None = None
    soup: dict | None = None
    quantization: dict | None = None
    output: str | None = None
    seconds: float | None = None
    phases: dict | None = None

    def to_dict(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        return {k: v for k, v in out.items() if v is not None or
                (k in _NONE_IS_AN_ANSWER and self.versus_best_member is not None)}
