"""Every model the onnx wheel ships with reference inputs and outputs, pushed through `edgetvm compile` and
`edgetvm run`, either matches the reference or ends in one clear line naming the unsupported operator or
feature: never a wrong answer, a traceback, a stray log line, a crash, a hang or a half-written file.

A fixed selection runs by default; all 149 cases with --runslow (`python bench/conformance.py` prints the
table)."""

import numpy as np
import onnx
import pytest
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

from edgetvm import conformance
from edgetvm.conformance import Case

# (suite, model) -> what must happen: "match", or a word its one error line must contain (the operator or feature).
EXPECTED = {
    ("simple", "test_single_relu_model"): "match",
    # Sequences built, edited and read at constant positions, one of them negative.
    ("simple", "test_sequence_model1"): "match",
    ("simple", "test_sequence_model3"): "match",
    # Output shape taken from an input's values: edgetvm builds static shapes only.
    ("simple", "test_expand_shape_model1"): "Expand",
    ("simple", "test_expand_shape_model3"): "Expand",
    ("simple", "test_strnorm_model_monday_casesensintive_lower"): "STRING",
    ("simple", "test_gradient_of_add"): "ai.onnx.preview.training::Gradient",
    # An empty input (--input-shape X:0), split at run-time positions.
    ("simple", "test_sequence_model8"): "SplitToSequence",
    # IR 3, opset 6: every weight is listed as a graph input too.
    ("pytorch-converted", "test_Conv2d"): "match",
    ("pytorch-converted", "test_BatchNorm2d_eval"): "match",
    ("pytorch-converted", "test_Linear"): "match",
    ("pytorch-converted", "test_AvgPool1d"): "match",
    ("pytorch-converted", "test_PReLU_2d_multiparam"): "match",
    ("pytorch-converted", "test_Embedding"): "match",
    ("pytorch-converted", "test_MaxPool2d_stride_padding_dilation"): "match",
    ("pytorch-operator", "test_operator_index"): "match",
    ("pytorch-operator", "test_operator_add_broadcast"): "match",
    ("pytorch-operator", "test_operator_chunk"): "match",
    ("pytorch-operator", "test_operator_symbolic_override_nested"): "match",
    ("pytorch-operator", "test_operator_non_float_params"): "match",
    ("light", "squeezenet"): "match",
}

CASES = {(c.suite, c.name): c for c in conformance.discover()}


@pytest.fixture(scope="module", autouse=True)
def imported_once():
    conformance.harness.preload()


def _check(row, expected):
    assert not row.failed, f"{row.suite}/{row.model} ended as {row.outcome}: {row.error}"
    if expected == "match":
        assert row.outcome == "match", row.error
    else:
        assert row.outcome == "clear error" and expected in row.error, row.error


@pytest.mark.parametrize("key", list(EXPECTED), ids=lambda k: f"{k[0]}/{k[1]}")
def test_shipped_model_matches_or_names_what_is_unsupported(key, tmp_path):
    _check(conformance.run_case(CASES[key], tmp_path), EXPECTED[key])


@pytest.mark.slow
@pytest.mark.parametrize("key", sorted(CASES), ids=lambda k: f"{k[0]}/{k[1]}")
def test_every_shipped_model_matches_or_fails_clearly(key, tmp_path):
    row = conformance.run_case(CASES[key], tmp_path, timeout=600)
    assert not row.failed, f"{row.suite}/{row.model} ended as {row.outcome}: {row.error}"


def test_a_wrong_answer_is_a_failure(tmp_path):
    """The suite sees a result that differs from the reference: here the reference is off by 1e-3."""
    case = CASES[("pytorch-converted", "test_Conv2d")]
    [(inputs, [want])] = case.data_sets
    off = Case(case.name, case.suite, case.model, [(inputs, [want + np.float32(1e-3) * np.abs(want).max()])])
    row = conformance.run_case(off, tmp_path)
    assert row.outcome == "differ" and row.failed, row


def test_compare_reports_shape_dtype_and_values():
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    assert conformance.compare([x], [x + np.float32(1e-5)]) is None
    assert "shape" in conformance.compare([x.reshape(3, 2)], [x])
    assert "int64" in conformance.compare([x.astype(np.int64)], [x])
    assert "max abs error" in conformance.compare([x + 0.01], [x])
    assert "differ" in conformance.compare([np.array([1, 2], np.int64)], [np.array([1, 3], np.int64)])
    assert "NaN" in conformance.compare([np.array([np.nan], np.float32)], [np.array([1.0], np.float32)])


def _opset6_case(tmp_path, name, nodes, inputs, output, inits, feeds, want) -> Case:
    listed = inputs + [(t.name, list(t.dims)) for t in inits]  # IR 3: weights are graph inputs too
    g = h.make_graph(nodes, name, [h.make_tensor_value_info(n, T.FLOAT, s) for n, s in listed],
                     [h.make_tensor_value_info("y", T.FLOAT, output)], inits)
    model = h.make_model(g, opset_imports=[h.make_opsetid("", 6)], ir_version=3)
    onnx.save(model, tmp_path / f"{name}.onnx")
    return Case(name, "opset6", tmp_path / f"{name}.onnx", [(feeds, [want])])


def test_opset6_prelu_has_one_slope_per_channel(tmp_path):
    """PRelu before opset 7 (PyTorch's nn.PReLU(C)) applies slope[c] to channel c, not to the last axis."""
    x = np.random.default_rng(0).standard_normal((2, 3, 3)).astype(np.float32)
    slope = np.array([0.1, 0.2, 0.3], np.float32)
    want = np.where(x < 0, x * slope[None, :, None], x)
    case = _opset6_case(tmp_path, "prelu", [h.make_node("PRelu", ["x", "s"], ["y"])], [("x", [2, 3, 3])],
                        [2, 3, 3], [nh.from_array(slope, "s")], [x], want)
    (tmp_path / "w").mkdir()
    assert conformance.run_case(case, tmp_path / "w").outcome == "match"


def test_opset6_broadcast_starts_at_axis(tmp_path):
    """Add(A[2,3,3], B[3], broadcast=1, axis=1) adds B[j] along axis 1, where numpy would use the last axis."""
    rng = np.random.default_rng(1)
    a, b = rng.standard_normal((2, 3, 3)).astype(np.float32), rng.standard_normal(3).astype(np.float32)
    case = _opset6_case(tmp_path, "add", [h.make_node("Add", ["a", "b"], ["y"], broadcast=1, axis=1)],
                        [("a", [2, 3, 3]), ("b", [3])], [2, 3, 3], [], [a, b], a + b[None, :, None])
    (tmp_path / "w").mkdir()
    assert conformance.run_case(case, tmp_path / "w").outcome == "match"


def test_cases_run_where_the_parent_pool_has_worker_threads(tmp_path):
    """A forked child inherits no threads: where this process's TVM pool has worker threads (two or more
    threads: bigger machines, or TVM_NUM_THREADS) and has run a parallel kernel, a case still runs to its
    end instead of hanging in its first parallel kernel."""
    import subprocess
    import sys

    code = """
import json, os, sys
os.environ["TVM_NUM_THREADS"] = "2"
import numpy as np, tvm
from tvm.script import tirx as T
from edgetvm import harness, zoo
from edgetvm.compiler import compile_model
from edgetvm.targets import load_board

@T.prim_func
def double(a: T.Buffer((4096,), "float32"), b: T.Buffer((4096,), "float32")):
    for i in T.parallel(4096):
        b[i] = a[i] * T.float32(2)

a, b = (tvm.runtime.tensor(np.ones(4096, "float32")) for _ in range(2))
tvm.compile(double, target="llvm")(a, b)   # the pool's worker threads start here
art = os.path.join(sys.argv[1], "mlp")
compile_model(zoo.path("mlp", sys.argv[1]), load_board("host"), art, zoo.default_input_shapes("mlp"))
r = harness.run_cli(["run", art], timeout=30)
print(json.dumps(r.outcome))
"""
    (tmp_path / "case.py").write_text(code)   # TVMScript reads its function's source: a file, not -c
    out = subprocess.run([sys.executable, str(tmp_path / "case.py"), str(tmp_path)], capture_output=True, text=True,
                         timeout=300)
    assert out.stdout.strip().splitlines()[-1:] == ['"ok"'], out.stderr[-2000:]
