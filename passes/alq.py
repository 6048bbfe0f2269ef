"""Multi-bit weights in, bit-packed kernels out: conv2d / matmul on a packed weight become kernels that
compute with the bases directly.

`pack_weights(mod, weights, packed)` rewrites `main` of an imported model (weights as parameters, named
as in the ONNX file): every `matmul(x, W)` and stride-1 ungrouped `conv2d(x, W)` whose weight W is in
`packed` (edgetvm/quant/multibit.py's packed form: nbases, words, alpha) is replaced by a call to a
kernel of this file, W leaves `main`'s parameters and its three packed arrays join them, so the weight
file holds the bits and the float weight exists nowhere.

The kernels (TIR, any CPU target: x86 and aarch64 alike) work one output row at a time, in parallel over
rows: for each group of the row with at least one basis, decode the group's weights once,
w_j = sum_i (bit_ij ? alpha_i : -alpha_i) (the order multibit.unpack adds them, so the weights equal the
numpy reference's exactly), and multiply them in; a group without bases is skipped (no work, as it has
no bits). Convolutions first gather their input as columns (K padded to whole groups, the positions to
whole vectors), so the kernel runs axpys along the positions: vectorised, no horizontal sums. Small
batches of a linear layer use the dot form, with a vector of partial sums per row.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax
from tvm.script import tirx as T

LANES = 16          # float32 lanes per partial-sum vector (AVX-512 width, two NEON registers... LLVM splits)
DOT_MAX_ROWS = 16   # up to this many input rows, a linear layer uses the dot form
CHUNK_TASKS = 16    # parallel tasks per kernel: enough to balance a few cores


def _scheduled(f, name: str):
    f = f.with_attr("global_symbol", name)
    # op_pattern 8 (opaque): fusion leaves the kernel alone and asks nothing of its loop structure
    return f.with_attrs({"tir.is_scheduled": True, "tir.noalias": True, "op_pattern": 8})


def dense_kernel(M: int, Kp: int, R: int, NG: int, group: int, NB: int):
    """Y (M, R) = X (M, Kp) @ W^T, W the packed (R, NG * group) rows; the dot form, for small M."""
    words = group // 32
    chunks = group // LANES
    CHUNKS = min(R, CHUNK_TASKS)
    PER_CHUNK = -(-R // CHUNKS)

    @T.prim_func
    def alq_dense(x: T.Buffer((M, Kp), "float32"), nbases: T.Buffer((R, NG), "uint8"),
                  bits: T.Buffer((NB, words), "uint32"), alpha: T.Buffer((NB,), "float16"),
                  y: T.Buffer((M, R), "float32")):
        start = T.alloc_buffer((R,), "int32")
        total = T.alloc_buffer((1,), "int32", scope="local")
        total[0] = 0
        for r in range(R):
            start[r] = total[0]
            for g in range(NG):
                total[0] = total[0] + T.Cast("int32", nbases[r, g])
        for ch in T.parallel(CHUNKS):
            # scratch allocated once per chunk of rows: per row it cost more than the row's work
            w = T.alloc_buffer((LANES,), "float32", scope="local")
            acc = T.alloc_buffer((M, LANES), "float32", scope="local")
            off = T.alloc_buffer((1,), "int32", scope="local")
            for rr in range(PER_CHUNK):
                r = T.bind(ch * PER_CHUNK + rr)
                if r < R:
                    off[0] = start[r]
                    for m in range(M):
                        for l in T.vectorized(LANES):
                            acc[m, l] = T.float32(0)
                    for g in range(NG):
                        nb = T.bind(T.Cast("int32", nbases[r, g]))
                        if nb > 0:
                            # LANES weights at a time, decoded in registers (a wider decode stored and
                            # re-read in pieces stalled on store forwarding)
                            for c in range(chunks):
                                for l in T.vectorized(LANES):
                                    w[l] = T.float32(0)
                                for i in range(nb):
                                    a = T.bind(T.Cast("float32", alpha[off[0] + i]))
                                    word = T.bind(bits[off[0] + i, c * LANES // 32])
                                    for l in T.vectorized(LANES):
                                        w[l] = w[l] + T.Select(
                                            (word >> T.Cast("uint32", c * LANES % 32 + l)) & T.uint32(1) == T.uint32(1),
                                            a, -a)
                                for m in range(M):
                                    for l in T.vectorized(LANES):
                                        acc[m, l] = acc[m, l] + w[l] * x[m, g * group + c * LANES + l]
                            off[0] = off[0] + nb
                    for m in range(M):
                        y[m, r] = T.float32(0)
                        for l in range(LANES):
                            y[m, r] = y[m, r] + acc[m, l]

    return _scheduled(alq_dense, f"alq_dense_{M}x{Kp}x{R}_{NB}")


def cols_kernel(Kp: int, Mp: int, R: int, NG: int, group: int, NB: int):
    """Y^T (R, Mp) = W (R, Kp) @ X^T (Kp, Mp): the axpy form, for convolutions and large batches."""
    words = group // 32
    # a block of up to 64 positions accumulates in registers over the whole row (8 AVX2 / 16 NEON
    # vectors: enough independent FMAs to hide their latency); each block decodes the row's groups
    # again, 1/64 of its FMAs per basis
    VB = next(v for v in (64, 32, LANES) if Mp % v == 0)
    TASKS = R * (Mp // VB)
    CHUNKS = min(TASKS, CHUNK_TASKS)
    PER_CHUNK = -(-TASKS // CHUNKS)

    @T.prim_func
    def alq_cols(xt: T.Buffer((Kp, Mp), "float32"), nbases: T.Buffer((R, NG), "uint8"),
                 bits: T.Buffer((NB, words), "uint32"), alpha: T.Buffer((NB,), "float16"),
                 yt: T.Buffer((R, Mp), "float32")):
        start = T.alloc_buffer((R,), "int32")
        total = T.alloc_buffer((1,), "int32", scope="local")
        total[0] = 0
        for r in range(R):
            start[r] = total[0]
            for g in range(NG):
                total[0] = total[0] + T.Cast("int32", nbases[r, g])
        for ch in T.parallel(CHUNKS):
            # scratch allocated once per chunk of tasks: per task it cost more than small tasks' work
            w = T.alloc_buffer((group,), "float32", scope="local")
            acc = T.alloc_buffer((VB,), "float32", scope="local")
            off = T.alloc_buffer((1,), "int32", scope="local")
            for tt in range(PER_CHUNK):
                rb = T.bind(ch * PER_CHUNK + tt)
                if rb < TASKS:
                    r = T.bind(rb // (Mp // VB))
                    b = T.bind(rb % (Mp // VB))
                    off[0] = start[r]
                    for l in T.vectorized(VB):
                        acc[l] = T.float32(0)
                    for g in range(NG):
                        nb = T.bind(T.Cast("int32", nbases[r, g]))
                        if nb > 0:
                            for j in T.vectorized(group):
                                w[j] = T.float32(0)
                            for i in range(nb):
                                a = T.bind(T.Cast("float32", alpha[off[0] + i]))
                                for q in range(words):   # one word broadcast to 32 lanes, each shifted by its lane
                                    word = T.bind(bits[off[0] + i, q])
                                    for j in T.vectorized(32):
                                        w[q * 32 + j] = w[q * 32 + j] + T.Select(
                                            (word >> T.Cast("uint32", j)) & T.uint32(1) == T.uint32(1), a, -a)
                            for j in range(group):
                                wj = T.bind(w[j])
                                for l in T.vectorized(VB):
                                    acc[l] = acc[l] + wj * xt[g * group + j, b * VB + l]
                            off[0] = off[0] + nb
                    for l in T.vectorized(VB):
                        yt[r, b * VB + l] = acc[l]

    return _scheduled(alq_cols, f"alq_cols_{Kp}x{Mp}x{R}_{NB}")


def im2col(x, KH: int, KW: int, pad: tuple[int, int, int, int], Kp: int, Mp: int):
    """X^T (Kp, Mp) as a TE compute (the default schedule parallelises and vectorises it; measured 1.7-3x
    faster than a hand-written TIR gather here): row c*KH*KW + kh*KW + kw, column n*OH*OW + oh*OW + ow
    holds the padded input under that kernel tap; rows past C*KH*KW and columns past N*OH*OW are 0."""
    from tvm import te, tirx

    N, C, H, W = (int(s) for s in x.shape)
    top, left, bottom, right = pad
    OH, OW = H + top + bottom - KH + 1, W + left + right - KW + 1
    K, M = C * KH * KW, N * OH * OW

    def tap(k, m):
        c, kh, kw = k // (KH * KW), k // KW % KH, k % KW
        n, ih, iw = m // (OH * OW), m // OW % OH + kh - top, m % OW + kw - left
        inside = tirx.all(k < K, m < M, ih >= 0, ih < H, iw >= 0, iw < W)
        clamp = lambda v, hi: tirx.max(tirx.min(v, hi - 1), 0)  # noqa: E731 (in bounds even where unused)
        return tirx.if_then_else(inside, x[clamp(n, N), clamp(c, C), clamp(ih, H), clamp(iw, W)],
                                 tirx.const(0, "float32"))

    return te.compute((Kp, Mp), tap, name="alq_im2col")


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


# ---- the rewrite ---------------------------------------------------------------------------------------------

_MATMUL = tvm.ir.Op.get("relax.matmul")
_CONV = tvm.ir.Op.get("relax.nn.conv2d")


def _static(expr) -> tuple[int, ...] | None:
    try:
        return tuple(int(s) for s in expr.ty.shape)
    except (AttributeError, TypeError, ValueError):
        return None


def _packed_shapes(p: dict) -> tuple[int, int, int, int]:
    R, NG = p["nbases"].shape
    return R, NG, int(p["group"]), len(p["alpha"])


@relax.expr_functor.mutator
class _Rewrite(relax.PyExprMutator):
    def __init__(self, mod, by_var: dict):
        super().__init__(mod)
        self.by_var = by_var      # weight Var -> (packed dict, (nbases, words, alpha) Vars)
        self.used = set()

    def _packed(self, w):
        return self.by_var.get(w) if isinstance(w, relax.Var) else None

    def visit_call_(self, call):
        call = self.visit_expr_post_order(call)
        if call.op == _MATMUL:
            hit = self._packed(call.args[1])
            x_shape = _static(call.args[0])
            if hit is not None and x_shape is not None and len(x_shape) == 2:
                return self._dense(call, hit, x_shape)
        if call.op == _CONV:
            hit = self._packed(call.args[1])
            a = call.attrs
            x_shape = _static(call.args[0])
            if (hit is not None and x_shape is not None and a.data_layout == "NCHW" and a.kernel_layout == "OIHW"
                    and int(a.groups) == 1 and all(int(s) == 1 for s in a.strides)
                    and all(int(d) == 1 for d in a.dilation) and a.out_layout == "NCHW"):
                return self._conv(call, hit, x_shape)
        return call

    def _dense(self, call, hit, x_shape):
        packed, (nb, words, alpha) = hit
        R, NG, group, NB = _packed_shapes(packed)
        M, K = x_shape
        Kp = NG * group
        self.used.add(call.args[1])
        bb = self.builder_
        x = call.args[0]
        if Kp != K:
            x = bb.emit(relax.op.nn.pad(x, [0, 0, 0, Kp - K]))
        if M <= DOT_MAX_ROWS:
            f = dense_kernel(M, Kp, R, NG, group, NB)
            gv = bb.add_func(f, f.attrs["global_symbol"])
            return relax.call_tir(gv, [x, nb, words, alpha], relax.TensorType((M, R), "float32"))
        Mp = _round_up(M, LANES)
        xt = bb.emit(relax.op.permute_dims(x))
        if Mp != M:
            xt = bb.emit(relax.op.nn.pad(xt, [0, 0, 0, Mp - M]))
        f = cols_kernel(Kp, Mp, R, NG, group, NB)
        gv = bb.add_func(f, f.attrs["global_symbol"])
        yt = bb.emit(relax.call_tir(gv, [xt, nb, words, alpha], relax.TensorType((R, Mp), "float32")))
        if Mp != M:
            yt = bb.emit(relax.op.strided_slice(yt, [1], [0], [M]))
        return relax.op.permute_dims(yt)

    def _conv(self, call, hit, x_shape):
        packed, (nb, words, alpha) = hit
        R, NG, group, NB = _packed_shapes(packed)
        N, C, H, W = x_shape
        shape = tuple(int(s) for s in packed["shape"])
        O, Cw, KH, KW = shape
        pad = tuple(int(p) for p in call.attrs.padding)
        if len(pad) == 2:
            pad = (pad[0], pad[1], pad[0], pad[1])
        OH, OW = H + pad[0] + pad[2] - KH + 1, W + pad[1] + pad[3] - KW + 1
        M = N * OH * OW
        Kp, Mp = NG * group, _round_up(M, LANES)
        self.used.add(call.args[1])
        bb = self.builder_
        xt = bb.emit_te(im2col, call.args[0], KH, KW, pad, Kp, Mp, primfunc_name_hint="alq_im2col")
        f = cols_kernel(Kp, Mp, R, NG, group, NB)
        gv = bb.add_func(f, f.attrs["global_symbol"])
        yt = bb.emit(relax.call_tir(gv, [xt, nb, words, alpha], relax.TensorType((R, Mp), "float32")))
        if Mp != M:
            yt = bb.emit(relax.op.strided_slice(yt, [1], [0], [M]))
        if N == 1:  # (R, OH*OW) is already NCHW: no transpose kernel
            return relax.op.reshape(yt, (1, R, OH, OW))
        y = bb.emit(relax.op.reshape(yt, (R, N, OH, OW)))
        return relax.op.permute_dims(y, [1, 0, 2, 3])


PACKED_FIELDS = ("nbases", "words", "alpha")


def pack_weights(mod: tvm.IRModule, weights: list[np.ndarray], packed: dict[str, dict]):
    """(module, weights) with every conv/matmul weight named in `packed` computed by the bit-packed
    kernels: the weight's parameter is replaced by its packed arrays, "<name>.nbases", ".words", ".alpha"."""
    main = mod["main"]
    num_input = int(main.attrs["num_input"])
    params = list(main.params)
    by_name = {p.name: p for p in params[num_input:]}
    missing = sorted(set(packed) - set(by_name))
    if missing:
        raise ValueError(f"the model has no weight named {', '.join(missing)}")
    by_var, new_vars = {}, {}
    for name, p in packed.items():
        vs = tuple(relax.Var(f"{name}.{f}", relax.TensorType(p[f].shape, str(p[f].dtype)))
                   for f in PACKED_FIELDS)
        by_var[by_name[name]] = (p, vs)
        new_vars[name] = vs
    rw = _Rewrite(mod, by_var)
    body = rw.visit_expr(main)
    if rw.used != set(by_var):
        # a packed weight also used by another operator (or by a form the kernels do not take) stays float
        left = [v.name for v in by_var if v not in rw.used]
        raise ValueError(f"{', '.join(left)}: not used as the weight of a plain conv2d or matmul")
    keep = [i for i, p in enumerate(params[num_input:]) if p not in by_var]
    new_params = params[:num_input] + [params[num_input + i] for i in keep]
    new_weights = [weights[i] for i in keep]
    for name, vs in new_vars.items():
        new_params += list(vs)
        new_weights += [np.ascontiguousarray(packed[name][f]) for f in PACKED_FIELDS]
    func = relax.Function(new_params, body.body, body.ret_ty, body.is_pure, body.attrs, body.span)
    out = rw.builder_.get()
    out["main"] = func
    out = relax.transform.DeadCodeElimination(entry_functions=["main"])(out)
    return out, new_weights


def packed_in(model) -> dict[str, dict] | None:
    """The multi-bit weights an ONNX model carries (written by `edgetvm quantize`), or None."""
    from edgetvm.errors import UserError
    from edgetvm.quant import multibit

    for prop in model.metadata_props:
        if prop.key == multibit.METADATA_KEY:
            try:
                return multibit.from_metadata(prop.value)
            except (ValueError, KeyError, TypeError) as e:
                raise UserError(f"the model's {multibit.METADATA_KEY} metadata is damaged ({e}); "
                                "quantise the model again") from None
    return None


def apply(mod: tvm.IRModule, weights: list[np.ndarray], packed: dict[str, dict]):
    """pack_weights, after checking that every packed weight decodes to the float weight the model holds
    (a model edited after quantisation must not silently run other weights)."""
    from edgetvm.errors import UserError
    from edgetvm.quant import multibit

    names = [p.name for p in mod["main"].params[int(mod["main"].attrs["num_input"]):]]
    for name, p in packed.items():
        if name not in names:
            raise UserError(f"the model's multi-bit weight {name} is not one of its weights; quantise it again")
        if not np.array_equal(multibit.unpack(p), weights[names.index(name)]):
            raise UserError(f"weight {name} differs from its multi-bit form in the model's metadata "
                            "(edited after quantisation?); quantise the model again")
    try:
        return pack_weights(mod, weights, packed)
    except ValueError as e:
        raise UserError(f"{e}; the bit-packed kernels take plain conv2d and matmul weights") from None
