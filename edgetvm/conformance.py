"""Conformance: every model the onnx wheel ships with reference data, compiled and run through the CLI.

A case ends as "match" (outputs equal the reference), "clear error" (exit code 2 and one line naming
what is unsupported) or a failure: "differ" (wrong values, shape or dtype), "noisy" (anything else on
stderr), "traceback", "crash", "hang" or "half-written".
"""

from __future__ import annotations

import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from edgetvm import harness

DATA = Path(onnx.__file__).parent / "backend" / "test" / "data"
LIGHT = DATA / "light"  # the classic model zoo, its weights left as ConstantOfShape fills
SUITES = ("simple", "pytorch-converted", "pytorch-operator", "light")
PASSED = ("match", "clear error")
RTOL, ATOL = 1e-4, 1e-4


@dataclass
class Case:
    name: str
    suite: str
    model: Path
    # (inputs, reference outputs) per data set; light models ship outputs only, see light_input.
    data_sets: list[tuple[list[np.ndarray], list[np.ndarray]]] = field(repr=False)


@dataclass
class Row:
    model: str
    suite: str
    outcome: str
    ops: list[str]
    error: str = ""
    seconds: float = 0.0

    @property
    def failed(self) -> bool:
        return self.outcome not in PASSED


def discover(suites=SUITES) -> list[Case]:
    """The cases of `suites`, sorted by suite then name."""
    cases = []
    for suite in suites:
        if suite == "light":
            cases += [light_case(p) for p in sorted((DATA / "light").glob("light_*.onnx"))]
            continue
        for d in sorted(p for p in (DATA / suite).iterdir() if (p / "model.onnx").exists()):
            sets = [([read_pb(p) for p in sorted(s.glob("input_*.pb"), key=_index)],
                     [read_pb(p) for p in sorted(s.glob("output_*.pb"), key=_index)])
                    for s in sorted(d.glob("test_data_set_*"), key=_index)]
            cases.append(Case(d.name, suite, d / "model.onnx", sets))
    return cases


def light_case(path: Path) -> Case:
    """A light model: its input is what onnx's backend runner feeds it, arange(n) / n, from which its output was made."""
    model = onnx.load(str(path), load_external_data=False)
    inputs = [light_input(vi) for vi in data_inputs(model)]
    want = [read_pb(p) for p in sorted(path.parent.glob(f"{path.stem}_output_*.pb"), key=_index)]
    return Case(path.stem.removeprefix("light_"), "light", path, [(inputs, want)])


def light_with_random_weights(name: str, seed: int = 0) -> onnx.ModelProto:
    """The light model with each ConstantOfShape weight replaced by a random initializer of its shape."""
    m = onnx.load(str(LIGHT / f"light_{name}.onnx"))
    g, rng = m.graph, np.random.default_rng(seed)
    inits = {t.name: numpy_helper.to_array(t) for t in g.initializer}
    keep, new = [], []
    variances = {n.input[4] for n in g.node if n.op_type == "BatchNormalization"}
    for node in g.node:
        if node.op_type == "ConstantOfShape" and node.input[0] in inits:
            shape = tuple(int(d) for d in inits[node.input[0]])
            fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else 1
            # Scaled so activations neither vanish nor overflow through 20-100 layers.
            w = rng.standard_normal(shape).astype(np.float32) * np.float32(1.0 / np.sqrt(fan_in))
            if node.output[0] in variances:
                w = (np.abs(w) + 0.5).astype(np.float32)
            elif len(shape) == 1:  # biases, batch-norm scales and means
                w = w * np.float32(0.1)
            new.append(numpy_helper.from_array(w, node.output[0]))
        else:
            keep.append(node)
    del g.node[:]
    g.node.extend(keep)
    used = {i for n in keep for i in n.input}
    kept = [t for t in g.initializer if t.name in used] + new  # the fill shapes go with their nodes
    del g.initializer[:]
    g.initializer.extend(kept)
    names = {t.name for t in kept}
    data = [i for i in g.input if i.name in names or i.name not in inits]
    del g.input[:]
    g.input.extend(data)
    # IR 3: every initializer is a graph input too, as the original exporters wrote them.
    listed = {i.name for i in g.input}
    for t in new:
        if t.name not in listed:
            g.input.append(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    onnx.checker.check_model(m)
    return m


def light_input(vi: onnx.ValueInfoProto) -> np.ndarray:
    shape = tuple(d.dim_value if d.HasField("dim_value") else 1 for d in vi.type.tensor_type.shape.dim)
    n = int(np.prod(shape))
    return (np.arange(n).reshape(shape) / n).astype(np.float32)


def read_pb(path: Path) -> np.ndarray:
    t = onnx.TensorProto()
    t.ParseFromString(path.read_bytes())
    return numpy_helper.to_array(t)


def _index(p: Path) -> int:
    return int(re.findall(r"\d+", p.stem)[-1])


def data_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    """Graph inputs that are not weights (IR < 4 also lists every initializer as an input)."""
    inits = {t.name for t in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in inits]


def model_ops(model: onnx.ModelProto) -> list[str]:
    return sorted({n.op_type if n.domain in ("", "ai.onnx") else f"{n.domain}::{n.op_type}"
                   for n in model.graph.node})


def run_case(case: Case, workdir: Path, timeout: float = 300.0) -> Row:
    """Compile `case` once, run it on each data set, compare with the reference."""
    model = onnx.load(str(case.model), load_external_data=False)
    names = [vi.name for vi in data_inputs(model)]
    ops = model_ops(model)
    art, npz = workdir / "art", workdir / "y.npz"
    argv = ["compile", str(case.model), "-o", str(art)]
    first_inputs = case.data_sets[0][0] if case.data_sets else []
    for vi, x in zip(data_inputs(model), first_inputs):
        dims = vi.type.tensor_type.shape.dim
        # Only where the model leaves a dimension open, as a user would.
        if not vi.type.tensor_type.HasField("shape") or any(not d.HasField("dim_value") for d in dims):
            argv += ["--input-shape", f"{vi.name}:{','.join(map(str, x.shape))}"]
    r = harness.run_cli(argv, timeout, outputs=[art])
    seconds, noise = r.seconds, (r if r.stderr.strip() else None)
    if r.returncode != 0:
        return Row(case.name, case.suite, outcome(r), ops, r.error_line, seconds)
    for k, (inputs, want) in enumerate(case.data_sets):
        if len(inputs) != len(names):
            return Row(case.name, case.suite, "differ", ops,
                       f"data set {k} has {len(inputs)} inputs, the model {len(names)}", seconds)
        argv = ["run", str(art), "--output", str(npz), "--repeat", "1"]
        for i, (name, x) in enumerate(zip(names, inputs)):
            np.save(workdir / f"input_{i}.npy", x)
            argv += ["--input", f"{name}={workdir / f'input_{i}.npy'}"]
        npz.unlink(missing_ok=True)
        r = harness.run_cli(argv, timeout)
        seconds += r.seconds
        if r.returncode != 0:
            return Row(case.name, case.suite, outcome(r), ops, r.error_line, seconds)
        noise = noise or (r if r.stderr.strip() else None)
        with np.load(npz) as f:
            got = [f[key] for key in f.files]
        problem = compare(got, want)
        if problem:  # a wrong answer outranks stray output
            return Row(case.name, case.suite, "differ", ops, f"data set {k}: {problem}", seconds)
    if noise is not None:  # right, but a successful command must keep stderr empty
        return Row(case.name, case.suite, "noisy", ops, noise.error_line, seconds)
    return Row(case.name, case.suite, "match", ops, "", seconds)


def outcome(r: harness.Result) -> str:
    """The harness's verdict on a failed command; a clear error must also leave stdout empty."""
    if r.outcome == "clear":
        return "noisy" if r.stdout.strip() else "clear error"
    return r.outcome


def compare(got: list[np.ndarray], want: list[np.ndarray]) -> str | None:
    """None if every output equals its reference, else what differs first."""
    if len(got) != len(want):
        return f"{len(got)} outputs, the reference has {len(want)}"
    for i, (g, w) in enumerate(zip(got, want)):
        if g.shape != w.shape:
            return f"output {i} has shape {g.shape}, the reference {w.shape}"
        if g.dtype != w.dtype:
            return f"output {i} is {g.dtype}, the reference {w.dtype}"
        if w.dtype.kind not in "fc":
            if not np.array_equal(g, w):
                return f"output {i}: {int((g != w).sum())} of {w.size} elements differ"
            continue
        if not np.array_equal(np.isnan(g), np.isnan(w)):
            return f"output {i}: NaN where the reference has none, or the reverse"
        finite = np.isfinite(w)
        if not np.array_equal(g[~finite & ~np.isnan(w)], w[~finite & ~np.isnan(w)]):
            return f"output {i}: infinities differ"
        g64, w64 = g[finite].astype(np.float64), w[finite].astype(np.float64)
        # Absolute error in units of the reference's magnitude: a 1e-4 slip on values near 1e3 is noise.
        scale = max(1.0, float(np.abs(w64).max(initial=0.0)))
        rtol, atol = (1e-3, 1e-3) if w.dtype == np.float16 else (RTOL, ATOL)
        err = np.abs(g64 - w64)
        if (err > atol * scale + rtol * np.abs(w64)).any():
            return f"output {i}: max abs error {err.max():.3g} (reference magnitude {scale:.3g})"
    return None


def run_all(cases: list[Case], timeout: float = 300.0, progress=lambda row: None) -> list[Row]:
    """Each case in a fresh temporary directory; TVM is imported once here and forked per command."""
    harness.preload()
    rows = []
    for case in cases:
        with tempfile.TemporaryDirectory(prefix=f"conformance-{case.name}-") as d:
            row = run_case(case, Path(d), timeout)
        progress(row)
        rows.append(row)
    return rows


def feature(error: str) -> str:
    """What a clear error names, for grouping: the operator if it names one, else its first clause."""
    text = error.removeprefix("edgetvm: error: ")
    m = re.search(r"operator ([\w.:]+)", text)
    if m:
        return m.group(1)
    return re.split(r"[;(]", text, maxsplit=1)[0].strip()
