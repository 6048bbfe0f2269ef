"""CutEdge: the controller picks the least-energy action when its queues are empty and trades energy
for backlog as V grows; queues never go negative; traces are seeded, replayable data and bad ones are
refused in one line; device profiles carry clocks and power; `edgetvm cutedge` simulates, runs on the
emulated testbed (a frame computed and sent for real) and restores every quota and qdisc it changed."""

import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

from edgetvm.cli import main
from edgetvm.costmodels.profile import Graph
from edgetvm.errors import UserError
from edgetvm.latte.devices import cgroups_unavailable, load_profile
from edgetvm.partition import cuts as cutlib
from edgetvm.partition.cutedge import controller, model, traces
from edgetvm.partition.cutedge.controller import CutEdge, Observation
from edgetvm.partition.cutedge.simulate import simulate
from edgetvm.runtime import link as link_mod

ENERGY = model.load(load_profile("sbc-a53"))


def chain_costs(device_ms=3.0, server_ms=0.3) -> cutlib.Costs:
    """A 6-op chain whose values shrink from a 100 kB frame to a 40-byte result."""
    sizes = [100_000, 80_000, 40_000, 20_000, 10_000, 5_000, 40]
    ops = [{"index": k, "kernel": f"k{k}", "reads": ["in0" if k == 0 else f"v{k - 1}"], "weights": [],
            "out": f"v{k}"} for k in range(6)]
    g = Graph(ops, {"in0": sizes[0], **{f"v{k}": sizes[k + 1] for k in range(6)}}, ["in0"], ["v5"])
    return cutlib.Costs(g, [device_ms / 1e3] * 6, [server_ms / 1e3] * 6)


def frame_energy_mj(cut, f_mhz, rate, cap) -> float:
    """What one frame costs the device: its work at clock f, its bytes at rate r (brute force)."""
    e_cpu = float(ENERGY.busy_power_w(f_mhz)) * cut.work_s / float(ENERGY.speed(f_mhz))
    e_tx = float(ENERGY.radio.power_w(rate, cap)) * cut.bytes / (rate * 1e6 / 8 * controller.PAYLOAD_SHARE)
    return (e_cpu + e_tx) * 1e3


# ---------------------------------------------------------------------------------- data


def test_device_profiles_carry_clocks_power_and_radio():
    e = model.load(load_profile("phone-hi"))
    assert e.freqs_mhz[0] == 345.6 and e.f_max == 2035.2 and len(e.freqs_mhz) == 12
    assert float(e.busy_power_w(e.f_max)) == pytest.approx(1.2)
    p = e.busy_power_w(e.freqs_mhz)
    assert np.all(np.diff(p) > 0)                                   # more power at a higher clock
    f_star = e.energy_optimal_mhz()
    assert e.freqs_mhz[0] < f_star < e.f_max                         # static power: not the slowest clock
    assert e.quota(e.f_max) == load_profile("phone-hi").cpu_quota
    r = e.radio
    assert float(r.power_w(5, 5)) == pytest.approx(r.circuit_w + r.max_tx_w)
    assert float(r.power_w(2.5, 5)) < float(r.power_w(5, 5))


def test_a_device_profile_without_a_frequency_table_is_one_line(capsys, tmp_path):
    rc = main(["cutedge", "simulate", str(tmp_path / "m.onnx"), "--device", "iot-tiny", "--arrivals",
               "poisson-30fps", "--link", "lte-tmobile", "-o", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "no frequency table" in err and "iot-tiny" in err


def test_traces_are_seeded_replayable_files(tmp_path):
    a1, a2 = traces.poisson(30, 500, seed=7), traces.poisson(30, 500, seed=7)
    assert np.array_equal(a1.values, a2.values)
    assert not np.array_equal(a1.values, traces.poisson(30, 500, seed=8).values)
    b = traces.bursty(30, 20000, seed=1)
    assert b.mean_rate() == pytest.approx(30, rel=0.1)                # the same rate, in bursts
    assert b.values.var() > 2 * b.values.mean()                      # overdispersed, unlike Poisson
    c = traces.lognormal_ar1("lte-verizon", 20000, seed=3)
    lc = np.log(c.values)
    assert np.corrcoef(lc[:-1], lc[1:])[0, 1] == pytest.approx(0.845, abs=0.03)
    for tr in (a1, c):
        back = traces.load(traces.write(tr, tmp_path / f"{tr.kind}.csv"))
        assert back.kind == tr.kind and back.slot_ms == 100 and np.allclose(back.values, tr.values, atol=1e-4)
        assert back.meta["seed"] == str(tr.meta["seed"])
    for name in ("poisson-30fps", "bursty-30fps", "lte-tmobile", "lte-verizon"):
        assert len(traces.load(name)) == 3000


def test_fitting_a_saturator_trace_recovers_its_rate():
    # 1 ms per opportunity: 12 Mbit/s, constant.
    fit = traces.fit_saturator([str(t) for t in range(1, 10001)])
    assert fit["mean_mbit"] == pytest.approx(12.0, rel=0.01) and fit["log_std"] < 0.02


# ---------------------------------------------------------------------------------- the controller


@pytest.mark.parametrize("arrivals,capacity", [(1, 2.0), (2, 10.0), (3, 40.0)])
def test_controller_picks_the_least_energy_action_when_its_queues_are_empty(arrivals, capacity):
    cuts = controller.candidate_cuts(chain_costs())
    ctl = CutEdge(cuts, ENERGY, 0.1, V=10)
    act = ctl.decide(Observation(0, arrivals, capacity, 0.0, 0.0))
    best = min(frame_energy_mj(c, f, fr * capacity, capacity)
               for c in cuts for f in ENERGY.freqs_mhz for fr in ENERGY.radio.rate_fractions)
    cheapest_rate = min(fr * capacity for fr in ENERGY.radio.rate_fractions
                        if frame_energy_mj(act.cut, act.f_mhz, fr * capacity, capacity) <= best * (1 + 1e-9))
    assert frame_energy_mj(act.cut, act.f_mhz, cheapest_rate, capacity) == pytest.approx(best, rel=1e-9)
    if act.cut.work_s > 0:  # with nothing to compute every clock costs the same
        assert act.f_mhz == ENERGY.energy_optimal_mhz()


def test_a_long_backlog_makes_the_controller_clock_up_and_send_less():
    cuts = controller.candidate_cuts(chain_costs())
    ctl = CutEdge(cuts, ENERGY, 0.1, V=1)
    calm = ctl.decide(Observation(0, 2, 5.0, 0.0, 0.0))
    busy = ctl.decide(Observation(0, 2, 5.0, 500.0, 0.0))            # half a second of work waiting
    assert busy.f_mhz > calm.f_mhz
    clogged = ctl.decide(Observation(0, 2, 5.0, 0.0, 2000.0))        # 2 MB waiting to be sent
    assert clogged.cut.bytes <= calm.cut.bytes and clogged.rate_mbit == 5.0


def test_a_non_positive_V_is_refused():
    with pytest.raises(ValueError):
        CutEdge(controller.candidate_cuts(chain_costs()), ENERGY, 0.1, V=0)


@pytest.mark.parametrize("seed", range(4))
def test_queues_never_go_negative(seed):
    rng = np.random.default_rng(seed)
    cuts = controller.candidate_cuts(chain_costs(rng.uniform(0.5, 6), rng.uniform(0.1, 1)))
    a = traces.Trace("arrivals", 100, rng.poisson(rng.uniform(1, 6), 400))
    c = traces.Trace("link", 100, np.exp(rng.normal(1.5, 1.0, 400)))
    ctl = CutEdge(cuts, ENERGY, 0.1, V=float(10 ** rng.uniform(-2, 4)), latency_target_s=0.05)
    res = simulate(ctl, ENERGY, a, c)
    assert all(s.q_ms >= 0 and s.b_kb >= 0 and s.cpu_busy_s >= 0 and s.tx_busy_s >= 0 for s in res.slots)
    assert all(s.cpu_busy_s <= 0.1 + 1e-12 and s.tx_busy_s <= 0.1 + 1e-12 for s in res.slots)
    assert ctl.Z >= 0
    assert len(res.latencies_s) + res.unfinished == res.arrived == a.values.sum()
    # A queue fed an observation with a negative backlog (a measurement glitch) treats it as empty.
    assert ctl.decide(Observation(0, 1, 5.0, -3.0, -1.0)) == ctl.decide(Observation(0, 1, 5.0, 0.0, 0.0))


def test_larger_V_spends_less_energy_and_keeps_more_backlog_in_simulation():
    costs = chain_costs()
    cuts = controller.candidate_cuts(costs)
    a, c = traces.poisson(25, 1500, seed=1), traces.lognormal_ar1("lte-verizon", 1500, seed=2)
    runs = [simulate(CutEdge(cuts, ENERGY, 0.1, V), ENERGY, a, c).summary() for V in (1, 30, 1000, 30000)]
    energy = [r["energy_per_frame_mj"] for r in runs]
    backlog = [r["q_mean_ms"] for r in runs]
    assert all(e2 <= e1 * 1.01 for e1, e2 in zip(energy, energy[1:])), energy
    assert energy[-1] < 0.97 * energy[0], energy
    assert backlog[-1] > 1.5 * backlog[0], backlog
    for b in controller.baselines(costs, ENERGY, c.mean_rate()):  # max clock, full rate: more energy
        assert simulate(b, ENERGY, a, c).summary()["energy_per_frame_mj"] > energy[-1]


def test_a_frames_time_splits_into_waiting_for_and_being_in_each_stage():
    cuts = controller.candidate_cuts(chain_costs())
    a, c = traces.poisson(25, 300, seed=3), traces.lognormal_ar1("lte-verizon", 300, seed=4)
    res = simulate(CutEdge(cuts, ENERGY, 0.1, 100), ENERGY, a, c)
    st = res.stage_means_ms()
    in_stages = sum(st[k] for k in ("device wait", "device", "send wait", "send", "server wait", "server"))
    assert in_stages == pytest.approx(res.summary()["latency_mean_ms"], rel=1e-9)
    assert st["cpu busy"] * len(res.latencies_s) == pytest.approx(sum(s.cpu_busy_s for s in res.slots) * 1e3)


def test_waiting_on_calls_lengthens_the_device_stage_but_costs_no_energy():
    from dataclasses import replace

    cut = controller.make_cut(chain_costs(), frozenset(range(3)))
    a, c = traces.Trace("arrivals", 100, np.ones(200, int)), traces.Trace("link", 100, np.full(200, 20.0))
    plain = simulate(controller.Fixed("plain", cut, ENERGY), ENERGY, a, c)
    calls = simulate(controller.Fixed("calls", replace(cut, call_s=0.004), ENERGY), ENERGY, a, c)
    assert calls.stage_means_ms()["device"] == pytest.approx(plain.stage_means_ms()["device"] + 4.0)
    assert calls.summary()["latency_mean_ms"] == pytest.approx(plain.summary()["latency_mean_ms"] + 4.0)
    assert calls.summary()["energy_j"] == pytest.approx(plain.summary()["energy_j"])


def test_on_the_emulated_device_a_frame_runs_at_full_speed_while_the_periods_quota_lasts():
    """simulate(quota=...): sbc-a53's top clock is a quarter CPU, 2.5 ms of each 10 ms period; a frame a
    slot, each slot starting on a period boundary. A frame of 2.25 ms of CPU (9 ms of work at the quarter)
    takes 2.25 ms. One of 3 ms runs on to the tick after its quota is spent (2.6 ms), waits for the next
    period and ends at 10.4 ms; the next two find runtime their runqueue kept from the last period and run
    through in 3 ms. The energy is the CPU time over the quota either way, as the testbed charges it."""
    from edgetvm.partition.cutedge.simulate import Quota

    a, c = traces.Trace("arrivals", 100, np.ones(30, int)), traces.Trace("link", 100, np.full(30, 20.0))
    q = Quota(0.010, tick_phase_s=0.0026)
    for ops, stages_ms in ((3, [2.25] * 3), (4, [10.4, 3.0, 3.0])):
        cut = controller.make_cut(chain_costs(), frozenset(range(ops)))
        fluid = simulate(controller.Fixed("f", cut, ENERGY), ENERGY, a, c)
        cfs = simulate(controller.Fixed("f", cut, ENERGY), ENERGY, a, c, quota=q)
        assert fluid.stage_means_ms()["device"] == pytest.approx(3.0 * ops)
        device_ms = [(m["device"][1] - m["device"][0]) * 1e3 for _, m in cfs.frames]
        assert device_ms == pytest.approx(stages_ms * 10)
        assert cfs.summary()["energy_j"] == pytest.approx(fluid.summary()["energy_j"])
    # the controller's turn delays each slot's frames, and so their latency, by as much
    cut = controller.make_cut(chain_costs(), frozenset(range(3)))
    late = simulate(controller.Fixed("f", cut, ENERGY), ENERGY, a, c, quota=Quota(0.010, 0.0026, turn_s=0.0015))
    now = simulate(controller.Fixed("f", cut, ENERGY), ENERGY, a, c, quota=Quota(0.010, 0.0026))
    assert late.stage_means_ms()["device wait"] == pytest.approx(now.stage_means_ms()["device wait"] + 1.5)
    assert late.summary()["latency_mean_ms"] == pytest.approx(now.summary()["latency_mean_ms"] + 1.5)


def test_testbed_measurements_replace_the_profile_and_other_cuts_get_the_median_excess():
    costs = chain_costs(device_ms=3.0, server_ms=0.3)
    d2, d4 = frozenset(range(2)), frozenset(range(4))
    m = controller.Measured({d2: controller.Stage(0.008, 0.001, 0.002), d4: controller.Stage(0.016, 0.0, 0.001)})
    c2 = controller.make_cut(costs, d2, measured=m)
    assert (c2.work_s, c2.call_s, c2.server_s) == (0.008, 0.001, 0.002)
    # Excess over the profile: device 8 - 6 and 16 - 12 ms (median 3), server 2 - 1.2 and 1 - 0.6 ms (0.6).
    c3 = controller.make_cut(costs, frozenset(range(3)), measured=m)
    assert c3.work_s == pytest.approx(0.009 + 0.003) and c3.server_s == pytest.approx(0.0009 + 0.0006)
    # The candidates are the profile's cuts (the ones a testbed compiles), costed as measured.
    for c in controller.candidate_cuts(costs, measured=m):
        assert c.device in {p.device for p in controller.candidate_cuts(costs)}
        assert c.work_s == controller.make_cut(costs, c.device, measured=m).work_s


# ---------------------------------------------------------------------------------- bad input


def _one_line(capsys, rc, *needles):
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1, err
    for n in needles:
        assert n in err, err


@pytest.mark.parametrize("vs,needle", [("0", "not positive"), ("1,-10", "not positive"), ("1,x", "'x' is not a number"),
                                       ("nan", "not positive")])
def test_a_V_that_is_not_positive_is_one_line(vs, needle, capsys, tmp_path):
    rc = main(["cutedge", "simulate", str(tmp_path / "m.onnx"), "--device", "sbc-a53", "--V", vs,
               "--arrivals", "poisson-30fps", "--link", "lte-tmobile", "-o", str(tmp_path / "out")])
    _one_line(capsys, rc, needle)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("body,needle", [
    ("# slot_ms = 100\nslot,frames\n0,1\n1,2\n3,1\n", "slot 2 is missing"),
    ("# slot_ms = 100\nslot,frames\n0,1\n1,two\n", "line 4"),
    ("# slot_ms = 100\nslot,frames\n0,1\n0,2\n", "out of order"),
    ("slot,frames\n0,1\n", "slot_ms"),
    ("# slot_ms = 100\ntime,frames\n0,1\n", "header"),
    ("# slot_ms = 100\nslot,frames\n0,-1\n", "counts >= 0"),
    ("# slot_ms = 100\nslot,frames\n", "no rows"),
    ("\x00\xff\xfe", "cannot be read"),
])
def test_a_bad_trace_is_one_line(body, needle, capsys, tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_bytes(body.encode("latin-1"))
    rc = main(["cutedge", "simulate", str(tmp_path / "m.onnx"), "--device", "sbc-a53", "--arrivals", str(bad),
               "--link", "lte-tmobile", "-o", str(tmp_path / "out")])
    _one_line(capsys, rc, needle)


def test_a_link_trace_with_a_gap_or_zero_capacity_is_one_line(capsys, tmp_path):
    for body, needle in [("# slot_ms = 100\nslot,mbit\n0,5\n2,5\n", "slot 1 is missing"),
                         ("# slot_ms = 100\nslot,mbit\n0,5\n1,0\n", "capacity 0.0")]:
        (tmp_path / "l.csv").write_text(body)
        rc = main(["cutedge", "simulate", str(tmp_path / "m.onnx"), "--device", "sbc-a53", "--arrivals",
                   "poisson-30fps", "--link", str(tmp_path / "l.csv"), "-o", str(tmp_path / "out")])
        _one_line(capsys, rc, needle)
    rc = main(["cutedge", "simulate", str(tmp_path / "m.onnx"), "--device", "sbc-a53", "--arrivals",
               "lte-tmobile", "--link", "lte-tmobile", "-o", str(tmp_path / "out")])
    _one_line(capsys, rc, "a link trace", "arrivals trace is wanted")


# ---------------------------------------------------------------------------------- the CLI


@pytest.fixture(scope="module")
def mlp(tmp_path_factory):
    from edgetvm import zoo

    return zoo.path("mlp", tmp_path_factory.mktemp("m"))


def test_simulate_prints_every_method_and_writes_the_plots(mlp, tmp_path, capsys):
    rc = main(["cutedge", "simulate", str(mlp), "--device", "phone-mid", "--V", "1,100", "--arrivals",
               "bursty-30fps", "--link", "lte-verizon", "--slots", "300", "-o", str(tmp_path / "o")])
    out = capsys.readouterr().out
    assert rc == 0, out
    for method in ("cutedge V=1", "cutedge V=100", "device-only", "server-only", "neurosurgeon", "dads", "cic"):
        assert method in out
    for png in ("energy_latency_vs_V_simulated.png", "energy_vs_latency_simulated.png"):
        assert (tmp_path / "o" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    import json

    doc = json.loads((tmp_path / "o" / "results.json").read_text())
    assert len(doc["results"]) == 7 and all(r["completed"] + r["unfinished"] == r["frames"] for r in doc["results"])


needs_testbed = pytest.mark.skipif((reason := link_mod.unavailable_reason() or cgroups_unavailable()) is not None,
                                   reason=f"emulated testbed: {reason}")


@needs_testbed
def test_run_on_the_testbed_computes_and_sends_frames_and_leaves_nothing(mlp, tmp_path, capsys):
    """A short real run: the device in its cgroup behind the shaped link, its quota and the link's rate
    changed slot by slot; every frame computed, sent and finished on the server."""
    from edgetvm.runtime import leftovers

    before = leftovers.find()
    rc = main(["cutedge", "run", str(mlp), "--device", "phone-mid", "--V", "10", "--arrivals", "poisson-30fps",
               "--link", "lte-verizon", "--slots", "30", "-o", str(tmp_path / "o")])
    out = capsys.readouterr().out
    assert rc == 0, out
    import json

    rows = json.loads((tmp_path / "o" / "results.json").read_text())["results"]
    ran = next(r for r in rows if r["mode"] == "testbed")
    sim = next(r for r in rows if r["mode"] == "simulated")
    assert ran["frames"] == sim["frames"] == sum(traces.load("poisson-30fps").values[:30])
    assert ran["completed"] == ran["frames"] and ran["unfinished"] == 0
    assert ran["energy_j"] > 0 and ran["latency_mean_ms"] > 0
    assert (tmp_path / "o" / "energy_vs_latency_testbed.png").exists()
    mine = [r for r in leftovers.new_since(before) if r.owner == os.getpid()]
    assert mine == []


class _Interrupting(controller.Policy):
    """Slow clock and a low rate for two slots, then Ctrl-C."""
    name = "interrupting"

    def __init__(self, cut):
        self.cut, self.n = cut, 0

    def decide(self, obs):
        self.n += 1
        if self.n > 2:
            raise KeyboardInterrupt
        return controller.Action(self.cut, ENERGY_MID.freqs_mhz[0], 1.5)


ENERGY_MID = model.load(load_profile("phone-mid"))


@needs_testbed
def test_ctrl_c_restores_the_quota_and_the_qdisc(mlp, tmp_path):
    from edgetvm.partition.cutedge import cli
    from edgetvm.runtime.cutedge import open_testbed

    s = cli.prepare(mlp, "phone-mid", "host", "poisson-30fps", "lte-verizon", slots=20, log=lambda *a: None)
    cut = s.cuts[0]
    with open_testbed(s, [cut], tmp_path / "splits", log=lambda *a: None) as tb:
        quota_file = tb.act.cpu_dir / "cpu.cfs_quota_us"
        quota0, rates0 = quota_file.read_text(), [q["rate_mbit"] for q in tb.link.qdiscs().values()]
        seen = {}
        policy = _Interrupting(cut)
        real = policy.decide

        def spy(obs):
            if policy.n == 2:  # what the first slot set, seen from the second
                seen["quota"] = quota_file.read_text()
                seen["rates"] = [q["rate_mbit"] for q in tb.link.qdiscs().values()]
            return real(obs)

        policy.decide = spy
        with pytest.raises(KeyboardInterrupt):
            tb.run(policy)
        assert seen["quota"] != quota0 and seen["rates"] == [1.5, 1.5]
        assert quota_file.read_text() == quota0
        assert [q["rate_mbit"] for q in tb.link.qdiscs().values()] == rates0
        netns, veth = tb.link.netns, tb.link.host_veth
    assert netns not in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert subprocess.run(["ip", "link", "show", veth], capture_output=True).returncode != 0


@needs_testbed
def test_slots_start_on_a_boundary_of_the_devices_cfs_period(mlp, tmp_path):
    """The testbed tells the simulation its device's period and ticks' phase (simulate.Quota) and its
    controller's turn, and starts its slots on a boundary of that period, where the simulation starts
    them."""
    from edgetvm.costmodels import cfs
    from edgetvm.partition.cutedge import cli
    from edgetvm.runtime.cutedge import open_testbed

    s = cli.prepare(mlp, "phone-mid", "host", "poisson-30fps", "lte-verizon", slots=3, log=lambda *a: None)
    with open_testbed(s, [s.cuts[0]], tmp_path / "splits", log=lambda *a: None) as tb:
        q = tb.quota()
        period = tb.act.period_us / 1e6
        assert q.period_s == period and 0 <= q.tick_phase_s < cfs.TICK_S and q.start_s == 0
        assert tb.turn(slots=5) > 0            # the controller's turn, before a slot's first frame starts
        boundary = tb._timers(cfs.period_boundary)
        res = tb.run(controller.Fixed("f", s.cuts[0], s.energy))
    periods = (res.started - boundary) / period
    assert res.started > boundary and periods == pytest.approx(round(periods), abs=1e-6)


@needs_testbed
def test_calibration_admits_frames_as_the_arrival_trace_brings_them(mlp, tmp_path):
    """The trace's mean count per slot at once, a group a slot apart: a frame after an idle device costs
    more CPU than one right after another, and a run's frames come so."""
    from edgetvm.partition.cutedge import cli
    from edgetvm.runtime.cutedge import open_testbed

    s = cli.prepare(mlp, "phone-mid", "host", "poisson-30fps", "lte-verizon", slots=20, log=lambda *a: None)
    per_slot = max(1, round(float(np.mean(s.arrivals.values))))
    assert per_slot > 1    # 30 frames/s in 100 ms slots
    with open_testbed(s, [s.cuts[0]], tmp_path / "splits", log=lambda *a: None) as tb:
        admitted = []
        admit = tb._admit

        def spy(cut, arrival):
            admitted.append(arrival)
            return admit(cut, arrival)

        tb._admit = spy
        measured = tb.calibrate(frames=2 * per_slot, rounds=1)
    groups = [admitted[:per_slot], admitted[per_slot:]]
    assert all(len(set(g)) == 1 for g in groups)               # a group comes at once
    assert groups[1][0] - groups[0][0] >= s.arrivals.slot_s    # the next a slot later
    assert measured.cuts[s.cuts[0].device].work_s > 0
