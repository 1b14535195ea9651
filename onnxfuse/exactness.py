"""Whether a wide model is exact: its outputs are the mean of the members' outputs (or identical to them)."""
from __future__ import annotations

from .ops import OpSpec, spec_of


UNKNOWN = OpSpec("")          # an op without a spec: no flag set


def _spec(node) -> OpSpec:
    return spec_of(node) or UNKNOWN


def is_linear(node) -> bool:
    """Ops that commute with averaging over members (used to tell whether a wide model is exact)."""
    return _spec(node).linear


def _shape_state(node, ins: list) -> tuple[str, str | None] | None:
    """Exactness of a node that reads the shape of a widened value, or computes with such a shape: the
    result is 'shape' (sizes, checked where they meet the channels), or None when the shape values only
    give a data op its sizes (then the op is judged on its data inputs)."""
    spec = _spec(node)
    if spec.reads_shape or spec.shape_arithmetic and all(s[0] in ("shape", "same") for s in ins):
        return ("shape", None)
    if all(s[0] != "shape" or i in spec.size_inputs for i, s in enumerate(ins)):
        return None
    return ("derived", f"{node.op_type} at node '{node.name}' computes with the shape of a widened value")


def output_exactness(a, differing: set[str]) -> dict[str, str | None]:
    """For each graph output: None if the wide model's output is exactly the mean of the members' outputs
    (or identical to them), else the reason why not.

    A value is 'wide' (widened channels: the members side by side), 'mean' (the members' mean), 'same'
    (identical in every member) or derived (a function of averaged values that is not their mean).
    """
    state: dict[str, tuple[str, str | None]] = {}
    for node in a.model.graph.node:
        if node.op_type == "Constant":
            continue
        ins = [state.get(x, ("same", None)) for x in node.input if x]
        if any(s[0] == "shape" for s in ins) or (_spec(node).reads_shape and ins[0][0] != "same"):
            result = _shape_state(node, [state.get(x, ("same", None)) for x in node.input])
            if result is not None:
                for y in node.output:
                    state[y] = result
                continue
            ins = [("same", None) if s[0] == "shape" else s for s in ins]
        derived = next((s for s in ins if s[0] == "derived"), None)
        out_wide = node.output[0] in a.chan and all(a.is_widened(s.space) for s in a.chan[node.output[0]][1])
        in_wide = node.input[0] in a.chan and all(a.is_widened(s.space) for s in a.chan[node.input[0]][1])
        averaged = [x for x in node.input if x in differing]
        if derived:
            result = derived
        elif node.name in a.mixing and any(s[0] == "wide" for s in ins):
            result = ("derived", a.mixing[node.name])
        elif out_wide:
            result = ("wide", None)
        elif _spec(node).layout is not None and in_wide:
            result = ("mean", None)
        elif any(s[0] in ("mean", "wide") for s in ins) or averaged:
            kinds = [s[0] for s in ins]        # a mean scaled by a value every member has: still a mean
            scaled = not averaged and (node.op_type == "Mul" and sorted(kinds) == ["mean", "same"] or
                                       node.op_type == "Div" and kinds == ["mean", "same"])
            linear = scaled or is_linear(node) and (not averaged or node.op_type in ("Add", "Sub"))
            why = (f"{node.op_type} at node '{node.name}' is applied to averaged values" if not averaged else
                   f"tensor '{averaged[0]}' of node '{node.name}' differs between members and is averaged")
            result = ("mean", None) if linear else ("derived", why)
        else:
            result = ("same", None)
        for y in node.output:
            state[y] = result
    return {o.name: (None if state.get(o.name, ("same", None))[0] in ("mean", "same", "shape")
                     else state[o.name][1]) for o in a.model.graph.output}
