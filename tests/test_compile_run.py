"""`edgetvm compile` + `edgetvm run`: outputs match onnxruntime, artifacts are complete and self-describing."""

import json
import struct

import numpy as np
import onnxruntime as ort
import pytest

from edgetvm import zoo
from edgetvm.cli import main
from edgetvm.compiler import compile_model, random_inputs
from edgetvm.runtime.artifact import ALIGN, open_artifact, sha256_file
from edgetvm.runtime.session import Runner
from edgetvm.targets import load_board

# Every zoo model: real pretrained CNNs (classifier, detector, CRNN recognizer) and generated ones
# with residual graphs, attention, Gemm(transB=1), batch norm.
MODELS = list(zoo.MODELS)
# Smaller than the defaults where LLVM's code generation would take minutes (it grows with loop
# extents: the recognizer at 48x320 spends ~25 s on one depthwise conv); same graphs.
TEST_SHAPES = {"ocr_det": {"x": (1, 3, 64, 128)}, "ocr_rec": {"x": (1, 3, 48, 64)}}
TEST_KWARGS = {"dense_stack": {"n": 3, "d": 1024}}


def ort_reference(path, inputs):
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, inputs)


@pytest.fixture(scope="module")
def host_builds(tmp_path_factory):
    built = {}

    def get(name):
        if name not in built:
            out = tmp_path_factory.mktemp("host") / name
            src = zoo.path(name, tmp_path_factory.mktemp("zoo"), **TEST_KWARGS.get(name, {}))
            shapes = TEST_SHAPES.get(name) or zoo.default_input_shapes(name, **TEST_KWARGS.get(name, {}))
            compile_model(src, load_board("host"), out, shapes)
            built[name] = (out, src, shapes)
        return built[name][0]

    get.source = lambda name: built[name][1:]
    return get


@pytest.mark.parametrize("name", MODELS)
def test_host_build_matches_onnxruntime(name, host_builds):
    art = open_artifact(host_builds(name))
    src, shapes = host_builds.source(name)
    # Text-line images for the OCR models (noise makes the detector output exactly 0), N(0, 1) otherwise.
    x = zoo.sample_inputs(name, seed=1, shapes=shapes, **TEST_KWARGS.get(name, {}))
    got = Runner(art).run(x)
    want = ort_reference(src, x)
    assert len(got) == len(want)
    for (out_name, y), ref in zip(got.items(), want):
        # fp32 with a different summation order: relative error grows with reduction length, ~1e-5 here.
        np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-4 * max(1.0, float(np.abs(ref).max())),
                                   err_msg=f"{name}: output {out_name}")


def test_manifest_describes_the_artifact(host_builds):
    path = host_builds("cnn")
    m = json.loads((path / "manifest.json").read_text())
    assert m["board"]["name"] == "host" and m["board"]["arch"] == "x86_64"
    assert m["inputs"] == [{"name": "x", "shape": [1, 3, 32, 32], "dtype": "float32"}]
    assert m["outputs"][0]["shape"] == [1, 10] and m["outputs"][0]["dtype"] == "float32"
    import tvm

    assert m["tvm_version"] == tvm.__version__
    assert m["model"]["sha256"] == sha256_file(zoo.path("cnn"))
    assert set(m["files"]) == {"model.so", "weights.bin"}
    for f, digest in m["files"].items():
        assert sha256_file(path / f) == digest
    assert all(w["offset"] % ALIGN == 0 for w in m["weights"])
    assert m["weight_bytes"] == sum(w["nbytes"] for w in m["weights"])


def test_weights_are_used_zero_copy_from_the_mapped_file(host_builds):
    art = open_artifact(host_builds("mlp"))
    runner = Runner(art)
    weights_file = str(art.weights_path.resolve())
    regions = []
    for line in open("/proc/self/maps"):
        fields = line.split()
        if len(fields) >= 6 and fields[5] == weights_file:
            lo, hi = (int(v, 16) for v in fields[0].split("-"))
            regions.append((lo, hi))
    assert regions, "weights.bin should be memory-mapped"
    for t in runner.weights:
        ptr = np.from_dlpack(t).__array_interface__["data"][0]
        assert any(lo <= ptr < hi for lo, hi in regions), "a weight was copied out of the mapping"


def test_gemm_transpose_runs_at_compile_time_not_per_call():
    """ONNX Gemm(transB=1) is stored pre-transposed; the deployed main never transposes a weight."""
    from edgetvm.passes import onnx_import, pipeline

    model = zoo.load("mlp")
    inputs = onnx_import.resolve_inputs(model, None)
    mod, weights = onnx_import.import_onnx(model, inputs)
    assert "permute_dims" in mod["main"].script()
    transform, deploy = pipeline.lift_weight_transforms(mod)
    assert "permute_dims" not in deploy["main"].script()
    lifted = pipeline.transform_weights(transform, weights)
    transposed = [w for w in weights if w.ndim == 2 and any(
        l.shape == w.T.shape and np.array_equal(l, w.T) for l in lifted)]
    assert transposed, "the transB=1 weight should appear transposed among the deployed weights"


def test_cli_run_writes_outputs_and_latency(host_builds, tmp_path, capsys):
    art = host_builds("resnet")
    x = random_inputs(open_artifact(art).inputs, seed=3)
    np.save(tmp_path / "x.npy", x["x"])
    rc = main(["run", str(art), "--input", f"x={tmp_path / 'x.npy'}", "--output", str(tmp_path / "y.npz"),
               "--repeat", "3"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "latency over 3 runs: min" in out and "median" in out and "max" in out
    y = np.load(tmp_path / "y.npz")
    want = Runner(open_artifact(art)).run(x)
    for k, v in want.items():
        np.testing.assert_array_equal(y[k], v)


def test_run_profile_names_every_kernel_with_its_share(host_builds, capsys):
    from edgetvm.costmodels.profile import instrumented_calls, kernel_times

    art = host_builds("resnet")
    assert main(["run", str(art), "--repeat", "3", "--profile"]) == 0
    out = capsys.readouterr().out
    runner = Runner(open_artifact(art))
    args = runner.args(random_inputs(runner.art.inputs, 0))
    times = kernel_times(runner.vm, "main", args, runs=3)
    # every call main makes is counted, under its kernel, slowest kernel first
    assert sum(t.calls for t in times) == len(instrumented_calls(runner.vm, "main", args))
    assert times == sorted(times, key=lambda t: -t.seconds) and all(t.seconds > 0 for t in times)
    assert len({t.kernel for t in times}) == len(times) > 5
    assert f"{len(times)} kernels sum to" in out
    assert times[0].kernel in out and "%" in out


def test_run_profile_refuses_a_board_over_rpc(host_builds, capsys):
    rc = main(["run", str(host_builds("resnet")), "--profile", "--rpc", "127.0.0.1:1"])
    assert rc == 2
    assert "cannot cross RPC" in capsys.readouterr().err


def _elf(path):
    head = path.read_bytes()[:64]
    assert head[:4] == b"\x7fELF"
    bits = {1: 32, 2: 64}[head[4]]
    machine = struct.unpack_from("<H", head, 18)[0]
    flags = struct.unpack_from("<I", head, 48 if bits == 64 else 36)[0]
    return bits, machine, flags


@pytest.mark.parametrize("board,bits,machine", [("rpi4", 64, 0xB7), ("rpi3", 64, 0xB7),
                                                 ("jetson-nano-cpu", 64, 0xB7), ("rpi2", 32, 0x28)])
def test_cross_compiled_library_is_for_the_board(board, bits, machine, tmp_path):
    out = tmp_path / board
    compile_model(zoo.path("cnn"), load_board(board), out, zoo.default_input_shapes("cnn"))
    got_bits, got_machine, flags = _elf(out / "model.so")
    assert (got_bits, got_machine) == (bits, machine)
    if board == "rpi2":
        assert flags & 0x400, "armv7 boards run hard-float: EF_ARM_ABI_FLOAT_HARD must be set"
    assert json.loads((out / "manifest.json").read_text())["board"]["name"] == board


def test_recompiling_replaces_the_artifact(tmp_path):
    out = tmp_path / "a"
    compile_model(zoo.path("mlp"), load_board("host"), out)
    compile_model(zoo.path("cnn"), load_board("host"), out)
    assert open_artifact(out).inputs[0].shape == (1, 3, 32, 32)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]


def test_a_model_compiled_again_into_the_same_directory_runs_its_new_code_in_the_same_process(tmp_path):
    """dlopen returns the library it already loaded from a path: the second build must not run the first's kernels."""
    import onnx
    from onnx import TensorProto, helper

    def model(op):
        x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])
        y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])
        m = helper.make_model(helper.make_graph([helper.make_node(op, ["x"], ["y"])], op, [x], [y]),
                              opset_imports=[helper.make_opsetid("", 13)])
        path = tmp_path / f"{op}.onnx"
        onnx.save(m, path)
        return path

    x = {"x": np.array([-1.0, 2.0, -3.0, 4.0], "float32")}
    out = tmp_path / "a"
    compile_model(model("Neg"), load_board("host"), out)
    np.testing.assert_array_equal(Runner(open_artifact(out)).run(x)["y"], -x["x"])
    compile_model(model("Abs"), load_board("host"), out)
    np.testing.assert_array_equal(Runner(open_artifact(out)).run(x)["y"], np.abs(x["x"]))


def test_batch_norm_folds_into_conv_weights_at_compile_time():
    """Inference batch norm after a conv costs nothing per call: no batch_norm, sqrt or divide remains."""
    from edgetvm.passes import onnx_import, pipeline

    model = zoo.load("resnet")
    mod, _ = onnx_import.import_onnx(model, onnx_import.resolve_inputs(model, None))
    assert "batch_norm" in mod["main"].script()
    _, deploy = pipeline.lift_weight_transforms(mod)
    text = deploy["main"].script()
    assert "batch_norm" not in text and "sqrt" not in text and "divide" not in text


def test_a_local_run_uses_every_cpu_it_may_and_worker_threads(tmp_path, host_builds):
    """`edgetvm run` in a process with no thread settings: TVM's pool gets one thread per CPU the process
    may use (TVM's own default halves them on x86) with every task on a worker thread (one more thread
    than with the first task on the calling thread); a user's own settings are kept, and the run leaves
    the environment as it found it."""
    import json
    import os
    import subprocess
    import sys

    art = host_builds("mlp")
    code = ("import os, sys\nfrom edgetvm.cli import main\nrc = main(['run', sys.argv[1], '--repeat', '1'])\n"
            "import tvm, json\nprint(json.dumps([rc, tvm.get_global_func('runtime.NumThreads')(), "
            "len(os.listdir('/proc/self/task')), os.environ.get('TVM_NUM_THREADS')]))")
    env = {k: v for k, v in os.environ.items() if k not in ("TVM_NUM_THREADS", "TVM_EXCLUDE_WORKER0")}

    def run(**settings):
        out = subprocess.run([sys.executable, "-c", code, str(art)], env={**env, **settings}, capture_output=True,
                             text=True)
        return json.loads(out.stdout.strip().splitlines()[-1]), out.stderr

    (rc, threads, os_threads, left), err = run()
    assert (rc, threads, left) == (0, len(os.sched_getaffinity(0)), None), err
    (rc, threads_w0, os_threads_w0, _), err = run(TVM_EXCLUDE_WORKER0="1")
    assert (rc, threads_w0) == (0, threads), err
    if threads > 1:
        assert os_threads == os_threads_w0 + 1
    (rc, threads, _, left), err = run(TVM_NUM_THREADS="1")
    assert (rc, threads, left) == (0, 1, "1"), err


def test_a_local_runs_kernels_run_on_the_pools_worker_threads(tmp_path):
    """The pool `edgetvm run` makes is the one its kernels use: after the thread settings are taken back
    out of the environment, a parallel loop still runs on all the pool's worker threads (TVM reads
    TVM_NUM_THREADS at every launch; without it, on 2 CPUs, every loop ran on the calling thread). Each
    iteration of the loop asks which OS thread runs it; a ratio of per-thread CPU time, tried first, told
    the two apart only on an idle machine (the calling thread spins while the workers compute)."""
    import json
    import os
    import subprocess
    import sys

    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("one CPU: no worker threads to use")
    code = ("import os, sys, json, threading\n"
            "import numpy as np, tvm, tvm_ffi\n"
            "from tvm.script import tirx as T\n"
            "from edgetvm.runtime.session import model_threads\n"
            "model_threads()\n"
            "tvm_ffi.register_global_func('test.os_thread', lambda i: threading.get_native_id())\n"
            "@T.prim_func\n"
            "def loop(a: T.Buffer((64,), 'int64')):\n"
            "    for i in T.parallel(64):\n"
            "        a[i] = T.call_packed('test.os_thread', i, dtype='int64')\n"
            "a = tvm.runtime.tensor(np.zeros(64, 'int64'))\n"
            "tvm.compile(loop, target='llvm')(a)\n"
            "print(json.dumps([threading.get_native_id(), sorted(set(a.numpy().tolist())), "
            "tvm.get_global_func('runtime.NumThreads')(), os.environ.get('TVM_NUM_THREADS')]))")
    env = {k: v for k, v in os.environ.items() if k not in ("TVM_NUM_THREADS", "TVM_EXCLUDE_WORKER0")}
    script = tmp_path / "loop.py"   # TVMScript reads a function's source: not from `python -c`
    script.write_text(code)
    out = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    calling, ran_on, threads, left = json.loads(out.stdout.strip().splitlines()[-1])
    assert left is None, out.stderr
    assert threads == len(os.sched_getaffinity(0))
    assert calling not in ran_on and len(ran_on) == threads, (calling, ran_on, out.stderr)
