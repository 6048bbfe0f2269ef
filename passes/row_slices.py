"""Intra-layer partitioning: a run of conv/pool/elementwise layers computed for a band of output rows.

Several devices can compute one layer, or a fused run of layers, by each taking a band of the last
layer's output rows (NCHW: axis 2) and the input rows that band needs: for a conv or pool with kernel
k, stride s, top padding p and dilation d, output rows [o0, o1) read input rows
[o0*s - p, (o1-1)*s - p + (k-1)*d + 1), clipped to the tensor; through a run of layers the ranges
compose backwards (the halo grows with every layer), and a value read by several layers (a residual
block's shortcut) needs the hull of what they read. Elementwise ops pass a row range through (an
operand broadcast over rows, a bias, is read whole).

`slice_function(f, o0, o1)` rewrites a Relax function (live-ins first, then weights, one 4-D NCHW
result, as graph_cut.emit_parts makes a stage) into one that takes each live-in's needed rows and
returns output rows [o0, o1): every layer computes exactly the rows the rest needs, a conv or pool
keeping its zero padding only where its band touches the tensor's real top or bottom edge (inside the
tensor the halo rows take the padding's place), and its input cropped (strided_slice) to the rows it
reads. The kernels then see the same numbers in the same order, so the bands joined are
bit-identical to the unsplit layer (tests/test_pipeline.py checks it on VGG and ResNet runs).

`layers(deploy)` groups main's bindings as FuseOps fuses them (an anchor op followed by the
elementwise ops that consume it), so that a layer here is a kernel call of the fused graph, whose
per-device times costmodels/profile.py measures.
"""

from __future__ import annotations

from dataclasses import dataclass

import tvm
from tvm import relax

ELEMENTWISE = {"relax.add", "relax.multiply", "relax.subtract", "relax.divide", "relax.nn.relu", "relax.clip",
               "relax.sigmoid", "relax.tanh", "relax.nn.silu", "relax.maximum", "relax.minimum",
               "relax.nn.leakyrelu", "relax.nn.gelu", "relax.exp", "relax.sqrt", "relax.rsqrt", "relax.power",
               "relax.negative", "relax.abs", "relax.astype"}
WINDOWED = {"relax.nn.conv2d", "relax.nn.max_pool2d", "relax.nn.avg_pool2d"}


def canonical(deploy: tvm.IRModule) -> tvm.IRModule:
    """The deploy module at the level fusion starts from (batch norm decomposed, bindings canonical)."""
    return tvm.transform.Sequential([relax.transform.DecomposeOpsForInference(),
                                     relax.transform.CanonicalizeBindings()])(deploy)


def op_name(value) -> str:
    return value.op.name if isinstance(value, relax.Call) and isinstance(value.op, tvm.ir.Op) else ""


def layers(mod: tvm.IRModule, func: str = "main") -> list[list[int]]:
    """The function's bindings grouped into layers: an op, then the elementwise ops that read it."""
    bindings = [b for blk in mod[func].body.blocks for b in blk.bindings]
    groups: list[list[int]] = []
    for i, b in enumerate(bindings):
        if groups and op_name(b.value) in ELEMENTWISE and \
                bindings[groups[-1][-1]].var in relax.analysis.free_vars(b.value):
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


def _shape(v) -> tuple[int, ...] | None:
    ty = v.ty if hasattr(v, "ty") else v
    shape = getattr(ty, "shape", None)
    if shape is None or not hasattr(shape, "values"):
        return None
    return tuple(int(s) for s in shape.values)


def _is_rows(v, height: int) -> bool:
    s = _shape(v)
    return s is not None and len(s) == 4 and s[2] == height


@dataclass(frozen=True)
class _Window:
    k: int
    s: int
    pad_top: int
    pad_bottom: int
    d: int


def _window(call) -> _Window | None:
    name = op_name(call)
    a = call.attrs
    if name == "relax.nn.conv2d":
        if a.data_layout != "NCHW" or a.kernel_layout != "OIHW" or a.out_layout != "NCHW":
            return None
        k = _shape(call.args[1])[2]
    elif name in ("relax.nn.max_pool2d", "relax.nn.avg_pool2d"):
        if a.layout != "NCHW" or a.out_layout != "NCHW" or bool(a.ceil_mode):
            return None
        k = int(a.pool_size[0])
    else:
        return None
    pad = [int(p) for p in a.padding]
    top, bottom = (pad[0], pad[2]) if len(pad) == 4 else (pad[0], pad[0])
    return _Window(k, int(a.strides[0]), top, bottom, int(a.dilation[0]))


def _reads(w: _Window, o0: int, o1: int) -> tuple[int, int]:
    """Input rows (unclipped) that output rows [o0, o1) read."""
    return o0 * w.s - w.pad_top, (o1 - 1) * w.s - w.pad_top + (w.k - 1) * w.d + 1


def _bindings(f: relax.Function):
    """f's bindings but the tuple of results (emit_parts binds the returned tuple to a var)."""
    return [b for blk in f.body.blocks for b in blk.bindings if not isinstance(b.value, relax.Tuple)]


def _output_var(f: relax.Function):
    out = f.body.body
    tuples = {b.var: b.value for blk in f.body.blocks for b in blk.bindings if isinstance(b.value, relax.Tuple)}
    out = tuples.get(out, out)
    if isinstance(out, relax.Tuple):
        if len(out.fields) != 1:
            return None
        out = out.fields[0]
    return out


def sliceable(f: relax.Function) -> str | None:
    """None if every op of `f` can compute a band of rows and its result is one NCHW tensor; else why not."""
    out = _output_var(f)
    if out is None or _shape(out) is None or len(_shape(out)) != 4:
        return "the part's result is not one 4-D NCHW tensor"
    for b in _bindings(f):
        name = op_name(b.value)
        if name in WINDOWED:
            if _window(b.value) is None:
                return f"{name} with a layout or ceil mode the slicer does not handle"
        elif name not in ELEMENTWISE:
            return f"{name or type(b.value).__name__} mixes rows"
        elif _shape(b.var) is None or len(_shape(b.var)) != 4:
            return f"{name} on a tensor that is not NCHW"
    return None


def needed_rows(f: relax.Function, o0: int, o1: int) -> dict:
    """Rows [r0, r1) of every row value (params and bindings) that output rows [o0, o1) need."""
    if why := sliceable(f):
        raise ValueError(f"cannot slice rows: {why}")
    need = {_output_var(f): (o0, o1)}
    for b in reversed(_bindings(f)):
        if b.var not in need:
            continue  # dead here
        r0, r1 = need[b.var]
        name = op_name(b.value)
        if name in WINDOWED:
            x = b.value.args[0]
            a, e = _reads(_window(b.value), r0, r1)
            height = _shape(x)[2]
            ranges = [(x, max(0, a), min(height, e))]
        else:
            height = _shape(b.var)[2]
            ranges = [(x, r0, r1) for x in b.value.args if isinstance(x, relax.Var) and _is_rows(x, height)]
        for x, a, e in ranges:
            if x in need:
                a, e = min(a, need[x][0]), max(e, need[x][1])
            need[x] = (a, e)
    return need


def input_rows(f: relax.Function, o0: int, o1: int) -> list[tuple[int, int] | None]:
    """Per parameter of `f`: the rows a band [o0, o1) needs, None for a parameter passed whole."""
    need = needed_rows(f, o0, o1)
    return [need.get(p) if _shape(p) is not None and len(_shape(p)) == 4 and p in need else None
            for p in f.params]


def slice_function(f: relax.Function, o0: int, o1: int, name: str = "slice") -> relax.Function:
    """`f` computing output rows [o0, o1) from the rows `input_rows` gives of each row parameter."""
    need = needed_rows(f, o0, o1)
    num_input = int(f.attrs["num_input"]) if f.attrs and "num_input" in f.attrs else len(f.params)
    bb = relax.BlockBuilder()
    params, have = [], {}
    for i, p in enumerate(f.params):
        s = _shape(p)
        if p in need and i < num_input:
            r0, r1 = need[p]
            p2 = relax.Var(p.name, relax.TensorType((s[0], s[1], r1 - r0, s[3]), p.ty.dtype))
            have[p] = (p2, r0, r1)
        else:
            p2 = relax.Var(p.name, p.ty)
            have[p] = (p2, None, None)
        params.append(p2)

    def rows_of(x, r0, r1):
        """x (a value of f) as exactly its rows [r0, r1)."""
        v, a0, a1 = have[x]
        if a0 is None:
            return v
        if (a0, a1) == (r0, r1):
            return v
        assert a0 <= r0 and r1 <= a1, (x, a0, a1, r0, r1)
        return bb.emit(relax.op.strided_slice(v, axes=[2], begin=[r0 - a0], end=[r1 - a0]))

    def arg(x, r0, r1, height):
        if isinstance(x, relax.Var) and x in have:
            return rows_of(x, r0, r1) if _is_rows(x, height) else have[x][0]
        return x  # a constant

    with bb.function(name, params, attrs={"num_input": num_input}):
        with bb.dataflow():
            for b in _bindings(f):
                if b.var not in need:
                    continue
                r0, r1 = need[b.var]
                call = b.value
                opn = op_name(call)
                if opn in WINDOWED:
                    w = _window(call)
                    x = call.args[0]
                    a, e = _reads(w, r0, r1)
                    height = _shape(x)[2]
                    c0, c1 = max(0, a), min(height, e)
                    data = rows_of(x, c0, c1)
                    at = call.attrs
                    pad = [int(p) for p in at.padding]
                    left, right = (pad[1], pad[3]) if len(pad) == 4 else (pad[1], pad[1])
                    # Zero padding only where the band meets the tensor's edge: inside, halo rows take its place.
                    padding = [c0 - a, left, e - c1, right]
                    if opn == "relax.nn.conv2d":
                        new = relax.op.nn.conv2d(data, have[call.args[1]][0] if call.args[1] in have else call.args[1],
                                                 strides=at.strides, padding=padding, dilation=at.dilation,
                                                 groups=at.groups, data_layout="NCHW", kernel_layout="OIHW",
                                                 out_layout="NCHW", out_dtype=at.out_dtype)
                    else:
                        op = relax.op.nn.max_pool2d if opn == "relax.nn.max_pool2d" else relax.op.nn.avg_pool2d
                        kw = {} if opn == "relax.nn.max_pool2d" else {"count_include_pad": bool(at.count_include_pad)}
                        new = op(data, pool_size=at.pool_size, strides=at.strides, padding=padding,
                                 dilation=at.dilation, ceil_mode=False, layout="NCHW", out_layout="NCHW", **kw)
                else:
                    height = _shape(b.var)[2]
                    new = relax.Call(call.op, [arg(x, r0, r1, height) for x in call.args], call.attrs)
                v = bb.emit(new, name_hint=b.var.name)
                have[b.var] = (v, r0, r1)
            out = _output_var(f)
            ret = bb.emit_output(relax.Tuple([rows_of(out, o0, o1)]))
        bb.emit_func_output(ret)
    mod = bb.get()
    return mod[name]


def band_rows(height: int, speeds: list[float]) -> list[tuple[int, int]]:
    """Output rows split in contiguous bands proportional to `speeds` (every band at least one row,
    largest remainders first)."""
    n = len(speeds)
    if n > height:
        raise ValueError(f"{n} bands of {height} rows")
    total = sum(speeds)
    exact = [height * s / total for s in speeds]
    rows = [max(1, int(x)) for x in exact]
    order = sorted(range(n), key=lambda i: exact[i] - int(exact[i]), reverse=True)
    i = 0
    while sum(rows) < height:
        rows[order[i % n]] += 1
        i += 1
    while sum(rows) > height:
        j = max(range(n), key=lambda i: rows[i] - exact[i])
        rows[j] -= 1
    out, r = [], 0
    for k in rows:
        out.append((r, r + k))
        r += k
    return out
