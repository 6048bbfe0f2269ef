"""Multi-device pipeline: fleets, intra-layer row bands, DP, PSO against exhaustive search, a real run."""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import pytest

from edgetvm import zoo
from edgetvm.errors import UserError
from edgetvm.partition.pipeline import dp, fleet as fleets, pso


def test_fleets_parse():
    for name in fleets.list_fleets():
        f = fleets.load_fleet(name)
        speeds = [d.speed for d in f.devices]
        assert len(f.devices) >= 2 and max(speeds) / min(speeds) >= 4


@pytest.mark.parametrize("text,match", [
    ("name = \n", "does not parse"),
    ("[[device]]\nname='a'\nprofile='no-such-device'\nlink='wifi-20mbit'\n", "unknown device profile"),
    ("[[device]]\nname='a'\nprofile='sbc-a53'\n", "one of the two"),
    ("name='x'\n", "no \\[\\[device\\]\\]"),
])
def test_bad_fleet_is_one_user_error(tmp_path, text, match):
    p = tmp_path / "bad.toml"
    p.write_text(text)
    with pytest.raises(UserError, match=match):
        fleets.load_fleet(p)


@pytest.mark.parametrize("name,stage", [("vgg", (0, 8)), ("resnet", (0, 10))])
def test_row_bands_are_bit_identical(name, stage):
    import tvm
    from tvm import relax

    from edgetvm.partition import split
    from edgetvm.passes import graph_cut, pipeline, row_slices as rs

    tgt = split._host().target()
    m = split.load_model(zoo.path(name))
    can = rs.canonical(m.deploy)
    layers = rs.layers(can)
    a, b = stage
    mine = [i for l in layers[a:b] for i in l]
    rest = [i for l in layers[b:] for i in l]
    mod, sigs, _, _ = graph_cut.emit_parts(can, [mine, rest], len(m.weights), ["s0", "s1"])
    f = mod["s0"]
    assert rs.sliceable(f) is None
    ws = [tvm.runtime.tensor(m.weights[w]) for w in sigs[0].weights]
    x = np.random.default_rng(1).standard_normal([int(s) for s in f.params[0].ty.shape.values]).astype("float32")
    ref = relax.VirtualMachine(pipeline.build(tvm.IRModule({"s0": f}), tgt), tvm.cpu())["s0"](
        tvm.runtime.tensor(x), *ws)[0].numpy()
    bands = []
    for o0, o1 in rs.band_rows(ref.shape[2], [1.0, 2.5, 4.0]):
        g = rs.slice_function(f, o0, o1, "band")
        r0, r1 = rs.input_rows(f, o0, o1)[0]
        vm = relax.VirtualMachine(pipeline.build(tvm.IRModule({"band": g}), tgt), tvm.cpu())
        bands.append(vm["band"](tvm.runtime.tensor(np.ascontiguousarray(x[:, :, r0:r1])), *ws)[0].numpy())
    assert np.array_equal(np.concatenate(bands, axis=2), ref)


def test_band_rows_follow_speeds():
    assert rs_band([1, 1], 8) == [(0, 4), (4, 8)]
    assert rs_band([1, 3], 8) == [(0, 2), (2, 8)]
    assert [b - a for a, b in rs_band([0.1, 0.4, 0.25], 32)] == [3, 17, 12] or \
        sum(b - a for a, b in rs_band([0.1, 0.4, 0.25], 32)) == 32


def rs_band(speeds, h):
    from edgetvm.passes.row_slices import band_rows

    return band_rows(h, speeds)


# ------------------------------------------------------------------ DP and PSO on synthetic problems

class _Prof:
    def __init__(self, quota, mem):
        self.cpu_quota, self.memory_mib = quota, mem
        self.name = f"k{quota}"

    @property
    def speed(self):
        return self.cpu_quota

    @property
    def memory_bytes(self):
        return int(self.memory_mib * (1 << 20))


class _Link:
    def __init__(self, mbit):
        self.bandwidth_mbit, self.name, self.delay_ms = mbit, f"{mbit}mbit", 0


def _problem(seed: int, n_devices: int, layers: int = 10):
    """A conv chain: layer l halves or keeps the rows; per-kind times scale with 1/quota."""
    from edgetvm.costmodels.profile import Graph

    rng = random.Random(seed)
    ops, values, heights, windows = [], {"in0": 3 * 64 * 64 * 4}, {"in0": 64}, []
    h, prev = 64, "in0"
    for l in range(layers):
        stride = 2 if rng.random() < 0.3 and h > 4 else 1
        h //= stride
        ops.append({"index": l, "kernel": f"k{l}", "reads": [prev], "weights": [l], "out": f"v{l}"})
        values[f"v{l}"] = 16 * h * h * 4 * rng.randint(1, 4)
        heights[f"v{l}"] = h
        windows.append((3, stride, 1))
        prev = f"v{l}"
    base = [rng.uniform(1e-3, 8e-3) for _ in range(layers)]
    quotas = [rng.choice([0.1, 0.25, 0.4]) for _ in range(n_devices)]
    devices = [fleets.FleetDevice(f"d{i}", _Prof(q, 256), _Link(rng.choice([20, 100]))) for i, q in enumerate(quotas)]
    times = {f"k{q}": [t / q for t in base] for q in set(quotas)}
    sizes = [rng.randint(1, 4) << 20 for _ in range(layers)]
    g = Graph(ops, values, ["in0"], [prev])
    return dp.Problem(g, times, windows, heights, [], [[l] for l in range(layers)], sizes, devices, values["in0"])


def test_dp_matches_brute_force_boundaries():
    import itertools

    p = _problem(3, 3, layers=7)
    stages = [(0,), (1,), (2,)]
    best, bounds = dp.partition(p, stages)
    brute = min(max(c["period_s"] for c in dp.evaluate(p, stages, [0, a, b, 7]))
                for a, b in itertools.combinations(range(1, 7), 2))
    assert best == pytest.approx(brute)
    assert max(c["period_s"] for c in dp.evaluate(p, stages, bounds)) == pytest.approx(best)


@pytest.mark.parametrize("seed,n", [(0, 2), (1, 3), (2, 4), (3, 5), (4, 5)])
def test_pso_within_5_percent_of_exhaustive(seed, n):
    p = _problem(seed, n)
    s = pso.Search(p)
    best = s.exhaustive()
    got = pso.Search(p).pso(seed=seed)
    assert got.period_s <= best.period_s * 1.05


def test_of_placements_predicted_equally_fast_the_search_keeps_the_one_with_fewest_devices(monkeypatch):
    """A device that adds no throughput still adds its calls and a hop to the prediction's error."""
    p = _problem(0, 4)
    monkeypatch.setattr(dp, "partition", lambda problem, stages: (0.01, [0] + [problem.n] * len(stages)))
    for result in (pso.Search(p).exhaustive(), pso.Search(p).pso(seed=0)):
        assert sum(len(st) for st in result.stages) == 1, result.stages


@pytest.mark.parametrize("name", ["resnet", "vgg"])
def test_a_cut_between_layers_sends_what_the_kernel_graph_says_crosses_it(name):
    """Layer l is kernel l of the fused graph, residual blocks included (fusion computes a block's
    shortcut before its second convolution, the bindings after it): cut after any layer, the part
    before returns exactly the values the kernel graph says later layers (or the outputs) read."""
    from edgetvm.partition import split
    from edgetvm.partition.pipeline.plan import kernel_layers
    from edgetvm.passes import graph_cut, row_slices

    m = split.load_model(zoo.path(name), None)
    can = row_slices.canonical(m.deploy)
    g = m.graph
    groups = kernel_layers(can, g, len(m.weights))
    assert groups is not None and len(groups) == len(g.ops)
    for j in range(1, len(groups)):
        before = [b for grp in groups[:j] for b in grp]
        after = [b for grp in groups[j:] for b in grp]
        _, sigs, _, _ = graph_cut.emit_parts(can, [before, after], len(m.weights))
        later = {v for op in g.ops[j:] for v in op["reads"]} | set(g.outputs)
        crossing = {op["out"] for op in g.ops[:j]} & later
        assert set(sigs[0].outputs) == {f"v{groups[int(v[1:])][-1]}" for v in crossing}, f"cut after layer {j - 1}"


def test_a_calls_tensors_travel_as_one_blob_shapes_and_dtypes_kept():
    """Slices, 0-d values, empty and integer arrays come back equal, with their shapes and dtypes."""
    from edgetvm.runtime.tensors import pack, unpack

    x = np.arange(48, dtype=np.float32).reshape(1, 3, 4, 4)
    arrays = [x[:, :, 1:3], np.float32(2.5), np.zeros((2, 0), np.float32), np.arange(5, dtype=np.int64)]
    got = unpack(pack(arrays))
    assert [g.shape for g in got] == [np.asarray(a).shape for a in arrays]
    assert [g.dtype for g in got] == [np.asarray(a).dtype for a in arrays]
    assert all(np.array_equal(g, a) for g, a in zip(got, arrays))
    blob = bytearray(pack(arrays))
    kept = unpack(blob, own=True)   # what a receiver keeps after the call's argument is gone
    blob[:] = bytes(len(blob))
    assert all(np.array_equal(g, a) for g, a in zip(kept, arrays))


@pytest.mark.parametrize("dtype", ["float32", "float16", "int64", "uint8", "bool"])
def test_arrays_mostly_zero_travel_as_their_nonzero_elements_bit_for_bit(dtype):
    """A ReLU output (half zeros) packs into about half its bytes plus a bitmap and comes back with the
    same bits (-0.0 and NaN included); an array without zeros is not made bigger."""
    from edgetvm.runtime.tensors import pack, unpack

    rng = np.random.default_rng(1)
    x = (rng.standard_normal((4, 32, 8, 8)) * 50).astype(dtype)
    x[rng.random(x.shape) < 0.5] = 0
    if dtype.startswith("float"):
        x.flat[:3] = [-0.0, np.nan, np.inf]
    dense = np.full((4, 32, 8, 8), 3, dtype)
    blob = pack([x, dense])
    got = unpack(blob)
    assert [g.shape for g in got] == [x.shape, dense.shape] and [g.dtype for g in got] == [x.dtype, dense.dtype]
    assert got[0].tobytes() == x.tobytes() and got[1].tobytes() == dense.tobytes()
    kept = np.count_nonzero(x.reshape(-1).view(f"u{x.itemsize}"))
    assert len(blob) < dense.nbytes + x.size // 8 + kept * x.itemsize + 200


def test_fleet_that_cannot_hold_the_model():
    p = _problem(0, 2)
    for d in p.devices:
        object.__setattr__(d, "profile", _Prof(d.profile.cpu_quota, 0.5))
    s = pso.Search(p)
    assert s.pso(iterations=3).period_s == dp.INF


# ------------------------------------------------------------------ a real run on the emulated fleet

def _can_emulate():
    from edgetvm.latte.devices import cgroups_unavailable
    from edgetvm.runtime.link import unavailable_reason

    return unavailable_reason() or cgroups_unavailable()


@pytest.mark.skipif(bool(_can_emulate()), reason="needs root, cgroups and network namespaces")
def test_real_pipeline_run_matches_single_device(tmp_path):
    """Plan vgg over 3 emulated devices (profiles cached after the first run), stream frames device
    to device, outputs bit-identical to the single-device build; nothing left behind."""
    from edgetvm.partition.pipeline import plan as plans
    from edgetvm.runtime.leftovers import NETNS_DIR
    from edgetvm.runtime.pipeline import run_plan

    f = fleets.load_fleet("fleet-3")
    prep = plans.prepare(zoo.path("vgg"), f)
    decision = plans.plan(prep, "pso")
    out = plans.write_plan(prep, f, decision, tmp_path / "plan")
    res = run_plan(out, frames=6, log=lambda *a: None)
    assert res.frames == 6 and len(res.latencies_s) == 6
    assert res.identical
    assert not [p for p in NETNS_DIR.glob(f"edgetvm-{os.getpid()}-*")]


# ------------------------------------------------------------------ bad input through the CLI, bands, a device lost

def _cli(*argv, env=None, **kw):
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "edgetvm.cli", *map(str, argv)], capture_output=True, text=True,
                          env=env, **kw)


def _one_error_line(stderr: str) -> str:
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("edgetvm: error: "), stderr
    return lines[0]


def test_cli_fleet_that_cannot_hold_the_model(tmp_path):
    """Two 64 KiB sensors cannot hold the VGG's weights: refused before any profiling, one line, exit 2."""
    f = tmp_path / "small.toml"
    f.write_text("name = 'small'\n" + "".join(
        f"[[device]]\nname = 's{i}'\nprofile = 'sensor-tiny'\nlink = 'wifi-20mbit'\n" for i in range(2)))
    r = _cli("pipeline", "plan", zoo.path("vgg"), "--fleet", f, "-o", tmp_path / "plan", timeout=300)
    assert r.returncode == 2, r.stderr
    line = _one_error_line(r.stderr)
    assert "cannot hold vgg.onnx" in line and "small" in line
    assert not (tmp_path / "plan").exists()


def test_cli_unknown_fleet(tmp_path):
    r = _cli("pipeline", "plan", zoo.path("vgg"), "--fleet", "no-such-fleet", "-o", tmp_path / "p", timeout=300)
    assert r.returncode == 2 and "unknown fleet 'no-such-fleet'" in _one_error_line(r.stderr)


def test_bands_flag_forces_a_shared_stage():
    """--bands: the search only keeps placements with a stage split in row bands (synthetic conv chain)."""
    p = _problem(5, 4)
    p.force_bands = True
    r = pso.Search(p).pso(seed=0)
    costs = dp.evaluate(p, r.stages, r.bounds)
    assert r.period_s < dp.INF and any(c["bands"] for c in costs)
    ex = pso.Search(p).exhaustive()
    assert r.period_s <= ex.period_s * 1.05


def _mine(before, owner: int):
    import subprocess

    from edgetvm.runtime import leftovers
    from edgetvm.runtime.link import VETH_PREFIX

    left = [str(r) for r in leftovers.new_since(before) if r.owner == owner]
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    left += [line.split(":")[1].strip() for line in links.splitlines() if f"{VETH_PREFIX}{owner}" in line]
    return left


@pytest.mark.slow
@pytest.mark.skipif(bool(_can_emulate()), reason="needs root, cgroups and network namespaces")
def test_real_run_with_row_bands(tmp_path):
    """VGG over fleet-3 with --bands: a stage's devices compute bands of the same layers over the fleet;
    outputs bit-identical to the single-device build; nothing left behind."""
    from edgetvm.partition.pipeline import plan as plans
    from edgetvm.runtime import leftovers
    from edgetvm.runtime.pipeline import run_plan

    f = fleets.load_fleet("fleet-3")
    prep = plans.prepare(zoo.path("vgg"), f)
    decision = plans.plan(prep, "pso", bands=True)
    shared = [st for st in decision["stages"] if st["bands"]]
    assert shared and len(shared[0]["devices"]) >= 2
    out = plans.write_plan(prep, f, decision, tmp_path / "plan")
    before = leftovers.find()
    res = run_plan(out, frames=4, log=lambda *a: None)
    assert res.identical and len(res.latencies_s) == 4
    assert not _mine(before, os.getpid())


@pytest.mark.slow
@pytest.mark.skipif(bool(_can_emulate()), reason="needs root, cgroups and network namespaces")
def test_calibration_measures_calls_bytes_and_a_nodes_own_work_and_only_lowers_predictions():
    """On one emulated device per kind: every cost measured (the node probe streams its frames through a
    one-kernel part to the sink, or calibration fails), none negative, and a plan's predicted throughput
    with them is no higher than from the kernels' profiles alone."""
    from edgetvm.partition.pipeline import plan as plans
    from edgetvm.partition.pipeline.calibrate import calibrate

    f = fleets.load_fleet("fleet-2")
    costs = calibrate(f)
    assert set(costs) == {d.kind for d in f.devices}
    for kind, c in costs.items():
        assert set(c) == {"call_recv_s", "byte_recv_s", "call_send_s", "byte_send_s", "byte_join_s", "frame_s"}
        assert all(np.isfinite(v) and v >= 0 for v in c.values()), (kind, c)
    bare = plans.prepare(zoo.path("vgg"), f)
    both = plans.prepare(zoo.path("vgg"), f, calibrate=costs)
    for method in ("single", "dp"):
        assert plans.plan(both, method)["predicted"]["throughput_fps"] <= \
            plans.plan(bare, method)["predicted"]["throughput_fps"] * (1 + 1e-9)


@pytest.mark.slow
@pytest.mark.skipif(bool(_can_emulate()), reason="needs root, cgroups and network namespaces")
def test_a_stage_failing_far_down_the_chain_stops_the_run_with_its_message(tmp_path, monkeypatch):
    """The last stage's part fails on the first frame: its error travels down to the sink and the
    run stops naming that device, instead of waiting for a result that will never come."""
    from edgetvm.partition.pipeline import plan as plans
    from edgetvm.runtime import pipeline

    monkeypatch.setattr(pipeline, "STALL_S", 600.0)  # a stall would end the run with another message
    f = fleets.load_fleet("fleet-3")
    prep = plans.prepare(zoo.path("vgg"), f)
    decision = plans.plan(prep, "dp")
    assert len(decision["stages"]) >= 2
    out = plans.write_plan(prep, f, decision, tmp_path / "plan")
    last = decision["stages"][-1]["devices"][0]
    wfile = out / f"s{len(decision['stages']) - 1}-{last}.npz"
    with np.load(wfile) as z:
        arrays = [z[k] for k in sorted(z.files, key=lambda k: int(k.split("_")[1]))]
    np.savez(wfile, *arrays[:-1])  # loads, but the stage's function is called one weight short
    with pytest.raises(UserError, match=rf"the pipeline stopped: device '{last}'"):
        pipeline.run_plan(out, frames=2, log=lambda *a: None)


@pytest.mark.slow
@pytest.mark.skipif(bool(_can_emulate()), reason="needs root, cgroups and network namespaces")
def test_device_killed_mid_run(tmp_path):
    """A device's server killed while frames stream: the run stops with one line naming it, exit 2,
    within a bounded time, and every namespace, link, cgroup and process it made is gone."""
    import re
    import signal
    import subprocess
    import sys
    import time

    from edgetvm.partition.pipeline import plan as plans
    from edgetvm.runtime import leftovers

    f = fleets.load_fleet("fleet-2")
    prep = plans.prepare(zoo.path("vgg"), f)
    decision = plans.plan(prep, "dp")  # both devices, one stage each
    victim = decision["stages"][-1]["devices"][0]
    out = plans.write_plan(prep, f, decision, tmp_path / "plan")
    before = leftovers.find()
    # Everything the run makes is marked as this test's (the owner mark), so only it is counted.
    env = {**os.environ, leftovers.OWNER_ENV: str(os.getpid())}
    proc = subprocess.Popen([sys.executable, "-m", "edgetvm.cli", "pipeline", "run", str(out), "--frames", "100000"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        port = None
        for line in proc.stdout:
            if m := re.match(rf"device {victim}: .* at [\d.]+:(\d+)", line):
                port = m.group(1)
            if line.startswith("streaming"):
                break
        assert port, "the run never started streaming"
        time.sleep(2)
        pids = [p.name for p in Path("/proc").iterdir() if p.name.isdigit()
                and "edgetvm.runtime.device_server" in _cmdline(p) and f" --port {port} " in _cmdline(p)]
        assert pids, f"no server process for {victim} on port {port}"
        for pid in pids:
            os.kill(int(pid), signal.SIGKILL)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 2, err
    line = _one_error_line(err)
    assert f"device '{victim}'" in line, line
    assert not _mine(before, os.getpid())


def _cmdline(p: Path) -> str:
    try:
        return (p / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""
