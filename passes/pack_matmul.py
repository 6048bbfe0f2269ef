"""Matmuls on a weight read it packed in column strips: W [K, N] -> [N / 16, K, 16], prepared at compile time.

The default schedule (schedule.py) computes a register tile of 4 rows x 16 columns, walking the
reduction: on W [K, N] that walk reads 64 bytes per row of W, N * 4 bytes apart, so each tile
streams K cache lines from as many pages, and every row tile re-reads W that way. Packed, the
strip a tile needs is one contiguous run of K * 64 bytes. The reshape + transpose that packs it
uses weights only, so LiftTransformParams moves it into the function that runs once at compile
time (as it does with a Gemm's transpose); the board only ever sees the packed weight.

Same products summed in the same order: bit-identical to the plain matmul. Left alone: a matmul
with at most 4 rows (the schedule's matrix-vector path reads W's rows whole, already one stream),
a weight that is not 2-D, non-float32, dynamic shapes. Columns that are not a multiple of 16 pad the
last strip with zeros (the padded columns are computed, then sliced off: no predicate in the vector loop);
so do rows that are not a multiple of 4 or 6, to a multiple of 8 (the schedule's row tiles).
"""

from __future__ import annotations

import tvm
from tvm import relax, te

ROW_TILE = 8  # rows of the default schedule's matmul register tile
MANY_STRIPS = 11  # from this many strips on, pad an odd count to an even one where the tile is two strips wide
STRIP = 16  # columns per strip: the default schedule's vector tile on x86 (2 x 8 lanes) and aarch64 (4 x 4)
_MATMUL = tvm.ir.Op.get("relax.matmul")


def _matmul_packed(x, wp, extra: int = 0):
    """x (..., M, K) by wp (N / 16, K, 16), or x (G, M, K) by each group's own wp (G, N / 16, K, 16); with
    `extra` rows more than x has, which read x's last row (no padded copy of x: their results are cut off)."""
    *_, strips, k, width = wp.shape
    m = x.shape[-2]
    r = te.reduce_axis((0, k), name="k")

    def f(*i):
        row = tvm.tirx.min(i[-2], m - 1) if extra else i[-2]
        group = i[:1] if len(wp.shape) == 4 else ()
        return te.sum(x[(*i[:-2], row, r)] * wp[(*group, i[-1] // width, r, i[-1] % width)], axis=r)

    return te.compute((*x.shape[:-2], m + extra, strips * width), f, name="matmul_packed")


def _static(shape) -> list[int] | None:
    try:
        return [int(s) for s in shape]
    except (TypeError, ValueError):
        return None


def _weight_vars(main: relax.Function) -> set:
    """main's weight parameters (after its `num_input` inputs) and every binding computed from them alone."""
    weights = set(main.params[int(main.attrs["num_input"]):])
    for block in main.body.blocks:
        for b in block.bindings:
            free = relax.analysis.free_vars(b.value)
            if isinstance(b, relax.VarBinding) and free and all(v in weights for v in free):
                weights.add(b.var)
    return weights


@relax.expr_functor.mutator
class _Pack(relax.PyExprMutator):
    def __init__(self, mod, weights, row_tiles, columns):
        super().__init__(mod)
        self.weights = weights
        self.row_tiles = row_tiles
        self.columns = columns

    def visit_call_(self, orig):
        call = super().visit_call_(orig)
        if not (call.op.same_as(_MATMUL) and isinstance(orig.args[1], relax.Var) and orig.args[1] in self.weights):
            return call
        x, w = call.args
        xs, ws = _static(x.ty.shape), _static(w.ty.shape)
        # a 3-D weight: one per group of x's rows (a grouped conv's, conv_im2col.py)
        grouped = ws is not None and xs is not None and len(ws) == 3 and len(xs) == 3 and xs[0] == ws[0]
        if xs is None or ws is None or (len(ws) != 2 and not grouped) or len(xs) < 2 or x.ty.dtype != "float32" \
                or w.ty.dtype != "float32" or _rows(xs) <= 4:
            return call
        k, n = ws[-2:]
        lead = [0, 0] * (len(ws) - 2)
        # An odd number of strips gets a tile one vector wide where the target's is two (AVX-512: 16 rows x
        # 1 zmm, one load per FMA, against 8 x 2). Padded to an even count, 11-63 strips ran 1.10-1.23x
        # faster (169 x 512 x 1000 1.02-1.19x); 5 and 9 strips gained -17% to +10%, the padded work a tenth
        # or more of the whole.
        pad_to = self.columns if self.columns > STRIP and -(-n // STRIP) >= MANY_STRIPS else STRIP
        if n % pad_to:  # the last strip(s) padded with zero columns, computed whole (no predicate) then cut off
            w = self.builder_.emit(relax.op.nn.pad(w, lead + [0, 0, 0, pad_to - n % pad_to]))
        strips = -(-n // pad_to) * (pad_to // STRIP)
        if grouped:
            packed = self.builder_.emit(relax.op.permute_dims(relax.op.reshape(w, (ws[0], k, strips, STRIP)),
                                                              [0, 2, 1, 3]))
        else:
            packed = self.builder_.emit(relax.op.permute_dims(relax.op.reshape(w, (k, strips, STRIP)), [1, 0, 2]))
        m = xs[-2]
        # Rows that no register tile divides (a conv's 13 x 13 pixels as im2col rows) would be computed one
        # at a time, one vector of accumulators: computed as rows up to a multiple of 8, the extra ones
        # reading x's last row, then cut off. SqueezeNet's last conv (169 x 512 x 1000) ran 4.4x faster,
        # the network 1.7x, with x padded by a copy; 1.09x faster again without the copy.
        extra = (-m) % ROW_TILE if m > ROW_TILE and all(m % r for r in self.row_tiles) else 0
        y = self.builder_.call_te(_matmul_packed, x, packed, extra, primfunc_name_hint="matmul_packed")
        if n % pad_to or extra:
            y = relax.op.strided_slice(self.builder_.emit(y), [len(xs) - 2, len(xs) - 1], [0, 0], [m, n])
        return y


def _rows(shape: list[int]) -> int:
    n = 1
    for s in shape[:-1]:
        n *= s
    return n


def pack_weight_matmuls(row_tiles: tuple[int, ...] = (8, 6, 4), columns: int = STRIP) -> tvm.transform.Pass:
    """Rewrite matmul(x, W) on a weight W [K, N] (or one per group, [G, K, N]) as a matmul over W packed
    [N / 16, K, 16], for a schedule whose register tiles take `row_tiles` rows and `columns` columns
    (schedule.matmul_row_tiles, schedule.matmul_columns)."""

    @tvm.transform.module_pass(opt_level=0, name="PackWeightMatmuls")
    def _pass(mod: tvm.IRModule, _ctx=None) -> tvm.IRModule:
        if "main" not in [gv.name_hint for gv in mod.functions] or "num_input" not in (mod["main"].attrs or {}):
            return mod
        main = mod["main"]
        mutator = _Pack(mod, _weight_vars(main), row_tiles, columns)
        new_main = mutator.visit_expr(main)
        out = mutator.builder_.get()
        out[mod.get_global_var("main")] = new_main
        return out

    return _pass
