"""Nested row-sparse weights in, row-balanced sparse kernels out: one compiled model runs every DRESS subnet.

`sparsify(mod, weights, stores, target)` rewrites `main` of an imported model (weights as parameters,
named as in the ONNX file): every `matmul(x, W)` and stride-1 ungrouped `conv2d(x, W)` whose weight W has a
store (edgetvm/sparse/masks.py: idx, val, counts, rank-major, subnet k reads the first counts[k] ranks of
every row) becomes a call to a kernel of this file. W leaves `main`'s parameters, its store's arrays (laid
out for the kernel, see below) join them, and `main` gets one more data input, `subnet` (int32[1]): the
subnet to run. Every kernel reads where its subnet ends at run time and visits only that prefix of each
block of LANES rows, so

  * one library and one weight file serve every subnet: switching is passing another `subnet` value,
    no weight is copied or re-laid out;
  * the work (multiply-adds and weight bytes read) is proportional to the subnet's nonzeros: latency
    falls with sparsity.

The kernels (TIR; x86 and aarch64 alike unless noted), each applying the layer's bias, its ReLU and, for a
convolution, a 2x2 max pool before or after it where the graph allows (the model's add / relu / max_pool2d
calls are absorbed: no separate kernel, no intermediate tensor):
  conv (direct, no im2col): per output channel and PV output rows (parallel chunks), PV x OW accumulators
    in registers; rank j adds val * x[c, oh + kh, kw : kw + OW] for each of the PV rows, contiguous loads
    of the input read in place (idx holds the input offset of (c, kh, kw), `conv_offsets`). A pooled or
    padded input is staged once per chunk.
  window (linear layers on AVX-512 targets): `window_layout` re-lays the store as steps of LANES entries
    whose columns share one window of WINDOW columns; a step loads the window (two registers) and one
    vpermi2ps picks each row's input: no gather.
  dense (linear layers elsewhere): per block of LANES rows, rank j adds val[b, j, :] * x[m, idx[b, j, :]]
    (a gather from x, which LLVM does element by element).
An out-of-range `subnet` is clamped to the nearest subnet (the kernel never reads past the store).
Accumulators are small "global" buffers: TVM makes those stack arrays that LLVM keeps in registers, while a
"local" buffer is a runtime workspace allocation, read and written through memory at every step.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax
from tvm import tirx
from tvm.script import tirx as T

# The static-shape helper and the kernel attributes are ALQ's (passes/alq.py): the same questions, answered once.
from edgetvm.passes.alq import _CONV, _MATMUL, _epilogues, _scheduled, _static

LANES = 16              # rows per vector (masks.LANES: the store pads rows to it)
DOT_MAX_ROWS = 16       # up to this many input rows, a linear layer uses the dense (dot) form
CORES = 4               # parallel chunks of a conv kernel when the target does not give its cores
ACC_MAX = 96            # conv outputs a task accumulates in registers (24 of NEON's 32; 6 AVX-512 ones)
SUBNET_INPUT = "subnet"
FIELDS = ("idx", "val", "counts")


def dense_kernel(M: int, K: int, R: int, Rp: int, N0: int, L: int, itype: str = "int32", relu: bool = False):
    """Y (M, R) = X (M, K) @ W_subnet^T + bias, then ReLU if `relu`; W_subnet is the store's first
    counts[subnet] ranks of each row."""
    RL = R % LANES or LANES                        # real rows of the last block

    def finish(v):
        return T.max(v, T.float32(0)) if relu else v

    @T.prim_func
    def sparse_dense(x: T.Buffer((M, K), "float32"), subnet: T.Buffer((1,), "int32"),
                     idx: T.Buffer((Rp // LANES, N0, LANES), itype), val: T.Buffer((Rp // LANES, N0, LANES), "float32"),
                     counts: T.Buffer((L,), "int32"), bias: T.Buffer((R,), "float32"), y: T.Buffer((M, R), "float32")):
        for rb in T.parallel(Rp // LANES):
            acc = T.alloc_buffer((M, LANES), "float32")
            s = T.bind(T.max(T.min(subnet[0], L - 1), 0))
            n = T.bind(T.min(counts[s], N0))
            for m in range(M):
                for l in T.vectorized(LANES):
                    acc[m, l] = T.float32(0)
            for j in range(n):
                for m in range(M):
                    for l in T.vectorized(LANES):
                        acc[m, l] = acc[m, l] + val[rb, j, l] * x[m, T.Cast("int32", idx[rb, j, l])]
            for m in range(M):
                if rb < Rp // LANES - 1:
                    for l in T.vectorized(LANES):
                        y[m, rb * LANES + l] = finish(acc[m, l] + bias[rb * LANES + l])
                else:   # the store's padding rows were computed (zero values) but are not outputs
                    for l in range(RL):
                        y[m, rb * LANES + l] = finish(acc[m, l] + bias[rb * LANES + l])

    name = f"sparse_dense_{M}x{K}x{R}_{N0}_{L}_{itype}" + ("_relu" if relu else "")
    return _flops(_scheduled(sparse_dense, name), 2 * M * Rp * N0)


WINDOW = 32             # columns one permute step reads (two AVX-512 registers of x)


def window_layout(s: dict, K: int, R: int) -> dict[str, np.ndarray]:
    """The store of a linear layer re-laid for `window_kernel`: per block of LANES rows, steps of LANES
    entries (one per row, or a zero) whose columns lie in one window [base, base + WINDOW) of x, so that a
    step reads x with two contiguous loads and one permute instead of LANES scalar loads.

    The steps of a block go band by band, sparsest subnet first (band k: ranks counts[k+1] .. counts[k]),
    so subnet k reads a prefix of every block: steps starts[b] .. counts[b, k], starts[b] being the end of
    the previous block (counts[b - 1, 0]). Within a band each row's columns are visited in increasing
    order and a step's window starts at the smallest column any row still has (clamped so it fits in x):
    the rows whose next column lies in it advance, the others get a zero (LeNet5's fc1 with random
    weights: 1.16x the kept weights in steps at 0% sparsity, 1.28x at 70%, 1.42x at 90%).
      idx    uint8 (steps, LANES)    column - base of each row's entry
      val    float32 (steps, LANES)  its value (0 where the row has none)
      base   int16/int32 (steps,)    the window's first column
      counts int32 (blocks, subnets)  where subnet k's steps of the block end"""
    order, vals, n = s["idx"].astype(np.int64), s["val"], s["counts"]
    B, _, lanes = order.shape
    L = len(n)
    steps_idx, steps_val, steps_base = [], [], []
    counts = np.zeros((B, L), np.int32)
    for b in range(B):
        for k in range(L - 1, -1, -1):
            lo, hi = (int(n[k + 1]) if k + 1 < L else 0), int(n[k])
            cols, v = order[b, lo:hi], vals[b, lo:hi]
            sort = np.argsort(cols, axis=0, kind="stable")
            cols, v = np.take_along_axis(cols, sort, 0), np.take_along_axis(v, sort, 0)
            cols = np.vstack([cols, np.full((1, lanes), np.iinfo(np.int64).max)])   # a sentinel ends each row
            cols[:, b * lanes + np.arange(lanes) >= R] = np.iinfo(np.int64).max      # padding rows have none
            ptr = np.zeros(lanes, np.int64)
            lane = np.arange(lanes)
            while True:
                nxt = cols[ptr, lane]
                first = nxt.min()
                if first == np.iinfo(np.int64).max:
                    break
                base = min(int(first), K - WINDOW)
                take = nxt < base + WINDOW
                steps_idx.append(np.where(take, nxt - base, 0).astype(np.uint8))
                steps_val.append(np.where(take, v[np.minimum(ptr, hi - lo - 1), lane], 0).astype(np.float32))
                steps_base.append(base)
                ptr += take
            counts[b, k] = len(steps_base)
    btype = np.int16 if K < 2**15 else np.int32
    return {"idx": np.array(steps_idx, np.uint8).reshape(-1, lanes),
            "val": np.array(steps_val, np.float32).reshape(-1, lanes),
            "counts": counts, "base": np.array(steps_base, btype)}     # the kernels' argument order


def window_kernel(M: int, K: int, R: int, B: int, S: int, L: int, btype: str, relu: bool = False):
    """Y (M, R) = X (M, K) @ W_subnet^T + bias, then ReLU if `relu`, over `window_layout`'s steps: per
    step, x[base:base + WINDOW] in two registers and one AVX-512 two-register permute (vpermi2ps) picks each
    row's input."""
    RL = R % LANES or LANES

    def finish(v):
        return T.max(v, T.float32(0)) if relu else v

    @T.prim_func
    def sparse_window(x: T.Buffer((M, K), "float32"), subnet: T.Buffer((1,), "int32"),
                      idx: T.Buffer((S, LANES), "uint8"), val: T.Buffer((S, LANES), "float32"),
                      counts: T.Buffer((B, L), "int32"), base: T.Buffer((S,), btype),
                      bias: T.Buffer((R,), "float32"), y: T.Buffer((M, R), "float32")):
        for rb in T.parallel(B):
            # two accumulators per input row, for even and odd steps: two FMA chains in flight, not one
            acc = T.alloc_buffer((M, 2, LANES), "float32")
            s = T.bind(T.max(T.min(subnet[0], L - 1), 0))
            start = T.bind(T.if_then_else(rb == 0, 0, counts[T.max(rb - 1, 0), 0]))
            n = T.bind(counts[rb, s] - start)
            for m in range(M):
                for a in range(2):
                    acc[m, a, T.ramp(0, 1, LANES)] = T.Broadcast(T.float32(0), LANES)
            for t2 in range((n + 1) // 2):
                # steps 2 * t2 and 2 * t2 + 1 into accumulators 0 and 1 (an odd last step alone, into 0)
                for a in T.unroll(2):
                    if a == 0 or t2 * 2 + 1 < n:
                        t = T.bind(start + t2 * 2 + a)
                        i = T.bind(T.Cast("int32x16", idx[t, T.ramp(0, 1, LANES)]))
                        v = T.bind(val[t, T.ramp(0, 1, LANES)])
                        o = T.bind(T.Cast("int32", base[t]))
                        for m in range(M):
                            g = T.bind(T.call_llvm_pure_intrin("float32x16", "llvm.x86.avx512.vpermi2var.ps.512",
                                                               x[m, T.ramp(o, 1, LANES)], i,
                                                               x[m, T.ramp(o + LANES, 1, LANES)]))
                            acc[m, a, T.ramp(0, 1, LANES)] = acc[m, a, T.ramp(0, 1, LANES)] + v * g
            for m in range(M):
                if rb < B - 1:
                    for l in T.vectorized(LANES):
                        y[m, rb * LANES + l] = finish(acc[m, 0, l] + acc[m, 1, l] + bias[rb * LANES + l])
                else:   # the store's padding rows are not outputs
                    for l in range(RL):
                        y[m, rb * LANES + l] = finish(acc[m, 0, l] + acc[m, 1, l] + bias[rb * LANES + l])

    name = f"sparse_window_{M}x{K}x{R}_{S}_{L}" + ("_relu" if relu else "")
    return _flops(_scheduled(sparse_window, name), 2 * M * S * LANES)


def conv_kernel(x_shape: tuple, KH: int, KW: int, R: int, Rp: int, N0: int, L: int, itype: str = "int32",
                pad: tuple = (0, 0, 0, 0), pool_in: bool = False, relu: bool = False, pool_out: bool = False,
                chunks: int = 2):
    """y = the stride-1 correlation of the input with the store's rows (each row's first counts[subnet] ranks)
    + bias, then ReLU if `relu`, then a 2x2 max pool of stride 2 if `pool_out`. The input is x (x_shape), or
    with `pool_in` the 2x2 max pool of stride 2 of x; `pad` (top, left, bottom, right) puts zeros around it.
    idx holds offsets into one image of that input (`conv_offsets`), not columns. The tasks (an output
    channel and PV output rows each) run in `chunks` parallel chunks (the target's cores)."""
    N, C, HX, WX = x_shape
    H, W = (HX // 2, WX // 2) if pool_in else (HX, WX)
    top, left, bottom, right = pad
    HS, WS = _staged(H, W, pad)
    OH, OW = HS - KH + 1, WS - KW + 1
    OHC = OH // 2 * 2 if pool_out else OH         # the conv rows the output needs
    step = 2 if pool_out else 1
    # conv rows per task: PV rows of OW positions accumulate in registers over the row's ranks
    PV = max([v for v in range(step, OHC + 1, step) if OHC % v == 0 and v * OW <= ACC_MAX] or [step])
    TASKS = N * R * (OHC // PV)
    CHUNKS = max(1, min(chunks, TASKS))
    PER = -(-TASKS // CHUNKS)
    IMAGE = C * HS * WS
    stage = pool_in or any(pad)
    YS = (N, R, OH // 2, OW // 2) if pool_out else (N, R, OH, OW)

    def finish(v):
        return T.max(v, T.float32(0)) if relu else v

    def staged(x, n, c, h, w):
        # the input as the kernel reads it: pooled, zeros in the padding (clamped reads stay in bounds)
        ih, iw = h - top, w - left
        if any(pad):
            inside = tirx.all(ih >= 0, ih < H, iw >= 0, iw < W)
            ih, iw = T.max(T.min(ih, H - 1), 0), T.max(T.min(iw, W - 1), 0)
        if pool_in:
            v = T.max(T.max(x[n, c, 2 * ih, 2 * iw], x[n, c, 2 * ih, 2 * iw + 1]),
                      T.max(x[n, c, 2 * ih + 1, 2 * iw], x[n, c, 2 * ih + 1, 2 * iw + 1]))
        else:
            v = x[n, c, ih, iw]
        return T.if_then_else(inside, v, T.float32(0)) if any(pad) else v

    @T.prim_func
    def sparse_conv(x: T.Buffer(x_shape, "float32"), subnet: T.Buffer((1,), "int32"),
                    idx: T.Buffer((Rp // LANES, N0, LANES), itype), val: T.Buffer((Rp // LANES, N0, LANES), "float32"),
                    counts: T.Buffer((L,), "int32"), bias: T.Buffer((R,), "float32"), y: T.Buffer(YS, "float32")):
        xf = T.decl_buffer((N * IMAGE,), "float32", data=x.data)
        for ch in T.parallel(CHUNKS):
            # each chunk stages the input itself: one parallel region per call, not a second one (and its
            # barrier) for the staging, at the price of one staging per core
            xs = T.alloc_buffer((N * IMAGE if stage else 1,), "float32")
            if stage:
                for nc in range(N * C):
                    for h in range(HS):
                        for w in T.vectorized(WS):
                            xs[nc * HS * WS + h * WS + w] = staged(x, nc // C, nc % C, h, w)
            for tt in range(PER):
                if ch * PER + tt < TASKS:
                    acc = T.alloc_buffer((PV * OW,), "float32")
                    t = T.bind(ch * PER + tt)
                    n = T.bind(t // (R * (OHC // PV)))
                    r = T.bind(t // (OHC // PV) % R)
                    oh0 = T.bind(t % (OHC // PV) * PV)
                    s = T.bind(T.max(T.min(subnet[0], L - 1), 0))
                    cnt = T.bind(T.min(counts[s], N0))
                    for pv in T.unroll(PV):     # in the shape the ranks update it: it stays in registers
                        for l in T.vectorized(OW):
                            acc[pv * OW + l] = T.float32(0)
                    for j in range(cnt):
                        v = T.bind(val[r // LANES, j, r % LANES])
                        at = T.bind(n * IMAGE + T.Cast("int32", idx[r // LANES, j, r % LANES]) + oh0 * WS)
                        for pv in T.unroll(PV):
                            for l in T.vectorized(OW):
                                if stage:
                                    acc[pv * OW + l] = acc[pv * OW + l] + v * xs[at + pv * WS + l]
                                else:
                                    acc[pv * OW + l] = acc[pv * OW + l] + v * xf[at + pv * WS + l]
                    if pool_out:
                        for pp in T.unroll(PV // 2):
                            for l in T.vectorized(OW // 2):
                                y[n, r, oh0 // 2 + pp, l] = finish(
                                    T.max(T.max(acc[2 * pp * OW + 2 * l], acc[2 * pp * OW + 2 * l + 1]),
                                          T.max(acc[(2 * pp + 1) * OW + 2 * l], acc[(2 * pp + 1) * OW + 2 * l + 1]))
                                    + bias[r])
                    else:
                        for pv in T.unroll(PV):
                            for l in T.vectorized(OW):
                                y[n, r, oh0 + pv, l] = finish(acc[pv * OW + l] + bias[r])

    shape = f"{N}x{C}x{H}x{W}_{R}x{KH}x{KW}"
    tags = "".join(t for t, on in (("_pad", any(pad)), ("_poolin", pool_in), ("_relu", relu), ("_pool", pool_out))
                   if on)
    return _flops(_scheduled(sparse_conv, f"sparse_conv_{shape}_{N0}_{L}_{itype}{tags}"), 2 * N * Rp * N0 * OH * OW)


def _staged(H: int, W: int, pad: tuple) -> tuple[int, int]:
    top, left, bottom, right = pad
    return H + top + bottom, W + left + right


def conv_offsets(idx: np.ndarray, C: int, KH: int, KW: int, HS: int, WS: int) -> np.ndarray:
    """The store's columns c * KH * KW + kh * KW + kw as offsets c * HS * WS + kh * WS + kw into one image of
    the input the conv kernel reads (HS x WS, padded): the kernel adds them to a position, no division per
    rank. int16 when the image has fewer than 32768 values, as the columns are (masks.store)."""
    k = idx.astype(np.int64)
    off = k // (KH * KW) * HS * WS + k // KW % KH * WS + k % KW
    return off.astype(np.int16 if C * HS * WS < 2**15 else np.int32)


def _flops(f, n: int):
    # TIR's flop estimate cannot bound a loop whose extent is read at run time (it answers 2e12): give
    # the densest subnet's count, which the roofline in the manifest then bounds every subnet by
    return f.with_attr("estimated_flops", n)


def _store_shapes(s: dict) -> tuple[int, int, int, str]:
    B, N0, lanes = s["idx"].shape
    return N0, B * lanes, len(s["counts"]), str(s["idx"].dtype)


_POOL = tvm.ir.Op.get("relax.nn.max_pool2d")


def _bias_relu(func: relax.Function) -> dict:
    """conv / matmul call -> (bias, relu?, [the add and relu calls]): ALQ's epilogues without their pool,
    since the sparse conv kernel finds the pools before and after it itself (_pools)."""
    return {c: (bias, relu, calls[:len(calls) - pool]) for c, (bias, relu, pool, calls) in _epilogues(func).items()}


def _is_pool2(call) -> bool:
    """A 2x2 max pool of stride 2 without padding, NCHW: what the conv kernel computes before and after."""
    if not (isinstance(call, relax.Call) and call.op == _POOL):
        return False
    a = call.attrs
    return ([int(v) for v in a.pool_size] == [2, 2] and [int(v) for v in a.strides] == [2, 2]
            and not any(int(v) for v in a.padding) and all(int(v) == 1 for v in a.dilation)
            and not a.ceil_mode and a.layout == "NCHW" and a.out_layout == "NCHW")


def _pools(func: relax.Function, epilogues: dict) -> tuple[dict, dict]:
    """(conv call -> the max pool its kernel applies to its output, conv call -> the max pool it reads its
    input through): a 2x2 pool that is the only use of the conv's output (after its bias and ReLU, which the
    kernel absorbs) or whose output's only use is the conv. A pooled input is never materialised, a pooled
    output's full-size map neither."""
    values, var_of, users = {}, {}, {}
    for block in func.body.blocks:
        for b in block.bindings:
            values[b.var] = b.value
            var_of[b.value] = b.var
            for v in relax.analysis.free_vars(b.value):
                users.setdefault(v, []).append(b.value)
    for v in relax.analysis.free_vars(func.body.body):
        users.setdefault(v, []).append(None)
    after, before = {}, {}
    for val in values.values():
        if not (isinstance(val, relax.Call) and val.op == _CONV):
            continue
        last = epilogues[val][2][-1] if val in epilogues else val
        u = users.get(var_of.get(last), [])
        if len(u) == 1 and _is_pool2(u[0]):
            after[val] = u[0]
        x = val.args[0]
        if isinstance(x, relax.Var) and _is_pool2(values.get(x)) and len(users.get(x, [])) == 1:
            before[val] = values[x]
    return after, before


@relax.expr_functor.mutator
class _Rewrite(relax.PyExprMutator):
    def __init__(self, mod, by_var: dict, subnet: relax.Var, permute: bool, cores: int):
        super().__init__(mod)
        self.by_var = by_var      # weight Var -> (its name, its store)
        self.subnet = subnet
        self.permute = permute    # linear layers by window_kernel (AVX-512) rather than dense_kernel
        self.cores = cores
        self.used = set()
        self.arrays = {}          # weight name -> {field: the array its kernels take}
        self.vars = {}            # weight name -> the Vars of those arrays, `main`'s new parameters
        self.epilogues, self.pool_after, self.pool_before = {}, {}, {}
        self.absorbed = set()     # original add / relu / max_pool2d calls a kernel computes

    def visit_function_(self, func):
        self.epilogues = _bias_relu(func)
        self.pool_after, self.pool_before = _pools(func, self.epilogues)
        return super().visit_function_(func)

    def _store(self, w):
        return self.by_var.get(w) if isinstance(w, relax.Var) else None

    def visit_call_(self, call):
        if call in self.absorbed:   # already in its kernel's output: the binding aliases that output
            return self.visit_expr(call.args[0])
        original = call
        call = self.visit_expr_post_order(call)
        if call.op == _MATMUL:
            hit = self._store(call.args[1])
            x_shape = _static(call.args[0])
            if hit is not None and x_shape is not None and len(x_shape) == 2 and x_shape[0] <= DOT_MAX_ROWS:
                return self._dense(call, hit, x_shape, self._epilogue(original, hit))
        if call.op == _CONV:
            hit = self._store(call.args[1])
            a = call.attrs
            x_shape = _static(call.args[0])
            if (hit is not None and x_shape is not None and a.data_layout == "NCHW" and a.kernel_layout == "OIHW"
                    and int(a.groups) == 1 and all(int(s) == 1 for s in a.strides)
                    and all(int(d) == 1 for d in a.dilation) and a.out_layout == "NCHW"):
                return self._conv(original, call, hit, x_shape, self._epilogue(original, hit))
        return call

    def _epilogue(self, call, hit) -> tuple:
        """(bias, relu) the kernel applies: the model's, whose add and relu calls it absorbs, or zeros."""
        if call in self.epilogues:
            bias, relu, calls = self.epilogues[call]
            self.absorbed.update(calls)
            return bias, relu
        return relax.const(np.zeros(_rows(hit[1]), np.float32)), False

    def _args(self, w, arrays: dict) -> list:
        """The kernel arguments of weight w's store as `arrays` lays it out (one layout per weight)."""
        name, _ = self.by_var[w]
        self.used.add(w)
        if name in self.arrays:
            old = self.arrays[name]
            if list(old) != list(arrays) or not all(np.array_equal(old[f], arrays[f]) for f in arrays):
                raise ValueError(f"{name}: used by layers that need different layouts of its store")
        else:
            self.arrays[name] = arrays
            self.vars[name] = tuple(relax.Var(f"{name}.{f}", relax.TensorType(a.shape, str(a.dtype)))
                                    for f, a in arrays.items())
        return [self.subnet, *self.vars[name]]

    def _dense(self, call, hit, x_shape, epilogue):
        _, s = hit
        N0, Rp, L, itype = _store_shapes(s)
        M, K = x_shape
        bias, relu = epilogue
        if self.permute and K >= WINDOW:
            arrays = window_layout(s, K, _rows(s))
            (S, _), (B, _) = arrays["idx"].shape, arrays["counts"].shape
            f = window_kernel(M, K, _rows(s), B, S, L, str(arrays["base"].dtype), relu)
        else:
            arrays = {f: s[f] for f in FIELDS}
            f = dense_kernel(M, K, _rows(s), Rp, N0, L, itype, relu)
        gv = self.builder_.add_func(f, f.attrs["global_symbol"])
        args = [call.args[0], *self._args(call.args[1], arrays), bias]
        return relax.call_tir(gv, args, relax.TensorType((M, _rows(s)), "float32"))

    def _conv(self, original, call, hit, x_shape, epilogue):
        _, s = hit
        N0, Rp, L, _ = _store_shapes(s)
        R, C, KH, KW = (int(d) for d in s["shape"])
        pad = tuple(int(p) for p in call.attrs.padding)
        if len(pad) == 2:
            pad = (pad[0], pad[1], pad[0], pad[1])
        # not a pool an earlier kernel computes as its output (that output is already pooled)
        x, pool_in = call.args[0], original in self.pool_before and self.pool_before[original] not in self.absorbed
        if pool_in:     # the pool's own binding is left unused (dead code elimination drops it)
            x = self.visit_expr(self.pool_before[original].args[0])
            x_shape = _static(x)
        pool_out = original in self.pool_after
        if pool_out:
            self.absorbed.add(self.pool_after[original])
        N, _, H, W = x_shape
        HS, WS = _staged(H // 2 if pool_in else H, W // 2 if pool_in else W, pad)
        idx = conv_offsets(s["idx"], C, KH, KW, HS, WS)
        bias, relu = epilogue
        f = conv_kernel(x_shape, KH, KW, R, Rp, N0, L, str(idx.dtype), pad, pool_in, relu, pool_out, self.cores)
        gv = self.builder_.add_func(f, f.attrs["global_symbol"])
        OH, OW = HS - KH + 1, WS - KW + 1
        shape = (N, R, OH // 2, OW // 2) if pool_out else (N, R, OH, OW)
        args = [x, *self._args(call.args[1], {"idx": idx, "val": s["val"], "counts": s["counts"]}), bias]
        return relax.call_tir(gv, args, relax.TensorType(shape, "float32"))


def has_permute(target) -> bool:
    """Whether `target` runs window_kernel: an x86 CPU with AVX-512 (vpermi2ps)."""
    from tvm.target import codegen

    return target is not None and target.kind.name == "llvm" and bool(codegen.target_has_features("avx512f", target))


def sparsify(mod: tvm.IRModule, weights: list[np.ndarray], stores: dict[str, dict], target=None):
    """(module, weights, arrays) with every conv/matmul weight named in `stores` computed by the sparse
    kernels: the weight's parameter is replaced by "<name>.idx", ".val", ".counts", and `main` takes the data
    input `subnet` (int32[1]) right after its own. `arrays`: per weight the store as the kernels take it (a
    convolution's idx holds input offsets, `conv_offsets`)."""
    main = mod["main"]
    num_input = int(main.attrs["num_input"])
    params = list(main.params)
    by_name = {p.name: p for p in params[num_input:]}
    missing = sorted(set(stores) - set(by_name))
    if missing:
        raise ValueError(f"the model has no weight named {', '.join(missing)}")
    levels = {len(s["counts"]) for s in stores.values()}
    if len(levels) != 1:
        raise ValueError("the stores disagree on the number of subnets")
    subnet = relax.Var(SUBNET_INPUT, relax.TensorType((1,), "int32"))
    by_var = {by_name[name]: (name, s) for name, s in stores.items()}
    cores = int(target.attrs.get("num-cores", CORES)) if target is not None else CORES
    rw = _Rewrite(mod, by_var, subnet, has_permute(target), cores)
    body = rw.visit_expr(main)
    if rw.used != set(by_var):
        left = [v.name for v in by_var if v not in rw.used]
        raise ValueError(f"{', '.join(left)}: not used as the weight of a plain conv2d or small-batch matmul")
    keep = [i for i, p in enumerate(params[num_input:]) if p not in by_var]
    new_params = params[:num_input] + [subnet] + [params[num_input + i] for i in keep]
    new_weights = [weights[i] for i in keep]
    for name in stores:
        new_params += list(rw.vars[name])
        new_weights += [np.ascontiguousarray(a) for a in rw.arrays[name].values()]
    func = relax.Function(new_params, body.body, body.ret_ty, body.is_pure, body.attrs, body.span)
    func = func.with_attr("num_input", num_input + 1)
    out = rw.builder_.get()
    out["main"] = func
    out = relax.transform.DeadCodeElimination(entry_functions=["main"])(out)
    return out, new_weights, {name: dict(rw.arrays[name], shape=stores[name]["shape"], keep=stores[name]["counts"])
                              for name in stores}


def subnets_in(model):
    """(levels, accuracies, rankings by weight name) of an ONNX model written by `edgetvm dress`, or None."""
    from edgetvm.errors import UserError
    from edgetvm.sparse import masks

    for prop in model.metadata_props:
        if prop.key == masks.METADATA_KEY:
            try:
                return masks.from_metadata(prop.value)
            except (ValueError, KeyError, TypeError) as e:
                raise UserError(f"the model's {masks.METADATA_KEY} metadata is damaged ({e}); "
                                "run `edgetvm dress` again") from None
    return None


def apply(mod: tvm.IRModule, weights: list[np.ndarray], subnets, target=None):
    """sparsify with stores built from the model's own weights and the metadata's rankings, after checking
    that each weight is zero wherever the densest subnet keeps nothing (an edited model must not silently
    run other weights). Returns (module, weights, stores)."""
    from edgetvm.errors import UserError
    from edgetvm.sparse import masks

    levels, _, orders = subnets
    names = [p.name for p in mod["main"].params[int(mod["main"].attrs["num_input"]):]]
    stores = {}
    for name, order in orders.items():
        if name not in names:
            raise UserError(f"the model's sparse weight {name} is not one of its weights; run `edgetvm dress` again")
        w = weights[names.index(name)]
        rows = masks.rows_of(name, w)
        if order.shape != rows.shape or not (np.sort(order, axis=1) == np.arange(rows.shape[1])).all():
            raise UserError(f"the ranking of weight {name} in the model's metadata does not fit its shape "
                            f"{tuple(w.shape)}; run `edgetvm dress` again")
        s = masks.store(name, w, levels, order)
        if not np.array_equal(masks.from_store(s, 0), w):
            raise UserError(f"weight {name} has nonzeros outside its densest subnet (edited after "
                            "`edgetvm dress`?); run `edgetvm dress` again")
        stores[name] = s
    try:
        mod, weights, stores = sparsify(mod, weights, stores, target)
    except ValueError as e:
        raise UserError(f"{e}; the sparse kernels take plain conv2d and batch-1..16 matmul weights") from None
    return mod, weights, stores


def with_subnet_input(inputs: list) -> list:
    """The artifact's data inputs once `sparsify` added `subnet` after the model's own."""
    from edgetvm.passes.onnx_import import TensorInfo

    return list(inputs) + [TensorInfo(SUBNET_INPUT, (1,), "int32")]


def manifest_entry(subnets, stores: dict, weights: list[np.ndarray]) -> dict:
    """What `edgetvm run --budget-trace` needs to choose: per subnet its sparsity, test accuracy (measured
    when it was trained), nonzeros of the sparse weights and bytes of weights it reads (the store's prefix
    plus the dense weights), next to the whole store's bytes."""
    from edgetvm.sparse import masks

    levels, accuracy, _ = subnets
    store_all = sum(kernel_bytes(s) for s in stores.values())
    dense = sum(int(w.nbytes) for w in weights) - store_all
    out = []
    for k, level in enumerate(levels):
        nnz = sum(int(s["keep"][k]) * _rows(s) for s in stores.values())
        out.append({"level": k, "sparsity": level, "accuracy": accuracy[k] if k < len(accuracy) else None,
                    "nonzeros": nnz, "weight_bytes": dense + sum(kernel_bytes(s, k) for s in stores.values())})
    return {"levels": list(levels), "store_bytes": store_all, "dense_bytes": dense, "subnets": out}


def kernel_bytes(s: dict, level: int | None = None) -> int:
    """Bytes of a weight's arrays as `sparsify` laid them out that subnet `level` reads, or all of them."""
    from edgetvm.sparse import masks

    if "base" not in s:
        return masks.store_bytes(s, level)
    if level is None:
        return sum(int(s[f].nbytes) for f in ("idx", "val", "counts", "base"))
    ends = s["counts"][:, level].astype(np.int64)
    starts = np.concatenate([[0], s["counts"][:-1, 0]])
    per_step = s["idx"].itemsize * LANES + s["val"].itemsize * LANES + s["base"].itemsize
    return int((ends - starts).sum()) * per_step + int(s["counts"].nbytes)


def _rows(s: dict) -> int:  # real rows, without the padding
    shape = tuple(int(d) for d in s["shape"])
    return shape[0] if len(shape) == 4 else shape[1]
