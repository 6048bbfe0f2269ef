"""LATTE: device profiles, TVM-compiled training measured in cgroups, the cost model, allocation, Flower."""

import itertools
import json
import math
import subprocess
import sys
import warnings

import numpy as np
import pytest
import tvm
import tvm_ffi

from edgetvm.errors import UserError
from edgetvm.latte import allocate, devices, fed, models, training


def test_profiles_are_data_spanning_8x():
    profs = devices.list_profiles()
    assert len(profs) >= 6
    speeds = [p.speed for p in profs]
    assert max(speeds) / min(speeds) >= 8
    for p in profs:
        assert p.memory_mib > 0 and p.nominal_gflops > 0


def test_profile_missing_field_names_it(tmp_path):
    src = (devices.DEVICES_DIR / "phone-mid.toml").read_text()
    bad = tmp_path / "broken.toml"
    bad.write_text("\n".join(l for l in src.splitlines() if not l.startswith("cpu_quota")))
    with pytest.raises(UserError, match="lacks field 'cpu_quota'"):
        devices.load_profile_file(bad)
    bad.write_text(src.replace("cpus = 1", 'cpus = "one"'))
    with pytest.raises(UserError, match="field 'cpus' must be a int"):
        devices.load_profile_file(bad)
    with pytest.raises(UserError, match="unknown device profile 'nope'"):
        devices.load_profile("nope")


def test_cli_bad_profile_exits_2(tmp_path):
    bad = tmp_path / "x.toml"
    bad.write_text('name = "x"\n')
    r = subprocess.run([sys.executable, "-m", "edgetvm.latte.cli", "profile", "--device", str(bad)],
                       capture_output=True, text=True)
    assert r.returncode == 2
    assert "lacks field 'description'" in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_widths_slice_units():
    a = models.ARCHS["cnn-a"]
    assert models.sub_arch(a, 0.125)["channels"] == [2, 4]
    assert models.sub_arch(models.ARCHS["fedmlp"], 0.5)["hidden"] == [128, 128]
    assert models.flops_per_sample(models.sub_arch(a, 0.5)) < models.flops_per_sample(a) / 3


def test_setup_trainer_step_learns_digits():
    """The TVM-compiled step (forward, backward, SGD) lowers the loss on digits."""
    from sklearn.datasets import load_digits

    d = training.compile_trainer(models.ARCHS["mlp-d"], 0.25)
    meta = json.loads((d / "meta.json").read_text())
    kinds = {k["kind"] for k in meta["kernels"].values()}
    assert {"matmul", "transpose", "collapse_sum"} <= kinds       # forward and backward kernels
    assert any(k.startswith("fused_") for k in meta["kernels"])   # fused patterns
    assert all(k["n_loops"] >= 0 and k["bytes"] > 0 for k in meta["kernels"].values())
    r = training.StepRunner(d)
    X, y = load_digits(return_X_y=True)
    X = (X / 16).astype("float32")
    losses = []
    for epoch in range(4):
        for i in range(0, 1760, 32):
            r.set_batch(X[i:i + 32], y[i:i + 32])
            losses.append(r.step())
    assert np.mean(losses[-20:]) < 0.5 * np.mean(losses[:5])


LOOP_FEATURES = ("n_loops", "loop_depth", "n_parallel", "n_vectorized", "n_unrolled", "auto_unroll")


def _fors(stmt) -> list:
    """Every For loop under `stmt`, inner loops before the loops around them."""
    found = []
    tvm_ffi.structural_walk(stmt, ((tvm.tirx.For, found.append),), order="post")
    return found


def _loops_in(func) -> dict:
    """The loop features of a kernel counted straight from its TIR, independently of training.py."""
    kinds = {int(tvm.tirx.ForKind.PARALLEL): "n_parallel", int(tvm.tirx.ForKind.VECTORIZED): "n_vectorized",
             int(tvm.tirx.ForKind.UNROLLED): "n_unrolled"}
    out = dict.fromkeys(LOOP_FEATURES, 0)
    depth = {}

    def visit(node):
        if isinstance(node, tvm.tirx.For):
            out["n_loops"] += 1
            if int(node.kind) in kinds:
                out[kinds[int(node.kind)]] += 1
            step = (node.annotations or {}).get("pragma_auto_unroll_max_step")
            if step is not None:
                out["auto_unroll"] = max(out["auto_unroll"], int(step))
            depth[node] = 1 + max((depth[i] for i in _fors(node.body)), default=0)  # inner loops came first
            out["loop_depth"] = max(out["loop_depth"], depth[node])

    for loop in _fors(func.body):
        visit(loop)
    return out


def test_tuned_step_computes_the_same_step_with_metaschedule_kernels():
    """A tuned build gives the step's matmuls MetaSchedule's schedules (flagged, with their own loop
    structure), leaves the other kernels as the default build has them, and trains identically."""
    d_def = training.compile_trainer(models.ARCHS["mlp-d"], 0.25)
    d_tun = training.compile_trainer(models.ARCHS["mlp-d"], 0.25, schedule="tuned")
    assert d_def != d_tun and (d_tun / "tuning" / "database_tuning_record.json").stat().st_size > 0
    m_def, m_tun = training.load_meta(d_def), training.load_meta(d_tun)
    assert m_tun["schedule"] == "tuned" and m_def["schedule"] == "default"
    assert set(m_def["kernels"]) == set(m_tun["kernels"])          # same kernels, same names
    assert not any(k["tuned"] for k in m_def["kernels"].values())
    lowered_def = training.lowered_module(m_def["arch"], m_def["batch"], "default", d_def)
    lowered_tun = training.lowered_module(m_tun["arch"], m_tun["batch"], "tuned", d_tun)
    funcs_def = {gv.name_hint: f for gv, f in lowered_def.functions.items()}
    funcs_tun = {gv.name_hint: f for gv, f in lowered_tun.functions.items()}
    for name, k in m_tun["kernels"].items():
        assert k["tuned"] == (k["kind"] == "matmul"), name
        plain = m_def["kernels"][name]
        # Which schedule the search finds depends on the machine (a tiny matmul may be fastest serial
        # on two cores); that it came from the database and is not the default lowering does not.
        same = tvm_ffi.structural_equal(funcs_tun[name], funcs_def[name])
        assert same != bool(k["tuned"]), name
        assert _loops_in(funcs_tun[name]) == {f: k[f] for f in LOOP_FEATURES}, name
        assert _loops_in(funcs_def[name]) == {f: plain[f] for f in LOOP_FEATURES}, name
        if k["tuned"]:
            assert k["flops"] == plain["flops"] and k["shapes"] == plain["shapes"]
            assert k["tune_s"] > 0                                        # what tuning measured for it
        else:
            assert k["tune_s"] == 0
    # the features come back from the library's database alone (as after a feature-version change)
    assert training.step_kernel_features(m_tun["arch"], m_tun["batch"], "tuned", d_tun) == m_tun["kernels"]
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    X = (X / 16).astype("float32")
    losses = []
    for d in (d_def, d_tun):
        r = training.StepRunner(d)
        out = []
        for i in range(0, 320, 32):
            r.set_batch(X[i:i + 32], y[i:i + 32])
            out.append(r.step())
        losses.append(out)
    np.testing.assert_allclose(losses[0], losses[1], rtol=1e-4)


def test_unknown_architecture_to_tune_is_refused_before_anything_compiles():
    from edgetvm.latte.pipeline import compile_family

    with pytest.raises(UserError, match="unknown architecture 'mlp-z'"):
        compile_family(["mlp-a"], [1.0], quiet=True, tuned_archs=["mlp-z"])


@pytest.fixture(scope="module")
def measured():
    reason = devices.cgroups_unavailable()
    if reason:
        print(f"skipping cgroup measurements: {reason}")
        pytest.skip(reason)
    from edgetvm.latte.pipeline import profile_fleet

    profs = [devices.load_profile("phone-hi"), devices.load_profile("iot-tiny")]
    data = profile_fleet(profs, ["mlp-d", "cnn-b"], [1.0, 0.25], min_time=0.02, repeats=2, quiet=True,
                         tuned_archs=["mlp-d"])
    return data


def test_measured_in_cgroup_kernels_plus_overhead(measured):
    from edgetvm.costmodels.latte import decompose
    from edgetvm.latte.pipeline import noise_floor

    by = {(m["profile"], m["arch_name"], m["width"], m["schedule"]): m for m in measured["measurements"]}
    assert len(by) == 12 and len(measured["measurements"]) == 12
    for m in measured["measurements"]:
        assert m["step_s"] > 0 and m["cpu_step_s"] > 0 and len(m["step_s_runs"]) == 2
        parts = decompose(m, measured["metas"][m["dir"]])
        # TIR kernels (thread CPU time, instrument cost removed) + overhead outside them = the CPU step
        assert math.isclose(parts["kernels_s"] + parts["overhead_s"], m["cpu_step_s"], rel_tol=1e-9)
        assert parts["kernels_s"] > 0
        assert any(not s.startswith("vm.builtin") for s in m["kernels"])
    # The device's CPU quota was enforced: a tenth of a core is throttled every period it runs in.
    # (How much slower that makes a step, and how much the tuned kernels gain, are timings: bench/latte.py.)
    assert measured["runs"]["iot-tiny"]["throttled_s"] > 0
    nz = noise_floor(measured)
    assert nz["n"] == 12 and nz["repeats"] == 2 and nz["pair_mape"] >= 0


def test_cost_model_fits_and_predicts(measured, tmp_path):
    from edgetvm.costmodels.latte import FlopsBaseline, LatteModel

    ms, metas = measured["measurements"], measured["metas"]
    model = LatteModel().fit(ms, metas)
    base = FlopsBaseline().fit(ms, metas)
    for m in ms:
        parts = model.predict_parts(metas[m["dir"]], m["device"])
        p = parts["step_s"]
        assert math.isclose(parts["kernels_s"] + parts["overhead_s"], p, rel_tol=1e-9)
        assert parts["overhead_s"] >= 0
        assert 0.5 < p / m["step_s"] < 2.0, (m["profile"], m["arch_name"], p, m["step_s"])
        assert base.predict_step(metas[m["dir"]], m["device"]) > 0
    model.save(tmp_path / "m")
    again = LatteModel.load(tmp_path / "m")
    m = ms[0]
    assert math.isclose(again.predict_step(metas[m["dir"]], m["device"]),
                        model.predict_step(metas[m["dir"]], m["device"]), rel_tol=1e-5)
    with pytest.raises(UserError, match="latte fit"):
        LatteModel.load(tmp_path / "nothing")


def _synthetic(n_kernels_per_step=(3, 5, 8, 12), overhead=300e-6, quotas=(1.0, 0.5, 0.25), devices=None,
               slowdown=lambda q, flops: 1.0, overhead_per_cpu=lambda cpus: 1.0, host_leaves=1.0,
               schedules=("default",), refill_per_byte=0.0):
    """Steps whose kernels cost 1 ns per FLOP (x `slowdown`) and which spend a fixed `overhead` of CPU
    outside kernels (x `overhead_per_cpu`), measured on devices where wall = CPU / min(quota, what the
    host leaves of a core). A "tuned" step's kernels have a parallel loop and cost 0.05, 0.1 or 0.2 ns
    per FLOP on one core (the schedule tuning found, which it measured: `tune_s`), half that on two.
    The instrument adds `refill_per_byte` x the kernel's bytes to each timed kernel, not to the step."""
    metas, ms = {}, []
    for n, scale, sched in itertools.product(n_kernels_per_step, (1, 4, 16), schedules):
        d = f"/nonexistent/{n}-{scale}-{sched}"
        tuned = sched == "tuned"
        ks = {f"fused_matmul{i}_add": {"kind": "matmul", "n_fused": 2, "flops": 1e4 * scale * (i + 1),
                                        "bytes": 4e3 * scale, "out_bytes": 1e3, "n_args": 3,
                                        "tuned": int(tuned), "n_parallel": int(tuned), "loop_depth": 3 + 4 * tuned,
                                        "tune_s": 1e4 * scale * (i + 1) * 1e-10 * 2.0 ** (i % 3 - 1) * tuned}
              for i in range(n)}
        calls = {**{k: 1.0 for k in ks}, "vm.builtin.null_value": 10.0, "vm.builtin.alloc_tensor": 2.0 * n}
        metas[d] = {"kernels": ks, "calls": calls, "n_params": 2 * n, "flops_per_sample": 3e3 * scale * n,
                    "batch": 32}
        for q, cpus in devices or [(q, 1) for q in quotas]:
            dev = {"name": f"q{q}c{cpus}", "cpu_quota": q, "cpus": cpus, "nominal_gflops": 32 * min(q, 1) * cpus,
                   "mem_bandwidth_gbs": 8 * min(q, 1) * cpus, "memory_mib": 512, "description": ""}
            c_in = 1e-6
            kernels = {k: {"calls": 1.0, "time_s": (v["tune_s"] / cpus if tuned else v["flops"] * 1e-9)
                           * slowdown(min(q, 1), v["flops"]) + c_in} for k, v in ks.items()}
            kernels["vm.builtin.null_value"] = {"calls": 10.0, "time_s": 10 * c_in}
            kernels["vm.builtin.alloc_tensor"] = {"calls": 2.0 * n, "time_s": 2 * n * 3 * c_in}
            kern = sum(v["time_s"] - c_in for k, v in kernels.items() if k in ks)
            cpu = kern + overhead * overhead_per_cpu(cpus)
            for k, v in ks.items():
                kernels[k]["time_s"] += refill_per_byte * v["bytes"]
            ms.append({"arch_name": f"a{n}", "width": 1.0 / scale, "schedule": sched, "dir": d, "profile": dev["name"],
                       "device": dev, "clock": "thread_cpu", "kernels": kernels, "cpu_step_s": cpu,
                       "step_s": cpu / min(q, 1, host_leaves)})
    return metas, ms


def test_step_is_kernels_plus_overhead_on_synthetic_steps():
    """A per-step overhead that the kernels do not show is learned as its own term, so whole steps come
    out right where a sum of kernels alone would miss the overhead."""
    from edgetvm.costmodels.latte import LatteModel, decompose

    metas, ms = _synthetic()
    parts = decompose(ms[0], metas[ms[0]["dir"]])
    assert math.isclose(parts["overhead_s"], 300e-6, rel_tol=1e-6)   # the instrument's 1 us per call removed
    model = LatteModel().fit(ms, metas)
    for m in ms:
        p = model.predict_parts(metas[m["dir"]], m["device"])
        assert abs(p["step_s"] / m["step_s"] - 1) < 0.08, (m["arch_name"], m["width"], p["step_s"], m["step_s"])
        assert abs(p["overhead_s"] * m["device"]["cpu_quota"] / 300e-6 - 1) < 0.2


def test_small_share_slows_short_kernels_more_and_a_share_between_profiled_ones_interpolates():
    """Throttled to a small share, a short kernel loses more of its CPU time to cold caches than a long
    one: a device at a share no profiled device had gets both right."""
    from edgetvm.costmodels.latte import LatteModel

    def slowdown(q, flops):  # 1.4x for the shortest kernels at 0.1 of a core, 1.1x for the longest
        return q ** (-0.15 + 0.1 * math.log10(flops / 1e4) / math.log10(192))

    metas, ms = _synthetic(quotas=(1.0, 0.5, 0.25, 0.1), slowdown=slowdown)
    model = LatteModel().fit(ms, metas)
    _, held = _synthetic(quotas=(0.15,), slowdown=slowdown)
    for m in held:
        p = model.predict_parts(metas[m["dir"]], m["device"])
        kern = sum(v["time_s"] - 1e-6 for k, v in m["kernels"].items() if not k.startswith("vm.builtin"))
        assert abs(p["kernels_s"] * 0.15 / kern - 1) < 0.01, (m["arch_name"], m["width"])


def test_overhead_shrinks_with_a_second_core_but_not_with_the_share():
    """The code around the kernels runs at the device's per-core speed whatever its share (it is not
    throttled more than the kernels are), and takes half the time with two cores: the fit learns the
    core count's power, and a one-core device keeps the whole overhead."""
    from edgetvm.costmodels.latte import LatteModel

    devices = [(1.0, 1), (0.5, 1), (0.25, 1), (2.0, 2)]
    metas, ms = _synthetic(devices=devices, overhead_per_cpu=lambda c: 1.0 / c)
    model = LatteModel().fit(ms, metas)
    assert -1.2 < model.overhead_cpus < -0.8
    for m in ms:
        p = model.predict_parts(metas[m["dir"]], m["device"])
        want = 300e-6 / m["device"]["cpus"]
        assert abs(p["overhead_s"] * min(m["device"]["cpu_quota"], 1) / want - 1) < 0.15, m["profile"]
    # With no two-core device to learn from, the power is not guessed.
    assert LatteModel().fit([m for m in ms if m["device"]["cpus"] == 1], metas).overhead_cpus == 0.0


def test_tuned_parallel_kernels_get_faster_with_a_second_core_default_ones_do_not():
    """Tuned kernels (a parallel loop) run on both cores of a two-core device, default ones on one: the
    fit tells them apart by the kernel's loop structure, not by a device-wide factor, and predicts
    both schedules of a step it never saw."""
    from edgetvm.costmodels.latte import KERNEL_DEVICE, LatteModel

    devices = [(1.0, 1), (0.5, 1), (0.25, 1), (2.0, 2)]
    metas, ms = _synthetic(devices=devices, schedules=("default", "tuned"))
    train = [m for m in ms if m["arch_name"] != "a8"]
    model = LatteModel().fit(train, metas)
    coef = dict(zip(KERNEL_DEVICE, model.device))
    assert abs(coef["log_cpus_x_parallel"] + 1) < 0.1, coef   # halved by a second core
    assert abs(coef["log_cpus"]) < 0.1, coef
    for m in ms:
        p = model.predict_parts(metas[m["dir"]], m["device"])
        kern = sum(v["time_s"] - 1e-6 for k, v in m["kernels"].items() if not k.startswith("vm.builtin"))
        assert abs(p["kernels_s"] * min(m["device"]["cpu_quota"], 1) / kern - 1) < 0.1, \
            (m["arch_name"], m["schedule"], m["profile"])


def test_a_tuned_kernel_costs_what_tuning_measured_for_its_schedule_not_what_its_flops_say():
    """Alike tuned kernels differ 4x in speed by the schedule the search happened to find; the latency
    tuning measured for it carries that to an architecture the model never saw."""
    from edgetvm.costmodels.latte import LatteModel

    metas, ms = _synthetic(schedules=("default", "tuned"))
    model = LatteModel().fit([m for m in ms if m["arch_name"] != "a8"], metas)
    for m in ms:
        if m["arch_name"] == "a8" and m["schedule"] == "tuned":
            p = model.predict_parts(metas[m["dir"]], m["device"])
            for k, t in p["kernel_s"].items():
                want = m["kernels"][k]["time_s"] - 1e-6
                assert abs(t * m["device"]["cpu_quota"] / want - 1) < 0.1, (k, m["profile"], m["width"])


def test_kernels_timed_one_by_one_overstate_the_step_by_refilling_their_operands():
    """Each instrument callback evicts some of the next kernel's operands, so timed kernels add up to
    more than they take in the uninstrumented step, by an amount that grows with the bytes they touch
    (tuned mlp-a at width 1: 21.4 us outside kernels against 31.7 us for its default build, the same
    VM calls). The overhead fit learns that negative share, and whole steps come out right for an
    architecture it never saw."""
    from edgetvm.costmodels.latte import LatteModel

    metas, ms = _synthetic(schedules=("default", "tuned"), refill_per_byte=5e-10)
    model = LatteModel().fit([m for m in ms if m["arch_name"] != "a8"], metas)
    for m in ms:
        if m["arch_name"] == "a8":
            p = model.predict_step(metas[m["dir"]], m["device"])
            assert abs(p / m["step_s"] - 1) < 0.05, (m["schedule"], m["profile"], m["width"], p, m["step_s"])


def test_a_device_gets_its_quota_but_no_more_of_a_core_than_the_host_leaves():
    """Other work on the host takes 8% of a core: a full-core device runs at 0.92 of one, a throttled
    device still gets its whole quota. Wall time follows min(quota, 0.92), not a trend in log(quota)."""
    from edgetvm.costmodels.latte import LatteModel

    metas, ms = _synthetic(quotas=(1.0, 0.6, 0.25, 0.1), host_leaves=0.92)
    model = LatteModel().fit(ms, metas)
    _, held = _synthetic(quotas=(0.95, 0.4), host_leaves=0.92)
    for m in ms + held:
        p = model.predict_step(metas[m["dir"]], m["device"])
        assert abs(p / m["step_s"] - 1) < 0.02, (m["profile"], p, m["step_s"])


def _on_host(metas, ms, speed, l1=None):
    """The synthetic profile as another machine measures it: every time (kernels, overhead, tuning
    latencies) divided by `speed`, its reference step too, and its own L1 cache."""
    import copy

    metas, ms = copy.deepcopy(metas), copy.deepcopy(ms)
    host = {"ref_step_s": 1e-3 / speed, "l1": l1 or {"size": 32768, "ways": 8, "line": 64},
            "l2": {"size": 1 << 20, "ways": 8, "line": 64}, "cpu": f"x{speed:g}"}
    for meta in metas.values():
        for k in meta["kernels"].values():
            k["tune_s"] /= speed
    for m in ms:
        for k in m["kernels"].values():
            k["time_s"] /= speed
        m["cpu_step_s"] /= speed
        m["step_s"] /= speed
        m["host"] = host
    return metas, ms, host


def test_predictions_follow_the_machines_speed_not_the_one_it_was_fitted_on():
    """A model fitted on one machine predicts a machine with 1.7x faster cores (its reference step, every
    kernel, the overhead and the tuning latencies 1.7x shorter) from that machine's calibration alone.
    Fails as soon as any absolute time (a fitted slope, the overhead, a tuning latency) is machine-bound."""
    from edgetvm.costmodels.latte import LatteModel

    metas, ms = _synthetic(devices=[(1.0, 1), (0.5, 1), (0.25, 1), (2.0, 2)], schedules=("default", "tuned"))
    metas_a, ms_a, _ = _on_host(metas, ms, 1.0)
    metas_b, ms_b, host_b = _on_host(metas, ms, 1.7)
    model = LatteModel().fit(ms_a, metas_a)
    for a, b in zip(ms_a, ms_b):
        pa = model.predict_step(metas_a[a["dir"]], a["device"])
        pb = model.predict_step(metas_b[b["dir"]], b["device"], host=host_b)
        assert abs(pb * 1.7 / pa - 1) < 1e-4  # float32 margins, (b["arch_name"], b["schedule"], b["profile"])
        assert abs(pb / b["step_s"] - 1) < 0.1, (b["arch_name"], b["schedule"], b["profile"], pb, b["step_s"])


def test_cache_conflicts_are_those_of_the_machine_that_runs_the_kernel():
    """Column walks whose stride maps them into few L1 sets run 3x slower. On a machine with half the L1
    sets, strides that were harmless conflict: the model fitted on the first machine predicts the second
    from its cache geometry."""
    from edgetvm.costmodels.latte import LatteModel

    big = {"size": 65536, "ways": 8, "line": 64}      # 128 sets
    small = {"size": 16384, "ways": 4, "line": 64}    # 64 sets
    metas, ms = {}, []
    for host_l1 in (big, small):
        host = {"ref_step_s": 1e-3, "l1": host_l1, "l2": {"size": 1 << 20, "ways": 8, "line": 64}}
        for stride, ext, scale in itertools.product((4096, 6144, 8192, 2560, 3072, 4608), (64, 96, 128), (1, 4)):
            d = f"/nonexistent/{stride}-{ext}-{scale}"
            ks = {f"fused_matmul{i}": {"kind": "matmul", "flops": 2e4 * scale * (i + 1), "bytes": 8e3 * scale,
                                       "inner_extent": ext, "inner_stride": stride + 64 * i} for i in range(4)}
            metas[d] = {"kernels": ks, "calls": {k: 1.0 for k in ks}, "n_params": 4,
                        "flops_per_sample": 1e4 * scale, "batch": 32}
            dev = {"name": "full", "cpu_quota": 1.0, "cpus": 1, "nominal_gflops": 32.0, "mem_bandwidth_gbs": 8.0,
                   "memory_mib": 512, "description": ""}
            kernels = {k: {"calls": 1.0, "time_s": v["flops"] * 1e-9 *
                           (3.0 if training.stream_overflow(ext, v["inner_stride"], host_l1) > 1 else 1.0)}
                       for k, v in ks.items()}
            cpu = sum(v["time_s"] for v in kernels.values()) + 50e-6
            ms.append({"arch_name": d, "width": 1.0, "schedule": "default", "dir": d, "profile": "full",
                       "device": dev, "clock": "thread_cpu", "kernels": kernels, "cpu_step_s": cpu, "step_s": cpu,
                       "host": host})
    on_big, on_small = ms[:len(ms) // 2], ms[len(ms) // 2:]
    flipped = [m for m, n in zip(on_big, on_small) if n["step_s"] > 1.1 * m["step_s"]]
    assert flipped, "some strides conflict only on the small cache"
    model = LatteModel().fit(on_big, metas)
    for m in on_small:
        p = model.predict_step(metas[m["dir"]], m["device"], host=m["host"])
        assert abs(p / m["step_s"] - 1) < 0.1, (m["dir"], p, m["step_s"])


def test_split_never_trains_on_a_held_out_compiled_step():
    from edgetvm.latte.pipeline import split

    # cnn-a at width 1/2 is the same network (the same compiled step) as cnn-b at width 1
    assert models.sub_arch(models.ARCHS["cnn-a"], 0.5) == models.sub_arch(models.ARCHS["cnn-b"], 1.0)
    ms = [{"arch_name": a, "width": w, "dir": d, "profile": p} for p in ("x", "y")
          for a, w, d in (("cnn-a", 0.5, "D1"), ("cnn-b", 1.0, "D1"), ("mlp-a", 1.0, "D2"))]
    train, sets = split({"measurements": ms}, held_archs=("cnn-b",), held_profiles=("y",))
    assert {m["dir"] for m in train} == {"D2"}
    assert all(m["profile"] == "x" for m in train)
    assert len(sets["held-out archs"]) == 1 and len(sets["both held out"]) == 1


def test_noise_floor_from_repeats():
    from edgetvm.latte.pipeline import noise_floor

    ms = [{"profile": "p", "step_s_runs": [1.0, 1.1]}, {"profile": "p", "step_s_runs": [2.0, 2.0]},
          {"profile": "q", "step_s_runs": [1.0]}]
    nz = noise_floor({"measurements": ms})
    assert nz["n"] == 2 and math.isclose(nz["pair_mape"], (0.1 / 1.05) / 2 * 100)
    assert nz["within10"] == 100.0
    assert noise_floor({"measurements": ms[2:]}) is None


def _run(*times, schedule="default"):
    return [{"arch_name": "mlp-a", "width": w, "schedule": schedule, "dir": f"D{w}", "step_s": t, "cpu_step_s": t,
             "window_step_s": [t], "instrumented_step_s": t, "steps": 1, "kernels": {}}
            for w, t in zip((1.0, 0.5, 0.25), times)]


def test_a_run_whose_steps_all_took_longer_than_in_the_other_runs_is_disturbed():
    from edgetvm.latte.pipeline import disturbed_runs

    normal, slow = _run(1.0, 0.5, 0.25), _run(1.5, 0.72, 0.4)
    assert disturbed_runs([normal, slow, _run(1.02, 0.49, 0.26)]) == [1]
    assert disturbed_runs([slow, normal]) == [0]              # two runs: the slower one
    assert disturbed_runs([normal, _run(0.6, 0.3, 0.15), _run(1.02, 0.49, 0.26)]) == []  # never sped up
    assert disturbed_runs([normal, _run(1.1, 0.55, 0.27)]) == []  # 10% is noise, not a disturbed process
    assert disturbed_runs([normal, _run(1.0, 0.5, 0.9)]) == []    # one slow step is not the whole process
    assert disturbed_runs([slow]) == []


def test_a_disturbed_run_is_measured_again_by_a_fresh_process(monkeypatch):
    from edgetvm.latte import pipeline

    monkeypatch.setattr(pipeline, "cgroups_unavailable", lambda: None)
    monkeypatch.setattr(pipeline, "compile_family", lambda *a, **k: [])
    monkeypatch.setattr(pipeline.training, "compile_trainer", lambda *a, **k: "ref")
    calls = []
    plan = {"fast": [_run(1.0, 0.5, 0.25), _run(1.6, 0.8, 0.4), _run(1.01, 0.5, 0.25), _run(0.99, 0.5, 0.25)],
            "steady": [_run(2.0, 1.0, 0.5), _run(2.02, 1.0, 0.5), _run(1.98, 1.0, 0.5)]}

    def fake_measure(p, *a, **k):
        calls.append(p.name)
        got = plan[p.name][sum(c == p.name for c in calls) - 1]
        return {"results": got, "cgroup_peak_bytes": 1, "throttled_s": 0.0, "wall_s": 1.0,
                "host": {"ref_step_s": 0.002}}

    monkeypatch.setattr(pipeline, "_measure", fake_measure)
    profs = [devices.Profile(name=n, description="", cpus=1, cpu_quota=1.0, memory_mib=64, nominal_gflops=1.0, mem_bandwidth_gbs=1.0)
             for n in plan]
    data = pipeline.profile_fleet(profs, ["mlp-a"], [1.0], repeats=3, quiet=True)
    assert calls == ["fast", "steady"] * 3 + ["fast"]
    assert data["runs"]["fast"]["remeasured"] == 1 and "remeasured" not in data["runs"]["steady"]
    fast = {m["width"]: m for m in data["measurements"] if m["profile"] == "fast"}
    assert fast[1.0]["step_s_runs"] == [1.0, 0.99, 1.01]   # the disturbed second run replaced


def test_cache_conflict_feature():
    """A column walk down a 256-wide fp32 matrix hits only 4 of the 64 L1 sets (4 KiB aliasing) and
    overflows them 8x; 320 wide spreads over 16 sets."""
    l1 = {"size": 32768, "ways": 8, "line": 64}
    assert training.stream_overflow(256, 256 * 4, l1) == 8.0
    assert training.stream_overflow(256, 320 * 4, l1) == 2.0
    assert training.stream_overflow(64, 320 * 4, l1) <= 1
    assert training.stream_overflow(64, 4, l1) < 0.01            # contiguous: a few lines
    assert training.stream_overflow(1, 1024, l1) == 0.0


def test_kernel_features_see_matmul_access_pattern():
    from tvm import relax

    mod = training.lowered_module(models.sub_arch(models.ARCHS["fedmlp"], 1.0))
    feats = training.kernel_features(mod)
    fwd = [f for f in feats.values() if f["kind"] == "matmul" and f["shapes"][:2] == [[32, 256], [256, 256]]]
    assert fwd, "the 256x256 forward matmul is a kernel"
    f = fwd[0]
    assert f["inner_extent"] == 256 and f["inner_reduce"] == 1 and f["inner_stride"] == 1024
    assert f["inner_l1_overflow"] > 1
    assert relax is not None


def _fleet():
    names = ["phone-hi", "phone-mid", "sbc-a53", "iot-tiny", "sensor-lowmem", "sensor-tiny"]
    return {i: devices.load_profile(n) for i, n in enumerate(names)}


def _fake_step(profile, width):
    # overhead-dominated small widths, like measured steps
    return (0.2e-3 + 8e-3 * width * width) / profile.speed


def test_allocator_evens_rounds_and_respects_memory():
    fleet = _fleet()
    arch = models.ARCHS[models.FED_ARCH]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assign, deadline = allocate.latte(fleet, _fake_step, arch, 32, local_steps=20)
    by = {a.profile: a for a in assign}
    assert by["sensor-tiny"].width is None
    assert any("sensor-tiny" in str(w.message) and "left out" in str(w.message) for w in caught)
    assert by["sensor-lowmem"].width is not None and by["sensor-lowmem"].width < 1.0
    for a in assign:
        if a.width is not None:
            assert allocate.fits(fleet[a.client], arch, a.width, 32)
            assert a.predicted_s <= deadline * 1.0001
    assert by["phone-hi"].width > by["iot-tiny"].width
    times = [a.predicted_s for a in assign if a.width is not None]
    fedavg_times = [20 * _fake_step(p, 1.0) for p in fleet.values() if allocate.fits(p, arch, 1.0, 32)]
    assert max(times) / min(times) < max(fedavg_times) / min(fedavg_times)


def test_heterofl_static_ratios_from_nominal_compute():
    fleet = _fleet()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a = {x.profile: x for x in allocate.static(fleet, models.ARCHS[models.FED_ARCH], 32, 20, full=False)}
        f = {x.profile: x for x in allocate.static(fleet, models.ARCHS[models.FED_ARCH], 32, 20, full=True)}
    assert a["phone-hi"].width == 1.0 and a["iot-tiny"].width == 0.25
    assert f["sensor-lowmem"].width is None and f["phone-hi"].width == 1.0


def test_heterofl_aggregation_and_rolling():
    arch = {"kind": "mlp", "hidden": [8, 4]}
    g = fed.init_params(arch, 0)
    h_small = fed.hidden_indices(arch, 0.5, 1, rolling=False)
    assert [list(h) for h in h_small] == [[0, 1, 2, 3], [0, 1]]
    h_roll = fed.hidden_indices(arch, 0.5, 3, rolling=True)
    assert list(h_roll[0]) == [2, 3, 4, 5] and list(h_roll[1]) == [2, 3]
    sub = fed.slice_params(g, arch, h_small)
    assert sub[0].shape == (64, 4) and sub[2].shape == (4, 2) and sub[4].shape == (2, 10)
    ones = [np.ones_like(s) for s in sub]
    full = [np.full_like(p, 3.0) for p in g]
    new = fed.aggregate(g, arch, [(ones, h_small, 1.0), (full, fed.hidden_indices(arch, 1.0, 1, False), 1.0)])
    assert np.allclose(new[0][:, :4], 2.0) and np.allclose(new[0][:, 4:], 3.0)
    # an element nobody trained keeps its value
    kept = fed.aggregate(g, arch, [(ones, h_small, 1.0)])
    assert np.allclose(kept[0][:, 4:], g[0][:, 4:]) and np.allclose(kept[0][:, :4], 1.0)


def test_local_training_and_non_iid_split():
    parts = fed.partition(10, 0.3, 0)
    assert len(parts) == 10 and sum(len(p) for p in parts) >= 1347
    Xtr, Xte, ytr, yte = fed.digits_split(0)
    label_sets = [set(ytr[p]) for p in parts]
    assert min(len(s) for s in label_sets) < 10   # skewed labels
    arch = models.ARCHS[models.FED_ARCH]
    p0 = fed.init_params(arch, 0)
    p1, loss = fed.local_train(p0, Xtr, ytr, 200, 0.05, 32, 0)
    assert fed.accuracy(p1, Xte, yte) > 0.85 > fed.accuracy(p0, Xte, yte)


def _plan(rounds, crash_rate=0.0):
    fleet = {i: p for i, p in enumerate([devices.load_profile(n) for n in
                                         ["phone-hi", "phone-mid", "sbc-a53", "iot-tiny", "sensor-lowmem",
                                          "sensor-tiny"]] * 2)}
    measured = {(p.name, w): _fake_step(p, w) for p in fleet.values() for w in models.WIDTHS}
    return fed.Plan(fleet=fleet, measured=measured, predicted=dict(measured), rounds=rounds,
                    crash_rate=crash_rate, local_steps=10)


@pytest.mark.slow
def test_flower_simulation_all_methods_with_crashes():
    """One Flower simulation (Ray) runs LATTE and the baselines; injected crashes do not stop rounds."""
    hist = fed.simulate(_plan(3, crash_rate=0.3))
    assert set(hist) == set(fed.METHODS)
    assert len(hist["latte"].rounds) == len(hist["fedavg"].rounds) == 3
    fedavg_time = hist["fedavg"].rounds[-1]["sim_time_s"]
    for m, h in hist.items():
        assert all(r["accuracy"] is not None for r in h.rounds)
        assert all(r["round_s"] > 0 for r in h.rounds)
        if m in ("heterofl", "fedrolex"):  # shorter rounds than FedAvg's: more of them, in FedAvg's time
            assert len(h.rounds) > 3 and h.rounds[-2]["sim_time_s"] < fedavg_time
    assert any(r["failed"] for h in hist.values() for r in h.rounds)
    assert hist["latte"].rounds[-1]["sim_time_s"] < fedavg_time


def test_baselines_run_to_fedavgs_simulated_time_not_a_round_count():
    """HeteroFL's round waits for its slowest sub-model, shorter than FedAvg's full model on the slowest
    device: it gets as many rounds as fill FedAvg's time, so time-to-accuracy compares equal budgets."""
    plan = _plan(10)
    Strategy = fed._strategy_class()
    fedavg = Strategy("fedavg", plan, fed.History("fedavg"))
    heterofl = Strategy("heterofl", plan, fed.History("heterofl"))
    round_of = lambda s: max(plan.measured_step(plan.fleet[a.client], a.width) * a.steps  # noqa: E731
                             for a in s.allocation(1) if a.width is not None)
    budget = 10 * round_of(fedavg)
    n = fed.rounds_for(heterofl, plan, budget)
    assert n > 10 and (n - 1) * round_of(heterofl) < budget <= n * round_of(heterofl) + 1e-12
    assert fed.rounds_for(fedavg, plan, budget) == 10


def test_throttled_devices_get_windows_of_many_cfs_periods_unthrottled_ones_many_short_windows():
    """A throttled device's window lasts many CFS periods (or it is one of the minimum 5); a device that is
    never throttled has no periods to straddle and gets many short windows."""
    from edgetvm.latte.measure import MAX_WINDOWS, MIN_PERIODS, MIN_WINDOWS, windows_for

    for p in devices.list_profiles():
        n = windows_for(p, 0.1, 0.01)
        if p.cpu_quota >= p.cpus:
            assert n == MAX_WINDOWS, p.name
        else:
            assert MIN_WINDOWS <= n <= MAX_WINDOWS
            assert n == MIN_WINDOWS or 0.1 / p.speed / n >= MIN_PERIODS * 0.01, p.name


@pytest.mark.skipif(__import__("platform").machine() != "x86_64", reason="x86 CPU model names")
def test_mcpu_names_a_cpu_model_the_host_can_run():
    training.check_cpu("x86-64")  # every x86-64 host runs the baseline
    with pytest.raises(UserError, match="--mcpu not-a-cpu: not a CPU model LLVM knows"):
        training.check_cpu("not-a-cpu")
