"""DRESS: nested row-sparse masks, joint training, sparse kernels over one store, run-time switching."""

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from edgetvm import train
from edgetvm.cli import main
from edgetvm.errors import UserError
from edgetvm.runtime import emulated_board
from edgetvm.runtime import subnets as rt
from edgetvm.runtime.artifact import open_artifact
from edgetvm.sparse import masks
from edgetvm.sparse import train as st
from edgetvm.sparse.cli import write_onnx

RNG = np.random.default_rng(0)
LEVELS = (0.0, 0.5, 0.7, 0.9)


# ---- the masks and the store -------------------------------------------------------------------------------


def test_every_row_keeps_its_largest_entries_and_sparser_masks_are_subsets_of_denser_ones():
    w = RNG.normal(size=(300, 40)).astype(np.float32)           # linear (in, out): 40 rows of 300
    ms = masks.masks("fc.weight", w, LEVELS)
    rows = [masks.rows_of("fc.weight", m) for m in ms]
    for s, r in zip(LEVELS, rows):
        assert (r.sum(axis=1) == round((1 - s) * 300)).all()    # row-balanced: the same count in every row
    for dense, sparse in zip(rows, rows[1:]):
        assert (sparse <= dense).all()                           # nested
    kept = np.abs(masks.rows_of("fc.weight", w)) * rows[2]
    dropped = np.abs(masks.rows_of("fc.weight", w)) * (1 - rows[2])
    assert (kept.max(axis=1) >= dropped.max(axis=1)).all()
    assert (np.where(rows[2] > 0, kept, np.inf).min(axis=1) >= dropped.max(axis=1)).all()


def test_the_store_holds_each_subnet_as_a_prefix_and_decodes_to_the_masked_weight():
    w = RNG.normal(size=(50, 20, 5, 5)).astype(np.float32)      # conv OIHW: 50 rows of 500
    s = masks.store("conv.weight", w, LEVELS)
    assert s["idx"].dtype == np.int16 and s["idx"].shape == (4, 500, masks.LANES)   # 50 rows padded to 64
    for k, m in enumerate(masks.masks("conv.weight", w, LEVELS)):
        np.testing.assert_array_equal(masks.from_store(s, k), w * m)
        assert masks.store_bytes(s, k) == s["counts"][k] * 64 * 6 + s["counts"].nbytes
    # subnet 3's store is the first counts[3] ranks of every block: cutting the store there changes nothing
    cut = dict(s, idx=s["idx"][:, :s["counts"][3]], val=s["val"][:, :s["counts"][3]])
    np.testing.assert_array_equal(masks.from_store(cut, 3), masks.from_store(s, 3))


@pytest.mark.parametrize("levels, message", [
    ((0.5, 0.5), "not increasing"), ((0.7, 0.5), "not increasing"), ((0.0, 1.0), "outside [0, 1)"),
    ((-0.1, 0.5), "outside [0, 1)"), ((), "no sparsity levels")])
def test_bad_sparsity_levels_are_refused(levels, message):
    with pytest.raises(UserError, match=message.replace("[", r"\[").replace(")", r"\)")):
        masks.check_levels(levels)


# ---- the kernels over one store ------------------------------------------------------------------------------


def _numpy_net(model, params, x):
    """The reference forward pass of a train.Model in numpy (convs via explicit taps)."""
    h = x
    n_conv = n_fc = 0
    for layer in model.layers:
        if isinstance(layer, train.Conv):
            n_conv += 1
            w, b = params[f"conv{n_conv}.weight"], params[f"conv{n_conv}.bias"]
            p = layer.pad
            h = np.pad(h, ((0, 0), (0, 0), (p, p), (p, p)))
            n, c, hh, ww = h.shape
            o, _, kh, kw = w.shape
            oh, ow = hh - kh + 1, ww - kw + 1
            cols = np.stack([h[:, :, i:i + oh, j:j + ow] for i in range(kh) for j in range(kw)], axis=2)
            h = np.einsum("ok,nkm->nom", w.reshape(o, -1), cols.reshape(n, c * kh * kw, oh * ow))
            h = h.reshape(n, o, oh, ow) + b[None, :, None, None]
        elif isinstance(layer, train.ReLU):
            h = np.maximum(h, 0)
        elif isinstance(layer, train.MaxPool):
            n, c, hh, ww = h.shape
            s = layer.size
            h = h[:, :, :hh // s * s, :ww // s * s].reshape(n, c, hh // s, s, ww // s, s).max(axis=(3, 5))
        elif isinstance(layer, train.Flatten):
            h = h.reshape(len(h), -1)
        elif isinstance(layer, train.Linear):
            n_fc += 1
            h = h @ params[f"fc{n_fc}.weight"] + params[f"fc{n_fc}.bias"]
    return h


def _subnets(model, seed=1, levels=LEVELS):
    """Random weights made sparse at the densest level: a Subnets as joint_train returns (no training)."""
    params = train.init_params(model, seed=seed)
    params = {n: p + (0.01 * RNG.normal(size=p.shape).astype(np.float32) if n.endswith(".bias") else 0)
              for n, p in params.items()}
    names = st.sparse_weights(model)
    orders = {n: masks.ranking(n, params[n]) for n in names}
    mks = {n: masks.masks(n, params[n], levels, orders[n]) for n in names}
    return st.Subnets(levels, st.masked(params, mks, 0), orders, [0.9, 0.8, 0.7, 0.6][:len(levels)])


@pytest.fixture(scope="module")
def lenet_artifact(tmp_path_factory):
    d = tmp_path_factory.mktemp("dress")
    model = train.lenet5()
    sub = _subnets(model)
    write_onnx(model, sub, d / "m.onnx")
    assert main(["compile", str(d / "m.onnx"), "-o", str(d / "art")]) == 0
    x = RNG.random((1, 1, 28, 28)).astype(np.float32)
    np.save(d / "x.npy", x)
    return d, model, sub, x


def test_the_onnx_file_runs_the_densest_subnet_in_onnxruntime(lenet_artifact):
    d, model, sub, x = lenet_artifact
    got = ort.InferenceSession(str(d / "m.onnx"), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, _numpy_net(model, sub.subnet_params(0), x), rtol=1e-4, atol=1e-4)


def test_one_artifact_computes_every_subnet_exactly_as_the_masked_dense_network(lenet_artifact):
    d, model, sub, x = lenet_artifact
    art = open_artifact(d / "art")
    assert [i["name"] for i in art.manifest["inputs"]] == ["x", "subnet"]
    names = [w["name"] for w in art.manifest["weights"]]
    assert "fc1.weight" not in names and {"fc1.weight.idx", "fc1.weight.val", "fc1.weight.counts"} <= set(names)
    assert "conv1.weight" in names                     # the first layer stays dense
    for k in range(len(LEVELS)):
        np.save(d / "s.npy", np.array([k], np.int32))
        assert main(["run", str(d / "art"), "--input", f"x={d / 'x.npy'}", "--input", f"subnet={d / 's.npy'}",
                     "--output", str(d / "y.npz"), "--repeat", "1"]) == 0
        want = _numpy_net(model, sub.subnet_params(k), x)
        np.testing.assert_allclose(np.load(d / "y.npz")["logits"], want, rtol=1e-4, atol=1e-4)


def test_the_store_is_held_once_and_each_subnet_reads_a_share_that_falls_with_sparsity(lenet_artifact):
    d, model, sub, _ = lenet_artifact
    m = open_artifact(d / "art").manifest
    table = m["dress"]
    dense_float = sum(int(np.prod(s)) * 4 for n, s in train.param_shapes(model).items())
    # one store for all subnets: below two dense copies (int16 indices + values at 0% sparsity)
    assert m["weight_bytes"] < 2 * dense_float
    reads = [s["weight_bytes"] for s in table["subnets"]]
    assert reads == sorted(reads, reverse=True) and reads[3] < 0.2 * reads[0]
    nnz = [s["nonzeros"] for s in table["subnets"]]
    assert nnz[0] == sum(int(np.prod(train.param_shapes(model)[n])) for n in st.sparse_weights(model))
    assert [s["accuracy"] for s in table["subnets"]] == sub.accuracy


def test_padded_convolutions_use_the_same_kernels_correctly(tmp_path):
    model = train.vgg_small(channels=(16, 24), hidden=40)          # 3x3 convs with padding 1
    sub = _subnets(model, seed=2, levels=(0.2, 0.6))
    write_onnx(model, sub, tmp_path / "v.onnx")
    assert main(["compile", str(tmp_path / "v.onnx"), "-o", str(tmp_path / "a")]) == 0
    from edgetvm.runtime.session import Runner

    r = Runner(open_artifact(tmp_path / "a"))
    x = RNG.random((1, 1, 28, 28)).astype(np.float32)
    for k in range(2):
        got = r.run({"x": x, "subnet": np.array([k], np.int32)})["logits"]
        np.testing.assert_allclose(got, _numpy_net(model, sub.subnet_params(k), x), rtol=1e-4, atol=1e-4)
    # a subnet index past the last runs the last (the kernels clamp it: they never read past the store)
    np.testing.assert_array_equal(r.run({"x": x, "subnet": np.array([7], np.int32)})["logits"],
                                  r.run({"x": x, "subnet": np.array([1], np.int32)})["logits"])


def test_a_model_edited_outside_its_densest_subnet_is_refused(tmp_path, capsys):
    model = train.lenet5(hidden=20)
    write_onnx(model, _subnets(model, levels=(0.5, 0.9)), tmp_path / "m.onnx")
    m = onnx.load(tmp_path / "m.onnx")
    w = next(t for t in m.graph.initializer if t.name == "fc1.weight")
    arr = onnx.numpy_helper.to_array(w).copy()
    arr[arr == 0] = 1.0                                     # fills in what the densest subnet dropped
    w.CopyFrom(onnx.numpy_helper.from_array(arr, "fc1.weight"))
    onnx.save(m, tmp_path / "edited.onnx")
    assert main(["compile", str(tmp_path / "edited.onnx"), "-o", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err.strip()
    assert "fc1.weight has nonzeros outside its densest subnet" in err and len(err.splitlines()) == 1


# ---- run-time switching ---------------------------------------------------------------------------------------


def test_switching_subnets_passes_the_same_weight_tensors_and_only_changes_the_subnet_input(lenet_artifact):
    d, _, _, x = lenet_artifact
    sr = rt.SubnetRunner(open_artifact(d / "art"))
    a0, a3 = sr.args({"x": x}, 0), sr.args({"x": x}, 3)
    assert all(p is q for p, q in zip(a0[2:], a3[2:]))       # the weights: the same mapped tensors
    assert int(a3[1].numpy()[0]) == 3
    sr.calibrate({"x": x}, repeat=1)
    cost = rt.switch_cost(sr, {"x": x}, n=50)
    assert cost["weights_shared"]


def test_the_runner_picks_the_most_accurate_subnet_that_fits_and_else_the_smallest(lenet_artifact):
    d, _, _, _ = lenet_artifact
    sr = rt.SubnetRunner(open_artifact(d / "art"))
    sr.predicted_ms = [4.0, 2.0, 1.0, 0.5]                # as if calibrated: no timing in this test
    mib = [s["weight_bytes"] for s in sr.subnets]
    assert sr.choose(rt.Budget(10.0, 10 * mib[0])) == rt.Choice(0, True)
    assert sr.choose(rt.Budget(1.5, 10 * mib[0])) == rt.Choice(2, True)      # time rules out 0 and 1
    assert sr.choose(rt.Budget(10.0, mib[1])) == rt.Choice(1, True)          # memory rules out 0
    assert sr.choose(rt.Budget(0.1, 10 * mib[0])) == rt.Choice(3, False)     # nothing fits: the smallest


def test_run_with_a_budget_trace_reports_choices_misses_and_subnets_that_do_not_fit(lenet_artifact, capsys):
    d, _, _, _ = lenet_artifact
    (d / "trace.txt").write_text("# ms MiB repeats\n1000 64 x3\n1000 0.001\n")
    assert main(["run", str(d / "art"), "--budget-trace", str(d / "trace.txt")]) == 0
    out = capsys.readouterr().out
    assert "4 inferences: subnets used [3, 0, 0, 1]" in out
    assert "1 of 4 budgets fit no subnet: ran the smallest (subnet 3)" in out
    assert "no copy" in out


@pytest.mark.parametrize("text, message", [
    ("fast 8\n", "line 1"), ("1.0\n", "line 1"), ("1.0 8\n2.0 -1\n", "line 2"), ("1 8 x0\n", "line 1"),
    ("# nothing\n", "holds no budgets")])
def test_a_budget_trace_that_does_not_parse_exits_2_with_one_line(lenet_artifact, text, message, tmp_path, capsys):
    d, _, _, _ = lenet_artifact
    (tmp_path / "t.txt").write_text(text)
    assert main(["run", str(d / "art"), "--budget-trace", str(tmp_path / "t.txt")]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_a_budget_trace_on_an_artifact_without_subnets_is_refused(tmp_path, capsys):
    model = train.lenet5(hidden=20)
    onnx.save(train.to_onnx(model, train.init_params(model)), tmp_path / "d.onnx")
    assert main(["compile", str(tmp_path / "d.onnx"), "-o", str(tmp_path / "a")]) == 0
    (tmp_path / "t.txt").write_text("1 8\n")
    assert main(["run", str(tmp_path / "a"), "--budget-trace", str(tmp_path / "t.txt")]) == 2
    assert "has no subnets" in capsys.readouterr().err


def test_a_trace_line_may_set_the_cpu_share_of_the_device_and_repeat_as_before(tmp_path):
    (tmp_path / "t.txt").write_text("2.5 8 0.5 x2  # half the device's quota\n1 4 x1\n3 2 0.25\n")
    mib = 2**20
    assert rt.parse_trace(tmp_path / "t.txt") == [rt.Budget(2.5, 8 * mib, 0.5)] * 2 + [
        rt.Budget(1.0, 4 * mib, 1.0), rt.Budget(3.0, 2 * mib, 0.25)]


@pytest.mark.parametrize("line", ["1 8 1.5", "1 8 0", "1 8 -0.5", "1 8 half x2", "1 8 nan"])
def test_a_trace_line_with_a_bad_cpu_share_exits_2_with_one_line(lenet_artifact, line, tmp_path, capsys):
    d, _, _, _ = lenet_artifact
    (tmp_path / "t.txt").write_text(f"1 8 x2\n{line}\n")
    assert main(["run", str(d / "art"), "--budget-trace", str(tmp_path / "t.txt"), "--device", "phone-hi"]) == 2
    err = capsys.readouterr().err.strip()
    assert "line 2" in err and "CPU_SHARE" in err and len(err.splitlines()) == 1


def test_cpu_shares_without_an_emulated_device_are_refused_with_one_line(lenet_artifact, tmp_path, capsys):
    d, _, _, _ = lenet_artifact
    (tmp_path / "t.txt").write_text("1 8 0.5\n")
    assert main(["run", str(d / "art"), "--budget-trace", str(tmp_path / "t.txt")]) == 2
    err = capsys.readouterr().err.strip()
    assert "--device" in err and len(err.splitlines()) == 1


def test_a_lower_cpu_share_scales_the_predicted_latency_and_picks_a_smaller_subnet(lenet_artifact):
    d, _, _, _ = lenet_artifact
    sr = rt.SubnetRunner(open_artifact(d / "art"))
    sr.predicted_ms = [4.0, 2.0, 1.0, 0.5]                # as if calibrated at the full quota: no timing here
    big = rt.Budget(5.0, 10 * sr.memory_bytes[0])
    assert sr.predicted(1, 0.5) == 4.0
    assert sr.choose(big, 1.0) == rt.Choice(0, True)
    assert sr.choose(big, 0.5) == rt.Choice(1, True)         # 8 / 4 / 2 / 1 ms at half the quota
    assert sr.choose(big, 0.25) == rt.Choice(2, True)        # 16 / 8 / 4 / 2 ms
    assert sr.choose(big, 0.05) == rt.Choice(3, False)       # 10 ms at least: nothing fits, the smallest


def _device_or_skip():
    from edgetvm.latte.devices import cgroups_unavailable

    if reason := cgroups_unavailable():
        pytest.skip(f"emulated devices need cgroups: {reason}")


def _our_cgroups(pid):
    from edgetvm.runtime import leftovers

    return [r for r in leftovers.find() if r.kind == "cgroup" and r.owner == pid]


def test_on_an_emulated_device_the_quota_and_memory_limit_follow_the_trace_and_the_choice_follows_the_quota(
        lenet_artifact):
    import os

    from edgetvm.runtime.dress_device import DeviceWorker, summarize

    _device_or_skip()
    d, _, _, x = lenet_artifact
    # the rule of the calibration scaled by 1 / share (policy "mean"); the per-call policy: tests below
    with DeviceWorker("phone-hi", "dress", [d / "art"], {"x": x}, policy="mean") as dev:  # 1 CPU, quota 1.0 per 10 ms
        cgroups = [Path(p) for p in dev.device.paths.values()]
        cal = dev.calibrate()
        pred, mem = cal["predicted_ms"], cal["memory_bytes"]
        assert mem == sorted(mem, reverse=True) and mem[3] < mem[0]          # measured: a sparser prefix holds less
        t = 10 * pred[3] * 1.01        # at a tenth of the quota the sparsest subnet's scaled prediction fits
        roomy, tight = 64 * 2**20, max(mem[3], mem[0] // 2)
        trace = [rt.Budget(t, roomy, 1.0)] * 5 + [rt.Budget(t, roomy, 0.1)] * 60 + [rt.Budget(t, tight, 1.0)] * 5
        run = dev.replay(trace)
    recs = run["records"]
    # the worker read its cgroup's quota and memory limit during the run: they changed with the lines
    assert [r["quota_us"] for r in recs] == [10_000] * 5 + [1_000] * 60 + [10_000] * 5
    assert not run["lines"][2]["limit_raised"]                # above the worker's own memory: set as it is
    assert [r["memory_limit"] for r in recs] == [roomy] * 65 + [tight // 4096 * 4096] * 5   # whole pages
    assert run["lines"][1]["throttled_periods"] > 0           # 60 calls need more than 1 ms of CPU: throttled
    # every choice is the rule over the calibration scaled by the quota it saw, with the memory a subnet
    # needs then: its weight pages (calibration) + the worker's anonymous memory at that moment
    plan = rt.SubnetRunner(open_artifact(d / "art"))
    plan.predicted_ms = pred
    for r, b in zip(recs, trace):
        plan.memory_bytes = [f + r["anon_bytes"] for f in cal["file_bytes"]]
        assert r["share"] == b.cpu_share and r["predicted_ms"] == pytest.approx(pred[r["level"]] / b.cpu_share)
        assert rt.Choice(r["level"], r["fits"]) == plan.choose(b, b.cpu_share)
    # the lower quota: a sparser subnet (not always the sparsest: the sparse subnets of LeNet take 30-100 us
    # and two of them can measure within 1% of each other, and then the denser one fits too and is chosen)
    assert recs[0]["level"] < recs[10]["level"]
    assert all(r["memory_bytes"] <= tight for r in recs[65:])              # held under the limit set from the budget
    assert summarize(run, [0.9, 0.8, 0.7, 0.6])["inferences"] == 70
    assert not any(c.exists() for c in cgroups) and not _our_cgroups(os.getpid())


def test_a_call_runs_at_full_speed_if_it_fits_in_the_quota_left_and_else_waits_for_the_next_period():
    from edgetvm.runtime.dress_device import CPU_MARGIN, GLUE_MS, per_call_ms

    # a quarter of one CPU: 2.5 ms of quota per 10 ms period; a 0.2 ms subnet needs 0.2 x margin + glue
    need = 0.2 * CPU_MARGIN + GLUE_MS
    assert per_call_ms(0.2, need, 2.5, 10, 1) == 0.2                          # fits: the quota does not slow it
    assert per_call_ms(0.2, need - 0.01, 2.5, 10, 1) == pytest.approx(0.2 + 7.5)   # meets the period's end
    assert per_call_ms(3.0, 1.0, 2.5, 10, 1) == pytest.approx(3.0 + 2 * 7.5)  # crosses two periods
    assert per_call_ms(0.2, -1.0, 10, 10, 1) == 0.2          # the whole cpuset's quota never binds
    assert per_call_ms(0.2, 2.5, 2.5, 10, 1, page_in_ms=3.0) == pytest.approx(3.2)   # evicted pages read back


def test_the_correction_is_a_high_quantile_of_the_calls_own_slowdown_kept_apart_for_cold_calls():
    from edgetvm.runtime.dress_device import Correction

    c = Correction(n=10, q=0.9, least=4)
    for ms in (0.11, 0.12, 0.13):
        c.add(False, 0.1, ms)
    assert c.factor(False) == 1.0                        # too few calls: the calibration as it is
    c.add(False, 0.1, 0.30)
    assert c.factor(False) == pytest.approx(np.quantile([1.1, 1.2, 1.3, 3.0], 0.9))
    assert c.factor(True) == 1.0                         # a first call after a wait learns from first calls only
    for _ in range(10):                                  # the last n calls only: an old slowdown is forgotten
        c.add(False, 0.2, 0.16)
    assert c.factor(False) == pytest.approx(0.8)         # calls faster than calibrated lower it


def test_the_quota_left_never_exceeds_what_the_cgroup_can_still_use_in_its_period():
    from edgetvm.runtime.dress_device import QuotaLeft

    q = QuotaLeft(quota_ms=2.5, period_ms=10)
    q.refilled(cpu_ms=100.0)                                 # the quota was written: CFS refilled it
    assert q.look(0.0, 100.0, nr_throttled=0) == 2.5
    assert q.look(0.5, 100.4, 0) == pytest.approx(2.1)       # the worker's CPU time since then is the cgroup's
    assert q.look(1.5, 102.0, 0) == pytest.approx(0.5)
    # throttled since the last look: the refill came after it, so at most what was used since then is spent
    assert q.look(9.0, 102.6, 1) == pytest.approx(2.5 - 0.6)
    # a period of wall time later a boundary has passed: the CPU used since the look a period ago bounds it
    assert q.look(19.5, 104.0, 1) == pytest.approx(2.5 - (104.0 - 102.6))
    assert q.look(40.0, 104.1, 1) == pytest.approx(2.5 - (104.1 - 104.0))


def test_residency_sees_which_weight_pages_are_in_memory_and_pages_a_set_in(tmp_path):
    import resource

    from edgetvm.runtime.dress_device import PAGE, Residency, _drop_page_cache, _no_readahead

    f = tmp_path / "w.bin"
    f.write_bytes(RNG.integers(0, 255, 32 * PAGE, dtype=np.uint8).tobytes())
    _drop_page_cache(f)
    mm = np.memmap(f, dtype=np.uint8, mode="c")
    assert _no_readahead(f) == 32 * PAGE                   # a fault reads its page, not a window around it
    res = Residency(f)
    if res.resident().any():
        pytest.skip("this file system keeps the pages cached after POSIX_FADV_DONTNEED")
    int(mm[3 * PAGE])                                        # one page read
    assert np.flatnonzero(res.resident()).tolist() == [3]
    want = np.zeros(res.pages, bool)
    want[[3, 8, 9, 10, 20]] = True
    assert res.missing([want, ~want]) == [4, 31 - 4]
    assert res.page_in(want) == 4
    assert set(np.flatnonzero(res.resident())) >= {3, 8, 9, 10, 20}
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_majflt
    int(mm[8 * PAGE]) + int(mm[20 * PAGE])                   # read in and mapped by the page-in: no fault now
    assert resource.getrusage(resource.RUSAGE_SELF).ru_majflt == faults


def _drop_and_rise(dev, t_ms, cal):
    """Roomy memory, a limit only the sparsest subnet fits (the kernel evicts the denser pages), roomy again."""
    roomy, tight = 64 * 2**20, int(cal["memory_bytes"][3] * 1.2)
    return dev.replay([rt.Budget(t_ms, roomy)] * 3 + [rt.Budget(t_ms, tight)] * 5 + [rt.Budget(t_ms, roomy)] * 3)


def test_after_a_budget_drop_and_rise_the_chosen_subnets_pages_are_resident_before_its_timed_call(lenet_artifact):
    from edgetvm.runtime.dress_device import DeviceWorker, summarize

    _device_or_skip()
    d, _, _, x = lenet_artifact
    with DeviceWorker("phone-hi", "dress", [d / "art"], {"x": x}) as dev:
        cal = dev.calibrate()
        run = _drop_and_rise(dev, 1000.0, cal)
    recs, lines = run["records"], run["lines"]
    assert [r["level"] for r in recs] == [0] * 3 + [3] * 5 + [0] * 3
    assert recs[3]["missing_pages"][0] > 0                   # the tight limit evicted the densest subnet's pages
    assert lines[2]["prefetch"]["level"] == 0 and lines[2]["prefetch"]["pages"] >= recs[7]["missing_pages"][0] > 0
    assert recs[8]["missing_pages"][0] == 0 and recs[8]["page_ins"] == 0   # read in at the budget change, not in it
    assert summarize(run)["prefetch_pages"] == lines[2]["prefetch"]["pages"] + lines[1]["prefetch"]["pages"]


def test_a_subnet_whose_pages_are_not_resident_is_predicted_with_reading_them_back(lenet_artifact):
    from edgetvm.runtime.dress_device import DeviceWorker

    _device_or_skip()
    d, _, _, x = lenet_artifact
    with DeviceWorker("phone-hi", "dress", [d / "art"], {"x": x}, prefetch=False) as dev:
        cal = dev.calibrate()
        pred, page_ms = cal["predicted_ms"], cal["page_in_ms"]
        assert page_ms > 0                                   # measured: the first calls read the store in
        # time enough for the densest subnet at full speed, not for reading back 1 page in 10 of its own
        t = pred[0] + 0.1 * cal["pages"][0] * page_ms
        run = _drop_and_rise(dev, t, cal)
    back = run["records"][8]                                 # the first call with roomy memory again
    missing = back["missing_pages"]
    assert missing[0] > 0.1 * cal["pages"][0]
    # the first call after the wait for the new budget: its cold latency; the full quota: no wait for it
    assert back["predicted_all"][0] == pytest.approx(cal["cold_ms"][0] + missing[0] * page_ms)
    assert back["level"] != 0 and missing[back["level"]] < missing[0]
    assert back["predicted_ms"] <= t


def test_the_device_and_its_worker_are_gone_after_a_run_and_after_ctrl_c(lenet_artifact, tmp_path):
    import os
    import signal
    import subprocess
    import sys

    from edgetvm.runtime.leftovers import OWNER_ENV

    _device_or_skip()
    d, _, _, _ = lenet_artifact
    (tmp_path / "short.txt").write_text("1000 64 1 x3\n1000 64 0.2 x3\n")
    (tmp_path / "long.txt").write_text("1000 64 0.1 x1000000\n")
    env = {k: v for k, v in os.environ.items() if k != OWNER_ENV}
    cmd = [sys.executable, "-m", "edgetvm.cli", "run", str(d / "art"), "--device", "phone-hi", "--budget-trace"]
    done = subprocess.Popen(cmd + [str(tmp_path / "short.txt")], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    out, err = done.communicate(timeout=300)
    assert done.returncode == 0, err
    assert "6 inferences" in out and "CPU share 0.2: 3 inferences" in out
    assert not _our_cgroups(done.pid)
    # Deaf to Ctrl-C otherwise where the suite itself runs in the background (see test_cleanup.py).
    p = subprocess.Popen(cmd + [str(tmp_path / "long.txt")], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        for line in p.stdout:                     # the subnets are listed once calibrated: the trace runs then
            if line.startswith("  subnet 3"):
                break
        assert _our_cgroups(p.pid)                # the device exists while the trace runs
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=120)
    finally:
        if p.poll() is None:                      # a failed test must not leave a trace of a million calls running
            p.kill()
            p.wait()
    assert p.returncode == 130 and "interrupted" in err
    assert not _our_cgroups(p.pid)
    assert not [r for r in __import__("edgetvm.runtime.leftovers", fromlist=["find"]).find()
                if r.kind == "process" and r.owner == p.pid]


# ---- training ----------------------------------------------------------------------------------------------------


def test_the_joint_gradient_is_the_weighted_sum_of_each_subnets_masked_gradient(monkeypatch):
    """One joint step with lr 1 and no momentum moves the backbone by exactly -sum_k c_k g_k * M_k
    (c normalised to sum 1), and the subnets kept are the masks that step trained."""
    from edgetvm import data

    model = train.lenet5(hidden=16)
    ds = data.DataSet("toy", data.Split(RNG.random((64, 1, 28, 28)).astype(np.float32), RNG.integers(0, 10, 64)),
                      data.Split(np.zeros((0, 1, 28, 28), np.float32), np.zeros(0, np.int64)),
                      data.Split(RNG.random((64, 1, 28, 28)).astype(np.float32), RNG.integers(0, 10, 64)),
                      tuple("0123456789"), 0)
    params = train.init_params(model, seed=3)
    levels, c = (0.0, 0.5), np.array([0.25, 0.75])
    sub = st.joint_train(model, ds, levels, params, 1, loss_weights=3 * c, lr=1.0, momentum=0.0, progress=False)
    t = train.Trainer(model, 64)
    x, y = next(iter(data.batches(ds.train, 64, 0, 0)))
    mks = {n: masks.masks(n, params[n], levels) for n in st.sparse_weights(model)}
    want = {n: p.copy() for n, p in params.items()}
    for k in range(2):
        t.set_params(st.masked(params, mks, k))
        g = t.gradients(x, y)[1]
        for n in want:
            want[n] -= c[k] * (g[n] * mks[n][k] if n in mks else g[n])
    for n in want:       # stored: the densest subnet as trained (the masks the epoch used)
        expect = want[n] * mks[n][0] if n in mks else want[n]
        np.testing.assert_allclose(sub.params[n], expect, rtol=1e-4, atol=1e-6)
    for n in mks:
        np.testing.assert_array_equal(sub.orders[n], masks.ranking(n, params[n]))


@pytest.mark.parametrize("model, args, message", [
    ("lenet5", ["--levels", "0,0.9,0.5"], "not increasing"), ("lenet5", ["--levels", "0,1"], "outside [0, 1)"),
    ("lenet5", ["--levels", "0,half"], "not a comma-separated list"), ("lenet5", ["--loss-weights", "1,1"], "give 4"),
    ("resnet50", [], "unknown model")])
def test_bad_dress_arguments_exit_2_with_one_line_before_any_training(model, args, message, tmp_path, capsys):
    assert main(["dress", model, "-o", str(tmp_path / "m.onnx"), "--workdir", str(tmp_path), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "m.onnx").exists()


@pytest.mark.slow
def test_dress_trains_all_subnets_and_writes_a_model_whose_metadata_compiles(tmp_path, capsys):
    out = tmp_path / "m.onnx"
    assert main(["dress", "lenet5", "--data", "mnist", "--train-limit", "256", "--fp32-epochs", "1", "--epochs", "1",
                 "--workdir", str(tmp_path / "w"), "-o", str(out), "--quiet"]) == 0
    meta = json.loads(next(p.value for p in onnx.load(out).metadata_props if p.key == masks.METADATA_KEY))
    assert meta["levels"] == list(LEVELS) and len(meta["accuracy"]) == 4
    assert "0% sparse" in capsys.readouterr().out
    assert main(["compile", str(out), "-o", str(tmp_path / "a")]) == 0


board_reason = emulated_board.board_unavailable_reason()


@pytest.mark.slow
@pytest.mark.skipif(board_reason is not None, reason=f"emulated board unavailable: {board_reason}")
def test_the_subnets_built_for_rpi4_equal_the_reference_on_the_emulated_board(lenet_artifact):
    d, model, sub, x = lenet_artifact
    assert main(["compile", str(d / "m.onnx"), "--target", "rpi4", "-o", str(d / "rpi4")]) == 0
    with emulated_board.EmulatedBoard() as board:
        for k in (0, 3):
            np.save(d / "s.npy", np.array([k], np.int32))
            assert main(["run", str(d / "rpi4"), "--input", f"x={d / 'x.npy'}", "--input", f"subnet={d / 's.npy'}",
                         "--output", str(d / "yb.npz"), "--repeat", "1", "--rpc", f"127.0.0.1:{board.port}"]) == 0
            np.testing.assert_allclose(np.load(d / "yb.npz")["logits"], _numpy_net(model, sub.subnet_params(k), x),
                                       rtol=1e-4, atol=1e-4)


# ---- the slimmable-width baseline ---------------------------------------------------------------------------

from edgetvm.sparse import slimmable as sl  # noqa: E402

SMALL = train.lenet5(channels=(2, 3), hidden=4)


def test_macs_are_the_hand_count_for_the_full_a_narrow_and_a_dress_network():
    # conv1 2 filters x 25 taps x 24*24, conv2 3 x 50 x 8*8, fc1 4 x 48 (3 channels of 4*4), fc2 10 x 4
    assert sl.macs(SMALL) == 2 * 25 * 576 + 3 * 50 * 64 + 4 * 48 + 10 * 4 == 38_632
    assert sl.macs(sl.narrow(SMALL, (1, 2, 3))) == 1 * 25 * 576 + 2 * 25 * 64 + 3 * 32 + 10 * 3
    # DRESS at 50%: the first layer dense, every other row does half its entries
    assert sl.dress_macs(SMALL, (0.0, 0.5)) == [38_632, 2 * 25 * 576 + 3 * 25 * 64 + 4 * 24 + 10 * 2]


def test_a_narrower_width_reads_a_prefix_of_the_wider_ones_weights_and_computes_the_zeroed_full_network():
    params = {n: RNG.normal(size=s).astype(np.float32) for n, s in train.param_shapes(SMALL).items()}
    widths = [(2, 3, 4), (2, 2, 3), (1, 1, 2)]
    views = [sl.take(params, sl.narrow(SMALL, wd)) for wd in widths]
    assert all(np.array_equal(views[0][n], params[n]) for n in params)       # the full width is the store
    for wide, thin in zip(views, views[1:]):
        for n, p in thin.items():
            np.testing.assert_array_equal(p, wide[n][tuple(slice(0, d) for d in p.shape)])
    x = RNG.random((2, 1, 28, 28)).astype(np.float32)
    for wd, v in zip(widths, views):
        # channels a width drops, zeroed in the full network, output relu(0) = 0 and add nothing after: so
        # the narrow network must equal it (fc1's rows follow the channel-major flatten)
        zeroed = {n: np.zeros_like(p) for n, p in params.items()}
        for n, p in v.items():
            zeroed[n][tuple(slice(0, d) for d in p.shape)] = p
        np.testing.assert_allclose(_numpy_net(sl.narrow(SMALL, wd), v, x), _numpy_net(SMALL, zeroed, x),
                                   rtol=1e-5, atol=1e-5)


def test_widths_match_the_dress_subnets_macs_and_stay_nested():
    model = train.lenet5()
    targets = sl.dress_macs(model, LEVELS)
    widths = sl.match_widths(model, targets)
    assert widths[0] == sl.full_width(model) and sl.macs(model) == targets[0]
    for a, b in zip(widths, widths[1:]):
        assert all(y <= x for x, y in zip(a, b))
    for t, wd in zip(targets, widths):
        got = sl.macs(sl.narrow(model, wd))
        assert abs(got - t) <= 0.01 * t
        # no uniform-fraction width (each layer round(f * C)) is closer: the floor/ceil search covers it
        for f in np.arange(1, 101) / 100:
            u = tuple(max(1, round(f * c)) for c in sl.full_width(model))
            if all(y <= x for x, y in zip(widths[max(0, widths.index(wd) - 1)], u)):
                assert abs(got - t) <= abs(sl.macs(sl.narrow(model, u)) - t)


def _toy_data(n=256):
    """Learnable in a few steps: class c is a bright 6x6 patch at the c-th of 10 places, over noise."""
    from edgetvm import data

    rng = np.random.default_rng(5)
    y = rng.integers(0, 10, n)
    x = 0.1 * rng.random((n, 1, 28, 28)).astype(np.float32)
    for i, c in enumerate(y):
        r, q = divmod(int(c), 5)
        x[i, 0, 2 + 12 * r:8 + 12 * r, 1 + 5 * q:7 + 5 * q] += 1.0
    split = data.Split(x, y.astype(np.int64))
    return data.DataSet("toy", split, data.Split(x[:0], y[:0].astype(np.int64)), split, tuple("0123456789"), 0)


# An MLP compiles its step in half a LeNet's time (each width is a step of its own); the LeNet case is slow.
MLP, MLP_WIDTHS = train.mlp(hidden=(16, 8)), [(16, 8), (8, 4)]


@pytest.mark.parametrize("model, widths", [
    (MLP, MLP_WIDTHS),
    pytest.param(train.lenet5(channels=(4, 6), hidden=16), [(4, 6, 16), (2, 3, 8)], marks=pytest.mark.slow)])
def test_one_slimmable_step_moves_the_store_by_the_weighted_sum_of_each_widths_padded_gradient(model, widths):
    from edgetvm import data

    ds = _toy_data(64)
    params = train.init_params(model, seed=4)
    c = np.array([0.25, 0.75])
    got = sl.joint_train(model, ds, widths, params, 1, loss_weights=2 * c, lr=1.0, momentum=0.0, progress=False)
    x, y = next(iter(data.batches(ds.train, 64, 0, 0)))
    want = {n: p.copy() for n, p in params.items()}
    for k, wd in enumerate(widths):
        m = sl.narrow(model, wd)
        t = train.Trainer(m, 64)
        t.set_params(sl.take(params, m))
        for n, g in t.gradients(x, y)[1].items():
            want[n][tuple(slice(0, d) for d in g.shape)] -= c[k] * g
    for n in want:
        np.testing.assert_allclose(got.params[n], want[n], rtol=1e-4, atol=1e-6)
    assert got.macs == [sl.macs(sl.narrow(model, wd)) for wd in widths]


def test_a_short_joint_run_lowers_every_widths_loss():
    model, widths = MLP, MLP_WIDTHS
    ds = _toy_data()
    params = train.init_params(model, seed=4)

    def losses(p):
        out = []
        for wd in widths:
            m = sl.narrow(model, wd)
            t = train.Trainer(m, 64)
            t.set_params(sl.take(p, m))
            out.append(train.evaluate(t, ds.train)["loss"])
        return out

    before = losses(params)
    got = sl.joint_train(model, ds, widths, params, 3, lr=0.05, progress=False)
    after = losses(got.params)
    assert all(a < 0.8 * b for a, b in zip(after, before)), (before, after)
    assert len(got.accuracy) == 2 and all(0 <= a <= 1 for a in got.accuracy)


def test_widths_that_are_not_nested_are_refused():
    with pytest.raises(ValueError, match="not nested"):
        sl.joint_train(SMALL, _toy_data(64), [(1, 2, 3), (2, 2, 3)], train.init_params(SMALL), 1, progress=False)
