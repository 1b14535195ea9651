"""Weight layers: Gemm, MatMul and Conv. Each opens a channel space on its output and touches its weight; its
`Layout` says how the weight reads as Y = X @ W + b, for the analysis, reconstruction, the bridge and training."""
from __future__ import annotations

from dataclasses import dataclass
from math import ceil, prod

import numpy as np

from . import F, OpSpec, register, torch
from ..groups import AttrConst, GroupedConv, Seg, Touch


@dataclass(frozen=True)
class Layout:
    """A weight layer (weight = input 1) as Y = X @ W + b over rows of its input: the weight axis that consumes
    the input's channels (`in_axis`) and the one that holds the output's (`out_axis`), the channel axes of the
    input and output values (negative: counted from the end), the bias input, Gemm's scales and transA, and a
    Conv's attributes (`window`: its rows are im2col patches)."""
    in_axis: int
    out_axis: int
    x_axis: int
    y_axis: int
    bias: int | None = None          # input position of the bias (a MatMul's is the Add that follows it)
    alpha: float = 1.0
    beta: float = 1.0
    trans_a: bool = False
    window: dict | None = None

    def matrix(self, w: np.ndarray) -> np.ndarray:
        """The weight as the [in, out] matrix W of Y = X @ W, in float64."""
        w = np.asarray(w, np.float64)
        return (w.reshape(w.shape[0], -1).T if self.out_axis == 0 else w) * self.alpha

    def weight(self, m: np.ndarray, shape) -> np.ndarray:
        """The inverse of `matrix`: W in the weight's own layout."""
        return (m.T.reshape(shape) if self.out_axis == 0 else m) / self.alpha

    def rows(self, x: np.ndarray, weight_shape) -> np.ndarray:
        """The layer's input as the rows of X (one row per output position)."""
        x = np.asarray(x)
        if self.window is not None:
            kernel = list(weight_shape[2:])
            strides, pads, dilations = window(self.window, x.shape[2:], kernel)
            return im2col(x, kernel, strides, pads, dilations)
        x = x.T if self.trans_a else x
        return x.reshape(-1, x.shape[-1])

    def target_rows(self, y: np.ndarray) -> np.ndarray:
        """The layer's output as the rows of Y."""
        y = np.moveaxis(np.asarray(y), self.y_axis, -1)
        return y.reshape(-1, y.shape[-1])

    def rows_per_sample(self, x: np.ndarray, y: np.ndarray) -> int:
        """Rows one sample gives: output positions of a conv, tokens of a MatMul, 1 for a Gemm."""
        return int(prod(y.shape[2:])) if self.window is not None else int(prod(x.shape[1:-1]))


MATMUL = Layout(in_axis=0, out_axis=1, x_axis=-1, y_axis=-1)


def _gemm_layout(index, node) -> Layout:
    at = index.attrs(node)
    trans_b = at["transB"]
    return Layout(in_axis=1 if trans_b else 0, out_axis=0 if trans_b else 1, x_axis=0 if at["transA"] else 1,
                  y_axis=1, bias=2, alpha=at["alpha"], beta=at["beta"], trans_a=bool(at["transA"]))


def _conv_layout(index, node) -> Layout:
    return Layout(in_axis=1, out_axis=0, x_axis=1, y_axis=1, bias=2, window=index.attrs(node))


def conv_pads(attrs: dict, spatial_in, kernel, strides, dilations) -> list[int]:
    """Begin and end pads of a Conv or pool (explicit `pads` or `auto_pad`) on an input of spatial size spatial_in."""
    nd = len(kernel)
    auto = attrs.get("auto_pad", "NOTSET")
    auto = auto.decode() if isinstance(auto, bytes) else auto
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        begin, end = [], []
        for size, k, s, d in zip(spatial_in, kernel, strides, dilations):
            total = max((ceil(size / s) - 1) * s + (k - 1) * d + 1 - size, 0)
            small = total // 2
            begin.append(small if auto == "SAME_UPPER" else total - small)
            end.append(total - begin[-1])
        return begin + end
    if auto == "VALID":
        return [0] * 2 * nd
    return list(attrs.get("pads", [0] * 2 * nd))


def window(attrs: dict, spatial_in, kernel) -> tuple[list, list, list]:
    """Strides, pads and dilations of a Conv or pool."""
    nd = len(kernel)
    strides, dilations = list(attrs.get("strides", [1] * nd)), list(attrs.get("dilations", [1] * nd))
    return strides, conv_pads(attrs, spatial_in, kernel, strides, dilations), dilations


def im2col(x: np.ndarray, kernel, strides, pads, dilations) -> np.ndarray:
    """[B, C, *S] -> [B * prod(out S), C * prod(kernel)], columns in the order of a [O, C, *kernel] weight."""
    nd = len(kernel)
    x = np.pad(x, [(0, 0), (0, 0)] + [(pads[i], pads[i + nd]) for i in range(nd)])
    windows = [(k - 1) * d + 1 for k, d in zip(kernel, dilations)]
    v = np.lib.stride_tricks.sliding_window_view(x, windows, axis=tuple(range(2, 2 + nd)))
    v = v[(slice(None), slice(None)) + tuple(slice(None, None, s) for s in strides)
          + tuple(slice(None, None, d) for d in dilations)]
    v = v.transpose([0, *range(2, 2 + nd), 1, *range(2 + nd, 2 + 2 * nd)])
    return v.reshape(-1, x.shape[1] * prod(kernel))


# ----------------------------------------------------------------------------- channel rules

def _weight_layer(a, node, layout: Layout, x_rank: int | None = None):
    """Shared by Gemm, MatMul and Conv: the weight consumes x's channels on its `in_axis` and opens a space on its
    `out_axis` (see Layout)."""
    x, w = node.input[0], node.input[1]
    in_axis, out_axis = layout.in_axis, layout.out_axis
    x_axis, out_chan_axis = (ax if ax >= 0 else x_rank + ax for ax in (layout.x_axis, layout.y_axis))
    if w not in a.tensors:
        return a.unsupported(node, "weight is not a constant")
    if x in a.chan:
        axis, segs = a.chan[x]
        if axis != x_axis:
            return a.unsupported(node, f"channels on axis {axis} of its input, expected axis {x_axis}")
        if a.tensors.shape(w)[in_axis] != a.size(segs):
            return a.unsupported(node, "weight does not match its input's channel count")
        a.touches.append(Touch(w, in_axis, segs, "in", node.name))
    else:               # a graph input or fixed-width value: if `w` is shared, its other uses must not widen this axis
        a.touches.append(Touch(w, in_axis, (), "fixed", node.name))
    out_segs = a.open_space(node, a.tensors.shape(w)[out_axis], node.output[0], out_chan_axis)
    a.touches.append(Touch(w, out_axis, out_segs, "out", node.name))
    return out_segs


def _rule_gemm(a, node):
    segs = _weight_layer(a, node, _gemm_layout(a.index, node))
    if segs and len(node.input) > 2:
        bias_touch(a, node, node.input[2], node.output[0])


def _rule_matmul(a, node):
    x, w = node.input
    rank = a.rank(x)
    if w not in a.tensors and x in a.chan or w in a.chan:
        return _activation_matmul(a, node)
    if w not in a.tensors or len(a.tensors.shape(w)) != 2 or rank is None:
        return a.unsupported(node, "MatMul with a weight of rank > 2 (or an unknown rank) touching a channel axis")
    _weight_layer(a, node, MATMUL, rank)


def _activation_matmul(a, node):
    """A @ B of two activations (attention): channels on a batch axis (heads) are unified and kept; channels
    on the rows of A or the columns of B carry through; a contracted channel axis is not supported."""
    y = node.output[0]
    out_rank = a.rank(y)
    result = None
    for pos, x in enumerate(node.input):
        if x not in a.chan:
            continue
        axis, segs = a.chan[x]
        rank = a.rank(x)
        from_end = rank - axis
        contracted = 1 if pos == 0 else 2
        if from_end == contracted or rank < 2 or out_rank is None:
            return a.unsupported(node, "contracts a channel axis of two activations")
        out_axis = out_rank - from_end
        if result is not None:
            if result[0] != out_axis or len(result[1]) != len(segs):
                return a.unsupported(node, "its inputs carry channels on different axes")
            for s, r in zip(segs, result[1]):
                a.union(s.space, r.space, node.name)
        result = (out_axis, segs)
    a.chan[y] = result


def _rule_matmul_free(a, node):
    """A MatMul that sees no channels and has no 2-D constant weight (rotary embeddings: inv_freq @
    positions) opens no channel space; every other MatMul follows _rule_matmul."""
    w = node.input[1]
    if not any(x in a.chan for x in node.input) and not (w in a.tensors and len(a.tensors.shape(w)) == 2):
        return
    if all(x in a.chan for x in node.input):      # GQA: query heads meet repeated kv heads
        s1, s2 = a.chan[node.input[0]][1], a.chan[node.input[1]][1]
        if len(s1) == len(s2) == 1 and a.size(s1) == a.size(s2) and s1[0].inner != s2[0].inner:
            fine, coarse = sorted((s1[0], s2[0]), key=lambda g: g.inner)
            if coarse.inner % fine.inner == 0:
                a.regrain(fine.space, coarse.inner // fine.inner)   # a unit is a kv head with its query group
    return _rule_matmul(a, node)


def _rule_conv(a, node):
    group = a.attr(node, "group", 1)
    if group != 1:
        return _depthwise_conv(a, node, group)
    segs = _weight_layer(a, node, _conv_layout(a.index, node))
    if segs and len(node.input) > 2 and node.input[2] in a.tensors:
        a.touches.append(Touch(node.input[2], 0, segs, "param", node.name))


def _depthwise_conv(a, node, group: int):
    """group == input channels: output channel o comes from input channel o // multiplier, so the output
    keeps the input's channels (each repeated `multiplier` times, segment by segment) and the group count is
    their width."""
    x, w = node.input[0], node.input[1]
    if x not in a.chan or w not in a.tensors:
        return a.unsupported(node, f"grouped convolution (group={group}) of a graph input")
    axis, segs = a.chan[x]
    if axis == 1 and len(segs) == 1 and segs[0].inner == 1 and a.size(segs) % group == 0 and \
            a.size(segs) != group:
        return _grouped_conv(a, node, group)
    if axis != 1 or any(s.inner != 1 for s in segs) or a.size(segs) != group:
        return a.unsupported(node, f"grouped convolution with group={group} (only depthwise, group = input "
                                   f"channels, is supported)")
    multiplier = a.tensors.shape(w)[0] // group
    out_segs = tuple(Seg(s.space, multiplier) for s in segs)     # several segments: a concat's parts
    a.touches.append(Touch(w, 0, out_segs, "out", node.name))
    if len(node.input) > 2 and node.input[2]:
        a.touches.append(Touch(node.input[2], 0, out_segs, "param", node.name))
    a.attr_consts.append(AttrConst(a.index.index(node), "group", segs))
    a.chan[node.output[0]] = (1, out_segs)


def _grouped_conv(a, node, group: int):
    """1 < group < channels (ResNeXt, RegNet): the output opens a space; input and output channels are kept
    evenly within the conv's blocks, see GroupedConv and `Analysis.blocks`."""
    x, w = node.input[0], node.input[1]
    segs = a.chan[x][1]
    shape = a.tensors.shape(w)
    if shape[1] * group != a.size(segs) or shape[0] % group:
        return a.unsupported(node, f"grouped convolution (group={group}) whose weight {list(shape)} does not "
                                   f"match its input's {a.size(segs)} channels")
    out_segs = a.open_space(node, shape[0], node.output[0], 1)
    a.touches.append(Touch(w, 0, out_segs, "out", node.name))
    if len(node.input) > 2 and node.input[2] in a.tensors:
        a.touches.append(Touch(node.input[2], 0, out_segs, "param", node.name))
    a.grouped.append(GroupedConv(node.name, w, segs, out_segs, group, a.index.index(node)))


def bias_touch(a, node, b: str, y: str):
    """A constant added to (or multiplying) y: touches its channel axis unless it broadcasts over it."""
    if b not in a.tensors:
        return
    axis, segs = a.chan[y]
    shape = a.tensors.shape(b)
    rank = a.rank(y) or axis + 1
    b_axis = axis - (rank - len(shape))
    size = a.size(segs)
    # a size-1 axis on a 1-wide layer is taken as per-channel: concatenating it is right either way
    if b_axis >= 0 and shape[b_axis] == size:
        a.touches.append(Touch(b, b_axis, segs, "param", node.name))
    elif b_axis >= 0 and shape[b_axis] != 1:
        a.unsupported(node, f"constant '{b}' has {shape[b_axis]} entries on a channel axis of size {size}")


# ----------------------------------------------------------------------------- torch forwards

def _gemm(m, at, a, b, c=None):
    alpha, beta = at["alpha"], at["beta"]
    a = a.t() if at["transA"] else a
    b = b.t() if at["transB"] else b
    if c is None:
        y = a @ b
        return y if alpha == 1.0 else y * alpha
    return torch.addmm(c, a, b, beta=beta, alpha=alpha)     # one fused op, as nn.Linear does


def pad_if_asymmetric(x, pads, value=0.0):
    """Torch pads both sides of an axis alike: asymmetric pads (begin..., end...) are applied to x first."""
    begin, end = pads[:len(pads) // 2], pads[len(pads) // 2:]
    if list(begin) == list(end):
        return x, list(begin)
    flat = []
    for b, e in zip(reversed(begin), reversed(end)):
        flat += [b, e]
    return F.pad(x, flat, value=value), [0] * len(begin)


def _conv(m, at, x, w, b=None):
    dims = w.dim() - 2
    strides, pads, dilations = window(at, x.shape[2:], list(w.shape[2:]))
    x, padding = pad_if_asymmetric(x, pads)
    fn = (F.conv1d, F.conv2d, F.conv3d)[dims - 1]
    return fn(x, w, b, stride=strides, padding=padding, dilation=dilations, groups=at["group"])


def _always(a, node) -> bool:
    """A weight layer opens a space whatever its input."""
    return True


register(
    OpSpec("Gemm", _rule_gemm, opens_space=_always, forward=_gemm, layout=_gemm_layout),
    OpSpec("MatMul", _rule_matmul_free, opens_space=_always, batchwise=True,
           forward=lambda m, at, a, b: torch.matmul(a, b), layout=lambda index, node: MATMUL),
    OpSpec("Conv", _rule_conv, opens_space=_always, forward=_conv, layout=_conv_layout),
)
