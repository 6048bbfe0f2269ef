"""The default CPU schedule covers every kernel of the zoo models; a fallback to loop nests would be silent otherwise."""

import pytest
import tvm

from edgetvm import zoo
from edgetvm.passes import onnx_import, pipeline
from edgetvm.passes.onnx_fold import fold_shapes
from edgetvm.targets import load_board


def fused_kernels(name, board):
    model = zoo.load(name)
    shapes = zoo.default_input_shapes(name)
    inputs = onnx_import.resolve_inputs(model, shapes)
    mod, _ = onnx_import.import_onnx(fold_shapes(model, shapes), inputs)
    _, deploy = pipeline.lift_weight_transforms(mod)
    fused = pipeline.fuse(deploy, load_board(board).target())
    return {gv.name_hint: f for gv, f in fused.functions.items() if isinstance(f, tvm.tirx.PrimFunc)}


@pytest.mark.parametrize("name", ["ocr_cls", "mlp", "cnn", "resnet", "transformer", "vgg"])
@pytest.mark.parametrize("board", ["host", "rpi4"])
def test_every_kernel_is_scheduled(name, board):
    kernels = fused_kernels(name, board)
    unscheduled = [k for k, f in kernels.items() if not (f.attrs and f.attrs.get("tirx.is_scheduled"))]
    assert kernels and not unscheduled


def test_conv_epilogue_is_not_materialised():
    """Batch norm + relu run per output tile: only the padded input and the conv accumulator stay buffers."""
    kernels = fused_kernels("cnn", "host")
    conv = next(f for k, f in kernels.items() if k.startswith("fused_conv2d"))
    text = conv.script()
    assert "T_subtract" not in text and "T_divide" not in text and "T_multiply" not in text
    assert "T.parallel" in text and "T.vectorized" in text


@pytest.mark.parametrize("rows, N", [(1, 96), (3, 96), (1, 90), (1, 16)])
def test_matrix_vector_product_streams_whole_weight_rows(rows, N):
    """A few rows times W[K, N] (N a multiple of the vector width or not): each core sums its own
    contiguous slice of W's rows, and the result is exact. The split depends on K alone, however few
    the columns (16: a piece of a layer cut for swapping sums in the same order as the whole)."""
    import numpy as np
    from tvm import relax

    K = 512
    x = relax.Var("x", relax.TensorType([rows, K], "float32"))
    w = relax.Var("w", relax.TensorType([K, N], "float32"))
    b = relax.Var("b", relax.TensorType([N], "float32"))
    bb = relax.BlockBuilder()
    with bb.function("main", [x, w, b]):
        with bb.dataflow():
            y = bb.emit_output(bb.emit(relax.op.nn.relu(relax.op.add(relax.op.matmul(x, w), b))))
        bb.emit_func_output(y)
    target = tvm.target.Target({"kind": "llvm", "num-cores": 2})
    fused = pipeline.fuse(bb.get(), target)
    (kernel,) = [f for f in fused.functions.values() if isinstance(f, tvm.tirx.PrimFunc)]
    text = kernel.script()
    assert "_rf" in text and "T.parallel(T.int64(2))" in text  # partial sums, one per core
    rng = np.random.default_rng(0)
    args = [rng.standard_normal(s).astype("float32") for s in ((rows, K), (K, N), (N,))]
    vm = relax.VirtualMachine(pipeline.finish(fused, target), tvm.cpu())
    got = vm["main"](*[tvm.runtime.tensor(a) for a in args]).numpy()
    np.testing.assert_allclose(got, np.maximum(args[0] @ args[1] + args[2], 0), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("target, K, group, width", [
    ({"kind": "llvm", "mcpu": "znver4"}, 256, 8, 16),     # AVX-512: zmm partial sums, 8 rows of W each
    ({"kind": "llvm", "mcpu": "haswell"}, 256, 8, 8),     # AVX2: ymm
    ({"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"]}, 256, 8, 4),
    ({"kind": "llvm", "mcpu": "znver4"}, 264, 4, 16),     # 132 rows per core: 4 at a time
])
def test_a_matrix_vector_product_adds_several_weight_rows_per_partial_sum_in_a_register(target, K, group, width):
    """Each partial-sum vector takes `group` rows of W (unrolled, in order) between its load and its
    store, in the target's full vector width."""
    from tvm import relax, s_tir

    x = relax.Var("x", relax.TensorType([1, K], "float32"))
    w = relax.Var("w", relax.TensorType([K, 1024], "float32"))
    bb = relax.BlockBuilder()
    with bb.function("main", [x, w]):
        with bb.dataflow():
            y = bb.emit_output(bb.emit(relax.op.matmul(x, w)))
        bb.emit_func_output(y)
    fused = pipeline.fuse(bb.get(), tvm.target.Target({**target, "num-cores": 2}))
    (kernel,) = [f for f in fused.functions.values() if isinstance(f, tvm.tirx.PrimFunc)]
    sch = s_tir.Schedule(kernel)
    (rf,) = [b for b in sch.get_child_blocks(sch.get_sblock("root")) if "_rf" in sch.get(b).name_hint
             and not sch.get(b).name_hint.endswith("_init")]  # the cores' partial sums
    *_, rows, lanes = [sch.get(loop) for loop in sch.get_loops(rf)]
    assert (rows.kind, int(rows.extent)) == (tvm.tirx.ForKind.UNROLLED, group)
    assert (lanes.kind, int(lanes.extent)) == (tvm.tirx.ForKind.VECTORIZED, width)


@pytest.mark.parametrize("rows, parallel", [(1, False), (4, False), (64, True)])
def test_a_kernel_too_small_for_a_fork_join_runs_on_the_calling_core(rows, parallel):
    """A softmax over 64 values took 2 us as a parallel loop and 0.5 us without: kernels below 2^15
    iterations get no parallel loop; bigger ones still spread over the cores."""
    from tvm import relax

    x = relax.Var("x", relax.TensorType([rows, 1024], "float32"))
    bb = relax.BlockBuilder()
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit_output(bb.emit(relax.op.nn.softmax(x)))
        bb.emit_func_output(y)
    fused = pipeline.fuse(bb.get(), tvm.target.Target({"kind": "llvm", "num-cores": 2}))
    (kernel,) = [f for f in fused.functions.values() if isinstance(f, tvm.tirx.PrimFunc)]
    assert ("T.parallel" in kernel.script()) == parallel


def test_a_pool_padded_along_channels_then_added_writes_every_channel():
    """max_pool -> pad the channels 64 -> 128 -> add (a residual of mediapipe's TFLite models): the add
    is not computed per tile of the pool, whose tiles cover only the first 64 channels."""
    import numpy as np
    from tvm import relax

    x = relax.Var("x", relax.TensorType([1, 32, 32, 64], "float32"))
    r = relax.Var("r", relax.TensorType([1, 16, 16, 128], "float32"))
    bb = relax.BlockBuilder()
    with bb.function("main", [x, r]):
        with bb.dataflow():
            pooled = bb.emit(relax.op.nn.max_pool2d(x, pool_size=2, strides=2, layout="NHWC"))
            padded = bb.emit(relax.op.nn.pad(pooled, [0, 0, 0, 0, 0, 0, 0, 64]))
            y = bb.emit_output(bb.emit(relax.op.add(padded, r)))
        bb.emit_func_output(y)
    target = tvm.target.Target({"kind": "llvm", "num-cores": 2})
    ex = pipeline.build(bb.get(), target)
    rng = np.random.default_rng(0)
    xs, rs = rng.standard_normal((1, 32, 32, 64), "float32"), rng.standard_normal((1, 16, 16, 128), "float32")
    got = relax.VirtualMachine(ex, tvm.cpu())["main"](tvm.runtime.tensor(xs), tvm.runtime.tensor(rs)).numpy()
    want = np.pad(xs.reshape(1, 16, 2, 16, 2, 64).max(axis=(2, 4)), [(0, 0)] * 3 + [(0, 64)]) + rs
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("op, size, stride, pad, width, count_pad, kernel", [
    ("max", 3, 2, (0, 0, 1, 1), 56, False, "pool"),      # Inception v2's pools: stride 2 into rows of 28
    ("max", 3, 1, (1, 1, 1, 1), 7, False, "pool"),
    ("max", 3, 2, (0, 0, 0, 0), 111, False, "pool"),     # SqueezeNet's, unpadded, into rows of 55
    ("avg", 3, 1, (1, 1, 1, 1), 14, False, "pool"),      # the border windows divide by their own taps
    ("avg", 3, 1, (1, 1, 1, 1), 14, True, "pool"),
    ("avg", 3, 2, (1, 1, 1, 1), 13, False, "pool"),
    ("avg", 2, 2, (0, 0, 0, 0), 28, False, "pool2d"),    # windows tiling the input: read in place
    ("max", 2, 2, (0, 0, 0, 0), 64, False, "pool2d"),    # rows of 32: whole vectors already
    ("avg", 7, 1, (0, 0, 0, 0), 7, False, "pool2d"),     # one output per row: most of a wide row wasted
])
def test_a_pool_into_rows_of_part_vectors_computes_whole_vectors_and_what_tvm_computes(
        op, size, stride, pad, width, count_pad, kernel):
    """A pool whose output rows are not whole vectors (AVX-512: 16 floats) is computed over rows padded to
    whole vectors, several rows at once, the input padded per channel inside each core's task and stored
    as stride phases (no gathers): 1.3-4.4x faster single pools, Inception v2 1.035x. Same values as TVM's
    own pool, border windows of an average included."""
    import numpy as np
    from tvm import relax

    x = relax.Var("x", relax.TensorType([1, 24, width, width], "float32"))
    bb = relax.BlockBuilder()
    with bb.function("main", [x], attrs={"num_input": 1}):
        with bb.dataflow():
            if op == "max":
                y = relax.op.nn.max_pool2d(x, size, stride, pad)
            else:
                y = relax.op.nn.avg_pool2d(x, size, stride, pad, count_include_pad=count_pad)
            y = bb.emit_output(bb.emit(y))
        bb.emit_func_output(y)
    board = tvm.target.Target({**AVX512, "num-cores": 2})
    _, deploy = pipeline.lift_weight_transforms(bb.get(), target=board, channels_last=False)
    fused = pipeline.fuse(deploy, board)
    names = [gv.name_hint for gv, f in fused.functions.items() if isinstance(f, tvm.tirx.PrimFunc)]
    assert [n for n in names if "pool" in n] == [kernel] if kernel == "pool" else all(kernel in n for n in names)
    target = tvm.target.Target({"kind": "llvm", "num-cores": 2})  # the rewrite's result, on any x86 machine
    xs = np.random.default_rng(0).standard_normal((1, 24, width, width), "float32")
    got = relax.VirtualMachine(pipeline.finish(pipeline.fuse(deploy, target), target), tvm.cpu())["main"](
        tvm.runtime.tensor(xs)).numpy()
    want = relax.VirtualMachine(tvm.compile(bb.get(), target=target), tvm.cpu())["main"](
        tvm.runtime.tensor(xs)).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("width", [28, 56])
def test_a_transpose_back_to_nchw_walks_a_tile_of_channels_per_output_row(width):
    """A channels-last product put back in NCHW (+ bias, relu) reads its input `channels` floats apart along each
    output row: a tile of 8 channels is walked inside each row, so the lines one row reads serve the next 7
    rows from L1 (Inception v2's transposes 2.03 -> 1.35 ms; DenseNet-121 1.035x). Same values."""
    import numpy as np
    from tvm import relax

    x = relax.Var("x", relax.TensorType([1, width, width, 96], "float32"))
    b = relax.Var("b", relax.TensorType([1, 96, 1, 1], "float32"))
    bb = relax.BlockBuilder()
    with bb.function("main", [x, b]):
        with bb.dataflow():
            y = relax.op.nn.relu(relax.op.add(relax.op.permute_dims(x, [0, 3, 1, 2]), b))
            y = bb.emit_output(bb.emit(y))
        bb.emit_func_output(y)
    target = tvm.target.Target({"kind": "llvm", "num-cores": 2})
    fused = pipeline.fuse(bb.get(), target)
    (kernel,) = [f for f in fused.functions.values() if isinstance(f, tvm.tirx.PrimFunc)]
    import re

    nest = []  # (loop variable, extent), outermost first
    for names, extents in re.findall(r"for (.+?) in T\.\w+\((.+?)\):", kernel.script()):
        nest += zip([n.strip() for n in names.split(",")], re.findall(r"T\.int64\((\d+)\)", extents))
    assert nest[-2] == ("i1_1", "8"), nest  # 8 channels (i1) just outside the innermost loop along the row
    rng = np.random.default_rng(0)
    xs, bs = rng.standard_normal((1, width, width, 96), "float32"), rng.standard_normal((1, 96, 1, 1), "float32")
    got = relax.VirtualMachine(pipeline.finish(fused, target), tvm.cpu())["main"](
        tvm.runtime.tensor(xs), tvm.runtime.tensor(bs)).numpy()
    np.testing.assert_array_equal(got, np.maximum(xs.transpose(0, 3, 1, 2) + bs, 0))


@pytest.mark.parametrize("kernel, pad", [(3, 1), (1, 0)])
def test_a_strided_conv_reads_its_input_as_phases_and_computes_the_same(kernel, pad):
    """Stride 2 along the vector axis would make every load a gather: the input (the padded copy, or a
    copy of the function's input for a 1x1 conv) is stored as [.., w % 2, w // 2]; the sums are the
    same products in the same order as the unscheduled kernel, so the outputs are bit-identical."""
    import numpy as np
    from tvm import relax

    x = relax.Var("x", relax.TensorType([1, 16, 32, 32], "float32"))
    w = relax.Var("w", relax.TensorType([32, 16, kernel, kernel], "float32"))
    bb = relax.BlockBuilder()
    with bb.function("main", [x, w]):
        with bb.dataflow():
            y = bb.emit_output(bb.emit(relax.op.nn.relu(relax.op.nn.conv2d(x, w, strides=2, padding=pad))))
        bb.emit_func_output(y)
    target = tvm.target.Target({"kind": "llvm", "num-cores": 2})
    fused = pipeline.fuse(bb.get(), target)
    (conv,) = [f for f in fused.functions.values() if isinstance(f, tvm.tirx.PrimFunc)]
    text = conv.script()
    assert "% T.int64(2), " in text and "// T.int64(2)]" in text and "T.vectorized" in text
    # the copy into phases walks them in order: its innermost loop is the phase, the one outside it w // 2
    sch = tvm.s_tir.Schedule(conv)
    (copy,) = [b for b in sch.get_child_blocks(sch.get_sblock("root"))
               if any(len(w.source.shape) == 5 for w in sch.get(b).writes) and sch.get(b).name_hint != "root"]
    *_, half, phase = [sch.get(loop) for loop in sch.get_loops(copy)]
    assert (int(half.extent), int(phase.extent)) == (16 + pad, 2)
    rng = np.random.default_rng(0)
    args = [rng.standard_normal((1, 16, 32, 32), "float32"), rng.standard_normal((32, 16, kernel, kernel), "float32")]
    run = lambda ex: relax.VirtualMachine(ex, tvm.cpu())["main"](*[tvm.runtime.tensor(a) for a in args]).numpy()
    plain = tvm.compile(bb.get(), target=target)  # TVM's own pipeline, no edgetvm schedule
    np.testing.assert_array_equal(run(pipeline.finish(fused, target)), run(plain))


def test_gelu_uses_the_vectorisable_erf_within_1e6_of_libm():
    """ONNX's GELU (x/sqrt2 -> Erf) legalizes as TOPI's fast_erf: no per-element libm erff call is left."""
    import math

    import numpy as np
    from tvm import relax

    kernels = fused_kernels("transformer", "host")
    assert any("fast_erf" in k for k in kernels) and not any("T.erf(" in f.script() for f in kernels.values())
    x = relax.Var("x", relax.TensorType([4096], "float32"))
    bb = relax.BlockBuilder()
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit_output(bb.emit(relax.op.erf(x)))
        bb.emit_func_output(y)
    target = tvm.target.Target({"kind": "llvm", "num-cores": 2})
    xs = np.linspace(-5, 5, 4096, dtype="float32")
    got = relax.VirtualMachine(pipeline.build(bb.get(), target), tvm.cpu())["main"](tvm.runtime.tensor(xs)).numpy()
    np.testing.assert_allclose(got, [math.erf(v) for v in xs], rtol=0, atol=1e-6)


@pytest.mark.parametrize("rows, n, packed", [(64, 64, (4, 96, 16)), (40, 90, (6, 96, 16)), (4, 64, None),
                                             (169, 90, (6, 96, 16))])
def test_a_weight_matmul_reads_its_weight_packed_at_compile_time(rows, n, packed):
    """matmul(x, W) on a weight: W [K, N] becomes [N/16, K, 16] (the last strip padded with zeros) in the
    function that runs once at compile time, and `main` computes bit-identically to the plain matmul (169
    rows padded to 176 for the register tile, then cut off); up to 4 rows keep W as it is (the
    matrix-vector path streams its rows)."""
    import numpy as np
    from tvm import relax

    x = relax.Var("x", relax.TensorType([rows, 96], "float32"))
    w = relax.Var("w", relax.TensorType([96, n], "float32"))
    bb = relax.BlockBuilder()
    with bb.function("main", [x, w], attrs={"num_input": 1}):
        with bb.dataflow():
            y = bb.emit_output(bb.emit(relax.op.nn.relu(relax.op.matmul(x, w))))
        bb.emit_func_output(y)
    mod = bb.get()
    transform, deploy = pipeline.lift_weight_transforms(mod)
    rng = np.random.default_rng(0)
    xs, ws = rng.standard_normal((rows, 96), "float32"), rng.standard_normal((96, n), "float32")
    (wt,) = pipeline.transform_weights(transform, [ws])
    assert wt.shape == (packed or (96, n))
    target = tvm.target.Target({"kind": "llvm", "num-cores": 2})
    got = relax.VirtualMachine(pipeline.build(deploy, target), tvm.cpu())["main"](
        tvm.runtime.tensor(xs), tvm.runtime.tensor(wt)).numpy()
    _, plain = pipeline.lift_weight_transforms(mod, pack_matmuls=False)
    want = relax.VirtualMachine(pipeline.build(plain, target), tvm.cpu())["main"](
        tvm.runtime.tensor(xs), tvm.runtime.tensor(ws)).numpy()
    np.testing.assert_array_equal(got, want)


def _matmul_tile(target, rows, k=96, n=64):
    """relu(x @ W) for a weight W (packed by lift_weight_transforms), its fused kernels for the target, and
    the extents of the unrolled loops (the register tile) around its update."""
    from tvm import relax, s_tir

    x = relax.Var("x", relax.TensorType([rows, k], "float32"))
    w = relax.Var("w", relax.TensorType([k, n], "float32"))
    bb = relax.BlockBuilder()
    with bb.function("main", [x, w], attrs={"num_input": 1}):
        with bb.dataflow():
            y = bb.emit_output(bb.emit(relax.op.nn.relu(relax.op.matmul(x, w))))
        bb.emit_func_output(y)
    transform, deploy = pipeline.lift_weight_transforms(bb.get(), target=target)
    fused = pipeline.fuse(deploy, target)
    (mm,) = [f for gv, f in fused.functions.items() if isinstance(f, tvm.tirx.PrimFunc) and "matmul" in gv.name_hint]
    sch = s_tir.Schedule(mm)
    (update,) = [b for b in sch.get_child_blocks(sch.get_sblock("root")) if sch.get(b).name_hint.endswith("_update")]
    unrolled = [int(sch.get(loop).extent) for loop in sch.get_loops(update)
                if sch.get(loop).kind == tvm.tirx.ForKind.UNROLLED]
    return bb.get(), transform, fused, unrolled


@pytest.mark.parametrize("target, tile", [
    ({"kind": "llvm", "mcpu": "znver4"}, [8, 2]),        # AVX-512: 8 rows x 2 zmm, one per packed strip (16 of 32)
    ({"kind": "llvm", "mcpu": "haswell"}, [4]),          # AVX2: 4 rows x 2 ymm (8 of 16)
    ({"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"]}, [8]),  # 8 rows x 2 q (16 of 32)
    ({"kind": "llvm", "mtriple": "armv7a-linux-gnueabihf", "mattr": ["+neon"]}, [4]),  # 16 q registers
])
def test_a_matmul_register_tile_takes_half_the_vector_registers_as_accumulators(target, tile):
    """Without a conv's output channels to add, a matmul's tile grows in rows: enough independent FMAs to
    cover their latency on every target, and no wider than a packed strip per vector."""
    *_, unrolled = _matmul_tile(tvm.target.Target({**target, "num-cores": 2}), 64)
    assert unrolled == tile


@pytest.mark.parametrize("rows, n, tile", [(64, 64, [8, 2]), (40, 90, [8, 2]), (40, 80, [8]), (6, 64, [6, 2]), (20, 64, [5, 2]),
                                           (49, 64, [7, 2]), (7, 64, [7, 2]), (13, 64, [8, 2]), (169, 1000, [8, 2]),
                                           (32, 144, [16]), (20, 176, [5, 2])])
def test_a_matmul_tile_computes_what_tvm_computes(rows, n, tile):
    """Rows in 8s, 7s, 6s, 5s or 4s, the most that divides them (more rows that none divides are computed
    up to a multiple of 8, the extra ones reading the last row, and cut off), and 2 vectors when the
    columns allow (16 rows of one when they do not: an odd count of few strips, 9 for 144 columns; 11 or more
    are padded to an even count): the same result as TVM's own build of the unpacked matmul."""
    import numpy as np
    from tvm import relax

    target = tvm.target.Target({"kind": "llvm", "mcpu": "znver4", "num-cores": 2})
    mod, transform, fused, unrolled = _matmul_tile(target, rows, n=n)
    assert unrolled == tile
    kernels = [gv.name_hint for gv, f in fused.functions.items() if isinstance(f, tvm.tirx.PrimFunc)]
    assert len(kernels) == 1, kernels        # no padded copy of x, the cut-off written tile by tile
    host = tvm.target.Target({"kind": "llvm", "mcpu": tvm.target.codegen.llvm_get_system_cpu()})
    if not tvm.target.codegen.target_has_features("avx512f", host):
        pytest.skip("this machine has no AVX-512: the schedule is checked, not run")
    rng = np.random.default_rng(0)
    xs, ws = rng.standard_normal((rows, 96), "float32"), rng.standard_normal((96, n), "float32")
    (wt,) = pipeline.transform_weights(transform, [ws])
    got = relax.VirtualMachine(pipeline.finish(fused, target), tvm.cpu())["main"](
        tvm.runtime.tensor(xs), tvm.runtime.tensor(wt)).numpy()
    want = relax.VirtualMachine(tvm.compile(mod, target=target), tvm.cpu())["main"](
        tvm.runtime.tensor(xs), tvm.runtime.tensor(ws)).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


AVX2 = {"kind": "llvm", "mcpu": "haswell"}
AVX512 = {"kind": "llvm", "mcpu": "znver4"}
NEON = {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"]}


@pytest.mark.parametrize("width, target, kernel, stride", [
    (4, AVX2, "conv_nhwo", 1), (6, AVX2, "im2col", 1), (30, AVX2, "im2col", 1), (16, AVX2, "conv2d", 1),
    (8, AVX2, "conv2d", 1), (8, NEON, "conv2d", 1), (8, AVX512, "conv_nhwo", 1), (16, AVX512, "conv2d", 1),
    (12, AVX512, "conv_nhwo", 1), (4, None, "conv_nhwo", 1), (8, None, "conv2d", 1),
    (24, AVX512, "conv_nhwo", 1), (56, AVX512, "conv_nhwo", 1),  # half an AVX-512 register per row vector
    (24, AVX2, "conv2d", 1), (56, NEON, "conv2d", 1),             # whole registers there
    (28, AVX2, "conv_nhwo", 1), (28, AVX512, "conv_nhwo", 1),    # whole 4-pixel tiles, not whole vectors
    (28, NEON, "im2col", 1),
    (14, AVX512, "im2col", 2),   # stride 2 into rows of 7 (Inception-v2): im2col reads the strided patches
    (16, AVX512, "conv2d", 2),   # into rows of 8: the NCHW conv reads its input as phases
    (34, AVX512, "conv2d", 2),   # into rows of 17: as a matmul its output would cost more to transpose back
])
def test_a_conv_with_narrow_output_rows_runs_with_the_output_channels_innermost(width, target, kernel, stride):
    """Output rows narrower than a vector register (VGG's 4x4 blocks; its 8x8 ones on AVX-512) or not a
    multiple of 8 gave the conv schedule nothing, half a register or predicated loads to vectorise: such a
    conv vectorises its output channels instead, its weight transposed (and packed) at compile time. Rows
    of whole 4-pixel tiles narrower than the target's register run as a direct conv into a channels-last
    output (the im2col gather cost as much as the product there); other rows as im2col + a packed matmul;
    rows that are a multiple of 8 and at least a register wide stay NCHW convs (with no target: 8 wide). On x86,
    rows of whole 4-pixel tiles that are not whole vectors run channels-innermost at any width, where their
    channel counts measured faster that way (below). Same result as TVM's own conv."""
    assert _conv_kernels(width, target, stride) == [kernel]


@pytest.mark.parametrize("cin, cout, k, kernel", [
    (64, 192, 3, "conv_nhwo"), (128, 32, 3, "conv_nhwo"), (32, 32, 5, "conv_nhwo"),
    (16, 64, 3, "conv2d"), (64, 256, 3, "conv2d"), (64, 64, 1, "conv2d"),
])
def test_a_conv_into_rows_of_part_vectors_runs_channels_innermost_where_that_measured_faster(cin, cout, k, kernel):
    """Rows of 24, 40 or 56 split into 8-float vectors on AVX-512 (NCHW), rows of 28 or 20 ran as im2col +
    matmul. With 32 to 192 output channels and at least 32 input channels a 3x3 or 5x5 conv ran 1.07-2.2x
    faster with its output channels as the vector; with fewer input channels, more output channels or a 1x1
    kernel it ran slower, and keeps its path. Same result as TVM's own conv either way."""
    assert _conv_kernels(24, AVX512, 1, cin, cout, k) == [kernel]
    assert _conv_kernels(28, AVX2, 1, cin, cout, k) == [kernel if kernel == "conv_nhwo" else "im2col"]


def _conv_kernels(width, target, stride, cin=64, cout=64, k=3) -> list[str]:
    """Which of conv_nhwo / im2col / conv2d the pipeline makes of one conv + relu for `target`, after checking
    that it computes what TVM's own conv does."""
    import numpy as np
    from tvm import relax

    x = relax.Var("x", relax.TensorType([1, cin, width, width], "float32"))
    w = relax.Var("w", relax.TensorType([cout, cin, k, k], "float32"))
    bb = relax.BlockBuilder()
    with bb.function("main", [x, w], attrs={"num_input": 1}):
        with bb.dataflow():
            y = bb.emit_output(bb.emit(relax.op.nn.relu(relax.op.nn.conv2d(x, w, strides=stride, padding=k // 2))))
        bb.emit_func_output(y)
    board = tvm.target.Target({**target, "num-cores": 2}) if target else None
    transform, deploy = pipeline.lift_weight_transforms(bb.get(), target=board, channels_last=False)  # the NCHW path
    fused = pipeline.fuse(deploy, board or tvm.target.Target({"kind": "llvm", "num-cores": 2}))
    names = [gv.name_hint for gv, f in fused.functions.items() if isinstance(f, tvm.tirx.PrimFunc)]
    # the gather is a 6-D kernel of its own (no flat index to divide back into pixels), the reshape a view
    assert all(n.startswith("im2col_t") for n in names if "im2col" in n), names
    target = tvm.target.Target({"kind": "llvm", "num-cores": 2})  # the rewrite's result, on any x86 machine
    fused = pipeline.fuse(deploy, target)
    rng = np.random.default_rng(0)
    xs, ws = rng.standard_normal((1, cin, width, width), "float32"), rng.standard_normal((cout, cin, k, k), "float32")
    (wt,) = pipeline.transform_weights(transform, [ws])
    got = relax.VirtualMachine(pipeline.finish(fused, target), tvm.cpu())["main"](
        tvm.runtime.tensor(xs), tvm.runtime.tensor(wt)).numpy()
    want = relax.VirtualMachine(tvm.compile(bb.get(), target=target), tvm.cpu())["main"](
        tvm.runtime.tensor(xs), tvm.runtime.tensor(ws)).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    return [k for k in ("conv_nhwo", "im2col", "conv2d") if any(k in n for n in names)]


@pytest.mark.parametrize("groups, width, kernels", [(4, 7, {"im2col_g": 1, "matmul_packed": 1, "concat": 0}),
                                                    (4, 16, {}), (32, 7, {})])
def test_a_grouped_conv_with_narrow_rows_runs_as_one_batched_matmul_over_the_groups(groups, width, kernels):
    """A few groups (ShuffleNet's 4) into rows that are not a multiple of 8: one gather of every group's
    patches and one matmul batched over the groups, each group with its own packed weight (no kernel per
    group, nothing concatenated); rows of 16 stay one grouped NCHW conv, and so does a depthwise-like conv
    of 32 groups. The result is TVM's."""
    import numpy as np
    from tvm import relax

    x = relax.Var("x", relax.TensorType([1, 64, width, width], "float32"))
    w = relax.Var("w", relax.TensorType([128, 64 // groups, 1, 1], "float32"))
    bb = relax.BlockBuilder()
    with bb.function("main", [x, w], attrs={"num_input": 1}):
        with bb.dataflow():
            y = bb.emit_output(bb.emit(relax.op.nn.relu(relax.op.nn.conv2d(x, w, groups=groups))))
        bb.emit_func_output(y)
    target = tvm.target.Target({**AVX2, "num-cores": 2})
    transform, deploy = pipeline.lift_weight_transforms(bb.get(), target=target, channels_last=False)  # the NCHW path
    fused = pipeline.fuse(deploy, target)
    names = [gv.name_hint for gv, f in fused.functions.items() if isinstance(f, tvm.tirx.PrimFunc)]
    assert {k: sum(n.startswith(k) or f"_{k}" in n for n in names) for k in kernels} == kernels, names
    assert bool(kernels) != any("conv2d" in n for n in names), names
    rng = np.random.default_rng(0)
    xs, ws = rng.standard_normal((1, 64, width, width), "float32"), rng.standard_normal((128, 64 // groups, 1, 1), "float32")
    wt = pipeline.transform_weights(transform, [ws])
    got = relax.VirtualMachine(pipeline.finish(fused, target), tvm.cpu())["main"](
        tvm.runtime.tensor(xs), *[tvm.runtime.tensor(a) for a in wt]).numpy()
    want = relax.VirtualMachine(tvm.compile(bb.get(), target=target), tvm.cpu())["main"](
        tvm.runtime.tensor(xs), tvm.runtime.tensor(ws)).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("op", ["Sum", "Mean", "Max", "Min"])
def test_an_onnx_sum_of_inputs_is_a_chain_of_binary_ops_not_a_stack(op, tmp_path):
    """ONNX Sum, Mean, Max and Min over several inputs (broadcast among them) compile to adds, maximums or
    minimums, with no stacked copy of the inputs, and compute what onnxruntime computes."""
    import numpy as np
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    from edgetvm.compiler import compile_model
    from edgetvm.runtime.artifact import open_artifact
    from edgetvm.runtime.session import Runner

    shapes = {"a": [2, 3, 4], "b": [2, 3, 4], "c": [1, 3, 1]}
    g = helper.make_graph([helper.make_node(op, list(shapes), ["y"])], "g",
                          [helper.make_tensor_value_info(k, TensorProto.FLOAT, v) for k, v in shapes.items()],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3, 4])])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)]), tmp_path / "m.onnx")
    imported = onnx_import.import_onnx(*onnx_import.prepare(tmp_path / "m.onnx"))[0]
    _, deploy = pipeline.lift_weight_transforms(imported)
    ops = [b.value.op.name for blk in deploy["main"].body.blocks for b in blk.bindings if hasattr(b.value, "op")]
    assert "relax.stack" not in ops and "relax.broadcast_to" not in ops, ops
    compile_model(tmp_path / "m.onnx", load_board("host"), tmp_path / "art")
    rng = np.random.default_rng(0)
    x = {k: rng.standard_normal(v).astype("float32") for k, v in shapes.items()}
    got = Runner(open_artifact(tmp_path / "art")).run(x)["y"]
    want = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"]).run(None, x)[0]
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("width, rows", [(28, 7), (14, 7), (7, 7), (20, 5)])
def test_a_depthwise_conv_into_odd_rows_computes_whole_vectors_over_several_rows_at_once(width, rows):
    """A depthwise 3x3 conv into rows that are not a multiple of 8 (ShuffleNet's 28, 14 and 7): one kernel with
    at most one parallel loop (the padding inside each core's task), output rows computed whole vectors wide and cut
    off, a register tile of several rows (each row its own chain of the 9 taps). The result is TVM's."""
    import numpy as np
    from tvm import relax, s_tir

    c = 32
    x = relax.Var("x", relax.TensorType([1, c, width, width], "float32"))
    w = relax.Var("w", relax.TensorType([c, 1, 3, 3], "float32"))
    bb = relax.BlockBuilder()
    with bb.function("main", [x, w], attrs={"num_input": 1}):
        with bb.dataflow():
            y = bb.emit_output(bb.emit(relax.op.nn.relu(relax.op.nn.conv2d(x, w, padding=1, groups=c))))
        bb.emit_func_output(y)
    target = tvm.target.Target({**AVX512, "num-cores": 2})
    transform, deploy = pipeline.lift_weight_transforms(bb.get(), target=target, channels_last=False)
    fused = pipeline.fuse(deploy, target)
    (kernel,) = [f for f in fused.functions.values() if isinstance(f, tvm.tirx.PrimFunc)]
    assert str(kernel).count("T.parallel") <= 1       # (none when too small for a fork-join: 7 x 7 here)
    sch = s_tir.Schedule(kernel)
    (update,) = [b for b in sch.get_child_blocks(sch.get_sblock("root")) if sch.get(b).name_hint.endswith("_update")]
    loops = [sch.get(loop) for loop in sch.get_loops(update)]
    assert [int(loop.extent) for loop in loops if loop.kind == tvm.tirx.ForKind.UNROLLED] == [rows]
    (vector,) = [int(loop.extent) for loop in loops if loop.kind == tvm.tirx.ForKind.VECTORIZED]
    taps = str(kernel).split('T.sblock("compute")')[0]          # all but the write-back that cuts off
    assert vector % 8 == 0 and "T.where" not in taps             # whole vectors, no masked ones
    host = tvm.target.Target({"kind": "llvm", "mcpu": tvm.target.codegen.llvm_get_system_cpu()})
    if not tvm.target.codegen.target_has_features("avx512f", host):
        pytest.skip("this machine has no AVX-512: the schedule is checked, not run")
    rng = np.random.default_rng(0)
    xs, ws = rng.standard_normal((1, c, width, width), "float32"), rng.standard_normal((c, 1, 3, 3), "float32")
    got = relax.VirtualMachine(pipeline.finish(fused, target), tvm.cpu())["main"](
        tvm.runtime.tensor(xs), *[tvm.runtime.tensor(a) for a in pipeline.transform_weights(transform, [ws])]).numpy()
    want = relax.VirtualMachine(tvm.compile(bb.get(), target=target), tvm.cpu())["main"](
        tvm.runtime.tensor(xs), tvm.runtime.tensor(ws)).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def _conv_tile(target, cin, cout, stride=1, groups=1, h=32):
    """relu(conv2d(x, w)) on a (h, 32) image, its fused kernels for the target, and the extents of the
    unrolled loops (the register tile) around its conv update."""
    from tvm import relax, s_tir

    x = relax.Var("x", relax.TensorType([1, cin, h, 32], "float32"))
    w = relax.Var("w", relax.TensorType([cout, cin // groups, 3, 3], "float32"))
    bb = relax.BlockBuilder()
    with bb.function("main", [x, w]):
        with bb.dataflow():
            y = relax.op.nn.conv2d(x, w, strides=stride, padding=1, groups=groups)
            y = bb.emit_output(bb.emit(relax.op.nn.relu(y)))
        bb.emit_func_output(y)
    fused = pipeline.fuse(bb.get(), target)
    (conv,) = [f for f in fused.functions.values() if isinstance(f, tvm.tirx.PrimFunc)]
    sch = s_tir.Schedule(conv)
    (update,) = [b for b in sch.get_child_blocks(sch.get_sblock("root")) if sch.get(b).name_hint.endswith("_update")]
    loops = [sch.get(loop) for loop in sch.get_loops(update)]
    unrolled = [int(loop.extent) for loop in loops if loop.kind == tvm.tirx.ForKind.UNROLLED]
    return bb.get(), fused, unrolled


@pytest.mark.parametrize("target, tile", [
    ({"kind": "llvm", "mcpu": "znver4"}, [4, 4]),         # AVX-512: 4 channels x 4 rows of one zmm (16 of 32)
    ({"kind": "llvm", "mcpu": "haswell"}, [4]),           # AVX2: 4 rows x 2 ymm already take 8 of 16 registers
    ({"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"]}, [2, 4]),  # 2 x 4 x 2 q of 32
    ({"kind": "llvm", "mtriple": "armv7a-linux-gnueabihf", "mattr": ["+neon"]}, [4]),  # 16 q registers
])
def test_a_conv_register_tile_spans_output_channels_as_registers_allow(target, tile):
    """Each input vector a conv loads feeds accumulators of several output channels (half the target's
    vector registers in all), so the FMAs outnumber the loads and hide their latency."""
    _, _, unrolled = _conv_tile(tvm.target.Target({**target, "num-cores": 2}), 16, 32)
    assert unrolled == tile


@pytest.mark.parametrize("cin, cout, stride, groups, h, tile", [
    (16, 32, 1, 1, 32, [4, 4]),
    (16, 32, 2, 1, 32, [4, 4]),   # strided: the input read as phases, still independent of the channel
    (4, 6, 1, 1, 32, [2, 4]),     # 6 output channels: the largest power of two dividing them
    (3, 16, 1, 1, 32, [4]),       # a stem conv's 27-step reduction: too short to amortise a bigger tile
    (5, 7, 1, 1, 32, [4]),        # odd channel counts: no channel tile
    (16, 32, 1, 2, 32, [4]),      # grouped: every input read depends on the output channel, nothing to share
    (16, 32, 1, 1, 6, [4, 3]),    # 6 rows: 3 at a time, 4 channels (12 accumulators)
    (16, 32, 1, 1, 5, [16]),      # 5 rows: one at a time, 16 channels
])
def test_a_conv_with_a_channel_tile_computes_what_tvm_computes(cin, cout, stride, groups, h, tile):
    import numpy as np
    from tvm import relax

    target = tvm.target.Target({"kind": "llvm", "mcpu": "znver4", "num-cores": 2})
    mod, fused, unrolled = _conv_tile(target, cin, cout, stride, groups, h)
    assert unrolled == tile
    host = tvm.target.Target({"kind": "llvm", "mcpu": tvm.target.codegen.llvm_get_system_cpu()})
    if not tvm.target.codegen.target_has_features("avx512f", host):
        pytest.skip("this machine has no AVX-512: the schedule is checked, not run")
    rng = np.random.default_rng(0)
    args = [rng.standard_normal((1, cin, h, 32), "float32"), rng.standard_normal((cout, cin // groups, 3, 3), "float32")]
    run = lambda ex: relax.VirtualMachine(ex, tvm.cpu())["main"](*[tvm.runtime.tensor(a) for a in args]).numpy()
    np.testing.assert_allclose(run(pipeline.finish(fused, target)), run(tvm.compile(mod, target=target)),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("h, cout, split", [(64, 16, "rows"), (8, 16, "channels"), (16, 512, "channels")])
def test_a_conv_gives_each_core_its_own_rows_when_its_activations_outweigh_its_weights(h, cout, split):
    """Split by output channels, every core reads the whole input, half of it written by the other core;
    split by rows, each pads and reads its own rows (and halo) within its one task. Rows when there are at
    least 8 per core and the input outweighs the weights (16x66x66 against 16x16x3x3, not 16x18x66 against
    512x16x3x3), channels otherwise, the padding then a task of its own; the result is TVM's."""
    import numpy as np
    from tvm import relax

    x = relax.Var("x", relax.TensorType([1, 16, h, 64], "float32"))
    w = relax.Var("w", relax.TensorType([cout, 16, 3, 3], "float32"))
    bb = relax.BlockBuilder()
    with bb.function("main", [x, w]):
        with bb.dataflow():
            y = bb.emit_output(bb.emit(relax.op.nn.relu(relax.op.nn.conv2d(x, w, padding=1))))
        bb.emit_func_output(y)
    target = tvm.target.Target({"kind": "llvm", "num-cores": 2})
    fused = pipeline.fuse(bb.get(), target)
    (conv,) = [f for f in fused.functions.values() if isinstance(f, tvm.tirx.PrimFunc)]
    parallel = [line for line in conv.script().splitlines() if "T.parallel" in line]
    if split == "rows":  # the padding inside the conv's two tasks
        assert len(parallel) == 1 and "T.parallel(T.int64(2))" in parallel[0], parallel
    else:  # the conv's tasks by channels; the padding apart (too small for a fork-join here)
        assert parallel and all("T.parallel(T.int64(2))" not in line for line in parallel), parallel
    sch = tvm.s_tir.Schedule(conv)
    (pad,) = [b for b in sch.get_child_blocks(sch.get_sblock("root")) if sch.get(b).name_hint == "pad_temp"] or \
        [b for b in sch.get_child_blocks(sch.get_loops(sch.get_sblock("conv2d_nchw_update"))[0])
         if sch.get(b).name_hint == "pad_temp"]
    rows_padded = int(sch.get(sch.get_loops(pad)[-2]).extent)
    assert rows_padded == ((h // 2 + 2) if split == "rows" else h + 2)  # a core's rows and their halo
    rng = np.random.default_rng(0)
    args = [rng.standard_normal((1, 16, h, 64), "float32"), rng.standard_normal((cout, 16, 3, 3), "float32")]
    run = lambda ex: relax.VirtualMachine(ex, tvm.cpu())["main"](*[tvm.runtime.tensor(a) for a in args]).numpy()
    np.testing.assert_allclose(run(pipeline.finish(fused, target)), run(tvm.compile(bb.get(), target=target)),
                               rtol=1e-5, atol=1e-5)
