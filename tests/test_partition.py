"""Device/server split: any cut closed under predecessors runs bit-identical to the unsplit build; the
partitioners find what exhaustive search finds (DADS: the optimal cut; CIC: the min-cut's cost at every
bandwidth; Neurosurgeon: the best split point); profiles are cached per model and device and a stale
one is refused; `edgetvm partition` and `edgetvm run` across an emulated link; bad input is one line."""

import itertools
import json
import os

import numpy as np
import pytest

from edgetvm import zoo
from edgetvm.cli import main
from edgetvm.compiler import compile_model, random_inputs
from edgetvm.costmodels import profile as profiles
from edgetvm.errors import UserError
from edgetvm.partition import cuts, split
from edgetvm.runtime.artifact import open_artifact
from edgetvm.runtime.session import Runner
from edgetvm.runtime.split import SplitRunner
from edgetvm.targets import load_board

HOST = load_board("host")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("models")
    out = {}
    for name, kw in [("mlp", {}), ("resnet", {}), ("inception", {"modules": 4})]:
        src = zoo.path(name, d, **kw)
        out[name] = (src, split.load_model(src))
    return out


def closure(graph, chosen: set[int]) -> frozenset[int]:
    """The smallest cut holding `chosen`: every op whose value they need comes along."""
    producer = {op["out"]: k for k, op in enumerate(graph.ops)}
    todo, done = list(chosen), set()
    while todo:
        k = todo.pop()
        if k in done:
            continue
        done.add(k)
        todo += [producer[v] for v in graph.ops[k]["reads"] if v in producer]
    return frozenset(done)


@pytest.mark.parametrize("name", ["mlp", "resnet", "inception"])
def test_any_closed_cut_runs_bit_identical_to_the_unsplit_build(name, models, tmp_path):
    src, m = models[name]
    ref = open_artifact(compile_model(src, HOST, tmp_path / "ref").path)
    x = random_inputs(ref.inputs, seed=3)
    want = Runner(ref).run(x)
    n, rng = len(m.graph.ops), np.random.default_rng(0)
    cut_sets = [frozenset(), frozenset(range(n))] + [closure(m.graph, set(rng.choice(n, 2).tolist())) for _ in range(3)]
    crossed_several = False
    for i, dset in enumerate(cut_sets):
        costs = cuts.Costs(m.graph, [1.0] * n, [1.0] * n)
        crossing = costs.crossing(dset)
        crossed_several |= len(crossing) > 1
        out = split.write_split(m, dset, HOST, HOST, tmp_path / f"s{i}", {"crossing": crossing})
        manifest = split.open_split(out)
        assert [c["value"] for c in manifest["crossing"]] == crossing
        assert all(c["bytes"] == int(np.prod(c["shape"])) * 4 for c in manifest["crossing"])
        got, _ = SplitRunner(out, manifest).run(x)
        for k in want:
            np.testing.assert_array_equal(got[k], want[k])
    if name == "inception":
        assert crossed_several, "a cut through a module's branches should send several tensors"


def test_a_part_with_one_output_returns_the_tensor_itself_and_one_with_several_a_tuple(models, tmp_path):
    """Over RPC a returned tuple stays on the board and costs a round trip per question about it: a
    device part that sends one tensor returns it bare, so a frame is one call and one read."""
    import tvm

    from edgetvm.runtime.session import _load_library, _virtual_machine

    src, m = models["inception"]
    n = len(m.graph.ops)
    costs = cuts.Costs(m.graph, [1.0] * n, [1.0] * n)
    cands = [closure(m.graph, {k}) for k in range(n)]
    one = next(d for d in cands if len(costs.crossing(d)) == 1)
    several = next(d for d in cands if len(costs.crossing(d)) > 1)
    for i, dset in enumerate([one, several]):
        k = len(costs.crossing(dset))
        out = split.write_split(m, dset, HOST, HOST, tmp_path / f"s{i}", {"crossing": costs.crossing(dset)})
        part = open_artifact(out / "device")
        runner = Runner(part)
        raw = _virtual_machine(_load_library(part.library), runner.dev, part.library)["device"](
            *runner.args(random_inputs(part.inputs, seed=0)))
        assert isinstance(raw, tvm.runtime.Tensor) == (k == 1)
        assert len(part.outputs) == k == len(runner.call(runner.args(random_inputs(part.inputs, seed=0))))


def test_a_frame_pays_a_round_trip_per_tuple_item_only_when_the_part_returns_several_tensors():
    one, three = {"tensors": 1}, {"tensors": 3}
    assert cuts.call_round_trips(one) == 1
    assert cuts.call_round_trips(three) == 4
    link = cuts.Link(8e6, per_tensor_s=1e-3, call_s=5e-3)   # 1 byte per microsecond
    parts = {"bytes": 1000, "tensors": 1, "device_s": 0.0, "server_s": 0.0}
    assert cuts.parts_latency(parts, link, cuts.DeviceCPU(1.0, 0.1))[0] == pytest.approx(1e-3 + 1e-3 + 5e-3)
    # without a measured call, a call's round trip costs what a tensor's does (the planners' link)
    assert cuts.parts_latency(parts, cuts.Link(8e6, 1e-3), cuts.DeviceCPU(1.0, 0.1))[0] == pytest.approx(3e-3)


def test_a_cut_that_is_not_closed_under_predecessors_is_refused(models, tmp_path):
    src, m = models["resnet"]
    with pytest.raises(ValueError, match="closed under predecessors"):
        split.write_split(m, frozenset({3}), HOST, HOST, tmp_path / "s", {"crossing": []})
    assert not (tmp_path / "s").exists()


# ------------------------------------------------------------------------------------ partitioners

def random_dag(rng, n: int) -> profiles.Graph:
    ops = []
    for k in range(n):
        earlier = [f"v{j}" for j in range(k)] or ["in0"]
        reads = sorted(set(rng.choice(earlier, size=min(len(earlier), int(rng.integers(1, 3))), replace=False)))
        ops.append({"index": k, "kernel": f"k{k}", "reads": list(reads), "weights": [], "out": f"v{k}"})
    values = {"in0": int(rng.integers(1000, 100000))} | {f"v{k}": int(rng.integers(100, 200000)) for k in range(n)}
    return profiles.Graph(ops, values, ["in0"], [f"v{n - 1}"])


def closed_sets(graph):
    n = len(graph.ops)
    for bits in itertools.product((0, 1), repeat=n):
        s = frozenset(k for k in range(n) if bits[k])
        if closure(graph, set(s)) == s:
            yield s


@pytest.mark.parametrize("seed", range(5))
def test_dads_finds_the_optimal_cut_of_a_dag(seed):
    rng = np.random.default_rng(seed)
    g = random_dag(rng, 10)
    costs = cuts.Costs(g, rng.uniform(1e-3, 2e-2, 10).tolist(), rng.uniform(1e-4, 2e-3, 10).tolist())
    for mbit in (1, 10, 100):
        link = cuts.Link(mbit * 1e6, 1e-3)
        best = min(costs.latency(s, link) for s in closed_sets(g))
        got = cuts.dads(costs, link)
        assert closure(g, set(got)) == got
        assert costs.latency(got, link) == pytest.approx(best, rel=1e-9)
        # Neurosurgeon's single split point can do no better; device and server alone are cuts too.
        assert costs.latency(cuts.neurosurgeon(costs, link), link) >= best - 1e-12
        assert costs.latency(cuts.neurosurgeon(costs, link), link) <= min(
            costs.latency(cuts.device_only(costs), link), costs.latency(cuts.server_only(costs), link)) + 1e-12


@pytest.mark.parametrize("name", ["resnet", "inception"])
def test_cic_costs_the_same_as_the_full_min_cut_at_every_bandwidth(name, models):
    _, m = models[name]
    rng = np.random.default_rng(1)
    n = len(m.graph.ops)
    costs = cuts.Costs(m.graph, rng.uniform(1e-3, 2e-2, n).tolist(), rng.uniform(1e-4, 2e-3, n).tolist())
    env = cuts.cic_envelope(costs, 1e-3)
    assert len(env.cuts) >= 2 and env.min_cuts <= 2 * len(env.cuts) + 1
    for mbit in np.geomspace(0.05, 1000, 60):
        link = cuts.Link(mbit * 1e6, 1e-3)
        assert costs.latency(env.lookup(link), link) == pytest.approx(
            costs.latency(cuts.dads(costs, link), link), rel=1e-9), mbit


def test_throughput_objective_balances_the_stages():
    rng = np.random.default_rng(2)
    g = random_dag(rng, 9)
    costs = cuts.Costs(g, rng.uniform(1e-3, 1e-2, 9).tolist(), rng.uniform(1e-3, 1e-2, 9).tolist())
    link = cuts.Link(50e6, 1e-3)
    best = max(costs.throughput(s, link) for s in closed_sets(g))
    for method in ("dads", "cic", "neurosurgeon"):
        d = cuts.decide(costs, link, method, "throughput")
        assert costs.throughput(d.device, link) <= best + 1e-9
    assert costs.throughput(cuts.decide(costs, link, "dads", "throughput").device, link) >= max(
        costs.throughput(cuts.device_only(costs), link), costs.throughput(cuts.server_only(costs), link))


# ------------------------------------------------------------------------------------ profiles

def test_a_profile_measured_for_another_model_or_device_is_refused(models, tmp_path):
    _, m = models["mlp"]
    key = profiles.profile_key(m.sha256, m.inputs, HOST)
    prof = profiles.Profile(key, m.graph, [1e-3] * len(m.graph.ops), 1e-2)
    (tmp_path / "p.json").write_text(json.dumps(prof.to_json()))
    assert profiles.load(tmp_path / "p.json", key).time_s == prof.time_s
    other = dict(key, model="0" * 64)
    with pytest.raises(UserError, match="stale.*model"):
        profiles.load(tmp_path / "p.json", other)
    # fusion rules that changed since (other kernel calls) make it stale too, not silently misaligned
    fewer = profiles.Graph.from_json(dict(m.graph.to_json(), ops=m.graph.to_json()["ops"][:-1]))
    keyed = profiles.profile_key(m.sha256, m.inputs, HOST, m.graph)
    (tmp_path / "g.json").write_text(json.dumps(profiles.Profile(keyed, m.graph, [1e-3] * len(m.graph.ops), 1e-2).to_json()))
    with pytest.raises(UserError, match="stale.*graph"):
        profiles.load(tmp_path / "g.json", profiles.profile_key(m.sha256, m.inputs, HOST, fewer))


def test_profile_times_every_kernel_call_of_main(models):
    src, m = models["mlp"]
    prof = split.profile(m, HOST)
    assert len(prof.time_s) == len(m.graph.ops)
    assert all(t > 0 for t, op in zip(prof.time_s, m.graph.ops) if op["kernel"])
    # The second time it comes from the cache, unchanged.
    assert split.profile(m, HOST).time_s == prof.time_s


# ------------------------------------------------------------------------------------ the CLI

def one_line_error(capsys, rc, *needles):
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1, err
    for n in needles:
        assert n in err, err


@pytest.mark.parametrize("argv,needles", [
    (["--device", "iot-tiny", "--bandwidth", "fast"], ["bandwidth 'fast'", "10Mbit"]),
    (["--device", "toaster", "--bandwidth", "10Mbit"], ["unknown device profile 'toaster'"]),
    (["--device", "iot-tiny", "--server", "rpi9", "--bandwidth", "10Mbit"], ["rpi9"]),
    (["--device", "iot-tiny"], ["--bandwidth"]),
])
def test_partition_bad_input_is_one_line(argv, needles, models, tmp_path, capsys):
    src, _ = models["mlp"]
    rc = main(["partition", str(src), *argv, "-o", str(tmp_path / "out")])
    one_line_error(capsys, rc, *needles)
    assert not (tmp_path / "out").exists()


def test_a_modified_part_is_refused(models, tmp_path, capsys):
    src, m = models["mlp"]
    out = split.write_split(m, frozenset({0}), HOST, HOST, tmp_path / "s", {"crossing": ["v0"]})
    with open(out / "server" / "weights.bin", "r+b") as f:
        f.write(b"\x01")
    one_line_error(capsys, main(["run", str(out)]), "weights.bin", "modified")


def _emulation_unavailable():
    from edgetvm.latte.devices import cgroups_unavailable
    from edgetvm.runtime import link

    return link.unavailable_reason() or cgroups_unavailable()


@pytest.mark.skipif(_emulation_unavailable() is not None, reason=f"no emulated link: {_emulation_unavailable()}")
def test_partition_then_run_across_an_emulated_link(models, tmp_path, capsys):
    """The device part runs in the device's cgroup behind a shaped veth pair; its tensors cross it."""
    from edgetvm.runtime import leftovers

    src, m = models["resnet"]
    before = leftovers.find()
    assert main(["partition", str(src), "--device", "iot-tiny", "--bandwidth", "100Mbit", "--method", "dads",
                 "-o", str(tmp_path / "s")]) == 0
    out = capsys.readouterr().out
    assert "crossing:" in out and "predicted latency" in out and "decision" in out
    ref = open_artifact(compile_model(src, HOST, tmp_path / "ref").path)
    x = random_inputs(ref.inputs, seed=4)
    np.save(tmp_path / "x.npy", x["x"])
    rc = main(["run", str(tmp_path / "s"), "--input", f"x={tmp_path / 'x.npy'}", "--output", str(tmp_path / "y.npz"),
               "--repeat", "2", "--report", "--link", "wifi-20mbit"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "emulated iot-tiny over wifi-20mbit" in out and "predicted ms" in out and "frames/s" in out
    assert "predicted under the device's CFS quota" in out   # with its CPU per call and per byte, measured
    want = Runner(ref).run(x)
    got = np.load(tmp_path / "y.npz")
    for k in want:
        np.testing.assert_array_equal(got[k], want[k])
    mine = [r for r in leftovers.new_since(before) if r.owner == os.getpid()]
    assert mine == []  # no namespace, veth, cgroup or server left behind


def test_a_device_part_that_does_not_fit_the_device_memory_is_refused(models, tmp_path, capsys):
    src, _ = models["resnet"]
    rc = main(["partition", str(src), "--device", "sensor-tiny", "--bandwidth", "10Mbit", "--method", "device",
               "-o", str(tmp_path / "s")])
    one_line_error(capsys, rc, "sensor-tiny", "MiB")
    assert not (tmp_path / "s").exists()


def _board_unavailable():
    from edgetvm.runtime import emulated_board

    return emulated_board.board_unavailable_reason()


@pytest.mark.skipif(_board_unavailable() is not None, reason=f"emulated board unavailable: {_board_unavailable()}")
def test_device_part_cross_compiled_for_rpi4_profiled_and_run_on_the_aarch64_board(models, tmp_path, capsys):
    """A profile naming a board is timed on it over RPC; its part is built for aarch64, the server's here."""
    from edgetvm.runtime import emulated_board

    src, m = models["mlp"]
    ref = open_artifact(compile_model(src, HOST, tmp_path / "ref").path)
    x = random_inputs(ref.inputs, seed=5)
    np.save(tmp_path / "x.npy", x["x"])
    with emulated_board.EmulatedBoard() as board:
        addr = f"127.0.0.1:{board.port}"
        assert main(["partition", str(src), "--device", "rpi4-board", "--rpc", addr, "--bandwidth", "10Mbit",
                     "--method", "neurosurgeon", "-o", str(tmp_path / "s")]) == 0
        manifest = split.open_split(tmp_path / "s")
        assert json.loads((tmp_path / "s" / "device" / "manifest.json").read_text())["board"]["arch"] == "aarch64"
        # Run whichever cut it chose, and a cut with work on both sides.
        split.write_split(m, frozenset({0, 1}), load_board("rpi4"), HOST, tmp_path / "both",
                          {"crossing": cuts.Costs(m.graph, [0] * len(m.graph.ops), [0] * len(m.graph.ops))
                           .crossing(frozenset({0, 1}))})
        for art in ("s", "both"):
            rc = main(["run", str(tmp_path / art), "--input", f"x={tmp_path / 'x.npy'}", "--rpc", addr,
                       "--repeat", "1", "--output", str(tmp_path / f"{art}.npz")])
            assert rc == 0, capsys.readouterr().err
            got, want = np.load(tmp_path / f"{art}.npz"), Runner(ref).run(x)
            for k in want:
                np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=1e-5)
    assert manifest["plan"]["device_board"] == "rpi4"


class _Frames(SplitRunner):
    """A split runner whose frames take the times given, in turn, and whose idle times are recorded."""

    def __init__(self, totals):
        self.totals, self.k = totals, 0

    def place(self, inputs):
        return {}

    def device_step(self, placed):
        t = self.totals[self.k % len(self.totals)]
        self.k += 1
        return {}, t, 0.0

    def server_step(self, values):
        return {}, 0.0


def test_split_latency_adds_bursts_until_the_mean_is_known_to_the_share_asked(monkeypatch):
    import time as _time

    slept = []
    monkeypatch.setattr(_time, "sleep", slept.append)
    steady = _Frames([0.002])
    assert len(steady.latency({}, repeat=48, idle_max_s=0.01, burst=8, rel_sem=0.02)) == 48
    assert len(slept) == 6 and all(0 <= s < 0.01 for s in slept)   # one idle time per burst
    # Bursts whose means differ (a frame of 10 ms in one burst of 3): more are needed, up to the limit.
    noisy = _Frames([0.002] * 8 + [0.002] * 8 + [0.01] + [0.002] * 7)
    times = noisy.latency({}, repeat=48, idle_max_s=0.01, burst=8, rel_sem=0.02, max_frames=160)
    assert len(times) == 160
    times = noisy.latency({}, repeat=48, idle_max_s=0.01, burst=8, rel_sem=0.2)
    assert len(times) == 48
    # Without idle times frames run back to back: no sleeping, exactly `repeat` without rel_sem.
    slept.clear()
    assert len(_Frames([0.002, 0.008]).latency({}, repeat=10)) == 10 and slept == []
