"""What a fusion method is (`FusionMethod`), what it builds from (`Job`) and what it returns (`Assembly`), and
the registry that onnxfuse.fuse and the CLI read (`METHODS`, `register`)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import onnx

from ..errors import OnnxFuseError
from ..groups import Analysis
from ..model_io import Member, TensorTable
from ..transplant import MemberTensors


@dataclass(frozen=True)
class Job:
    """The loaded members, their analysis and the caller's choices: everything a method builds from."""
    members: list[Member]
    load: MemberTensors           # load(tensor, m): member m's tensor of member 0's name, in the compute dtype
    analysis: Analysis
    groups: list                  # the prunable channel groups
    keep: float | None
    importance: Callable          # (analysis, load, n, widened touches) -> channel scores (onnxfuse.select)
    kept: Callable | None         # FuseOptions.kept: the caller's selection, instead of the top-k
    release: bool                 # the members' tensors may be dropped as they are used (no later step reads them)

    @property
    def n(self) -> int:
        return len(self.members)


@dataclass
class Assembly:
    """A built model: member 0's graph without weight data, its tensors, the kept wide channels of every group
    (None for a method that does not select channels) and one summary row per prunable group."""
    graph: onnx.ModelProto
    tensors: TensorTable
    kept: dict[int, np.ndarray] | None
    groups: list[dict]


@dataclass(frozen=True)
class FusionMethod:
    """One way to fuse the members. `build` does the method's work; the flags say which options apply."""
    name: str                     # --method NAME
    label: str                    # provenance: the result's "onnxfuse.method" metadata
    verb: str                     # what the CLI prints: "<verb>: a.onnx, b.onnx -> out.onnx"
    help: str                     # its sentence in `merge --help`
    reference: str                # where the method comes from
    build: Callable[[Job], Assembly]
    min_members: int = 2          # below 2: not offered by `merge` (it has a command of its own)
    keep: bool = True             # --keep applies
    calibrate: bool = False       # --calibrate (least-squares reconstruction of the kept channels) applies
    selects: bool = False         # it keeps the most important channels: FuseOptions.importance and kept apply
    wide: bool = False            # the result is the wide model: its exactness as the ensemble is reported
    imports: tuple[str, ...] = () # heavy modules it needs, imported before the members load (phase "import")

    def validate(self, n: int, keep, calibrate) -> None:
        """Refuse, before anything is loaded, a member count or options that the method cannot take."""
        if n < self.min_members:
            raise OnnxFuseError(f"merge needs at least {self.min_members} models, got {n}")
        if keep is not None and not self.keep:
            raise OnnxFuseError(f"--keep applies to neuron transplantation only, not to --method {self.name}")
        if calibrate is not None and not self.calibrate:
            raise OnnxFuseError(f"--calibrate applies to neuron transplantation (and prune), not to method "
                                f"{self.name}")


METHODS: dict[str, FusionMethod] = {}


def register(method: FusionMethod) -> FusionMethod:
    """Add a method to the registry (in the order `merge --help` lists them)."""
    if method.name in METHODS or method.name == "auto":
        raise ValueError(f"a fusion method named '{method.name}' exists already")
    METHODS[method.name] = method
    return method


def merge_methods() -> list[str]:
    """The methods that `merge --method` offers (besides auto): those that fuse several members."""
    return [m.name for m in METHODS.values() if m.min_members >= 2]
