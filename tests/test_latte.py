"""LATTE: device profiles, TVM-compiled training measured in cgroups, the cost model, allocation, Flower."""

import json
import math
import subprocess
import sys
import warnings

import numpy as np
import pytest

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


@pytest.fixture(scope="module")
def measured():
    reason = devices.cgroups_unavailable()
    if reason:
        print(f"skipping cgroup measurements: {reason}")
        pytest.skip(reason)
    from edgetvm.latte.pipeline import compile_family, profile_fleet

    profs = [devices.load_profile("phone-hi"), devices.load_profile("iot-tiny")]
    data = profile_fleet(profs, ["mlp-d", "cnn-b"], [1.0, 0.25], min_time=0.03, quiet=True)
    return data


def test_measured_in_cgroup_per_kernel_sums(measured):
    by = {(m["profile"], m["arch_name"], m["width"]): m for m in measured["measurements"]}
    assert len(by) == 8
    for m in measured["measurements"]:
        assert m["step_s"] > 0
        assert math.isclose(sum(m["kernel_s"].values()), m["step_s"], rel_tol=1e-6)
        assert any(not s.startswith("vm.builtin") for s in m["kernels"])
    # 10% of one core is several times slower than a full core
    slow, fast = by[("iot-tiny", "mlp-d", 1.0)]["step_s"], by[("phone-hi", "mlp-d", 1.0)]["step_s"]
    assert slow > 4 * fast, (slow, fast)
    assert measured["runs"]["iot-tiny"]["throttled_s"] > 0


def test_cost_model_fits_and_predicts(measured, tmp_path):
    from edgetvm.costmodels.latte import FlopsBaseline, LatteModel

    ms, metas = measured["measurements"], measured["metas"]
    model = LatteModel().fit(ms, metas)
    base = FlopsBaseline().fit(ms, metas)
    for m in ms:
        p = model.predict_step(metas[m["dir"]], m["device"])
        assert 0.5 < p / m["step_s"] < 2.0, (m["profile"], m["arch_name"], p, m["step_s"])
        assert base.predict_step(metas[m["dir"]], m["device"]) > 0
    model.save(tmp_path / "m")
    again = LatteModel.load(tmp_path / "m")
    m = ms[0]
    assert math.isclose(again.predict_step(metas[m["dir"]], m["device"]),
                        model.predict_step(metas[m["dir"]], m["device"]), rel_tol=1e-5)
    with pytest.raises(UserError, match="latte fit"):
        LatteModel.load(tmp_path / "nothing")


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
    for m, h in hist.items():
        assert len(h.rounds) == 3
        assert all(r["accuracy"] is not None for r in h.rounds)
        assert all(r["round_s"] > 0 for r in h.rounds)
    assert any(r["failed"] for h in hist.values() for r in h.rounds)
    lat = hist["latte"].rounds[-1]["sim_time_s"]
    assert lat < hist["fedavg"].rounds[-1]["sim_time_s"]
