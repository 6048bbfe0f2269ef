"""Multi-bit weights in, bit-packed kernels out: conv2d / matmul on a packed weight become kernels that
compute with the bases directly.

`pack_weights(mod, weights, packed)` rewrites `main` of an imported model (weights as parameters, named
as in the ONNX file): every `matmul(x, W)` and stride-1 ungrouped `conv2d(x, W)` whose weight W is in
`packed` (edgetvm/quant/multibit.py's packed form: nbases, words, alpha) is replaced by a call to a
kernel of this file, W leaves `main`'s parameters and its packed arrays join them (the bits and alphas as
packed, nbases as a row index: `row_index`), so the weight file holds the bits and the float weight exists
nowhere. A bias add, a ReLU and (convolutions) a 2x2 max pool that only follow the layer move into its kernel.

The kernels (TIR, any CPU target: x86 and aarch64 alike) never decode a weight. With b_i in {-1, +1},
sum_j w_j x_j = sum_i alpha_i sum_j b_ij x_j, and sum_j b_ij x_j over a quad of 4 inputs is one of 16
signed sums: per block of output positions the kernel tabulates them (16 per quad of inputs, read in place
from the NCHW input: no im2col matrix), then each basis costs one table lookup per quad, indexed by its 4
bits, and one multiply by alpha. Work is proportional to the bases, like the storage: a weight at 1 bit
costs a quarter of a lookup per output, a group without bases costs nothing (the kernels visit a row's
bases through the row index, not its groups), and a short row (conv1's 25 weights in a group of 64) costs
its own quads only. Each lookup adds a vector over the block's positions (up to 8 output rows x 8
columns), and the table is built and used one group at a time, so that it stays in the L1 cache.
A linear layer at batch 1 has a single position, where a table entry would be a scalar: its kernel
(_row_kernel) uses sum_j b_ij x_j = 2 * sum_{b_ij = +1} x_j - sum_j x_j instead, with the bits as lane masks
of vector FMAs over the inputs.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax
from tvm.script import tirx as T

CHUNK_TASKS = 16    # parallel tasks per kernel: enough to balance a few cores
TABLE_ROWS = 128    # rows of a layer per copy of the table (more copies: more parallel tasks, more builds)
PV_MAX = 8          # output rows per position block (x 8 columns): up to 64 lanes per table entry
TABLE_BYTES = 32768 # a group's table at most: the L1 data cache's size (32 KB on Zen 4 and Cortex-A72); at
                    # 16 KB (half the lanes per lookup) LeNet5's conv2 was 1.3x slower


def _scheduled(f, name: str):
    f = f.with_attr("global_symbol", name)
    # op_pattern 8 (opaque): fusion leaves the kernel alone and asks nothing of its loop structure
    return f.with_attrs({"tir.is_scheduled": True, "tir.noalias": True, "op_pattern": 8})


def _tree_sum(terms: list):
    """A balanced sum: independent adds for the out-of-order core, in registers (no buffer round trip)."""
    while len(terms) > 1:
        terms = [terms[i] + terms[i + 1] if i + 1 < len(terms) else terms[i] for i in range(0, len(terms), 2)]
    return terms[0]


def group_dtype(NG: int) -> str:
    """The row index's group numbers: a byte per basis up to 256 groups per row (16384 weights at 64)."""
    return "uint8" if NG <= 256 else "uint16"


def row_index(nbases: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(rows, groups) for nbases (R, NG): row r's bases are rows[r]:rows[r + 1] of the words and alphas (stored
    by row, group, basis), basis o belongs to group groups[o]. The kernels visit bases, not groups: an empty
    group costs nothing, and the index is smaller than nbases where most groups are empty."""
    R, NG = nbases.shape
    per_group = nbases.reshape(-1).astype(np.int64)
    rows = np.concatenate([[0], np.cumsum(nbases.sum(axis=1, dtype=np.int64))]).astype(np.int32)
    groups = np.repeat(np.tile(np.arange(NG), R), per_group).astype(group_dtype(NG))
    return rows, groups


def lut_kernel(N: int, C: int, H: int, W: int, KH: int, KW: int, R: int, NG: int, group: int, NB: int,
               relu: bool = False, dense: bool = False, pool: bool = False):
    """y (N, R, OH, OW) = the valid, stride-1 correlation of x (N, C, H, W) with the packed (R, C*KH*KW) rows, plus
    bias (R,), then ReLU if `relu`; computed by table lookups. `pool`: then a 2x2, stride-2 max pool, y (N, R, OH/2,
    OW/2) (OH and OW even). `dense`: a linear layer, y (M, R) = x (M, K) @ W^T + bias, computed as the 1x1 case with
    N = H = 1, C = K and the M inputs as the positions along W; at batch 1 by _row_kernel instead."""
    if dense and W == 1:
        return _row_kernel(C, R, NG, group, NB, relu)
    OH, OW = H - KH + 1, W - KW + 1
    assert not pool or (not dense and OH % 2 == 0 and OW % 2 == 0), "pool: a 2x2 max pool of an even-sized output"
    K = C * KH * KW
    K4 = -(-K // 4)                        # inputs in quads: one table of 16 signed sums per quad
    CPG = group // 4                       # quads per group
    QT = min(CPG, K4)                      # quads per table: one group's (a short row's only)
    LAST = K4 - (NG - 1) * CPG             # quads of the last group: its padding is never looked up
    # positions per table entry: a contiguous run of up to 8 columns in up to PV_MAX output rows (more lanes per
    # lookup), while each image keeps at least two blocks for two cores and a group's table stays in the L1 cache
    # (TABLE_BYTES); with `pool`, blocks of whole 2x2 windows (even rows and columns)
    VB = next(v for v in (8, 4, 2, 1) if OW % v == 0)
    PV = next(v for v in (8, 4, 2, 1)
              if v == (2 if pool else 1) or (VB > 1 and v <= PV_MAX and OH % v == 0 and OH // v * (OW // VB) >= 2
                                             and QT * 16 * v * VB * 4 <= TABLE_BYTES))
    L = PV * VB
    NPOS = N * (OH // PV) * (OW // VB)
    RC = max(1, min(-(-CHUNK_TASKS // NPOS), R // TABLE_ROWS))
    PER = -(-R // RC)
    TASKS = NPOS * RC
    CHUNKS = min(TASKS, CHUNK_TASKS)
    PER_CHUNK = -(-TASKS // CHUNKS)
    words = group // 32

    XS, YS = ((W, K), (W, R)) if dense else ((N, C, H, W), (N, R, OH // 2, OW // 2) if pool else (N, R, OH, OW))
    NB1, GDT = max(NB, 1), group_dtype(NG)   # a weight without bases keeps one dummy (_artifact_arrays)

    def tap(x, q, b, pv, l, n, oh0, ow0):
        k = q * 4 + b   # input k = (c, kh, kw) read in place: no im2col matrix
        if dense:
            return T.if_then_else(k < K, x[ow0 + l, T.min(k, K - 1)], T.float32(0))
        return T.if_then_else(k < K, x[n, T.min(k // (KH * KW), C - 1), oh0 + pv + k // KW % KH, ow0 + l + k % KW],
                              T.float32(0))

    def signed(p, v):
        return _tree_sum([T.Select((p >> b) & 1 == 1, v[b], -v[b]) for b in range(4)])

    def basis(tab, w, quads, l):
        # one table entry per quad of the basis: its 4 bits pick the signs
        return _tree_sum([tab[(m * 16 + T.Cast("int32", (w[m // 8] >> T.uint32(m % 8 * 4)) & T.uint32(15))) * L + l]
                          for m in range(quads)])

    def finish(v):
        return _finish(v, relu)

    def window(acc, base, pv2, l2):
        # the 2x2 window's maximum before the bias and ReLU: both are monotone (rounding too), so the result is
        # bit for bit the pool of the biased, rectified outputs
        i = base + pv2 * 2 * VB + l2 * 2
        return T.max(T.max(acc[i], acc[i + 1]), T.max(acc[i + VB], acc[i + VB + 1]))

    def next_group(rows, groups, cur, rr, r):
        # the group of row r's next unvisited basis (NG once the row is done): bases are stored by row, then group
        return T.if_then_else(cur[rr] < rows[r + 1], T.Cast("int32", groups[T.min(cur[rr], NB1 - 1)]), NG)

    @T.prim_func
    def alq_lut(x: T.Buffer(XS, "float32"), rows: T.Buffer((R + 1,), "int32"),
                groups: T.Buffer((NB1,), GDT), bits: T.Buffer((NB1, words), "uint32"),
                alpha: T.Buffer((NB1,), "float16"), bias: T.Buffer((R,), "float32"),
                y: T.Buffer(YS, "float32")):
        for ch in T.parallel(CHUNKS):
            # scratch allocated once per chunk of tasks (a buffer over 1 KB is a call into the runtime)
            tab = T.alloc_buffer((QT * 16 * L,), "float32")
            acc = T.alloc_buffer((PER * L,), "float32")      # the task's rows' sums
            cur = T.alloc_buffer((PER,), "int32")            # each row's next basis
            # default scope: small arrays LLVM keeps in registers (scope "local" would make them run-time workspace
            # allocations, every accumulation a load and a store through memory)
            s = T.alloc_buffer((L,), "float32")
            o = T.alloc_buffer((1,), "int32")
            used = T.alloc_buffer((1,), "int32")
            for tt in range(PER_CHUNK):
                task = T.bind(ch * PER_CHUNK + tt)
                if task < TASKS:
                    pb = T.bind(task // RC)
                    rc = T.bind(task % RC)
                    n = T.bind(pb // ((OH // PV) * (OW // VB)))
                    oh0 = T.bind(pb // (OW // VB) % (OH // PV) * PV)
                    ow0 = T.bind(pb % (OW // VB) * VB)
                    for rr in range(PER):
                        cur[rr] = rows[T.min(rc * PER + rr, R)]
                        for l in T.vectorized(L):
                            acc[rr * L + l] = T.float32(0)
                    # group by group: the group's table (QT quads x 16 entries x L positions) is built once and stays
                    # in the L1 cache while every row of the task adds its bases of that group (a table of the whole
                    # row, 256 KB for LeNet5's conv2, came from the L2 cache at every lookup: 1.45x the time)
                    for g in range(NG):
                        used[0] = 0
                        for rr in range(PER):
                            if rc * PER + rr < R:
                                if next_group(rows, groups, cur, rr, rc * PER + rr) == g:
                                    used[0] = 1
                        if used[0] == 1:   # a group no row of the task has bases in costs no table
                            # tab[m, p] = sum_b (bit b of p ? x[4q+b] : -x[4q+b]) at the L positions, q = g*CPG + m
                            if L == 1:   # a quad's 16 entries are one vector, the signs from the lane number
                                for m in range(QT):
                                    for p in T.vectorized(16):
                                        tab[m * 16 + p] = signed(p, [tap(x, g * CPG + m, b, 0, 0, n, oh0, ow0)
                                                                     for b in range(4)])
                            else:        # each entry a vector over the positions, from the quad's 4 inputs read once
                                for m in range(QT):
                                    for pv in T.unroll(PV):
                                        for l in T.vectorized(VB):
                                            v0 = T.bind(tap(x, g * CPG + m, 0, pv, l, n, oh0, ow0))
                                            v1 = T.bind(tap(x, g * CPG + m, 1, pv, l, n, oh0, ow0))
                                            v2 = T.bind(tap(x, g * CPG + m, 2, pv, l, n, oh0, ow0))
                                            v3 = T.bind(tap(x, g * CPG + m, 3, pv, l, n, oh0, ow0))
                                            for p in T.unroll(16):
                                                tab[(m * 16 + p) * L + pv * VB + l] = signed(p, [v0, v1, v2, v3])
                            for rr in range(PER):
                                r = T.bind(rc * PER + rr)
                                if r < R:
                                    if next_group(rows, groups, cur, rr, r) == g:
                                        for l in T.vectorized(L):
                                            s[l] = T.float32(0)
                                        # the row's bases in this group only: an empty group is never visited
                                        o[0] = cur[rr]
                                        while o[0] < rows[r + 1] and T.Cast("int32", groups[T.min(o[0], NB1 - 1)]) == g:
                                            a = T.bind(T.Cast("float32", alpha[o[0]]))
                                            if g < NG - 1:
                                                for l in T.vectorized(L):
                                                    s[l] = s[l] + a * basis(tab, [bits[o[0], j] for j in range(words)],
                                                                            QT, l)
                                            else:
                                                for l in T.vectorized(L):
                                                    s[l] = s[l] + a * basis(tab, [bits[o[0], j] for j in range(words)],
                                                                            LAST, l)
                                            o[0] = o[0] + 1
                                        cur[rr] = o[0]
                                        for l in T.vectorized(L):
                                            acc[rr * L + l] = acc[rr * L + l] + s[l]
                    for rr in range(PER):
                        r = T.bind(rc * PER + rr)
                        if r < R:
                            if pool:
                                for pv2 in range(PV // 2):
                                    for l2 in T.vectorized(VB // 2):
                                        y[n, r, oh0 // 2 + pv2, ow0 // 2 + l2] = finish(
                                            window(acc, rr * L, pv2, l2) + bias[r])
                            else:
                                for pv in range(PV):
                                    for l in T.vectorized(VB):
                                        if dense:
                                            y[ow0 + l, r] = finish(acc[rr * L + l] + bias[r])
                                        else:
                                            y[n, r, oh0 + pv, ow0 + l] = finish(acc[rr * L + pv * VB + l] + bias[r])

    shape = f"{W}x{K}_{R}" if dense else f"{N}x{C}x{H}x{W}_{R}x{KH}x{KW}"
    return _scheduled(alq_lut, f"alq_lut_{shape}_{NB}" + ("_relu" if relu else "") + ("_pool" if pool else ""))


SIGN_LANES = 16     # inputs per masked-sum vector of the batch-1 linear kernel (one AVX-512 / four NEON registers)


def _row_kernel(K: int, R: int, NG: int, group: int, NB: int, relu: bool = False):
    """y (1, R) = x (1, K) @ W^T + bias for the packed (R, K) rows, at batch 1: no table. With one position a
    table entry would be a scalar: 16 dependent scalar lookups per 64-weight basis, each with its own index
    arithmetic. Here, with S_g the sum of group g's inputs, sum_j b_j x_j = 2 * sum_{b_j = +1} x_j - S_g: a basis
    is group / 16 vector steps, each adding alpha * x over 16 consecutive inputs in the lanes whose bit is set
    (the basis' bits are the lane mask of one masked FMA on AVX-512; a select and an FMA elsewhere), and one
    scalar alpha * S_g. Each of the group's 16-input slices has its own sum (group / 16 independent FMA chains:
    with one sum, a basis waited for 4 FMAs in a row); a row's slices and lanes are added once at the end. x is
    copied once per chunk into a buffer padded with zeros to whole groups (the last group needs no bounds test),
    and its group sums are taken there."""
    NB1, GDT = max(NB, 1), group_dtype(NG)
    V = SIGN_LANES
    words = group // 32
    KP = NG * group
    CHUNKS = max(1, min(CHUNK_TASKS, R // TABLE_ROWS))   # as many parallel tasks as the lookup kernel's
    PER = -(-R // CHUNKS)

    @T.prim_func
    def alq_rows(x: T.Buffer((1, K), "float32"), rows: T.Buffer((R + 1,), "int32"),
                 groups: T.Buffer((NB1,), GDT), bits: T.Buffer((NB1, words), "uint32"),
                 alpha: T.Buffer((NB1,), "float16"), bias: T.Buffer((R,), "float32"),
                 y: T.Buffer((1, R), "float32")):
        for ch in T.parallel(CHUNKS):
            xp = T.alloc_buffer((KP,), "float32")
            gs = T.alloc_buffer((NG,), "float32")
            # default scope: small arrays LLVM keeps in registers (scope "local" would make them run-time
            # workspace allocations, read and written through memory at every step)
            acc = T.alloc_buffer((group,), "float32")
            corr = T.alloc_buffer((1,), "float32")
            for k in range(K):
                xp[k] = x[0, k]
            for k in range(KP - K):
                xp[K + k] = T.float32(0)
            for g in range(NG):
                for l in T.vectorized(V):
                    acc[l] = _tree_sum([xp[g * group + c * V + l] for c in range(group // V)])
                gs[g] = _tree_sum([acc[l] for l in range(V)])
            for rr in range(PER):
                r = T.bind(ch * PER + rr)
                if r < R:
                    for l in T.vectorized(group):
                        acc[l] = T.float32(0)
                    corr[0] = T.float32(0)
                    for o in range(rows[r], rows[r + 1]):
                        g = T.bind(T.Cast("int32", groups[o]))
                        a = T.bind(T.Cast("float32", alpha[o]))
                        for c in T.unroll(group // V):
                            for l in T.vectorized(V):
                                acc[c * V + l] = T.Select(
                                    (bits[o, c * V // 32] >> T.Cast("uint32", c * V % 32 + l)) & T.uint32(1)
                                    == T.uint32(1), acc[c * V + l] + a * xp[g * group + c * V + l], acc[c * V + l])
                        corr[0] = corr[0] + a * gs[g]
                    # the slices' sums added as vectors, then the 16 lanes: once per row
                    for l in T.vectorized(V):
                        acc[l] = _tree_sum([acc[c * V + l] for c in range(group // V)])
                    y[0, r] = _finish(T.float32(2) * _tree_sum([acc[l] for l in range(V)]) - corr[0] + bias[r], relu)

    return _scheduled(alq_rows, f"alq_rows_{K}_{R}_{NB}" + ("_relu" if relu else ""))


def _finish(v, relu: bool):
    return T.max(v, T.float32(0)) if relu else v


# ---- the rewrite ---------------------------------------------------------------------------------------------

_MATMUL = tvm.ir.Op.get("relax.matmul")
_CONV = tvm.ir.Op.get("relax.nn.conv2d")
_ADD = tvm.ir.Op.get("relax.add")
_RELU = tvm.ir.Op.get("relax.nn.relu")
_RESHAPE = tvm.ir.Op.get("relax.reshape")
_MAX_POOL = tvm.ir.Op.get("relax.nn.max_pool2d")


def _epilogues(func: relax.Function) -> dict:
    """conv2d / matmul call -> (bias parameter, relu?, pool?, [the add, relu and pool calls]) wherever the call's
    only use is a per-output bias add (a vector parameter, or its reshape to (1, R, 1, 1)), that add's only use, if
    any, a ReLU, and (convolutions) the next value's only use, if any, a 2x2 stride-2 max pool (_plain_pool): the
    kernel applies them to its outputs in registers. The pool, a kernel of its own, cost LeNet5's float build 11 of
    its ~100 us (batch 1, TVM's default schedule)."""
    values, users = {}, {}
    for block in func.body.blocks:
        for b in block.bindings:
            values[b.var] = b.value
            for v in relax.analysis.free_vars(b.value):
                users.setdefault(v, []).append((b.var, b.value))
    for v in relax.analysis.free_vars(func.body.body):
        users.setdefault(v, []).append((None, None))
    params = set(func.params)

    def only_call(var, op):
        u = users.get(var, [])
        ok = len(u) == 1 and isinstance(u[0][1], relax.Call) and u[0][1].op == op
        return u[0] if ok else (None, None)

    out = {}
    for var, val in values.items():
        if not (isinstance(val, relax.Call) and val.op in (_CONV, _MATMUL)):
            continue
        add_var, add = only_call(var, _ADD)
        if add is None or not add.args[0].same_as(var):
            continue
        bias = add.args[1]
        b_val = values.get(bias)
        if isinstance(b_val, relax.Call) and b_val.op == _RESHAPE:
            bias = b_val.args[0]
        shape = _static(bias) if bias in params else None
        out_shape = _static(var)
        if shape is None or out_shape is None or len(shape) != 1 or shape[0] != out_shape[1]:
            continue
        if val.op == _MATMUL and _static(add.args[1]) != shape:
            continue
        if val.op == _CONV and _static(add.args[1]) not in (shape, (1, shape[0], 1, 1)):
            continue
        relu_var, relu = only_call(add_var, _RELU)
        calls = [add] + ([relu] if relu is not None else [])
        pool = None
        if val.op == _CONV:
            _, pool = only_call(add_var if relu is None else relu_var, _MAX_POOL)
            if pool is not None and not _plain_pool(pool, out_shape):
                pool = None
        out[val] = (bias, relu is not None, pool is not None, calls + ([pool] if pool is not None else []))
    return out


def _plain_pool(call, in_shape) -> bool:
    """A 2x2, stride-2, unpadded NCHW max pool of an even-sized input: whole windows, no edge."""
    a = call.attrs
    return (tuple(int(v) for v in a.pool_size) == (2, 2) and tuple(int(v) for v in a.strides) == (2, 2)
            and all(int(v) == 0 for v in a.padding) and all(int(v) == 1 for v in a.dilation)
            and a.layout == "NCHW" and a.out_layout == "NCHW" and len(in_shape) == 4
            and in_shape[2] % 2 == 0 and in_shape[3] % 2 == 0)


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
        self.by_var = by_var      # weight Var -> (packed dict, (rows, groups, words, alpha) Vars)
        self.used = set()
        self.epilogues = {}       # original conv / matmul call -> _epilogues' entry
        self.absorbed = set()     # original add / relu calls a kernel computes

    def visit_function_(self, func):
        self.epilogues = _epilogues(func)
        return super().visit_function_(func)

    def _packed(self, w):
        return self.by_var.get(w) if isinstance(w, relax.Var) else None

    def visit_call_(self, call):
        if call in self.absorbed:   # already in its kernel's output: the binding aliases that output
            return self.visit_expr(call.args[0])
        original = call
        call = self.visit_expr_post_order(call)
        if call.op == _MATMUL:
            hit = self._packed(call.args[1])
            x_shape = _static(call.args[0])
            if hit is not None and x_shape is not None and len(x_shape) == 2:
                return self._dense(call, hit, x_shape, self._epilogue(original, hit))
        if call.op == _CONV:
            hit = self._packed(call.args[1])
            a = call.attrs
            x_shape = _static(call.args[0])
            if (hit is not None and x_shape is not None and a.data_layout == "NCHW" and a.kernel_layout == "OIHW"
                    and int(a.groups) == 1 and all(int(s) == 1 for s in a.strides)
                    and all(int(d) == 1 for d in a.dilation) and a.out_layout == "NCHW"):
                return self._conv(call, hit, x_shape, self._epilogue(original, hit))
        return call

    def _epilogue(self, call, hit) -> tuple:
        """(bias, relu, pool) the kernel applies: the model's, whose add, relu and pool calls it absorbs, or zeros."""
        if call in self.epilogues:
            bias, relu, pool, calls = self.epilogues[call]
            self.absorbed.update(calls)
            return bias, relu, pool
        R = int(hit[0]["nbases"].shape[0])
        return relax.const(np.zeros(R, np.float32)), False, False

    def _lut(self, x, hit, x_shape, KH, KW, epilogue, dense=False):
        packed, (rows, groups, words, alpha) = hit
        R, NG, group, NB = _packed_shapes(packed)
        N, C, H, W = x_shape
        bias, relu, pool = epilogue
        f = lut_kernel(N, C, H, W, KH, KW, R, NG, group, NB, relu, dense, pool)
        gv = self.builder_.add_func(f, f.attrs["global_symbol"])
        OH, OW = H - KH + 1, W - KW + 1
        shape = (W, R) if dense else (N, R, OH // 2, OW // 2) if pool else (N, R, OH, OW)
        return relax.call_tir(gv, [x, rows, groups, words, alpha, bias], relax.TensorType(shape, "float32"))

    def _dense(self, call, hit, x_shape, epilogue):
        M, K = x_shape
        self.used.add(call.args[1])
        return self._lut(call.args[0], hit, (1, K, 1, M), 1, 1, epilogue, dense=True)

    def _conv(self, call, hit, x_shape, epilogue):
        O, Cw, KH, KW = (int(s) for s in hit[0]["shape"])
        N, C, H, W = x_shape
        pad = tuple(int(p) for p in call.attrs.padding)
        if len(pad) == 2:
            pad = (pad[0], pad[1], pad[0], pad[1])
        self.used.add(call.args[1])
        x = call.args[0]
        if any(pad):
            top, left, bottom, right = pad
            x = self.builder_.emit(relax.op.nn.pad(x, [0, 0, 0, 0, top, bottom, left, right]))
            H, W = H + top + bottom, W + left + right
        return self._lut(x, hit, (N, C, H, W), KH, KW, epilogue)


PACKED_FIELDS = ("rows", "groups", "words", "alpha")


def _artifact_arrays(p: dict) -> dict[str, np.ndarray]:
    """What the kernels take for a packed weight: nbases as a row index (row_index), the bits and alphas as packed.
    A weight whose bases were all pruned keeps one dummy basis, never read: no stored array and no kernel argument
    is ever zero-length (one fewer case for the weight file, the runtimes and the boards)."""
    rows, groups = row_index(p["nbases"])
    words, alpha = p["words"], p["alpha"]
    if len(alpha) == 0:
        groups, alpha = np.zeros(1, groups.dtype), np.zeros(1, alpha.dtype)
        words = np.zeros((1,) + words.shape[1:], words.dtype)
    return {"rows": rows, "groups": groups, "words": np.ascontiguousarray(words), "alpha": np.ascontiguousarray(alpha)}


def pack_weights(mod: tvm.IRModule, weights: list[np.ndarray], packed: dict[str, dict]):
    """(module, weights) with every conv/matmul weight named in `packed` computed by the bit-packed
    kernels: the weight's parameter is replaced by its packed arrays, "<name>.rows", ".groups", ".words", ".alpha"."""
    main = mod["main"]
    num_input = int(main.attrs["num_input"])
    params = list(main.params)
    by_name = {p.name: p for p in params[num_input:]}
    missing = sorted(set(packed) - set(by_name))
    if missing:
        raise ValueError(f"the model has no weight named {', '.join(missing)}")
    by_var, new_vars, arrays = {}, {}, {}
    for name, p in packed.items():
        arrays[name] = _artifact_arrays(p)
        vs = tuple(relax.Var(f"{name}.{f}", relax.TensorType(arrays[name][f].shape, str(arrays[name][f].dtype)))
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
        new_weights += [arrays[name][f] for f in PACKED_FIELDS]
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
