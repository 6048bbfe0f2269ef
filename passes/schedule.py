"""A default CPU schedule for fused kernels that no tuning database covers.

LegalizeOps leaves every fused kernel as plain loop nests that materialise each elementwise
intermediate at full size, run on one core and vectorise nothing. This rule inlines the
elementwise chain, moves reductions outside a vectorised innermost output axis (with a small
register tile on the next axis, and for convolutions on their output channels too, as many as half
the target's vector registers hold), parallelises the outer loops, and computes the epilogue per
tile. Any kernel the rule cannot handle keeps its unscheduled form, so correctness never
depends on it.
"""

from __future__ import annotations

import os

import tvm
from tvm import s_tir, tirx
from tvm.s_tir import dlight
from tvm.sym.pattern import detect_linear_equation

VECTOR_BYTES = {"x86_64": 32, "aarch64": 16, "arm": 16}


def _lanes(target: tvm.target.Target, dtype_bits: int = 32) -> int:
    triple = str(target.attrs.get("mtriple", "")) or "x86_64"
    arch = "aarch64" if triple.startswith("aarch64") else "arm" if triple.startswith("arm") else "x86_64"
    return max(1, VECTOR_BYTES[arch] * 8 // dtype_bits)


def _native_lanes(target: tvm.target.Target) -> tuple[int, int]:
    """(fp32 lanes of one hardware vector register, how many such registers): what a register tile fits in."""
    from tvm.target.codegen import target_has_features

    triple = str(target.attrs.get("mtriple", "")) or "x86_64"
    if triple.startswith("aarch64"):
        return 4, 32  # NEON: 32 x 128-bit
    if triple.startswith("arm"):
        return 4, 16  # 32-bit NEON: 16 q registers
    try:
        if target_has_features("avx512f", target):
            return 16, 32
    except Exception:  # a target LLVM cannot describe (no mcpu): the AVX2 baseline
        pass
    return 8, 16


def _iter_kinds(sch, block):
    return [iv.iter_type for iv in sch.get(block).iter_vars]


def _is_spatial(sch, block) -> bool:
    return all(k == tirx.IterVar.DataPar for k in _iter_kinds(sch, block))


def _spatial_size(sch, block) -> int | None:
    n = 1
    for iv in sch.get(block).iter_vars:
        if iv.iter_type == tirx.IterVar.DataPar:
            if not isinstance(iv.dom.extent, tirx.IntImm):
                return None
            n *= int(iv.dom.extent)
    return n


def _covers_only(sch, consumer, producer) -> bool:
    """Computed per tile of the producer (reverse_compute_at), the consumer gets only the iterations
    that read those tiles: all of them when each reads one element of the producer's output, not when
    some of its elements read another tensor or a constant (the producer padded along channels, or
    concatenated with something else): those would never be written."""
    size, whole = _spatial_size(sch, consumer), _spatial_size(sch, producer)
    # fewer: a slice cutting off a padded matmul's rows or columns (pack_matmul.py), written tile by tile
    # rather than from a whole padded copy in a second fork-join (SqueezeNet 1.06x faster)
    return size is not None and whole is not None and size <= whole \
        and "if_then_else" not in str(sch.get(consumer).body)


def _output_blocks(sch, blocks):
    outs = []
    for b in blocks:
        if not sch.get_consumers(b):
            outs.append(b)
    return outs


def _pads_a_reduction(sch, block) -> bool:
    """Padding inlined into a conv puts a bounds check in its innermost loop: materialise it instead."""
    return "if_then_else" in str(sch.get(block).body) and any(
        not _is_spatial(sch, c) for c in sch.get_consumers(block))


def _inline_elementwise(sch, root) -> None:
    """Inline injective producers into consumers (and consumers into spatial producers) until stable."""
    changed = True
    while changed:
        changed = False
        blocks = sch.get_child_blocks(root)
        outputs = {sch.get(b).name_hint for b in _output_blocks(sch, blocks)}
        for b in blocks:
            if sch.get(b).name_hint in outputs or not _is_spatial(sch, b):
                continue
            if _pads_a_reduction(sch, b):
                continue
            try:
                sch.compute_inline(b)
                changed = True
                break
            except Exception:  # not inlinable (e.g. read twice with different indices): keep it
                pass
        if changed:
            continue
        for b in sch.get_child_blocks(root):
            if not _is_spatial(sch, b) or not sch.get_producers(b):
                continue
            if not all(_is_spatial(sch, p) for p in sch.get_producers(b)):
                continue
            try:
                sch.reverse_compute_inline(b)
                changed = True
                break
            except Exception:
                pass


def _deinterleave_strided_reads(sch, block) -> None:
    """A strided convolution reads its input at x * s + r along the output's innermost (vector) axis, so
    every vector load is a gather. Store that input's last axis as s phases (w -> [w % s, w // s]; an
    input of the function is first copied) so the loads walk memory contiguously. Same products, same
    order: bit-identical; a stride-2 conv of ResNet ran 4-7x faster."""
    stmt = sch.get(block)
    spatial = [iv.var for iv in stmt.iter_vars if iv.iter_type == tirx.IterVar.DataPar]
    written = {w.source.name for w in stmt.writes}
    if not spatial or len({r.source.name for r in stmt.reads} - written) < 2:
        return  # a pooling window reads one tensor: a copy would cost more than its gathers
    for i, region in enumerate(stmt.reads):
        if not region.region:
            continue
        coef = detect_linear_equation(region.region[-1].min, [spatial[-1]])
        if len(coef) != 2 or not isinstance(coef[0], tirx.IntImm) or int(coef[0]) <= 1:
            continue
        s, width = int(coef[0]), region.source.shape[-1]
        if not isinstance(width, tirx.IntImm) or int(width) % s:
            continue
        if not _allocated_in(sch, region.source):
            sch.cache_read(block, i, "global")
        sch.transform_layout(block, ("read", i), lambda *ax: [*ax[:-1], ax[-1] % s, ax[-1] // s])
        # The copy (or padding) walks w as (w // s, w % s): each of its s stores then streams through one
        # phase, and LLVM turns the strided loads into wide loads + permutes. Walking w itself scattered
        # every store: a 1x1 stride-2 conv of ResNet ran 1.7x faster this way, a 3x3 one 1.2x.
        buf = sch.get(block).reads[i].source
        (copy,) = [b for b in sch.get_producers(block) if any(w.source.same_as(buf) for w in sch.get(b).writes)]
        sch.transform_block_layout(copy, tvm.tirx.IndexMap.from_func(
            lambda *ax: [*ax[:-1], ax[-1] // s, ax[-1] % s], ndim=len(sch.get(copy).iter_vars)))


def _padding_loop(sch, block, task, rows: bool):
    """Where a kernel's padding copy goes: into each core's task; for a depthwise kernel (or pool) split by
    rows, into each channel of the task, which reads only that channel."""
    # All channels of a core's rows at once were 1.4 MB for a 192-channel 56 x 56 max pool, padded and
    # then read back from beyond the L2 cache; one channel's rows (7.6 KB) stay in L1.
    loops = sch.get_loops(block)
    if not rows or DEPTHWISE not in sch.get(block).annotations:
        return task
    at = next(i for i, l in enumerate(loops) if sch.get(l).same_as(sch.get(task)))
    return loops[at + 1] if at + 1 < len(loops) else task


def _vectorize_innermost(sch, block, lanes: int) -> None:
    """Vectorise the block's innermost loop where it is whole vectors long (a padding copy moved into a task)."""
    loops = sch.get_loops(block)
    inner = _int(sch, loops[-1]) if loops else None
    if inner is not None and inner >= lanes and inner % lanes == 0:
        _, v = sch.split(loops[-1], [None, lanes])
        sch.vectorize(v)


def _allocated_in(sch, buffer) -> bool:
    root = sch.get(sch.get_sblock("root"))
    return any(b.same_as(buffer) for b in root.alloc_buffers)


# Below this many iterations (scalar multiply-adds or elements) a block runs on the calling core: a
# fork-join on TVM's thread pool costs 1.5-2 us here, about what one core does with 2^15 of them. A
# softmax over 64 values had taken 2 us as a parallel loop, 0.5 us without: the CNN ran 1.28x faster
# without its small kernels' fork-joins, the MLP 1.5x, the transformer 1.2x; 2^17 slowed MobileNetV3.
PARALLEL_WORK = 1 << 15


def _work(sch, block) -> int:
    """The block's iterations: the product of its loops' extents (a symbolic one counts as large)."""
    n = 1
    for loop in sch.get_loops(block):
        n *= _int(sch, loop) or 1 << 20
    return n


def _parallel(sch, loops, cores: int, block=None) -> None:
    """Fuse leading loops until there is enough work for every core, then run them in parallel; not
    when `block` has too little work for a fork-join to pay."""
    if block is not None and _work(sch, block) < PARALLEL_WORK:
        return
    take, extent = [], 1
    for loop in loops:
        take.append(loop)
        extent *= int(sch.get(loop).extent) if isinstance(sch.get(loop).extent, tirx.IntImm) else 1
        if extent >= 4 * cores:
            break
    if extent > 1:
        sch.parallel(sch.fuse(*take) if len(take) > 1 else take[0])


def _parallel_rows(sch, lead, mid, row, cores: int) -> bool:
    """Cut `row` into one contiguous slice per core, outside `mid` (channels): loops [*lead, slice, *mid,
    rows within the slice], the first two fused and parallel. False (nothing done) when the rows do not divide."""
    e = _int(sch, row)
    if cores < 2 or e is None or e < cores or e % cores:
        return False
    rp, rr = sch.split(row, [cores, None])
    sch.reorder(*lead, rp, *mid, rr)
    sch.parallel(sch.fuse(*lead, rp) if lead else rp)
    return True


def _schedule_spatial(sch, block, lanes: int, cores: int, rows: bool = False) -> None:
    loops = sch.get_loops(block)
    if not loops:
        return
    inner = sch.get(loops[-1]).extent
    across = None if rows else _transposed_loop(sch, block, lanes)
    vector = isinstance(inner, tirx.IntImm) and int(inner) >= lanes and int(inner) % lanes == 0
    if vector:
        sch.split(loops[-1], [None, lanes])
    if across is not None:
        # a transpose: `lanes` of the read's contiguous axis just outside the innermost (vector) loop, so the
        # lines one row of the output reads serve the next lanes - 1 rows too, from L1
        _, ki = sch.split(across, [None, lanes])
        now = sch.get_loops(block)
        at = next(i for i, l in enumerate(now) if sch.get(l).same_as(sch.get(ki)))
        sch.reorder(*now[at + 1:-1], ki)
    if vector:
        sch.vectorize(sch.get_loops(block)[-1])
        loops = sch.get_loops(block)[:-1]
    elif across is not None:
        loops = sch.get_loops(block)
    # (n, c, h, ...) beside a conv that splits its rows across cores: the same rows, in the same core's cache
    if rows and len(loops) >= 4 and _parallel_rows(sch, loops[:1], loops[1:2], loops[2], cores):
        return
    _parallel(sch, loops, cores, block)


def _transposed_loop(sch, block, lanes: int):
    """The loop over a read's contiguous (last) axis when the innermost loop strides through another axis of that
    read (a transpose, e.g. a channels-last product put back in NCHW), if whole vectors long; else None."""
    stmt = sch.get(block)
    loops = sch.get_loops(block)
    ivs = [iv.var for iv in stmt.iter_vars]
    if len(loops) != len(ivs) or len(ivs) < 2:
        return None
    ana = tvm.sym.Analyzer()
    for iv in stmt.iter_vars:  # a fused reshape leaves (h * W + w) // (H * W)-style indices to simplify
        ana.bind(iv.var, iv.dom)
    for r in stmt.reads:
        index = [ana.simplify(rg.min) for rg in r.region]
        if not index or not isinstance(index[-1], tirx.Var):
            continue
        k = next((i for i, v in enumerate(ivs[:-1]) if v.same_as(index[-1])), None)
        strided = any(ivs[-1].name in {v.name for v in _vars_in(e)} for e in index[:-1])
        e = _int(sch, loops[k]) if k is not None else None
        if strided and e is not None and e >= lanes and e % lanes == 0:
            return loops[k]
    return None


def _rows_first(sch, block, cores: int) -> bool:
    """Should this conv (NCHW: spatial n, c, h, w; a (c, kh, kw) or (kh, kw) reduction) give each core a
    slice of its rows rather than of its output channels? Split by channels, every core reads the whole
    input, half of it written by the other core (the previous kernel's output), and on this 2-vCPU VM
    reading 256 KB the other core wrote took 18-25 us against 5 us from its own cache. Split by rows,
    each core reads its own rows (plus a halo) and all the weights, which nobody writes. So rows, when
    the activations outweigh the weights. ResNet ran 1.17x faster, the PP-OCRv4 detector 1.12x."""
    if cores < 2 or _work(sch, block) < PARALLEL_WORK:
        return False
    stmt = sch.get(block)
    kinds = _iter_kinds(sch, block)
    spatial = [iv.var for iv, k in zip(stmt.iter_vars, kinds) if k == tirx.IterVar.DataPar]
    if len(spatial) != 4 or len(kinds) - 4 < 2:
        return False
    # a few rows per core would each read most of the input again as their halo (a 5x5 depthwise conv
    # over 2 output rows: both cores read 5 of the 6 padded rows; MobileNetV3 ran 1.2x slower)
    rows = stmt.iter_vars[2].dom.extent
    if not isinstance(rows, tirx.IntImm) or int(rows) < 8 * cores:
        return False
    written = {w.source.name for w in stmt.writes}
    acts = weights = 0
    for r in stmt.reads:
        if r.source.name in written or not r.region:
            continue
        used = {v.name for rg in r.region for v in _vars_in(rg.min)}
        size = 1
        for d in r.source.shape:
            if not isinstance(d, tirx.IntImm):
                return False
            size *= int(d)
        if spatial[2].name in used:
            acts += size
        elif spatial[1].name in used:
            weights += size
        else:
            return False  # not indexed as NCHW activations and (co, ...) weights
    return acts > 0 and acts >= weights


def _contiguous_in_spatial(sch, block, var) -> bool:
    """Does some read walk memory contiguously as `var` (the innermost spatial iterator) grows?"""
    stmt = sch.get(block)
    for region in stmt.reads:
        last = region.region[-1].min if region.region else None
        if last is not None and any(v.same_as(var) for v in _vars_in(last)):
            return True
    return False


def _vars_in(expr):
    return tirx.analysis.undefined_vars(expr, [])


def _int(sch, loop) -> int | None:
    e = sch.get(loop).extent
    return int(e) if isinstance(e, tirx.IntImm) else None


GEMV_ROWS_PER_CORE = 128


def _row_group(k: int) -> int:
    """How many rows of W a matrix-vector product adds into a partial-sum vector while it is in a register."""
    return next((t for t in (8, 4, 2) if k % t == 0), 1)


def _schedule_gemv(sch, block, epilogue, lanes: int, cores: int, native_lanes: int = 8) -> bool:
    """Matrix-vector product y[r, :] = x[r, :] @ W[K, N] (a few rows r): every core streams its own
    contiguous slice of W's rows, whole rows at a time, into partial sums that are added at the end.

    Read whole rows, W is one sequential stream; the usual split by output columns walks every row
    in short runs (256 columns: 1 KiB every 12 KiB) and ran 1.5x slower on 3072 x 3072, slower still
    on narrower pieces of a layer split for swapping. Up to 8 rows of W go into each partial-sum vector
    while it sits in a register (one load and store of it per 8 rows, not per row), in full-width
    vectors: VGG's 1024 x 1024 layer ran 1.8x faster."""
    loops = sch.get_loops(block)
    kinds = _iter_kinds(sch, block)
    if kinds[-1] != tirx.IterVar.CommReduce or any(k != tirx.IterVar.DataPar for k in kinds[:-1]):
        return False  # not rows..., columns, one reduction in that order
    *rows, j, k = loops
    n, K = _int(sch, j), _int(sch, k)
    if n is None or K is None:
        return False
    # Columns in vector lanes where they divide evenly; otherwise plain (LLVM may still vectorise).
    # Either way every column sums its products in the same order, so a layer split into pieces of
    # any width for swapping computes bit-identically to the whole layer.
    if n % native_lanes == 0:
        lanes = max(lanes, native_lanes)
    vec = n % lanes == 0

    def lanes_inner(loop):
        if not vec:
            return loop, []
        o, i = sch.split(loop, [None, lanes])
        return o, [i]

    # Decided by K alone (a layer cut into column pieces for swapping sums in the same order as the whole):
    # 128 rows of W per core, about 2^15 multiply-adds for 256 columns, or one core.
    parts = cores if cores > 1 and K % cores == 0 and K // cores >= GEMV_ROWS_PER_CORE else 1
    if parts > 1:
        ko, _ = sch.split(k, [parts, None])
        rf = sch.rfactor(ko, 0)
        *rrows, rj, rko, rki = sch.get_loops(rf)
        jo, ji = lanes_inner(rj)
        # the same products summed in the same order (row k before row k + 1): still bit-identical
        rki, kin = sch.split(rki, [None, _row_group(K // parts)])
        sch.reorder(rko, rki, *rrows, jo, kin, *ji)
        sch.unroll(kin)
        for v in ji:
            sch.vectorize(v)
        sch.parallel(rko)
        sch.decompose_reduction(rf, rki)
        # the write-back block adds the cores' partial rows
        *wrows, wj, wko = sch.get_loops(block)
        wjo, wji = lanes_inner(wj)
        sch.reorder(*wrows, wjo, wko, *wji)
        for v in wji:
            sch.vectorize(v)
        outer, first_reduce = wjo, wko
    else:
        jo, ji = lanes_inner(j)
        k, kin = sch.split(k, [None, _row_group(K)])
        sch.reorder(k, *rows, jo, kin, *ji)
        sch.unroll(kin)
        for v in ji:
            sch.vectorize(v)
        outer, first_reduce = None, k
    if epilogue is not None:
        if outer is not None:
            sch.reverse_compute_at(epilogue, outer)
        else:
            _schedule_spatial(sch, epilogue, lanes, 1)
    sch.decompose_reduction(block, first_reduce)
    return True


# Row tiles for a conv whose rows are not a multiple of 4. Untiled, the PP-OCRv4 recognizer's 480-channel
# 1x1 convs over 6 x 80 and 3 x 80 pixels ran at 14 GMAC/s, a quarter of its other convs' rate.
SHORT_ROW_TILES = (3, 2)


DEPTHWISE = "edgetvm.depthwise"  # conv_im2col's depthwise kernel: rows only in its register tile, padded per task

# Row counts of a matmul's register tile, where the registers allow: rows that none divides are padded
# (pack_matmul.py). 7 and 5 too: a conv's 7 x 7 or 55 x 55 pixels as matmul rows then need no padding.
MATMUL_ROW_TILES = (8, 7, 6, 5, 4)


def matmul_row_tiles(target: tvm.target.Target) -> tuple[int, ...]:
    """The row tiles a matmul two vectors wide gets on the target (half its vector registers accumulate)."""
    native, registers = _native_lanes(target)
    most = registers // 2 // max(1, 2 * max(_lanes(target), native) // native)
    return tuple(r for r in MATMUL_ROW_TILES if r <= most)


def matmul_columns(target: tvm.target.Target) -> int:
    """The columns a matmul's widest register tile spans on the target: two of its vector registers."""
    return 2 * _native_lanes(target)[0]


def _channel_tile(sch, block, loop, var, accumulators: int, budget: int) -> int:
    """How many steps of `loop` (the axis before the row tile: a conv's output channels) to add to the
    register tile, up to `budget` accumulators. Worth it only when some read does not depend on it (a
    conv's input): each input vector loaded then feeds that many more accumulators. The rows x columns
    tile alone kept 4 zmm accumulators on AVX-512, too few FMAs in flight to cover their latency: a
    16-channel 3x3 conv of ResNet (64x64) took 364 us on one core, 178 us with 4 channels x 4 rows."""
    e = _int(sch, loop)
    if e is None or accumulators >= budget:
        return 1
    stmt = sch.get(block)
    written = {w.source.name for w in stmt.writes}
    shared = [r for r in stmt.reads if r.source.name not in written and r.region
              and not any(v.same_as(var) for rg in r.region for v in _vars_in(rg.min))]
    if not shared:
        return 1  # every read moves with the channel (depthwise, grouped): nothing to share
    t = 1
    while accumulators * t * 2 <= budget and e % (t * 2) == 0:
        t *= 2
    return t


def _schedule_reduction(sch, block, epilogue, lanes: int, cores: int, native=(8, 16),
                        rows_first: bool = False) -> bool:
    stmt = sch.get(block)
    loops = sch.get_loops(block)
    kinds = _iter_kinds(sch, block)
    if len(loops) != len(kinds):
        return False
    spatial = [l for l, k in zip(loops, kinds) if k == tirx.IterVar.DataPar]
    reduce = [l for l, k in zip(loops, kinds) if k == tirx.IterVar.CommReduce]
    if not spatial or not reduce or len(spatial) + len(reduce) != len(loops):
        return False
    last_var = [iv.var for iv, k in zip(stmt.iter_vars, kinds) if k == tirx.IterVar.DataPar][-1]
    extent = sch.get(spatial[-1]).extent
    if not isinstance(extent, tirx.IntImm) or int(extent) < lanes or not _contiguous_in_spatial(sch, block, last_var):
        # A reduction along the contiguous axis (softmax, norms, pooling windows): parallel rows only.
        _parallel(sch, spatial, cores, block)
        return True
    rows = 1
    for l in spatial[:-1]:
        e = sch.get(l).extent
        rows *= int(e) if isinstance(e, tirx.IntImm) else 1 << 20
    if rows <= 4 and len(reduce) == 1 and _schedule_gemv(sch, block, epilogue, lanes, cores, native[0]):
        return True
    native_lanes, registers = native
    steps = 1
    for r in reduce:
        steps *= _int(sch, r) or 1 << 20
    # a convolution's (channels, kh, kw) reduction, long enough to amortise a bigger tile's zeroing
    # and write-back (the 27 steps of a 3-channel stem conv ran 1.16x slower with one)
    conv = len(spatial) >= 3 and len(reduce) >= 2 and steps >= 32
    vec_factor = lanes * 2 if int(extent) % (lanes * 2) == 0 else lanes
    e2 = (_int(sch, spatial[-2]) or 0) if len(spatial) >= 2 else 0
    row_tiles = (4,)
    if len(spatial) >= 2 and len(reduce) == 1:  # a matmul
        # Rows x vectors is all a matmul's register tile has (a conv's adds channels): 4 rows of one zmm kept
        # 4 FMAs in flight on AVX-512, half of what two FMA units of 4 cycles' latency take. Half the
        # registers as accumulators, 2 vectors wide: the transformer's matmuls ran 1.7-1.8x faster.
        if int(extent) % (native_lanes * 2) == 0:
            vec_factor = max(vec_factor, native_lanes * 2)
        most = registers // 2 // max(1, vec_factor // native_lanes)
        row_tiles = tuple(sorted({r for r in (most, *MATMUL_ROW_TILES) if 4 <= r <= most}, reverse=True))
    so, si = sch.split(spatial[-1], [None, vec_factor])
    strips = []
    if vec_factor > max(lanes * 2, native_lanes):
        # one vector per step of the unrolled loop: 32 columns span two packed strips (pack_matmul.py), K * 64
        # bytes apart, which a single 32-wide vector loop would gather
        sv, si = sch.split(si, [None, native_lanes])
        strips = [sv]
    tile = []
    outer = spatial[:-1]
    if len(spatial) >= 2:
        # a conv's row counts that are not a multiple of 4 by SHORT_ROW_TILES, or one, with more channels
        rows = next((r for r in row_tiles if e2 >= r and e2 % r == 0), 0) or \
            next((r for r in SHORT_ROW_TILES if conv and e2 % r == 0), 1)
        if DEPTHWISE in stmt.annotations:
            # every read moves with the channel, so no channel tile: as many rows as registers allow, each
            # its own chain of the kernel's taps (one chain waits on each FMA's latency)
            per_row = max(1, vec_factor // native_lanes)
            rows = next((r for r in (8, 7, 6, 5, 4, 3, 2) if e2 % r == 0 and r * per_row <= registers // 2), 1)
        row_loop = spatial[-2]
        if rows > 1:
            row_loop, ri = sch.split(spatial[-2], [None, rows])
            tile = [ri]
            outer = spatial[:-2] + [row_loop]
        if conv:
            var3 = [iv.var for iv, k in zip(stmt.iter_vars, kinds) if k == tirx.IterVar.DataPar][-3]
            # half the registers for accumulators, the rest for the operands and addresses
            t = _channel_tile(sch, block, spatial[-3], var3, rows * max(1, vec_factor // native_lanes),
                              registers // 2)
            if t > 1:
                co, ci = sch.split(spatial[-3], [None, t])
                tile = [ci, *tile]
                outer = spatial[:-3] + [co, row_loop]
    else:
        outer = []
    sch.reorder(*outer, so, *reduce, *tile, *strips, si)
    # outer is [n, (channels), rows]
    split_rows = rows_first and len(outer) >= 2 and \
        _parallel_rows(sch, spatial[:-3], outer[len(spatial) - 3:-1], outer[-1], cores)
    if epilogue is not None:
        sch.reverse_compute_at(epilogue, so)
    # Loop kinds first: after decompose_reduction the update block no longer counts as a reduction.
    sch.vectorize(si)
    for t in tile + strips:
        sch.unroll(t)
    # A batch-1 matmul has no outer loop: then the vector chunks are the parallel work.
    if not split_rows:
        _parallel(sch, outer + [so], cores, block)
    sch.decompose_reduction(block, reduce[0])
    if epilogue is not None:
        eloops = sch.get_loops(epilogue)
        depth = len(sch.get_loops(block)) - len(reduce) - len(tile) - len(strips) - 1  # loops shared with `so`
        mine = eloops[depth:] if depth >= 0 else []
        if mine:
            inner = sch.get(mine[-1]).extent
            if isinstance(inner, tirx.IntImm) and int(inner) % lanes == 0:
                _, v = sch.split(mine[-1], [None, lanes])
                sch.vectorize(v)
            elif isinstance(inner, tirx.IntImm) and DEPTHWISE in stmt.annotations and int(inner) <= 2 * native[0]:
                # the row cut off a wider one (rows of 14 or 7 from 16): one short vector, not scalars
                sch.vectorize(mine[-1])
    return True


class CPUDefault(dlight.ScheduleRule):
    """Schedule any fused CPU kernel: inline, tile + vectorise the main reduction, parallelise."""

    def apply(self, func, target, _tunable):
        if not isinstance(func, tirx.PrimFunc) or not any(k in target.keys for k in ("cpu", "arm_cpu")):
            return None
        cores = int(target.attrs.get("num-cores", 1))
        lanes = _lanes(target)
        try:
            sch = s_tir.Schedule(func)
            root = sch.get_sblock("root")
            _inline_elementwise(sch, root)
            reductions = [b for b in sch.get_child_blocks(root) if not _is_spatial(sch, b)]
            if len(reductions) == 1:
                _deinterleave_strided_reads(sch, reductions[0])
            blocks = sch.get_child_blocks(root)
            reductions = [b for b in blocks if not _is_spatial(sch, b)]
            if len(reductions) == 1:
                (red,) = reductions
                consumers = sch.get_consumers(red)
                epilogue = consumers[0] if len(consumers) == 1 and _is_spatial(sch, consumers[0]) \
                    and len(sch.get_consumers(consumers[0])) == 0 and _covers_only(sch, consumers[0], red) else None
                skip = [sch.get(red)] + ([sch.get(epilogue)] if epilogue is not None else [])
                rows = _rows_first(sch, red, cores)
                # A conv split by rows pads each core's rows (and halo) inside its own task: one fork-join,
                # not two, and the padded rows stay in the cache of the core that reads them. ResNet's
                # 32-channel 3x3 convs ran 1.3x faster, the model 1.17x, PP-OCRv4's detector 1.13x.
                own = [b for b in blocks if (rows or DEPTHWISE in sch.get(red).annotations)
                       and not any(sch.get(b).same_as(k) for k in skip) and _pads_a_reduction(sch, b)]
                for b in blocks:
                    if not any(sch.get(b).same_as(k) for k in skip + [sch.get(o) for o in own]):
                        _schedule_spatial(sch, b, lanes, cores, rows)
                if not _schedule_reduction(sch, red, epilogue, lanes, cores, _native_lanes(target), rows):
                    return None
                tasks = [l for l in sch.get_loops(red) if sch.get(l).kind == tirx.ForKind.PARALLEL]
                for b in own:
                    if tasks:
                        sch.compute_at(b, _padding_loop(sch, red, tasks[0], rows))
                        _vectorize_innermost(sch, b, lanes)
                    else:
                        _schedule_spatial(sch, b, lanes, cores, rows)
                return sch
            if not reductions:
                for b in blocks:
                    _schedule_spatial(sch, b, lanes, cores)
                return sch
            for b in blocks:  # several reductions (softmax, layer norm): rows in parallel
                loops = sch.get_loops(b)
                kinds = _iter_kinds(sch, b)
                lead = []
                for l, k in zip(loops, kinds):
                    if k != tirx.IterVar.DataPar:
                        break
                    lead.append(l)
                if lead and len(loops) == len(kinds):
                    _parallel(sch, lead, cores, b)
            return sch
        except Exception:  # an unusual kernel: keep the unscheduled, correct form
            if os.environ.get("EDGETVM_SCHEDULE_DEBUG"):
                raise
            return None


def default_schedule() -> tvm.transform.Pass:
    """Give every PrimFunc not already scheduled (by a tuning database) the CPU default schedule."""
    return dlight.ApplyDefaultSchedule(CPUDefault())
