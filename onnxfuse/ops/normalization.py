"""Normalizations: BatchNormalization and InstanceNormalization act per channel of axis 1 (their scale is a
`norm` touch, counted in the importance); LayerNormalization over a widened channel axis mixes the members."""
from __future__ import annotations

from . import F, OpSpec, register
from ..groups import Touch


def _rule_norm(a, node):
    axis, segs = a.chan[node.input[0]]
    if axis != 1:
        return a.unsupported(node, f"normalization of axis 1, but channels are on axis {axis}")
    for i, x in enumerate(node.input[1:], start=1):
        if x and x in a.tensors:
            a.touches.append(Touch(x, 0, segs, "norm" if i == 1 else "param", node.name))
    a.chan[node.output[0]] = (axis, segs)


def _rule_layernorm(a, node):
    x = node.input[0]
    axis, segs = a.chan[x]
    rank = a.rank(x) or axis + 1
    first = a.attr(node, "axis", -1) % rank
    if axis >= first:
        for i, t in enumerate(node.input[1:3], start=1):
            if t and t in a.tensors:
                a.touches.append(Touch(t, axis - (rank - len(a.tensors.shape(t))), segs,
                                       "norm" if i == 1 else "param", node.name))
        a.mixing[node.name] = f"LayerNormalization '{node.name}' normalizes over the members' channels together"
    a.chan[node.output[0]] = (axis, segs)


# ----------------------------------------------------------------------------- torch forwards

def _batchnorm(m, at, x, scale, bias, mean, var):
    return F.batch_norm(x, mean, var, scale, bias, training=m.training, momentum=1.0 - at["momentum"],
                        eps=at["epsilon"])


def _layernorm(m, at, x, scale, bias=None):
    axis = at["axis"] % x.dim()
    return F.layer_norm(x, x.shape[axis:], scale, bias, eps=at["epsilon"])


register(
    OpSpec("BatchNormalization", _rule_norm, forward=_batchnorm, norm_inputs=(1, 2), buffer_inputs=(3, 4)),
    OpSpec("InstanceNormalization", _rule_norm, norm_inputs=(1, 2),
           forward=lambda m, at, x, scale, bias: F.instance_norm(x, weight=scale, bias=bias, eps=at["epsilon"])),
    OpSpec("LayerNormalization", _rule_layernorm, forward=_layernorm, norm_inputs=(1, 2)),
)
