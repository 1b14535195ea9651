"""What onnxfuse knows about each ONNX op, in one place: one `OpSpec` per op type, grouped by family.

A spec carries the op's channel rule (read by groups.analyze), whether it commutes with averaging (exactness),
which inputs are sizes rather than data, its torch forward (torch_bridge) and, for weight layers, its `Layout`
(groups, reconstruct, torch_bridge and training read it). Adding an op is adding its spec to its family's file.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable

from ..errors import UnsupportedGraphError
from ..graph_index import STANDARD, GraphIndex


class LazyModule:
    """A module imported on first attribute access (torch is the optional [train] extra: the analysis must not
    import it); each attribute is then cached on the proxy, so forwards pay for the lookup once."""

    def __init__(self, name: str):
        self._name = name

    def __getattr__(self, attr):
        value = getattr(importlib.import_module(self._name), attr)
        setattr(self, attr, value)
        return value


torch = LazyModule("torch")
F = LazyModule("torch.nn.functional")


@dataclass(frozen=True)
class OpSpec:
    """One op type. `rule(a, node)` records what the op does to channels (None: the op may not meet a channel
    axis); `opens_space(a, node)` says whether the rule also runs when no input carries channels (a weight layer,
    an embedding lookup). `forward(module, attrs, *inputs)` runs it in torch (attrs with the schema's defaults);
    an op without one must say `trainable=False`, and fine-tuning refuses a graph that needs it."""
    op_type: str
    rule: Callable | None = None
    opens_space: Callable | None = None
    linear: bool = False                  # commutes with averaging over members (output_exactness)
    shape_arithmetic: bool = False        # may compute a size from Shape values (shape_functions)
    reads_shape: bool = False             # returns a size of its input, not its data
    size_inputs: frozenset = frozenset()  # input positions that are sizes, not data
    batchwise: bool = False               # treats every index of axis 0 alone (heads merged into the batch)
    forward: Callable | None = None
    trainable: bool = True
    layout: Callable | None = None        # (index, node) -> Layout, for weight layers
    norm_inputs: tuple = ()               # normalization scale and shift inputs (PERP retrains them)
    buffer_inputs: tuple = ()             # running statistics: torch buffers that follow train/eval, not parameters


REGISTRY: dict[str, OpSpec] = {}


def register(*specs: OpSpec) -> None:
    for spec in specs:
        if spec.op_type in REGISTRY:
            raise ValueError(f"op {spec.op_type} is registered twice")
        if spec.forward is None and spec.trainable:
            raise ValueError(f"op {spec.op_type} has no torch forward: give one or mark it trainable=False")
        REGISTRY[spec.op_type] = spec


def spec_of(node) -> OpSpec | None:
    """The spec of a node's op (standard domain only)."""
    return REGISTRY.get(node.op_type) if node.domain in STANDARD else None


def untrainable_ops(index: GraphIndex, outputs: list[str]) -> list[str]:
    """'op (node 'name')' for every node that `outputs` need and the torch bridge cannot run."""
    return [f"{n.op_type}{' (domain ' + n.domain + ')' if n.domain not in STANDARD else ''} (node '{n.name}')"
            for n in index.needed_nodes(outputs) if n.op_type != "Constant"
            and (spec_of(n) is None or spec_of(n).forward is None)]


def check_trainable(model, target_output: str | None = None) -> None:
    """Refuse, before anything is fused, a graph that fine-tuning could not run (the op the bridge lacks)."""
    from ..runtime import logits_output      # onnxruntime: imported only where it is used
    missing = untrainable_ops(GraphIndex(model), [logits_output(model, target_output)])
    if missing:
        raise UnsupportedGraphError(f"cannot fine-tune: the torch bridge has no implementation of op {missing[0]}"
                                    + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))


from . import linear, elementwise, shape, slicing, normalization, reductions, attention  # noqa: E402,F401
