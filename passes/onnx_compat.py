"""ONNX forms that TVM 0.27's importer converts to wrong results, rewritten into forms it converts right.

- PRelu before opset 7 has one slope per channel (axis 1); the importer applies a 1-D slope to the
  last axis (an assertion on most shapes, wrong values when the last axis has the channels' size).
- Add, Mul, ... before opset 7 broadcast B from `axis`; the importer ignores `axis` and aligns B
  with the trailing axes.
- Slice before opset 10 takes starts/ends/axes as attributes; the importer reads only the inputs
  of Slice-10 and fails.
- SequenceInsert at a negative position p inserts before element n + p; the importer inserts at
  n + p + 1.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from edgetvm.errors import UserError
from edgetvm.passes.onnx_fold import _infer_shapes

LEGACY_BROADCAST = {"Add", "Sub", "Mul", "Div", "Pow", "And", "Or", "Xor", "Equal", "Greater", "Less"}


def rewrite_for_importer(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of `model` with the forms above rewritten; `model` itself if it has none."""
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)
    ops = {n.op_type for n in model.graph.node}
    if not (opset < 7 and ops & (LEGACY_BROADCAST | {"PRelu"})) and not (opset < 10 and "Slice" in ops) \
            and "SequenceInsert" not in ops:
        return model
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    dims = {name: d for name, (_, d) in _infer_shapes(out, 64 << 10).items() if d is not None}
    nodes = []
    for node in g.node:
        if opset < 7 and node.op_type == "PRelu":
            nodes += _channel_slope(node, dims)
        elif opset < 7 and node.op_type in LEGACY_BROADCAST:
            nodes += _broadcast_from_axis(node, dims)
        elif opset < 10 and node.op_type == "Slice":
            nodes += _slice_inputs(node)
        else:
            nodes.append(node)
    del g.node[:]
    g.node.extend(nodes)
    _positive_insert_positions(g)
    return out


def _unsqueeze(name: str, axes: list[int], node: onnx.NodeProto) -> onnx.NodeProto:
    # Unsqueeze-1 (axes as an attribute): these models are opset < 7.
    return helper.make_node("Unsqueeze", [name], [f"{name}_{node.output[0]}_unsqueezed"], axes=axes,
                            name=f"{node.name or node.output[0]}_unsqueeze")


def _channel_slope(node: onnx.NodeProto, dims: dict) -> list[onnx.NodeProto]:
    """PRelu(x, slope[C]) on x[N, C, ...]: slope becomes [C, 1, ..., 1], which broadcasts to axis 1."""
    x, slope = (dims.get(i) for i in node.input[:2])
    if x is None or slope is None or len(slope) != 1 or len(x) < 3 or slope[0] == 1 or slope[0] != x[1]:
        return [node]
    u = _unsqueeze(node.input[1], list(range(1, len(x) - 1)), node)
    node.input[1] = u.output[0]
    return [u, node]


def _broadcast_from_axis(node: onnx.NodeProto, dims: dict) -> list[onnx.NodeProto]:
    """A op B with broadcast=1, axis=k: B gets trailing 1s so that it lines up at k the numpy way."""
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    a, b = (dims.get(i) for i in node.input[:2])
    if not attrs.get("broadcast") or "axis" not in attrs or a is None or b is None:
        return [node]
    axis = attrs["axis"] % len(a) if a else 0
    trailing = len(a) - axis - len(b)
    if trailing <= 0:
        return [node]
    u = _unsqueeze(node.input[1], list(range(len(b), len(b) + trailing)), node)
    node.input[1] = u.output[0]
    for i in reversed(range(len(node.attribute))):
        if node.attribute[i].name == "axis":
            del node.attribute[i]
    return [u, node]


def _slice_inputs(node: onnx.NodeProto) -> list[onnx.NodeProto]:
    """Slice-1's starts/ends/axes attributes become Slice-10's constant inputs."""
    attrs = {a.name: list(helper.get_attribute_value(a)) for a in node.attribute}
    if len(node.input) != 1 or "starts" not in attrs:
        return [node]
    consts = []
    for key in ("starts", "ends", "axes"):
        if key in attrs:
            name = f"{node.output[0]}_{key}"
            consts.append(helper.make_node("Constant", [], [name], name=name, value=numpy_helper.from_array(
                np.asarray(attrs[key], dtype=np.int64), name)))
    node.input.extend(c.output[0] for c in consts)
    del node.attribute[:]
    return consts + [node]


def _positive_insert_positions(g: onnx.GraphProto) -> None:
    """Each SequenceInsert at a negative constant position gets the position counted from the front."""
    consts = {n.output[0]: numpy_helper.to_array(n.attribute[0].t) for n in g.node
              if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value"}
    consts |= {t.name: numpy_helper.to_array(t) for t in g.initializer}
    length: dict[str, int | None] = {}
    new_nodes = []
    for node in g.node:
        op, ins = node.op_type, list(node.input)
        n_in = length.get(ins[0]) if ins else None
        if op == "SequenceConstruct":
            length[node.output[0]] = len(ins)
        elif op == "SequenceEmpty":
            length[node.output[0]] = 0
        elif op == "SequenceErase":
            length[node.output[0]] = None if n_in is None else n_in - 1
        elif op == "SequenceInsert":
            length[node.output[0]] = None if n_in is None else n_in + 1
            pos = consts.get(ins[2]) if len(ins) > 2 and ins[2] else None
            if pos is not None and int(pos) < 0:
                if n_in is None:
                    raise UserError(f"SequenceInsert (node '{node.name or node.output[0]}') at negative position "
                                    f"{int(pos)} into a sequence of unknown length is imported wrongly by TVM; "
                                    f"use a position counted from the front when exporting the model")
                name = f"{node.output[0]}_position"
                new_nodes.append(helper.make_node("Constant", [], [name], name=name, value=numpy_helper.from_array(
                    np.asarray(int(pos) + n_in, dtype=pos.dtype), name)))
                node.input[2] = name
        new_nodes.append(node)
    del g.node[:]
    g.node.extend(new_nodes)
