"""ALQ: multi-bit weights, their training steps, bit-packed kernels, and `edgetvm quantize`."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from edgetvm import train
from edgetvm.cli import main
from edgetvm.passes import alq as alq_pass
from edgetvm.quant import alq, baselines, multibit
from edgetvm.quant.cli import Result, write_onnx
from edgetvm.runtime import emulated_board
from edgetvm.runtime.artifact import open_artifact

RNG = np.random.default_rng(0)


def _pruned(name, w, bits, group=64, max_bases=3):
    """A sketched weight pruned (by magnitude of alpha) to about `bits` average bits: empty groups included."""
    mb = multibit.sketch(name, w, group, max_bases)
    layer = alq.Layer(mb)
    scores = {name: np.where(mb.active, mb.alpha, np.inf)}
    alq.prune({name: layer}, scores, mb.bits() - int(bits * mb.n_weights()))
    return mb


# ---- the multi-bit form ---------------------------------------------------------------------------------


def test_one_basis_sketch_is_the_mean_magnitude_times_the_sign():
    w = RNG.normal(size=(50, 20, 5, 5)).astype(np.float32)     # conv OIHW: rows of 500, groups of 64
    mb = multibit.sketch("c.weight", w, 64, 1)
    rows = w.reshape(50, -1)
    g = 3
    chunk = rows[:, g * 64:(g + 1) * 64]
    np.testing.assert_allclose(mb.alpha[:, g, 0], np.abs(chunk).mean(axis=1), rtol=1e-5)
    np.testing.assert_array_equal(mb.bases[:, g, 0], np.where(chunk >= 0, 1, -1))


def test_more_bases_fit_the_weights_better_and_enough_fit_them_exactly():
    w = RNG.normal(size=(300, 40)).astype(np.float32)          # linear (in, out)
    errors = [np.abs(multibit.sketch("f.weight", w, 64, m).weight() - w).max() for m in (1, 2, 4, 8)]
    assert errors == sorted(errors, reverse=True) and errors[0] > 10 * errors[-1]
    small = np.array([[1.0, -3.0], [3.0, -1.0]], np.float32)   # two levels: two bases reproduce it
    np.testing.assert_allclose(multibit.sketch("s.weight", small, 32, 2).weight(), small, atol=1e-6)


def test_packed_weights_decode_to_the_multibit_weights_and_count_their_bits():
    w = RNG.normal(size=(800, 500)).astype(np.float32)
    mb = _pruned("fc1.weight", w, 0.4)
    assert 0.39 < mb.bits() / mb.n_weights() < 0.41
    assert (mb.active.sum(axis=2) == 0).any()                  # some groups have no basis at all
    packed = multibit.pack(mb)
    want = mb.alpha.astype(np.float16).astype(np.float32)      # the artifact keeps float16 alphas
    mb16 = multibit.MultiBit(mb.name, mb.shape, mb.group, mb.bases, want, mb.active)
    np.testing.assert_allclose(multibit.unpack(packed), mb16.weight(), rtol=1e-6, atol=1e-6)
    # below 1/40 of float32: bits + a byte per group + a float16 per basis
    assert multibit.packed_bytes(packed) * 40 < w.nbytes


def test_bad_group_sizes_are_refused():
    with pytest.raises(Exception, match="multiple of 32"):
        multibit.check_group(48)


# ---- the ALQ steps ------------------------------------------------------------------------------------------


def _model_value(mb, target, h):
    return float((h * (mb.reconstruct_rows() - target) ** 2).sum())


def test_a_basis_step_moves_the_weights_toward_the_quadratic_models_optimum():
    w = RNG.normal(size=(64, 32)).astype(np.float32)
    layer = alq.Layer(multibit.sketch("f.weight", w, 64, 2))
    g = RNG.normal(size=w.shape).astype(np.float32)
    # the optimum the step aims at, from the moments after folding in g (as the step does)
    probe = alq.AMSGrad(layer.w_state.m.copy(), layer.w_state.v.copy(), layer.w_state.vmax.copy())
    pg, ph = probe.update(layer.grad_rows(g), 0.01)
    target = layer.mb.reconstruct_rows() - pg / ph
    before = _model_value(layer.mb, target, ph)
    layer.basis_step(g, 0.01)
    assert _model_value(layer.mb, target, ph) < before
    assert (layer.mb.alpha >= 0).all()


def test_a_coordinate_step_lowers_a_quadratic_loss():
    w = RNG.normal(size=(128, 16)).astype(np.float32)
    goal = RNG.normal(size=w.shape).astype(np.float32)
    layer = alq.Layer(multibit.sketch("f.weight", w, 64, 3))
    loss = lambda: float(((layer.mb.weight() - goal) ** 2).sum())  # noqa: E731
    start = loss()
    for _ in range(200):
        layer.coordinate_step(2 * (layer.mb.weight() - goal), 0.01)
    assert loss() < 0.9 * start


def test_pruning_removes_the_least_important_bases_across_layers_until_the_bits_are_gone():
    a = alq.Layer(multibit.sketch("a.weight", RNG.normal(size=(64, 8)).astype(np.float32), 64, 2))
    b = alq.Layer(multibit.sketch("b.weight", RNG.normal(size=(128, 8)).astype(np.float32), 64, 2))
    scores = {"a.weight": np.where(a.mb.active, 1.0, np.inf), "b.weight": np.where(b.mb.active, 2.0, np.inf)}
    scores["b.weight"][0, 0, 0] = 0.5                          # the least important basis of all
    removed = alq.prune({"a.weight": a, "b.weight": b}, scores, 64)
    assert removed == 64 and not b.mb.active[0, 0, 0] and a.mb.active.all()
    removed = alq.prune({"a.weight": a, "b.weight": b}, scores, 64 * 8 * 2)   # all of a's, then b's
    assert not a.mb.active.any() and b.mb.active.sum() == 8 * 2 * 2 - 1
    assert alq.average_bits({"a.weight": a}) == 0


def test_the_baselines_are_one_and_two_bit_multibit_forms():
    w = RNG.normal(size=(200, 30)).astype(np.float32)
    bwn = baselines.quantise("bwn", "f.weight", w, 64)
    assert bwn.bits() == w.size and len(np.unique(np.abs(bwn.weight()[:64, 0]))) == 1
    u2 = baselines.quantise("uniform2", "f.weight", w, 64)
    assert u2.bits() == 2 * w.size
    levels = np.unique(np.round(u2.weight()[:64, 0] / u2.alpha[0, 0, 0], 4))
    assert set(levels) <= {-3.0, -1.0, 1.0, 3.0}


# ---- the pass and its kernels --------------------------------------------------------------------------------


def _network(bits=0.4):
    """LeNet5 with random weights pruned to `bits`: its multi-bit layers as a Result (no training)."""
    model = train.lenet5()
    params = train.init_params(model, seed=1)
    packed = {n: multibit.pack(_pruned(n, p, bits)) for n, p in params.items() if n.endswith(".weight")}
    decoded = {n: multibit.unpack(p) for n, p in packed.items()}
    params = {n: decoded.get(n, p + 0.01 * RNG.normal(size=p.shape).astype(np.float32)) for n, p in params.items()}
    return model, Result("alq", params, packed, bits, float("nan"), [])


def _numpy_lenet(params, x):
    """The reference forward pass of the quantised network, in numpy."""
    def conv(x, w, b):
        n, c, h, wd = x.shape
        o, _, kh, kw = w.shape
        oh, ow = h - kh + 1, wd - kw + 1
        cols = np.stack([x[:, :, i:i + oh, j:j + ow] for i in range(kh) for j in range(kw)], axis=2)
        y = np.einsum("ok,nkm->nom", w.reshape(o, -1), cols.reshape(n, c * kh * kw, oh * ow))
        return y.reshape(n, o, oh, ow) + b[None, :, None, None]

    def pool(x):
        n, c, h, w = x.shape
        return x.reshape(n, c, h // 2, 2, w // 2, 2).max(axis=(3, 5))

    h = pool(np.maximum(conv(x, params["conv1.weight"], params["conv1.bias"]), 0))
    h = pool(np.maximum(conv(h, params["conv2.weight"], params["conv2.bias"]), 0))
    h = np.maximum(h.reshape(len(x), -1) @ params["fc1.weight"] + params["fc1.bias"], 0)
    return h @ params["fc2.weight"] + params["fc2.bias"]


@pytest.fixture(scope="module")
def quantised(tmp_path_factory):
    d = tmp_path_factory.mktemp("alq")
    model, res = _network()
    write_onnx(model, res, d / "q.onnx")
    x = RNG.random((1, 1, 28, 28)).astype(np.float32)
    np.save(d / "x.npy", x)
    return d, res, x


def test_the_quantised_onnx_file_runs_in_onnxruntime_as_the_numpy_reference(quantised):
    d, res, x = quantised
    sess = ort.InferenceSession(str(d / "q.onnx"), providers=["CPUExecutionProvider"])
    got = sess.run(None, {"x": x})[0]
    np.testing.assert_allclose(got, _numpy_lenet(res.params, x), rtol=1e-4, atol=1e-4)


def test_compiled_bit_packed_kernels_equal_the_numpy_reference_and_store_only_the_bits(quantised):
    d, res, x = quantised
    assert main(["compile", str(d / "q.onnx"), "-o", str(d / "host")]) == 0
    art = open_artifact(d / "host")
    names = [w["name"] for w in art.manifest["weights"]]
    assert "fc1.weight" not in names and {f"fc1.weight.{f}" for f in alq_pass.PACKED_FIELDS} <= set(names)
    stored = sum(a.nbytes for p in res.packed.values() for a in alq_pass._artifact_arrays(p).values())
    floats = sum(p.size * 4 for n, p in res.params.items() if n.endswith(".weight"))
    biases = sum(p.size * 4 for n, p in res.params.items() if n.endswith(".bias"))
    assert art.manifest["weight_bytes"] <= stored + biases + 64 * len(names)   # the file holds the bits
    assert stored * 40 < floats
    assert main(["run", str(d / "host"), "--input", f"x={d / 'x.npy'}", "--output", str(d / "y.npz"),
                 "--repeat", "1"]) == 0
    np.testing.assert_allclose(np.load(d / "y.npz")["logits"], _numpy_lenet(res.params, x), rtol=1e-4, atol=1e-4)


def test_the_kernels_visit_each_rows_bases_with_their_groups():
    nbases = np.array([[2, 0, 1], [0, 0, 0], [1, 3, 0]], np.uint8)
    rows, groups = alq_pass.row_index(nbases)
    np.testing.assert_array_equal(rows, [0, 3, 3, 7])            # row 1 has no basis: an empty range
    np.testing.assert_array_equal(groups, [0, 0, 2, 0, 1, 1, 1])  # bases in (row, group, basis) order


def _run_kernel(f, *arrays):
    import tvm

    lib = tvm.compile(tvm.IRModule({"main": f}), target={"kind": "llvm"})
    args = [tvm.runtime.tensor(a) for a in arrays]
    lib["main"](*args)
    return args[-1].numpy()


@pytest.mark.parametrize("N, C, H, W, O, KH, KW, group, bits, relu, pool", [
    (1, 1, 12, 12, 6, 5, 5, 64, 3.5, True, False),    # 25-weight rows: one short group, 4 output rows per block
    (1, 1, 12, 12, 6, 5, 5, 64, 3.5, True, True),     # the same with its 2x2 max pool in the kernel
    (2, 3, 9, 13, 7, 3, 3, 32, 1.0, False, False),    # a batch, odd widths (one position per block), 27 = 32 - 5
    (1, 5, 7, 16, 9, 2, 3, 128, 2.0, True, False),    # groups of 128
    (1, 5, 7, 16, 9, 2, 3, 128, 2.0, True, True),     # pooled 6x14: blocks of 2x2 positions
    (2, 4, 10, 10, 7, 3, 3, 32, 1.5, False, True),    # a batch, two groups (36 = 32 + 4), pooled without ReLU
    (1, 16, 6, 6, 10, 3, 3, 32, 0.3, True, False),    # 5 groups at 0.3 bits: groups no row has bases in
    (1, 4, 6, 6, 5, 3, 3, 32, 0.0, False, False),     # no basis at all: the bias alone
])
def test_the_lookup_kernel_computes_the_convolution_with_the_decoded_weights(N, C, H, W, O, KH, KW, group, bits, relu,
                                                                           pool):
    w = RNG.normal(size=(O, C, KH, KW)).astype(np.float32)
    p = multibit.pack(_pruned("c.weight", w, bits, group, max_bases=4))
    R, NG = p["nbases"].shape
    x = RNG.normal(size=(N, C, H, W)).astype(np.float32)
    bias = RNG.normal(size=O).astype(np.float32)
    OH, OW = H - KH + 1, W - KW + 1
    arrays = alq_pass._artifact_arrays(p)
    out = (N, O, OH // 2, OW // 2) if pool else (N, O, OH, OW)
    got = _run_kernel(alq_pass.lut_kernel(N, C, H, W, KH, KW, R, NG, group, len(p["alpha"]), relu, pool=pool),
                      x, *(arrays[f] for f in alq_pass.PACKED_FIELDS), bias, np.zeros(out, np.float32))
    cols = np.stack([x[:, :, i:i + OH, j:j + OW] for i in range(KH) for j in range(KW)], axis=2)
    want = np.einsum("ok,nkm->nom", multibit.unpack(p).reshape(O, -1), cols.reshape(N, C * KH * KW, OH * OW))
    want = want.reshape(N, O, OH, OW) + bias[None, :, None, None]
    want = np.maximum(want, 0) if relu else want
    if pool:
        want = want.reshape(N, O, OH // 2, 2, OW // 2, 2).max(axis=(3, 5))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("M, K, R, group, bits", [
    (1, 800, 50, 64, 0.3),     # batch 1 (the masked-sum kernel): 12.5 groups, most of them empty
    (1, 200, 30, 128, 1.5),    # batch 1, groups of 128, a partial last group
    (1, 96, 300, 32, 2.0),     # batch 1, groups of 32, rows in several chunks
    (20, 70, 90, 32, 0.8),     # a batch: the lookup kernel, the inputs as positions
])
def test_the_lookup_kernel_computes_a_linear_layer_with_the_decoded_weights(M, K, R, group, bits):
    w = RNG.normal(size=(K, R)).astype(np.float32)              # (in, out), as train.py's linear weights
    p = multibit.pack(_pruned("f.weight", w, bits, group))
    x = RNG.normal(size=(M, K)).astype(np.float32)
    bias = RNG.normal(size=R).astype(np.float32)
    arrays = alq_pass._artifact_arrays(p)
    got = _run_kernel(alq_pass.lut_kernel(1, K, 1, M, 1, 1, R, p["nbases"].shape[1], group, len(p["alpha"]),
                                          dense=True),
                      x, *(arrays[f] for f in alq_pass.PACKED_FIELDS), bias, np.zeros((M, R), np.float32))
    np.testing.assert_allclose(got, x @ multibit.unpack(p) + bias, rtol=1e-5, atol=1e-5)


def test_bias_relu_and_pool_run_inside_the_kernels(tmp_path):
    from edgetvm.passes import model_import

    model, res = _network()
    write_onnx(model, res, tmp_path / "q.onnx")
    m, inputs = model_import.prepare(tmp_path / "q.onnx", None)
    mod, weights = model_import.import_model(m, inputs)
    out, _ = alq_pass.apply(mod, weights, res.packed)
    ops = {b.value.op.name for block in out["main"].body.blocks for b in block.bindings
           if isinstance(b.value, __import__("tvm").relax.Call) and hasattr(b.value.op, "name")}
    # LeNet5's 4 convolutions and linear layers, their 4 bias adds, 3 ReLUs and 2 max pools: 4 kernel calls
    assert {"relax.nn.conv2d", "relax.matmul", "relax.add", "relax.nn.relu", "relax.nn.max_pool2d"}.isdisjoint(ops)


def test_batched_inputs_and_padded_convolutions_use_the_same_kernels_correctly(tmp_path):
    model = train.vgg_small(channels=(32, 48), hidden=40)          # 3x3 convs with padding 1
    params = train.init_params(model, seed=2)
    packed = {n: multibit.pack(_pruned(n, p, 0.7)) for n, p in params.items() if n.endswith(".weight")}
    params |= {n: multibit.unpack(p) for n, p in packed.items()}
    proto = train.to_onnx(model, params, batch=20, metadata={multibit.METADATA_KEY: multibit.to_metadata(packed)})
    onnx.save(proto, tmp_path / "v.onnx")
    x = RNG.random((20, 1, 28, 28)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    want = ort.InferenceSession(str(tmp_path / "v.onnx"), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    assert main(["compile", str(tmp_path / "v.onnx"), "-o", str(tmp_path / "a")]) == 0
    assert main(["run", str(tmp_path / "a"), "--input", f"x={tmp_path / 'x.npy'}", "--output",
                 str(tmp_path / "y.npz"), "--repeat", "1"]) == 0
    np.testing.assert_allclose(np.load(tmp_path / "y.npz")["logits"], want, rtol=1e-4, atol=1e-4)


def test_a_model_whose_weights_differ_from_their_multibit_form_is_refused(quantised, tmp_path, capsys):
    d, _, _ = quantised
    m = onnx.load(d / "q.onnx")
    w = next(t for t in m.graph.initializer if t.name == "fc2.weight")
    arr = onnx.numpy_helper.to_array(w).copy()
    arr[0, 0] += 1.0
    w.CopyFrom(onnx.numpy_helper.from_array(arr, "fc2.weight"))
    onnx.save(m, tmp_path / "edited.onnx")
    assert main(["compile", str(tmp_path / "edited.onnx"), "-o", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err
    assert "fc2.weight differs from its multi-bit form" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "a").exists()


board_reason = emulated_board.board_unavailable_reason()


@pytest.mark.skipif(board_reason is not None, reason=f"emulated board unavailable: {board_reason}")
def test_the_quantised_network_built_for_rpi4_equals_the_reference_on_the_emulated_board(quantised):
    d, res, x = quantised
    assert main(["compile", str(d / "q.onnx"), "--target", "rpi4", "-o", str(d / "rpi4")]) == 0
    with emulated_board.EmulatedBoard() as board:
        assert main(["run", str(d / "rpi4"), "--input", f"x={d / 'x.npy'}", "--output", str(d / "yb.npz"),
                     "--repeat", "1", "--rpc", f"127.0.0.1:{board.port}"]) == 0
    np.testing.assert_allclose(np.load(d / "yb.npz")["logits"], _numpy_lenet(res.params, x), rtol=1e-4, atol=1e-4)


# ---- the command ---------------------------------------------------------------------------------------------

TINY = ["--train-limit", "256", "--fp32-epochs", "1", "--rounds", "1", "--basis-epochs", "1", "--post-epochs", "1",
        "--quiet"]


def test_quantize_trains_prunes_to_the_target_and_writes_a_compilable_model(tmp_path, capsys):
    out = tmp_path / "q.onnx"
    assert main(["quantize", "alq", "lenet5", "--data", "mnist", "--bits", "0.5", "-o", str(out),
                 "--workdir", str(tmp_path / "w"), *TINY]) == 0
    info = next(p.value for p in onnx.load(out).metadata_props if p.key == "edgetvm.quantize")
    assert 0.45 <= __import__("json").loads(info)["average_bits"] <= 0.5
    assert "bits per weight, test accuracy" in capsys.readouterr().out


def test_a_killed_alq_run_resumes_from_its_checkpoint_and_ends_where_an_uninterrupted_one_does(tmp_path):
    from edgetvm import data
    from edgetvm.quant.cli import limited

    ds = limited(data.load("mnist"), 128)
    model = train.lenet5(input_shape=ds.image_shape, hidden=32)
    params = train.init_params(model)
    schedule = alq.Schedule(rounds=1, basis_epochs=1, coordinate_epochs=1, post_epochs=1, max_bases=2)
    whole = alq.quantize(model, params, ds, 0.8, schedule, progress=False)
    ck = tmp_path / "ck.npz"
    short = alq.Schedule(rounds=1, basis_epochs=1, coordinate_epochs=1, post_epochs=1, max_bases=2)
    calls = {"n": 0}
    real = alq.run_epoch

    def dies_after_two(*a, **k):
        if calls["n"] == 2:
            raise KeyboardInterrupt
        calls["n"] += 1
        return real(*a, **k)

    alq.run_epoch = dies_after_two
    try:
        with pytest.raises(KeyboardInterrupt):
            alq.quantize(model, params, ds, 0.8, short, checkpoint=ck, progress=False)
    finally:
        alq.run_epoch = real
    resumed = alq.quantize(model, params, ds, 0.8, short, checkpoint=ck, progress=False)
    for n in whole.layers:
        np.testing.assert_array_equal(resumed.layers[n].mb.active, whole.layers[n].mb.active)
        np.testing.assert_allclose(resumed.layers[n].mb.weight(), whole.layers[n].mb.weight(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("args, message", [
    (["alq", "lenet5", "--bits", "0"], "outside (0, 8]"),
    (["alq", "lenet5", "--bits", "9"], "outside (0, 8]"),
    (["alq", "resnet50"], "unknown model"),
    (["alq", "lenet5", "--group", "48"], "multiple of 32"),
])
def test_bad_quantize_arguments_exit_2_with_one_line(args, message, tmp_path, capsys):
    assert main(["quantize", *args, "-o", str(tmp_path / "q.onnx"), "--workdir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "q.onnx").exists()


def test_a_missing_data_set_names_the_package_to_install(tmp_path, capsys, monkeypatch):
    from edgetvm import data

    monkeypatch.setattr(data, "FASHION_MNIST_DIR", tmp_path / "nowhere")
    monkeypatch.setenv("EDGETVM_CACHE", str(tmp_path / "cache"))
    assert main(["quantize", "alq", "lenet5", "--data", "fashion-mnist", "-o", str(tmp_path / "q.onnx")]) == 2
    err = capsys.readouterr().err.strip()
    assert "dataset-fashion-mnist" in err and len(err.splitlines()) == 1


def test_a_network_without_conv_or_linear_weights_cannot_be_quantised():
    with pytest.raises(Exception, match="no conv or linear weight"):
        alq.quantize(train.lenet5(), {"conv1.bias": np.zeros(20, np.float32)}, None, 0.4,
                     quantised=[])
