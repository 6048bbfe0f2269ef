"""Nested row-sparse weights in, row-balanced sparse kernels out: one compiled model runs every DRESS subnet.

`sparsify(mod, weights, stores)` rewrites `main` of an imported model (weights as parameters, named as in
the ONNX file): every `matmul(x, W)` and stride-1 ungrouped `conv2d(x, W)` whose weight W has a store
(edgetvm/sparse/masks.py: idx, val, counts, rank-major, subnet k reads the first counts[k] ranks of every
row) becomes a call to a kernel of this file. W leaves `main`'s parameters, its three store arrays join
them, and `main` gets one more data input, `subnet` (int32[1]): the subnet to run. Every kernel reads its
own n = counts[subnet] at run time and loops over the first n ranks of each row (a prefix of each block of LANES rows), so

  * one library and one weight file serve every subnet: switching is passing another `subnet` value,
    no weight is copied or re-laid out;
  * the work (multiply-adds and weight bytes read) is proportional to n: latency falls with sparsity.

The kernels (TIR, any CPU target: x86 and aarch64 alike):
  dense (small batches): per block of LANES rows (parallel), a vector of LANES partial sums per input
    row; rank j adds val[b, j, :] * x[m, idx[b, j, :]] (contiguous loads of values and indices, walking
    the block forwards; a gather from x, which is small and cached).
  cols (convolutions, after a TE im2col to X^T (K, positions)): per row and block of positions
    (parallel), rank j adds val[b, j, l] * X^T[idx[b, j, l], block] — an axpy along positions, vectorised.
An out-of-range `subnet` is clamped to the nearest subnet (the kernel never reads past the store).
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax
from tvm.script import tirx as T

# The static-shape helper and the kernel attributes are ALQ's (passes/alq.py): the same questions, answered once.
from edgetvm.passes.alq import _CONV, _MATMUL, _scheduled, _static

LANES = 16              # rows per vector (masks.LANES: the store pads rows to it)
DOT_MAX_ROWS = 16       # up to this many input rows, a linear layer uses the dense (dot) form
SUBNET_INPUT = "subnet"
FIELDS = ("idx", "val", "counts")


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

    return te.compute((Kp, Mp), tap, name="im2col")


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def dense_kernel(M: int, K: int, Rp: int, N0: int, L: int, itype: str = "int32"):
    """Y (M, Rp) = X (M, K) @ W_subnet^T, the store's first counts[subnet] ranks of each row."""

    @T.prim_func
    def sparse_dense(x: T.Buffer((M, K), "float32"), subnet: T.Buffer((1,), "int32"),
                     idx: T.Buffer((Rp // LANES, N0, LANES), itype), val: T.Buffer((Rp // LANES, N0, LANES), "float32"),
                     counts: T.Buffer((L,), "int32"), y: T.Buffer((M, Rp), "float32")):
        for rb in T.parallel(Rp // LANES):
            acc = T.alloc_buffer((M, LANES), "float32", scope="local")
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
                for l in T.vectorized(LANES):
                    y[m, rb * LANES + l] = acc[m, l]

    return _flops(_scheduled(sparse_dense, f"sparse_dense_{M}x{K}x{Rp}_{N0}_{L}_{itype}"), 2 * M * Rp * N0)


def cols_kernel(K: int, Mp: int, R: int, Rp: int, N0: int, L: int, itype: str = "int32"):
    """Y^T (R, Mp) = W_subnet (R, K) @ X^T (K, Mp): the axpy form, for convolutions."""
    # a block of up to 64 positions accumulates in registers over the row's ranks
    VB = next(v for v in (64, 32, LANES) if Mp % v == 0)

    @T.prim_func
    def sparse_cols(xt: T.Buffer((K, Mp), "float32"), subnet: T.Buffer((1,), "int32"),
                    idx: T.Buffer((Rp // LANES, N0, LANES), itype), val: T.Buffer((Rp // LANES, N0, LANES), "float32"),
                    counts: T.Buffer((L,), "int32"), yt: T.Buffer((R, Mp), "float32")):
        for rb in T.parallel(R * (Mp // VB)):
            acc = T.alloc_buffer((VB,), "float32", scope="local")
            r = T.bind(rb // (Mp // VB))
            b = T.bind(rb % (Mp // VB))
            s = T.bind(T.max(T.min(subnet[0], L - 1), 0))
            n = T.bind(T.min(counts[s], N0))
            for l in T.vectorized(VB):
                acc[l] = T.float32(0)
            for j in range(n):
                v = T.bind(val[r // LANES, j, r % LANES])
                i = T.bind(T.Cast("int32", idx[r // LANES, j, r % LANES]))
                for l in T.vectorized(VB):
                    acc[l] = acc[l] + v * xt[i, b * VB + l]
            for l in T.vectorized(VB):
                yt[r, b * VB + l] = acc[l]

    return _flops(_scheduled(sparse_cols, f"sparse_cols_{K}x{Mp}x{R}_{N0}_{L}_{itype}"), 2 * R * Mp * N0)


def _flops(f, n: int):
    # TIR's flop estimate cannot bound a loop whose extent is read at run time (it answers 2e12): give
    # the densest subnet's count, which the roofline in the manifest then bounds every subnet by
    return f.with_attr("estimated_flops", n)


def _store_shapes(s: dict) -> tuple[int, int, int, str]:
    B, N0, lanes = s["idx"].shape
    return N0, B * lanes, len(s["counts"]), str(s["idx"].dtype)


@relax.expr_functor.mutator
class _Rewrite(relax.PyExprMutator):
    def __init__(self, mod, by_var: dict, subnet: relax.Var):
        super().__init__(mod)
        self.by_var = by_var      # weight Var -> (store dict, (idx, val, counts) Vars)
        self.subnet = subnet
        self.used = set()

    def _store(self, w):
        return self.by_var.get(w) if isinstance(w, relax.Var) else None

    def visit_call_(self, call):
        call = self.visit_expr_post_order(call)
        if call.op == _MATMUL:
            hit = self._store(call.args[1])
            x_shape = _static(call.args[0])
            if hit is not None and x_shape is not None and len(x_shape) == 2 and x_shape[0] <= DOT_MAX_ROWS:
                return self._dense(call, hit, x_shape)
        if call.op == _CONV:
            hit = self._store(call.args[1])
            a = call.attrs
            x_shape = _static(call.args[0])
            if (hit is not None and x_shape is not None and a.data_layout == "NCHW" and a.kernel_layout == "OIHW"
                    and int(a.groups) == 1 and all(int(s) == 1 for s in a.strides)
                    and all(int(d) == 1 for d in a.dilation) and a.out_layout == "NCHW"):
                return self._conv(call, hit, x_shape)
        return call

    def _dense(self, call, hit, x_shape):
        s, (idx, val, counts) = hit
        N0, Rp, L, itype = _store_shapes(s)
        M, K = x_shape
        R = int(s["shape"][1])
        self.used.add(call.args[1])
        bb = self.builder_
        f = dense_kernel(M, K, Rp, N0, L, itype)
        gv = bb.add_func(f, f.attrs["global_symbol"])
        y = relax.call_tir(gv, [call.args[0], self.subnet, idx, val, counts], relax.TensorType((M, Rp), "float32"))
        if Rp == R:
            return y
        return relax.op.strided_slice(bb.emit(y), [1], [0], [R])

    def _conv(self, call, hit, x_shape):
        s, (idx, val, counts) = hit
        N0, Rp, L, itype = _store_shapes(s)
        N, C, H, W = x_shape
        O, Cw, KH, KW = (int(d) for d in s["shape"])
        pad = tuple(int(p) for p in call.attrs.padding)
        if len(pad) == 2:
            pad = (pad[0], pad[1], pad[0], pad[1])
        OH, OW = H + pad[0] + pad[2] - KH + 1, W + pad[1] + pad[3] - KW + 1
        M, K = N * OH * OW, Cw * KH * KW
        Mp = _round_up(M, LANES)
        self.used.add(call.args[1])
        bb = self.builder_
        xt = bb.emit_te(im2col, call.args[0], KH, KW, pad, K, Mp, primfunc_name_hint="sparse_im2col")
        f = cols_kernel(K, Mp, O, Rp, N0, L, itype)
        gv = bb.add_func(f, f.attrs["global_symbol"])
        yt = bb.emit(relax.call_tir(gv, [xt, self.subnet, idx, val, counts], relax.TensorType((O, Mp), "float32")))
        if Mp != M:
            yt = bb.emit(relax.op.strided_slice(yt, [1], [0], [M]))
        y = bb.emit(relax.op.reshape(yt, (O, N, OH, OW)))
        return relax.op.permute_dims(y, [1, 0, 2, 3])


def sparsify(mod: tvm.IRModule, weights: list[np.ndarray], stores: dict[str, dict]):
    """(module, weights) with every conv/matmul weight named in `stores` computed by the sparse kernels:
    the weight's parameter is replaced by "<name>.idx", ".val", ".counts", and `main` takes the data input
    `subnet` (int32[1]) right after its own."""
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
    by_var, new_vars = {}, {}
    for name, s in stores.items():
        vs = tuple(relax.Var(f"{name}.{f}", relax.TensorType(s[f].shape, str(s[f].dtype))) for f in FIELDS)
        by_var[by_name[name]] = (s, vs)
        new_vars[name] = vs
    rw = _Rewrite(mod, by_var, subnet)
    body = rw.visit_expr(main)
    if rw.used != set(by_var):
        left = [v.name for v in by_var if v not in rw.used]
        raise ValueError(f"{', '.join(left)}: not used as the weight of a plain conv2d or small-batch matmul")
    keep = [i for i, p in enumerate(params[num_input:]) if p not in by_var]
    new_params = params[:num_input] + [subnet] + [params[num_input + i] for i in keep]
    new_weights = [weights[i] for i in keep]
    for name, vs in new_vars.items():
        new_params += list(vs)
        new_weights += [np.ascontiguousarray(stores[name][f]) for f in FIELDS]
    func = relax.Function(new_params, body.body, body.ret_ty, body.is_pure, body.attrs, body.span)
    func = func.with_attr("num_input", num_input + 1)
    out = rw.builder_.get()
    out["main"] = func
    out = relax.transform.DeadCodeElimination(entry_functions=["main"])(out)
    return out, new_weights


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


def apply(mod: tvm.IRModule, weights: list[np.ndarray], subnets):
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
        mod, weights = sparsify(mod, weights, stores)
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
    store_all = sum(masks.store_bytes(s) for s in stores.values())
    dense = sum(int(w.nbytes) for w in weights) - store_all
    out = []
    for k, level in enumerate(levels):
        nnz = sum(int(s["counts"][k]) * _rows(s) for s in stores.values())
        out.append({"level": k, "sparsity": level, "accuracy": accuracy[k] if k < len(accuracy) else None,
                    "nonzeros": nnz, "weight_bytes": dense + sum(masks.store_bytes(s, k) for s in stores.values())})
    return {"levels": list(levels), "store_bytes": store_all, "dense_bytes": dense, "subnets": out}


def _rows(s: dict) -> int:  # real rows, without the padding
    shape = tuple(int(d) for d in s["shape"])
    return shape[0] if len(shape) == 4 else shape[1]
