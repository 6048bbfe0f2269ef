"""Pipeline model-parallel training: stages of a TVM training step, GPipe/1F1B schedules, the predictor
and search, a real run over TVM RPC, the CLI's bad input."""

from __future__ import annotations

import numpy as np
import pytest

from edgetvm import train
from edgetvm.errors import UserError
from edgetvm.pipetrain import schedule as sch
from edgetvm.pipetrain.stages import StagePlan, alexnet, check_bounds

SMALL = train.lenet5(channels=(6, 16), hidden=64)
B = 16
OPT = train.OptimizerConfig("momentum", 0.05)   # one plan per (bounds, micro-batch): compiled once


def _batches(n=3, seed=0, batch=B):
    rng = np.random.default_rng(seed)
    return [(rng.standard_normal((batch, 1, 28, 28)).astype("float32"), rng.integers(0, 10, batch)) for _ in range(n)]


@pytest.fixture(scope="module")
def reference():
    """The unsplit training step (train.Trainer) on three batches: losses and final weights."""
    t = train.Trainer(SMALL, batch=B, optimizer="momentum", lr=0.05)
    losses = [t.step(x, y) for x, y in _batches()]
    return losses, t.params


@pytest.mark.parametrize("schedule,bounds,micro,replicas", [
    ("gpipe", (0, 3, 7, 10), 4, None),
    ("1f1b", (0, 3, 7, 10), 4, None),
    ("1f1b", (0, 5, 10), 2, None),
    ("gpipe", (0, 2, 4, 6, 8, 10), 8, None),
    ("1f1b", (0, 3, 7, 10), 4, [1, 2, 1]),      # a data-parallel stage: gradients summed over replicas
    ("gpipe", (0, 10), 1, None),                 # one stage, one micro-batch: the plain step
])
def test_stages_train_like_the_unsplit_step(reference, schedule, bounds, micro, replicas):
    ref_losses, ref_params = reference
    plan = StagePlan(SMALL, bounds, B // micro, OPT)
    c = sch.Controller(sch.local_replicas(plan, replicas), schedule, micro)
    losses = [c.step(x, y)["loss"] for x, y in _batches()]
    params = sch.PipelineTrainer(plan, c, B, 0).params
    assert set(params) == set(ref_params)
    for name, ref in ref_params.items():
        np.testing.assert_allclose(params[name], ref, rtol=1e-4, atol=2e-5, err_msg=name)
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-4)
    c.close()


def test_gradients_summed_in_float16_are_rounded_on_the_wire_and_summed_in_float32():
    rng = np.random.default_rng(4)
    parts = [rng.standard_normal(1000).astype("float32") * 1e-3 for _ in range(3)]
    exact = sch.sum_gradients(parts)
    np.testing.assert_array_equal(exact, (parts[0] + parts[1]) + parts[2])      # replica order, float32
    half = sch.sum_gradients(parts, "float16")
    assert half.dtype == np.float32
    want = sum(p.astype("float16").astype("float32") for p in parts).astype("float16").astype("float32")
    np.testing.assert_array_equal(half, want)
    assert not np.array_equal(half, exact)
    np.testing.assert_allclose(half, exact, rtol=2e-3, atol=8e-6)   # a few float16 steps at 5e-3
    with pytest.raises(UserError, match="float32 or float16, not 'int8'"):
        sch.Controller([[object()]], "gpipe", 1, reduce_dtype="int8")


def test_replicas_summing_in_float16_stay_in_step_and_near_the_exact_sum(reference):
    """A data-parallel stage whose replicas exchange gradients in float16: every replica holds the same
    weights after each step, within float16 rounding of the unsplit step's, and not equal to them (the
    rounding happens)."""
    _, ref_params = reference
    plan = StagePlan(SMALL, (0, 3, 7, 10), B // 4, OPT)
    reps = sch.local_replicas(plan, [1, 2, 1])
    c = sch.Controller(reps, "1f1b", 4, reduce_dtype="float16")
    for x, y in _batches():
        c.step(x, y)
    for a, b in zip(reps[1][0].params(), reps[1][1].params()):
        np.testing.assert_array_equal(a, b)
    params = sch.PipelineTrainer(plan, c, B, 0).params
    differs = 0
    for name, ref in ref_params.items():
        np.testing.assert_allclose(params[name], ref, rtol=1e-2, atol=1e-4, err_msg=name)
        differs += not np.array_equal(params[name], ref)
    assert differs > 0
    c.close()


def test_stage_backward_is_the_vjp():
    """A middle stage's backward returns the gradient of sum(y * gy) w.r.t. its input (finite differences)."""
    plan = StagePlan(SMALL, (0, 3, 7, 10), 4, OPT)
    st = sch.local_replicas(plan)[1][0]
    rng = np.random.default_rng(3)
    a = rng.standard_normal((4, 6, 12, 12)).astype("float32")
    y = st.forward(0, a)
    gy = rng.standard_normal(y.shape).astype("float32")
    ga = st.backward(0, gy)
    assert ga.shape == a.shape
    d = rng.standard_normal(a.shape).astype("float32")
    eps = 1e-3
    fp = (st.forward(-1, a + eps * d, keep=False) * gy).sum(dtype=np.float64)
    fm = (st.forward(-1, a - eps * d, keep=False) * gy).sum(dtype=np.float64)
    assert abs((fp - fm) / (2 * eps) - (ga * d).sum(dtype=np.float64)) < 2e-2 * abs((ga * d).sum()) + 1e-3


def test_schedules_order():
    assert sch.gpipe(3, 3, 0) == [("F", 0), ("F", 1), ("F", 2), ("B", 2), ("B", 1), ("B", 0)]
    assert sch.one_f_one_b(3, 4, 0) == [("F", 0), ("F", 1), ("F", 2), ("B", 0), ("F", 3), ("B", 1), ("B", 2), ("B", 3)]
    assert sch.one_f_one_b(3, 4, 2) == [("F", 0), ("B", 0), ("F", 1), ("B", 1), ("F", 2), ("B", 2), ("F", 3), ("B", 3)]
    for S in (1, 2, 4):
        for M in (1, 3, 8):
            for s in range(S):
                for f in (sch.gpipe, sch.one_f_one_b):
                    ops = f(S, M, s)
                    assert sorted(ops) == sorted([("F", i) for i in range(M)] + [("B", i) for i in range(M)])
                    assert all(ops.index(("F", i)) < ops.index(("B", i)) for i in range(M))


def test_one_f_one_b_keeps_fewer_activations():
    plan = StagePlan(SMALL, (0, 3, 7, 10), 4, OPT)
    peaks = {}
    for kind in ("gpipe", "1f1b"):
        reps = sch.local_replicas(plan)
        sch.Controller(reps, kind, 4).step(*_batches(1)[0])
        peaks[kind] = [r[0].peak_stash for r in reps]
    assert peaks["gpipe"] == [4, 4, 4] and peaks["1f1b"] == [3, 2, 1]


def test_bad_input_is_one_user_error():
    with pytest.raises(UserError, match="partitions but .* has only 10 layers"):
        check_bounds(SMALL, tuple(range(12)))
    with pytest.raises(UserError, match="does not divide the batch of 16"):
        sch.check_micro_batches(16, 3)
    with pytest.raises(UserError, match="unknown schedule"):
        sch.schedule_ops("zigzag", 2, 2, 0)


def test_alexnet_shape():
    m = alexnet()
    shapes = train.param_shapes(m)
    assert sum(1 for n in shapes if n.startswith("conv") and n.endswith("weight")) == 5
    assert sum(1 for n in shapes if n.startswith("fc") and n.endswith("weight")) == 3
    assert shapes["fc1.weight"] == (64 * 3 * 3, 256)


def test_a_dying_stage_stops_the_step_with_its_name():
    plan = StagePlan(SMALL, (0, 3, 7, 10), 4, OPT)
    reps = sch.local_replicas(plan)

    def boom(*a, **k):
        raise RuntimeError("device 'sbc1' stopped answering")

    reps[1][0].backward = boom
    c = sch.Controller(reps, "1f1b", 4)
    with pytest.raises(sch.StageFailed, match="stage 1 failed: device 'sbc1' stopped answering"):
        c.step(*_batches(1)[0])


def _cli(argv, capsys):
    from edgetvm.cli import main

    code = main(argv)
    return code, capsys.readouterr().err.strip().splitlines()


@pytest.mark.parametrize("extra,match", [
    (["--micro-batches", "3", "--batch", "32"], "does not divide the batch of 32"),
    (["--partitions", "40"], "only 19 layers"),
    (["--bounds", "0,5,19", "--devices", "iot-tiny,iot-tiny", "--batch", "1024", "--micro-batches", "1"],
     "cannot hold stage 0"),
    (["--bounds", "0,5,9,19", "--devices", "2xsbc-a53"], "3 stages but --devices gives 2 devices"),
    (["--devices", "no-such-board"], "unknown device profile|unknown"),
])
def test_cli_bad_input_is_one_line_exit_2(tmp_path, capsys, extra, match):
    import re

    out = tmp_path / "run"
    code, err = _cli(["pipetrain", "run", "alexnet", "-o", str(out), *extra], capsys)
    assert code == 2 and len(err) == 1 and re.search(match, err[0]), err
    assert not out.exists()


def _rpc_unavailable():
    from edgetvm.latte.devices import cgroups_unavailable
    from edgetvm.runtime.link import unavailable_reason

    return unavailable_reason() or cgroups_unavailable()


@pytest.mark.skipif(bool(_rpc_unavailable()), reason="needs root, cgroups and network namespaces")
def test_two_stages_over_rpc_train_like_the_unsplit_step_and_a_dying_stage_stops(reference, tmp_path):
    """Two emulated devices (cgroups, shaped links, TVM RPC): the same weights as the unsplit step; then a
    device killed mid-epoch stops training with a message naming it, the last checkpoint intact."""
    import os
    import signal

    from edgetvm.data import DataSet, Split
    from edgetvm.pipetrain.emulate import EmulatedStages, parse_devices

    ref_losses, ref_params = reference
    plan = StagePlan(SMALL, (0, 5, 10), B // 4, OPT)
    devs = parse_devices("2xsbc-a53")
    rng = np.random.default_rng(5)
    x = rng.random((8 * B, 1, 28, 28)).astype("float32")
    y = rng.integers(0, 10, 8 * B)
    data = DataSet("toy", Split(x, y), Split(x[:B], y[:B]), Split(x[:B], y[:B]), tuple("0123456789"), 0)
    ck = tmp_path / "ck.npz"
    with EmulatedStages(plan, [[devs[0]], [devs[1]]], train.init_params(SMALL, 0)) as es:
        c = sch.Controller(es.replicas, "1f1b", 4, es.names)
        losses = [c.step(xb, yb)["loss"] for xb, yb in _batches()]
        params = sch.PipelineTrainer(plan, c, B, 0).params
        for name, ref in ref_params.items():
            np.testing.assert_allclose(params[name], ref, rtol=1e-4, atol=2e-5, err_msg=name)
        np.testing.assert_allclose(losses, ref_losses, rtol=1e-4)
        busy = c.totals[(1, 0)]
        assert 0 < busy["busy_s"] < busy["wall_s"] and busy["idle_s"] > 0
        steps = []

        def kill_in_epoch_2(rec):
            steps.append(rec)
            if len(steps) == 10:   # epoch 1 has 8 steps: this is epoch 2, step 2
                os.killpg(es.devices[devs[1].name].proc.pid, signal.SIGKILL)  # the server and its session

        with pytest.raises(UserError, match=r"epoch 2, step 3: stage 1 on device 'sbc1' failed.*intact"):
            sch.fit(plan, c, data, 3, B, 0, ck, progress=False, on_step=kill_in_epoch_2)
        c.close()
    saved = train.read_checkpoint(ck)
    assert saved["meta"]["epoch"] == 1 and set(saved["params"]) == set(ref_params)


@pytest.mark.skipif(bool(_rpc_unavailable()), reason="needs root, cgroups and network namespaces")
def test_stages_on_devices_hand_activations_to_each_other_not_through_the_coordinator(reference):
    """Stage 0 on one device, stage 1 data-parallel on two, GPipe: the activations (forward) and their
    gradients (backward) go from device to device over the devices' shaped links, and so do the replicas'
    gradient sums; the coordinator's connections carry the input batch, the labels and small control
    calls only, and the weights are the unsplit step's."""
    from edgetvm.pipetrain.emulate import EmulatedStages, parse_devices
    from edgetvm.pipetrain.stages import activation_shapes

    ref_losses, ref_params = reference
    plan = StagePlan(SMALL, (0, 1, 10), B // 4, OPT)   # cut after conv1: its output is 6x the input's size
    devs = parse_devices("3xsbc-a53")
    batches = _batches()
    with EmulatedStages(plan, [[devs[0]], [devs[1], devs[2]]], train.init_params(SMALL, 0)) as es:
        c = sch.Controller(es.replicas, "gpipe", 4, es.names)
        assert c.direct
        coord0, sent0 = es.coordinator_bytes(), es.link_bytes()
        losses = [c.step(xb, yb)["loss"] for xb, yb in batches]
        coord, sent = es.coordinator_bytes() - coord0, es.link_bytes()
        params = sch.PipelineTrainer(plan, c, B, 0).params
        c.close()
    for name, ref in ref_params.items():
        np.testing.assert_allclose(params[name], ref, rtol=1e-4, atol=2e-5, err_msg=name)
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-4)

    steps = len(batches)
    act = 4 * B * int(np.prod(activation_shapes(SMALL, 1)[0]))        # a step's activations at the cut
    inputs = sum(x.nbytes + 8 * len(y) for x, y in batches)
    # beyond those, the control calls: less than a quarter of one hop of the activations (through the
    # coordinator, every activation and gradient crossed it twice, 4 x act a step, and each replica's
    # weight gradients went there and back)
    assert coord - inputs < steps * act // 4, (coord, inputs, steps * act)
    # the activations left stage 0's device over its own link, the gradients each replica's over theirs
    # (half of each: gradients through a ReLU are about half zeros, and travel as their nonzero elements)
    assert sent[devs[0].name] - sent0[devs[0].name] >= steps * act
    for d in devs[1:]:
        assert sent[d.name] - sent0[d.name] >= steps * act // 4


@pytest.mark.skipif(bool(_rpc_unavailable()), reason="needs root, cgroups and network namespaces")
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_three_replicas_sum_their_gradients_a_third_each(dtype):
    """One stage on three devices: the weights are the unsplit step's (float16: those of the same replicas
    summed by the coordinator in float16), and the replicas' links carry the same bytes, at most 4/3 of the
    weight gradients a step each (a third to each of the two others, and the sum of its third back to
    them; float16: half that), where summing through one replica made its link carry twice what the
    others' did."""
    from edgetvm.pipetrain.emulate import EmulatedStages, parse_devices

    batch = 12
    ref = train.Trainer(SMALL, batch=batch, optimizer="momentum", lr=0.05)
    batches = _batches(batch=batch)
    ref_losses = [ref.step(x, y) for x, y in batches]
    plan = StagePlan(SMALL, (0, len(SMALL.layers)), batch // 3, OPT)
    devs = parse_devices("3xsbc-a53")
    if dtype == "float16":
        here = sch.Controller(sch.local_replicas(plan, [3]), "gpipe", 3, reduce_dtype=dtype)
        ref_losses = [here.step(x, y)["loss"] for x, y in batches]
        want_params = sch.PipelineTrainer(plan, here, batch, 0).params
        here.close()
    else:
        want_params = ref.params
    with EmulatedStages(plan, [devs], train.init_params(SMALL, 0)) as es:
        c = sch.Controller(es.replicas, "gpipe", 3, es.names, reduce_dtype=dtype)
        sent0 = es.link_bytes()
        losses = [c.step(x, y)["loss"] for x, y in batches]
        sent = es.link_bytes()
        params = sch.PipelineTrainer(plan, c, batch, 0).params
        c.close()
    for name, want in want_params.items():
        np.testing.assert_allclose(params[name], want, rtol=1e-4, atol=2e-5, err_msg=name)
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-4)
    grads = np.dtype(dtype).itemsize * sum(int(np.prod(p.shape)) for p in ref.params.values())
    per_step = [(sent[d.name] - sent0[d.name]) / len(batches) for d in devs]
    assert max(per_step) < 1.25 * min(per_step) and max(per_step) < 1.5 * grads, (per_step, grads)


def _fake(names, kind="k", memory_mib=256.0, mbit=100.0):
    from edgetvm.latte.devices import Profile as DP
    from edgetvm.partition.pipeline.fleet import FleetDevice
    from edgetvm.targets.links import LinkProfile

    prof = DP(kind, "", 1, 1.0, memory_mib, 0.0, 0.0)
    return [FleetDevice(n, prof, LinkProfile("l", "", mbit, 0.0)) for n in names]


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
def test_simulated_step_is_the_pipeline_bubble_formula(schedule):
    """Equal stages (forward f, backward b), free calls and transfers: a step is (M + S - 1)(f + b) plus the
    optimizer."""
    from edgetvm.pipetrain import plan as P

    L, f, b, o = 10, 0.001, 0.002, 0.0005
    prof = P.Profile("k", [f] * L, [b] * L, [o] * L, 0.0, 0.0)
    for S, M in ((1, 4), (2, 4), (5, 8)):
        bounds = tuple(range(0, L + 1, L // S))
        devices = _fake([f"d{i}" for i in range(S)], mbit=float("inf"))
        step, busiest = P.simulate(SMALL, 4, bounds, [[d] for d in devices], {"k": prof}, schedule, M)
        per = L // S * (f + b)
        assert step == pytest.approx((M + S - 1) * per + L // S * o, rel=1e-9)
        assert busiest == pytest.approx(M * per + L // S * o, rel=1e-9)


def test_a_tensor_between_stages_costs_one_hop_when_stages_send_directly():
    """One micro-batch, free compute and calls. Through the coordinator, each activation and gradient is
    paid (per byte) by the call that returns it and again by the call that takes it. Device to device it
    makes one hop: the link's time at its rate, plus the CPU of the device that sends and of the one that
    receives it."""
    from edgetvm.pipetrain import plan as P
    from edgetvm.pipetrain.stages import activation_shapes

    L, byte_s, cpu, cut = len(SMALL.layers), 1e-8, 2e-9, 3
    prof = P.Profile("k", [0.0] * L, [0.0] * L, [0.0] * L, 0.0, byte_s, byte_cpu_s=cpu)
    groups = [[d] for d in _fake(["a", "b"])]                          # 100 Mbit/s links
    act = 4 * 4 * int(np.prod(activation_shapes(SMALL, 1)[cut - 1]))     # micro-batch of 4
    step = {d: P.simulate(SMALL, 4, (0, cut, L), groups, {"k": prof}, "gpipe", 1, direct=d)[0] for d in (True, False)}
    inputs = 4 * 4 * 28 * 28 + 8 * 4 + 4 * 4 * 10             # the coordinator's: input, labels, logits
    assert step[False] == pytest.approx(byte_s * (inputs + 4 * act), rel=1e-9)
    link = 8 / (1448 / 1514 * 100e6)                            # TCP payload of a 100 Mbit/s link
    assert step[True] == pytest.approx(byte_s * inputs + 2 * act * (link + 2 * cpu), rel=1e-9)


@pytest.mark.parametrize("replicas", [2, 4])
def test_a_measured_gradient_sum_costs_its_own_work_and_its_packed_bytes(replicas):
    """Free compute and calls. With the sum measured (measure_reduce), replicas pay its own work once and
    exchange 2(R-1)/R of the gradients' packed bytes (grad_wire per weight, by dtype) at the link's time
    plus the replicas' CPU per byte; float16 halves neither the own work nor, here, more than the bytes."""
    from edgetvm.pipetrain import plan as P

    L, n = len(SMALL.layers), 10_000
    prof = P.Profile("k", [0.0] * L, [0.0] * L, [0.0] * L, 0.0, 0.0, reduce_s={"float32": 0.010, "float16": 0.030},
                     grad_wire={"float32": 3.2, "float16": 1.7}, reduce_byte_s=1e-7)
    group = [_fake([f"r{i}" for i in range(replicas)])]
    link = 8 / (1448 / 1514 * 100e6)
    for dtype in ("float32", "float16"):
        step, _ = P.simulate(SMALL, 4, (0, L), group, {"k": prof}, "gpipe", 4, n_weights=[n], reduce_dtype=dtype)
        wire = 2 * (replicas - 1) / replicas * prof.grad_wire[dtype] * n
        assert step == pytest.approx(prof.reduce_s[dtype] + wire * (link + 1e-7), rel=1e-9)
    # not measured (an older profile): raw bytes, the RPC's CPU at both ends, one call
    old = P.Profile("k", [0.0] * L, [0.0] * L, [0.0] * L, 0.0, 0.0, byte_cpu_s=1e-8)
    step, _ = P.simulate(SMALL, 4, (0, L), group, {"k": old}, "gpipe", 4, n_weights=[n])
    assert step == pytest.approx(2 * (replicas - 1) / replicas * 4 * n * (link + 2e-8), rel=1e-9)


def test_search_prints_every_candidate_and_skips_what_does_not_fit():
    from edgetvm.pipetrain import plan as P

    L = len(SMALL.layers)
    prof = P.Profile("k", [0.001] * L, [0.002] * L, [0.0] * L, 1e-4, 1e-9)
    lines = []
    cands = P.search(SMALL, 4, 4, _fake(["a", "b", "c"]), {"k": prof}, "1f1b", log=lines.append)
    # n devices in consecutive groups: 2^(n-1) ways for n = 1, 2, 3, less the 3 replicas of 4 micro-batches
    assert len(lines) == 1 + 2 + 4 - 1
    assert all("predicted" in line for line in lines)
    assert cands[0].step_s == min(c.step_s for c in cands)
    three = [c for c in cands if len(c.groups) == 3]
    assert three and three[0].step_s < [c for c in cands if c.n_devices == 1][0].step_s
    lines.clear()
    with pytest.raises(UserError, match="no candidate fits"):
        P.search(SMALL, 4, 4, _fake(["a"], memory_mib=0.01), {"k": prof}, "gpipe", log=lines.append)
    assert lines and "does not fit" in lines[0]


@pytest.mark.slow   # ~30 s: compiles two stages, loads Fashion-MNIST
def test_cli_run_local_trains_and_writes_checkpoint_history_and_png(tmp_path, capsys):
    """`pipetrain run --local`: real Fashion-MNIST images through two stages in this process."""
    import json

    out = tmp_path / "run"
    code = __import__("edgetvm.cli", fromlist=["main"]).main(
        ["pipetrain", "run", "lenet5", "--local", "--devices", "2xsbc-a53", "--bounds", "0,5,10", "--batch", "32",
         "--micro-batches", "4", "--schedule", "gpipe", "--train-samples", "640", "--epochs", "2", "--lr", "0.05",
         "-o", str(out)])
    text = capsys.readouterr()
    assert code == 0, text.err
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.npz", "history.json", "loss.png"]
    hist = json.loads((out / "history.json").read_text())
    assert [h["epoch"] for h in hist["history"]] == [1, 2] and len(hist["curve"]) == 2 * (640 // 32)
    assert hist["history"][-1]["loss"] < hist["history"][0]["loss"]
    assert hist["history"][-1]["val_accuracy"] > 0.3          # 10 classes: chance is 0.1
    assert train.read_checkpoint(out / "checkpoint.npz")["meta"]["epoch"] == 2
    assert "stage 1 on local1: busy" in text.out


@pytest.mark.slow   # minutes: profiles a device, then trains 8 configurations twice on emulated devices
@pytest.mark.skipif(bool(_rpc_unavailable()), reason="needs root, cgroups and network namespaces")
def test_bench_prints_measured_and_predicted_side_by_side(tmp_path, capsys):
    import importlib.util
    import json
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("bench_pipetrain",
                                                  Path(__file__).resolve().parent.parent / "bench" / "pipetrain.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main(["--width", "0.25", "--batch", "16", "--micro-batches", "2", "--train-samples", "64",
                       "--repeats", "2", "-o", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "measured s/epoch" in out and out.count("predicted") > 10
    results = json.loads((tmp_path / "results.json").read_text())
    rows = results["rows"]
    assert [r["devices"] for r in rows if r["reduce_dtype"] == "float32"] == [1, 2, 2, 4, 4]
    # the gradient sum was measured on two devices, per dtype; float16 takes fewer bytes per weight
    prof = results["profile"]
    assert set(prof["reduce_s"]) == {"float32", "float16"} and all(t > 0 for t in prof["reduce_s"].values())
    assert 0 < prof["grad_wire"]["float16"] < prof["grad_wire"]["float32"] <= 4 + 1 / 8
    # float16 sums are run where a stage has replicas, once more
    assert all(max(len(g) for g in r["groups"]) > 1 for r in rows if r["reduce_dtype"] == "float16")
    assert all(r["measured_epoch_s"] > 0 and r["predicted_epoch_s"] > 0 for r in rows)
    # every configuration trained once per round, from the same weights on the same batches
    assert all(len(r["rounds_epoch_s"]) == 2 and r["measured_epoch_s"] == pytest.approx(sum(r["rounds_epoch_s"]) / 2)
               for r in rows)
    assert all(len(set(r["rounds_val_accuracy"])) == 1 for r in rows)
    assert (tmp_path / "loss.png").stat().st_size > 0


def test_the_pass_refuses_a_cut_inside_a_layer():
    import tvm

    from edgetvm.passes.train_stages import train_stages

    mod = tvm.IRModule({"backbone": train.backbone(SMALL, 2)})
    out = train_stages(mod, [5])   # after conv1, relu, pool: one live activation
    assert {gv.name_hint for gv in out.functions} == {"stage0_forward", "stage0_backward", "stage1_forward",
                                                      "stage1_backward"}
    with pytest.raises(ValueError, match="used after the next cut|live activations"):
        train_stages(mod, [2])     # between conv1's bias reshape and its add
