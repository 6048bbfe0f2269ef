"""p-Meta: kanji few-shot data, Conv4, the masked adaptation step (passes/adapt_step.py), meta-training, CLI."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tvm

from edgetvm import data, train
from edgetvm.adapt import step as st
from edgetvm.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
SMALL = train.conv4(5, channels=8)


# ---- data -------------------------------------------------------------------------------------------

def test_kanji_renders_are_seeded_and_split_by_character():
    fs = data.load_fewshot("kanji")
    sizes = {s: x.shape for s, x in fs.x.items()}
    assert sizes == {"train": (600, 20, 28, 28), "val": (100, 20, 28, 28), "test": (200, 20, 28, 28)}
    chars = [set(fs.classes[s]) for s in ("train", "val", "test")]
    assert not (chars[0] & chars[1]) and not (chars[0] & chars[2]) and not (chars[1] & chars[2])
    # renders of one character differ (jitter + affine), but render the same again from the same seed
    strokes = data.kanji_strokes()[fs.classes["test"][0]]
    a = data.render_strokes(strokes, np.random.default_rng(3))
    b = data.render_strokes(strokes, np.random.default_rng(3))
    c = data.render_strokes(strokes, np.random.default_rng(4))
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert 0.0 <= a.min() and a.max() <= 1.0 and 0.03 < (a > 0.5).mean() < 0.5   # ink, not a blank or a blot
    x = fs.x["train"][:50].astype(np.float32)
    # a render is nearer its own class's mean than most other classes' (the classes are distinguishable)
    means = x.mean(1)
    d = ((x[:, 0, None] - means[None]) ** 2).sum((-1, -2))
    assert (d.argmin(1) == np.arange(50)).mean() > 0.6


def test_sample_task_and_bad_shot_counts():
    fs = data.load_fewshot("kanji")
    rng = np.random.default_rng(0)
    sx, sy, qx, qy = data.sample_task(fs, "test", 5, 3, 4, rng)
    assert sx.shape == (15, 1, 28, 28) and qx.shape == (20, 1, 28, 28) and sx.dtype == np.float32
    assert list(sy) == [c for c in range(5) for _ in range(3)] and sorted(set(qy)) == list(range(5))
    with pytest.raises(UserError, match="images per class"):
        data.sample_task(fs, "test", 5, 15, 10, rng)
    with pytest.raises(UserError, match="classes"):
        data.sample_task(fs, "val", 101, 1, 1, rng)


def test_mnist_as_cross_domain_tasks():
    fs = data.load_fewshot("mnist")
    assert fs.x["test"].shape[:1] == (10,) and fs.x["test"].shape[2:] == (28, 28)
    sx, sy, qx, qy = data.sample_task(fs, "test", 5, 1, 5, np.random.default_rng(0))
    assert sx.shape == (5, 1, 28, 28) and len(qy) == 25


# ---- the masked step ----------------------------------------------------------------------------------

def _task(batch=10, seed=0):
    rng = np.random.default_rng(seed)
    return rng.random((batch, 1, 28, 28), dtype=np.float32), (np.arange(batch) % 5).astype(np.int64)


def _reference_grads(model, x, y, params):
    tr = train.Trainer(model, batch=len(x), seed=0)
    tr.set_params(params)
    return tr.gradients(x, y)


def _slice(a, m):
    idx = np.flatnonzero(m)
    return a[:, idx] if st.mask_axis(a.shape) == 1 else a[idx]


PARTIAL = {"conv2.weight": np.arange(8) % 3 == 0, "conv3.bias": np.arange(8) < 2,
           "conv4.weight": np.arange(8) >= 5, "fc1.weight": np.arange(8) % 2 == 1, "fc1.bias": np.ones(5, bool)}


@pytest.mark.parametrize("mask", ["partial", "full", "bias"])
def test_masked_gradients_equal_tvm_full_gradients_on_the_selected_slices(mask):
    m = {"partial": PARTIAL, "full": st.full_mask(SMALL), "bias": st.bias_mask(SMALL)}[mask]
    x, y = _task()
    params = train.init_params(SMALL, 1)
    loss_ref, ref = _reference_grads(SMALL, x, y, params)
    step = st.MaskedStep(SMALL, len(x), m, output="grad")
    loss, got = step.run(x, y, params)
    assert loss == pytest.approx(loss_ref, rel=1e-5)
    assert sorted(got) == sorted(n for n in m if np.asarray(m[n]).any())
    for name, g in got.items():
        want = _slice(ref[name], step.mask[name])
        assert g.shape == want.shape
        np.testing.assert_allclose(g, want, rtol=1e-4, atol=1e-6 * np.abs(want).max())


def test_the_update_changes_only_the_selected_slices_by_lr_times_gradient():
    x, y = _task()
    params = train.init_params(SMALL, 2)
    rates = {n: np.linspace(0.01, 0.2, st.mask_len(s)).astype(np.float32) for n, s in train.param_shapes(SMALL).items()}
    grad = st.MaskedStep(SMALL, len(x), PARTIAL, output="grad")
    upd = st.MaskedStep(SMALL, len(x), PARTIAL, lr=rates, output="update")
    _, g = grad.run(x, y, params)
    _, slices = upd.run(x, y, params)
    new = upd.apply(params, slices)
    for name, p in params.items():
        if name not in upd.mask:
            assert np.array_equal(new[name], p)
            continue
        m = upd.mask[name]
        keep = ~m
        kept = new[name][:, keep] if st.mask_axis(p.shape) == 1 else new[name][keep]
        assert np.array_equal(kept, _slice(p, keep))
        r = rates[name][m]
        r = r.reshape([1, -1, 1, 1][:p.ndim] if st.mask_axis(p.shape) == 1 else [-1] + [1] * (p.ndim - 1))
        np.testing.assert_allclose(_slice(new[name], m), _slice(p, m) - r * g[name], rtol=1e-5, atol=1e-7)


def _ops(mod, func="adapt_step"):
    """(op name, output dtype, attributes) of every binding of the step."""
    from tvm import relax

    out = []
    for blk in mod[func].body.blocks:
        for b in blk.bindings:
            if isinstance(b.value, relax.Call) and isinstance(b.value.op, tvm.ir.Op):
                ty = b.var.ty
                out.append((b.value.op.name, str(getattr(ty, "dtype", "")), b.value.attrs))
    return out


def _packed_masks(mod, func="adapt_step"):
    """Shapes of the masks the step keeps: the outputs of its mask-packing kernels, which must be uint8."""
    from tvm import relax

    shapes = []
    for blk in mod[func].body.blocks:
        for b in blk.bindings:
            v = b.value
            if isinstance(v, relax.Call) and v.op.same_as(tvm.ir.Op.get("relax.call_tir")) \
                    and v.args[0].name_hint.startswith("pack_"):
                assert str(b.var.ty.dtype) == "uint8"
                shapes.append(tuple(int(d) for d in b.var.ty.shape))
    return shapes


def test_the_step_computes_only_needed_gradients_and_keeps_fewer_activations():
    top = {"conv4.weight": np.ones(8, bool), "fc1.weight": np.ones(8, bool), "fc1.bias": np.ones(5, bool)}
    full_ir = st.step_module(SMALL, 10, st.full_mask(SMALL), 0.1, conv_as_matmul=False)
    top_ir = st.step_module(SMALL, 10, top, 0.1, conv_as_matmul=False)
    bias_ir = st.step_module(SMALL, 10, st.bias_mask(SMALL), 0.1, conv_as_matmul=False)

    def count(mod, name, **attrs):
        return sum(1 for op, _, a in _ops(mod) if op == name and all(str(getattr(a, k, None)) == v for k, v in attrs.items()))

    # weight gradients: one conv in CNHW per updated conv weight; input gradients only above the lowest layer
    assert count(full_ir, "relax.nn.conv2d", data_layout="CNHW") == 4
    assert count(full_ir, "relax.nn.conv2d_transpose") == 3
    assert count(top_ir, "relax.nn.conv2d", data_layout="CNHW") == 1
    assert count(top_ir, "relax.nn.conv2d_transpose") == 0
    assert count(bias_ir, "relax.nn.conv2d", data_layout="CNHW") == 0
    # ReLU + pool keep one packed bit mask each, no float copy; frozen layers below the lowest keep none
    # (a pool keeps bits of the whole windows only: 7x7 -> 6x6, 3x3 -> 2x2)
    assert _packed_masks(full_ir) == [(10 * 8 * 28 * 28 // 8,), (10 * 8 * 14 * 14 // 8,), (10 * 8 * 6 * 6 // 8,),
                                      (10 * 8 * 2 * 2 // 8,)]
    assert _packed_masks(top_ir) == [(10 * 8 * 2 * 2 // 8,)]
    assert count(full_ir, "relax.logical_and") == 0 and count(full_ir, "relax.equal") == 0
    # planned memory (Relax's planner + kernel scratch): fewer activations kept, less memory
    p_full = st.planned_memory(full_ir, "adapt_step")
    p_top = st.planned_memory(top_ir, "adapt_step")
    p_tvm = st.planned_memory(st.full_step_module(SMALL, 10, conv_as_matmul=False), "backbone_loss_adjoint")
    assert p_top.inputs == p_full.inputs == p_tvm.inputs
    assert p_top.planned < 0.6 * p_full.planned
    assert p_full.dynamic <= 1.05 * p_tvm.dynamic


POOL_FIRST = train.Model("pool_first", (1, 13, 13), (train.Conv(4, 3, 1), train.MaxPool(2), train.ReLU(),
                                                       train.Flatten(), train.Linear(5)))


@pytest.mark.parametrize("model", [SMALL, pytest.param(train.vgg_small(5, channels=(4, 6), hidden=13),
                                                        marks=pytest.mark.slow),
                                   train.mlp(5, hidden=(13, 7)), POOL_FIRST], ids=lambda m: m.name)
def test_one_bit_masks_give_the_same_steps_to_the_bit_as_byte_masks(model):
    """ReLU + pool (Conv4: a 7x7 map pooled to 3x3 drops a row and a column), ReLU alone (vgg_small, mlp with
    widths that are not multiples of 8) and a max pool alone (pool_first, 13x13 -> 6x6): packing the masks
    eight to a byte changes no bit of the losses or the adapted weights over three steps, and the gradients
    still equal TVM's own."""
    rng = np.random.default_rng(4)
    x, y = rng.random((7, *model.input_shape), dtype=np.float32), (np.arange(7) % 5).astype(np.int64)
    params = train.init_params(model, 3)
    mask = st.full_mask(model)
    first = sorted(mask)[0]
    mask[first] = np.arange(len(mask[first])) % 2 == 0          # a partial selection too
    runs = {bits: st.MaskedStep(model, len(x), mask, lr=0.05, mask_bits=bits, conv_as_matmul=False).adapt(x, y, params, 3)
            for bits in (1, 8)}
    (p1, l1), (p8, l8) = runs[1], runs[8]
    assert l1 == l8
    for n in params:
        assert np.array_equal(p1[n], p8[n]), n
    assert any(not np.array_equal(p1[n], params[n]) for n in params)
    loss_ref, ref = _reference_grads(model, x, y, params)
    loss, got = st.MaskedStep(model, len(x), st.full_mask(model), output="grad", mask_bits=1).run(x, y, params)
    assert loss == pytest.approx(loss_ref, rel=1e-5)
    for n, g in got.items():
        np.testing.assert_allclose(g, ref[n], rtol=1e-4, atol=1e-6 * np.abs(ref[n]).max())


def test_one_bit_masks_lower_planned_memory():
    """Conv4-32, 5-shot, every layer updated: the 28x28 block's mask alone is 25 x 32 x 28 x 28 bytes as
    bools (627 KB) and 78 KB as bits."""
    m = train.conv4(5, channels=32)
    byte, bit = (st.planned_memory(st.step_module(m, 25, st.full_mask(m), 0.1, conv_as_matmul=False, mask_bits=b),
                                   "adapt_step") for b in (8, 1))
    assert bit.dynamic < byte.dynamic - (25 * 32 * 28 * 28 * 7) // 8, (bit, byte)
    with pytest.raises(ValueError, match="mask_bits"):
        st.step_module(m, 25, st.full_mask(m), 0.1, mask_bits=4)


def test_bad_masks_are_one_line_user_errors():
    with pytest.raises(UserError, match="selects nothing"):
        st.check_mask(SMALL, {"conv1.weight": np.zeros(1, bool)})
    with pytest.raises(UserError, match="entries"):
        st.check_mask(SMALL, {"conv2.weight": np.ones(3, bool)})
    with pytest.raises(UserError, match="does not have"):
        st.check_mask(SMALL, {"conv9.weight": np.ones(3, bool)})


# ---- meta-training and the command line ------------------------------------------------------------------

def _cli(*argv):
    from edgetvm.cli import main

    return main([str(a) for a in argv])


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    """A tiny p-Meta model (8 channels, 3 iterations): plumbing, not accuracy."""
    d = tmp_path_factory.mktemp("adapt")
    assert _cli("adapt", "meta-train", "--method", "pmeta", "--iterations", "3", "--channels", "8",
                "--meta-batch", "2", "--steps", "2", "-o", d / "art", "--png", d / "val.png", "--quiet") == 0
    return d / "art"


def test_meta_train_writes_an_artifact_with_history_and_png(artifact):
    from edgetvm.adapt import meta

    learner = meta.load(artifact)
    assert learner.config.method == "pmeta" and len(learner.history) == 3
    assert all("val_accuracy" in r and 0.0 <= r["val_accuracy"] <= 1.0 for r in learner.history)
    assert (artifact.parent / "val.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # p-Meta's step sizes moved away from their common start (they are meta-learned)
    rates = np.concatenate([r for r in learner.rates.values()])
    assert len(np.unique(np.round(rates, 6))) > 3
    assert not list(artifact.parent.glob(".art.*"))     # nothing half-written beside it


def test_adapt_run_adapts_to_a_support_set(artifact, tmp_path, capsys):
    assert _cli("adapt", "sample", "--k-shot", "2", "--q-query", "4", "-o", tmp_path / "s.npz",
                "--query", tmp_path / "q.npz") == 0
    assert _cli("adapt", "run", artifact, "--support", tmp_path / "s.npz", "--steps", "3",
                "--query", tmp_path / "q.npz", "-o", tmp_path / "adapted.npz") == 0
    out = capsys.readouterr().out
    assert "3 steps on 10 images here" in out and "query accuracy" in out
    from edgetvm.adapt import meta

    learner = meta.load(artifact)
    with np.load(tmp_path / "adapted.npz") as z:
        changed = {n for n in z.files if not np.array_equal(z[n], learner.params[n])}
    assert changed and changed <= set(learner.mask())


@pytest.mark.parametrize("case, message", [
    ("shape", "the model takes (n, 1, 28, 28) images"),
    ("labels", "outside the model's 5 classes"),
    ("missing", "has no image of class"),
    ("shots", "has only 2 images"),
    ("empty", "selects nothing"),
    ("artifact", "is not a meta-trained model"),
])
def test_bad_input_is_one_line_and_exit_2(artifact, tmp_path, capsys, case, message):
    rng = np.random.default_rng(0)
    x, y = rng.random((10, 1, 28, 28), dtype=np.float32), np.repeat(np.arange(5), 2)
    art = artifact
    if case == "shape":
        x = rng.random((10, 1, 32, 32), dtype=np.float32)
    elif case == "labels":
        y = y.copy()
        y[0] = 7
    elif case == "missing":
        y = np.zeros(10, np.int64)
    elif case == "empty":
        import shutil

        art = tmp_path / "art"
        shutil.copytree(artifact, art)
        with np.load(art / "weights.npz") as z:
            arrays = {k: (np.zeros_like(z[k]) if k.startswith("rate/") else z[k]) for k in z.files}
        np.savez(art / "weights.npz", **arrays)
    elif case == "artifact":
        art = tmp_path
    np.savez(tmp_path / "s.npz", x=x, y=y)
    extra = ["--shots", "3"] if case == "shots" else []
    out = tmp_path / "adapted.npz"
    capsys.readouterr()
    assert _cli("adapt", "run", art, "--support", tmp_path / "s.npz", "--steps", "1", "-o", out, *extra) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and message in err, err
    assert not out.exists()


# ---- memory: planned and measured -------------------------------------------------------------------------

def test_planned_memory_follows_the_mask():
    """Planned dynamic memory (Relax planner + scratch) of Conv4-32 at a 5-shot support set: updating the
    top layers only needs less than half of what full fine-tuning (TVM's own Gradient step) needs."""
    m = train.conv4(5, channels=32)
    top = {n: v for n, v in st.full_mask(m).items() if n.split(".")[0] in ("conv3", "conv4", "fc1")}
    full = st.planned_memory(st.full_step_module(m, 25, conv_as_matmul=False), "backbone_loss_adjoint")
    mine = st.planned_memory(st.step_module(m, 25, top, 0.1, conv_as_matmul=False), "adapt_step")
    assert mine.dynamic < 0.5 * full.dynamic, (mine, full)


@pytest.mark.slow
def test_pmeta_step_runs_under_a_cgroup_limit_that_kills_full_fine_tuning(tmp_path):
    """The same support set (5-way 20-shot, Conv4-32): TVM's full fine-tuning step is OOM-killed under a
    memory limit at which the top-layers step (what p-Meta's mask selects) runs and returns its losses."""
    from edgetvm.adapt import measure as me
    from edgetvm.runtime import cgroup

    if cgroup.unavailable_reason():
        pytest.skip(cgroup.unavailable_reason())
    m = train.conv4(5, channels=32)
    params = train.init_params(m, 0)
    fs = data.load_fewshot("kanji")
    x, y, _, _ = data.sample_task(fs, "test", 5, 20, 0, np.random.default_rng(0))
    top = {n: v for n, v in st.full_mask(m).items() if n.split(".")[0] in ("conv3", "conv4", "fc1")}
    full_dir = me.export(m, len(x), None, 0.05, params, x, y, tmp_path / "full", kind="full", conv_as_matmul=False)
    top_dir = me.export(m, len(x), top, 0.05, params, x, y, tmp_path / "top", conv_as_matmul=False)
    full = me.measure(full_dir, steps=2)
    mine = me.measure(top_dir, steps=2)
    full_dyn, mine_dyn = full["peak"] - full["idle"], mine["peak"] - mine["idle"]
    assert 0 < mine_dyn < 0.5 * full_dyn, (mine_dyn, full_dyn)
    limit = max(full["idle"], mine["idle"]) + (full_dyn + mine_dyn) // 2
    killed = me.measure(full_dir, steps=2, limit=limit)
    ran = me.measure(top_dir, steps=2, limit=limit)
    assert killed["killed"], killed
    assert ran["returncode"] == 0 and not ran["killed"] and ran["peak"] <= limit, ran
    print(f"\nlimit {limit / 2**20:.1f} MiB: full step ({full_dyn / 2**20:.1f} MiB above idle) killed; "
          f"top-layers step ({mine_dyn / 2**20:.1f} MiB above idle) ran, peak {ran['peak'] / 2**20:.1f} MiB")


@pytest.mark.slow
@pytest.mark.parametrize("which", ["artifact", "task_artifact"])
def test_adapt_run_on_the_emulated_aarch64_board(which, request, tmp_path, capsys):
    """The masked step cross-compiled for rpi4 and run over TVM RPC on the emulated aarch64 board (qemu):
    the same losses and adapted weights as the step run here (to float rounding). With the task-conditioned
    attention the statistics step runs on the board too, and picks the same layers as here."""
    from edgetvm.runtime import emulated_board

    artifact = request.getfixturevalue(which)

    reason = emulated_board.board_unavailable_reason()
    if reason:
        pytest.skip(reason)
    assert _cli("adapt", "sample", "--k-shot", "1", "-o", tmp_path / "s.npz") == 0
    assert _cli("adapt", "run", artifact, "--support", tmp_path / "s.npz", "--steps", "2",
                "-o", tmp_path / "here.npz") == 0
    with emulated_board.EmulatedBoard() as board:
        assert _cli("adapt", "run", artifact, "--support", tmp_path / "s.npz", "--steps", "2", "--board", "rpi4",
                    "--rpc", f"127.0.0.1:{board.port}", "-o", tmp_path / "board.npz") == 0
    out = capsys.readouterr().out
    assert "on rpi4 via 127.0.0.1" in out
    if which == "task_artifact":   # the same attention here and on the board
        lines = [l for l in out.splitlines() if l.startswith("task attention: ")]
        assert len(lines) == 2 and lines[0].split("; updates")[1] == lines[1].split("; updates")[1], lines
    with np.load(tmp_path / "here.npz") as a, np.load(tmp_path / "board.npz") as b:
        for n in a.files:
            np.testing.assert_allclose(b[n], a[n], rtol=1e-4, atol=1e-5)


# ---- a memory budget for the selection ---------------------------------------------------------------------

@pytest.mark.slow
def test_fit_budget_drops_the_least_important_until_the_planned_step_fits():
    from edgetvm.adapt import budget as bu

    planner = bu.Planner(SMALL, 10)
    full = st.full_mask(SMALL)
    # importance: the learned step sizes, here rising with depth and varying across channels
    rng = np.random.default_rng(0)
    imp = {n: (1 + names_i) * rng.uniform(0.5, 1.0, len(m)) for names_i, (n, m) in enumerate(full.items())}
    everything = planner(full)
    top = planner({n: v for n, v in full.items() if n.split(".")[0] in ("conv3", "conv4", "fc1")})
    budget = (everything + top) // 2
    fit = bu.fit_budget(SMALL, imp, budget, 10, planner=planner)
    assert fit.planned <= budget < everything and fit.planned == planner(fit.mask) and fit.dropped
    for n, m in fit.mask.items():
        assert m.any() and n in full
        # within a parameter, every channel kept is at least as important as every channel dropped
        if (~m).any():
            assert imp[n][m].min() >= imp[n][~m].max(), n
    # the top layers are cheap and the most important: they all stay
    for n in ("conv4.weight", "conv4.bias", "fc1.weight", "fc1.bias"):
        assert fit.mask[n].all(), n
    # a budget the mask already fits changes nothing
    same = bu.fit_budget(SMALL, imp, everything, 10, planner=planner)
    assert same.dropped == [] and all(np.array_equal(same.mask[n], full[n]) for n in full)
    # below the classifier's bias alone: unreachable, said in one line
    with pytest.raises(UserError, match="cannot be met") as e:
        bu.fit_budget(SMALL, imp, bu.floor_bytes(SMALL, 10, planner) - 1, 10, planner=planner)
    assert "\n" not in str(e.value)


@pytest.mark.slow
def test_meta_train_with_a_memory_budget_keeps_a_selection_that_fits(tmp_path):
    """p-Meta meta-trained under a budget (plumbing: 8 channels, 4 iterations, checks every 2): every
    meta-validation check and the kept selection plan within it; the planner agrees afresh."""
    from edgetvm.adapt import budget as bu
    from edgetvm.adapt import meta

    planner = bu.Planner(SMALL, 5 * 2)
    full = st.full_mask(SMALL)
    top = planner({n: v for n, v in full.items() if n.split(".")[0] in ("conv3", "conv4", "fc1")})
    budget_mib = (top + 64) / bu.MIB
    cfg = meta.MetaConfig(method="pmeta", iterations=4, channels=8, meta_batch=2, inner_steps=2, val_every=2,
                          val_tasks=3, memory_budget=budget_mib, budget_shots=2)
    learner = meta.meta_train(cfg)
    checks = [r for r in learner.history if "val_accuracy" in r]
    assert len(checks) == 2 and all(r["planned_mib"] <= budget_mib for r in checks)
    assert "budget_dropped" in checks[0]     # a full start does not fit: the first check dropped structures
    assert 0 < learner.planned <= budget_mib * bu.MIB
    assert planner(learner.mask()) == learner.planned
    assert not any(learner.mask().get(n, np.zeros(1, bool)).any() for n in ("conv1.weight", "conv1.bias"))
    meta.save(learner, tmp_path / "art")
    assert meta.load(tmp_path / "art").planned == learner.planned


@pytest.mark.parametrize("argv, message", [
    (["--method", "maml", "--memory-budget", "5"], "fits p-Meta's learned selection"),
    (["--memory-budget", "-1"], "give a positive number of MiB"),
    (["--memory-budget", "0.01"], "below the smallest step"),
])
def test_bad_memory_budgets_are_one_line_and_exit_2(tmp_path, capsys, argv, message):
    assert _cli("adapt", "meta-train", "--iterations", "1", "--channels", "8", "--quiet", "-o", tmp_path / "a",
                *argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and message in err, err
    assert not (tmp_path / "a").exists()


# ---- p-Meta's task-conditioned attention ----------------------------------------------------------------------

def _task_learner(static_layers=("conv2", "conv3", "conv4", "fc1"), seed=0):
    """A p-Meta learner on SMALL with the task-conditioned attention: the union is `static_layers` (static step
    sizes 0.05-0.1), the attention's networks small random numbers (scores strictly inside (0, 1))."""
    from edgetvm.adapt import attention as at
    from edgetvm.adapt import meta

    rng = np.random.default_rng(seed)
    rates = {n: (rng.uniform(0.05, 0.1, st.mask_len(s)) * (n.split(".")[0] in static_layers)).astype(np.float32)
             for n, s in train.param_shapes(SMALL).items()}
    att = at.TaskAttention.init(SMALL)
    for k, v in att.theta.items():
        att.theta[k] = (rng.normal(0, 0.05, v.shape) - (0.3 if "_b/" in k else 0.0)).astype(np.float32)
    cfg = meta.MetaConfig(method="pmeta", attention="task", channels=8)
    return meta.Learner(cfg, train.init_params(SMALL, seed), rates, attention=att)


def _kanji_task(k_shot, seed):
    fs = data.load_fewshot("kanji")
    return data.sample_task(fs, "test", 5, k_shot, 2, np.random.default_rng(seed))[:2]


def test_the_task_attention_differs_between_tasks_and_scales_the_static_rates_inside_the_union():
    from edgetvm.adapt import meta

    learner = _task_learner()
    union = learner.mask()
    adapter = meta.TaskAdapter(learner, 10)
    (x1, y1), (x2, y2) = _kanji_task(2, 1), _kanji_task(2, 2)
    a, b = adapter.plan(x1, y1), adapter.plan(x2, y2)
    assert a["scores"]["layer"] != b["scores"]["layer"]
    assert any(not np.array_equal(a["rates"][n], b["rates"][n]) for n in union)
    for ta in (a, b):
        for n, r in ta["rates"].items():
            assert r.shape == learner.rates[n].shape
            assert (r >= 0).all() and (r <= learner.rates[n] + 1e-7).all()   # scores in [0, 1] scale the rates
            assert not r[~union.get(n, np.zeros(len(r), bool))].any()        # nothing outside the union
        assert set(ta["mask"]) <= set(union)
    # the statistics are one image a class: the same task with more shots (same first images) scores the same
    idx = meta.stats_chunk(y1, 5)
    assert list(y1[idx]) == list(range(5))
    c = adapter.plan(np.concatenate([x1[idx], x1]), np.concatenate([y1[idx], y1]))
    assert c["scores"]["layer"] == pytest.approx(a["scores"]["layer"])


def test_a_layer_scored_zero_gets_no_update_and_its_activations_are_not_kept():
    """The attention drops conv2 for every task (its layer score under the threshold) and scores two of conv4's
    input channels 0: the task's step starts its backward pass at conv3 (no conv2 weight gradient, no mask kept
    for conv2's ReLU/pool, less planned memory than the union's step), leaves conv2 and those channels as they
    were, and equals the host's inner loop (full gradients, the same rates)."""
    from edgetvm.adapt import meta

    learner = _task_learner()
    learner.attention.theta["layer_b/conv2"][:] = -5.0
    learner.attention.theta["chan_b/conv4.weight"][:2] = -5.0
    x, y = _task(10, 3)
    ta = meta.TaskAdapter(learner, 10).plan(x, y)
    assert ta["scores"]["layer"]["conv2"] == 0.0 and ta["scores"]["layer"]["conv3"] > 0
    assert {n.split(".")[0] for n in ta["mask"]} == {"conv3", "conv4", "fc1"}
    assert not ta["rates"]["conv2.weight"].any() and not ta["rates"]["conv4.weight"][:2].any()
    assert ta["rates"]["conv4.weight"][2:].all()

    union_ir = st.step_module(SMALL, 10, learner.mask(), "input", conv_as_matmul=False)
    task_ir = st.step_module(SMALL, 10, ta["mask"], "input", conv_as_matmul=False)
    cnhw = lambda mod: sum(1 for op, _, a in _ops(mod) if op == "relax.nn.conv2d"
                           and str(getattr(a, "data_layout", "")) == "CNHW")
    assert cnhw(union_ir) == 3 and cnhw(task_ir) == 2          # weight gradients: conv2-4 vs conv3-4
    assert (10 * 8 * 6 * 6 // 8,) in _packed_masks(union_ir)    # conv2's ReLU + pool mask (14x14 -> 7x7 pooled)
    assert len(_packed_masks(task_ir)) == len(_packed_masks(union_ir)) - 1
    assert st.planned_memory(task_ir, "adapt_step").dynamic < st.planned_memory(union_ir, "adapt_step").dynamic

    step = meta.TaskAdapter(learner, 10).step_for(ta["mask"])
    adapted, _ = step.adapt(x, y, learner.params, 2, rates=ta["rates"])
    for n in ("conv1.weight", "conv1.bias", "conv2.weight", "conv2.bias"):
        assert np.array_equal(adapted[n], learner.params[n]), n
    assert np.array_equal(adapted["conv4.weight"][:, :2], learner.params["conv4.weight"][:, :2])
    assert not np.array_equal(adapted["conv4.weight"][:, 2:], learner.params["conv4.weight"][:, 2:])
    host, _ = meta.inner_loop(meta._Grads(SMALL, 10, 10).s, learner.params, ta["rates"], x, y, 2)
    for n in adapted:
        np.testing.assert_allclose(adapted[n], host[n], rtol=1e-4, atol=1e-6)


def test_a_task_whose_every_layer_scores_zero_still_updates_the_cheapest_layer():
    """Never nothing: the union's top layer (the classifier, the cheapest step) at its static step sizes."""
    from edgetvm.adapt import meta

    learner = _task_learner()
    for k in learner.attention.theta:
        if k.startswith("layer_b/"):
            learner.attention.theta[k][:] = -5.0
    x, y = _task(10, 3)
    ta = meta.TaskAdapter(learner, 10).plan(x, y)
    assert set(ta["scores"]["layer"].values()) == {0.0}
    assert sorted(ta["mask"]) == ["fc1.bias", "fc1.weight"]
    for n, r in ta["rates"].items():
        assert np.array_equal(r, learner.rates[n] if n.startswith("fc1") else np.zeros_like(r)), n


def test_rates_given_at_run_time_equal_rates_compiled_in():
    x, y = _task()
    params = train.init_params(SMALL, 2)
    rates = {n: np.linspace(0.01, 0.2, st.mask_len(s)).astype(np.float32) for n, s in train.param_shapes(SMALL).items()}
    _, const = st.MaskedStep(SMALL, len(x), PARTIAL, lr=rates).run(x, y, params)
    _, given = st.MaskedStep(SMALL, len(x), PARTIAL, lr="input").run(x, y, params, rates)
    for n in const:
        np.testing.assert_allclose(given[n], const[n], rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="rates"):
        st.MaskedStep(SMALL, len(x), PARTIAL, lr="input").run(x, y, params)


def test_the_attention_meta_gradient_is_the_chain_rule_through_the_scores():
    """Inside the clip (every score strictly between the threshold and 1), TaskAttention.backward is the exact
    derivative of sum(c x rates) in the attention's parameters and the static rates (central differences)."""
    from edgetvm.adapt import attention as at

    learner = _task_learner(seed=1)
    rng = np.random.default_rng(5)
    union = learner.mask()
    grads = at.union_slices({n: rng.normal(size=p.shape) for n, p in learner.params.items()}, union)
    att = learner.attention
    ta = at.task_attention(att, learner.rates, union, grads, learner.params)
    assert all(0.05 < s < 1 for s in ta["scores"]["layer"].values())
    assert all(((a > 0.05) & (a < 1)).all() for a in ta["scores"]["channel"].values())
    c = {n: rng.normal(size=r.shape) for n, r in learner.rates.items()}
    d_static, d_theta = att.backward(c, learner.rates, union, ta["features"], ta["scores"])

    def loss(theta, static):
        t = at.task_attention(at.TaskAttention(theta, att.threshold), static, union, grads, learner.params)
        return sum(float((c[n] * t["rates"][n].astype(np.float64)).sum()) for n in static)

    theta64 = {k: v.astype(np.float64) for k, v in att.theta.items()}
    static64 = {n: r.astype(np.float64) for n, r in learner.rates.items()}
    for key, j in (("layer_b/conv3", 0), ("layer_u/conv2", 1), ("chan_v/conv4.weight", 0), ("chan_b/fc1.bias", 2)):
        e = 1e-4
        hi, lo = dict(theta64), dict(theta64)
        hi[key], lo[key] = hi[key].copy(), lo[key].copy()
        hi[key][j] += e
        lo[key][j] -= e
        fd = (loss(hi, static64) - loss(lo, static64)) / (2 * e)
        assert d_theta[key][j] == pytest.approx(fd, rel=2e-2, abs=1e-5), key
    hi, lo = dict(static64), dict(static64)
    hi["conv3.weight"], lo["conv3.weight"] = hi["conv3.weight"].copy(), lo["conv3.weight"].copy()
    hi["conv3.weight"][1] += 1e-4
    lo["conv3.weight"][1] -= 1e-4
    fd = (loss(theta64, hi) - loss(theta64, lo)) / 2e-4
    assert d_static["conv3.weight"][1] == pytest.approx(fd, rel=2e-2, abs=1e-5)


@pytest.fixture(scope="module")
def task_artifact(tmp_path_factory):
    """A tiny p-Meta model with the task-conditioned attention (8 channels, 3 iterations): plumbing."""
    d = tmp_path_factory.mktemp("adapt_task")
    assert _cli("adapt", "meta-train", "--method", "pmeta", "--attention", "task", "--iterations", "3",
                "--channels", "8", "--meta-batch", "2", "--steps", "2", "-o", d / "art", "--quiet") == 0
    return d / "art"


def test_meta_training_learns_the_attention_and_run_adapts_per_task(task_artifact, tmp_path, capsys):
    from edgetvm.adapt import meta

    learner = meta.load(task_artifact)
    assert learner.config.attention == "task" and learner.attention is not None
    assert all("task_layers_dropped" in r for r in learner.history)
    # the networks moved from their start (every score 1 for every task): the attention is meta-trained
    assert any(np.abs(v).max() > 0 for k, v in learner.attention.theta.items() if "_v/" in k or "_u/" in k)
    outs = []
    for seed in (0, 1):
        assert _cli("adapt", "sample", "--k-shot", "2", "--seed", seed, "-o", tmp_path / f"s{seed}.npz") == 0
        assert _cli("adapt", "run", task_artifact, "--support", tmp_path / f"s{seed}.npz", "--steps", "2",
                    "-o", tmp_path / f"a{seed}.npz") == 0
        outs.append(capsys.readouterr().out)
        with np.load(tmp_path / f"a{seed}.npz") as z:
            changed = {n for n in z.files if not np.array_equal(z[n], learner.params[n])}
        assert changed and changed <= set(learner.mask())
    layer_lines = [next(l for l in o.splitlines() if l.startswith("task attention: layer scores")) for o in outs]
    assert layer_lines[0] != layer_lines[1]        # two tasks, two attentions
    assert "2 steps on 10 images here" in outs[0]


@pytest.mark.parametrize("argv, message", [
    (["--method", "anil", "--attention", "task"], "--attention task is p-Meta's"),
    (["--attention", "dynamic"], "unknown --attention 'dynamic'"),
    (["--attention", "task", "--attention-threshold", "1.5"], "give a score in (0, 1)"),
])
def test_bad_attention_options_are_one_line_and_exit_2(tmp_path, capsys, argv, message):
    assert _cli("adapt", "meta-train", "--iterations", "1", "--channels", "8", "--quiet", "-o", tmp_path / "a",
                *argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and message in err, err
    assert not (tmp_path / "a").exists()


def test_an_artifact_without_its_attention_networks_is_refused_in_one_line(task_artifact, tmp_path, capsys):
    import shutil

    art = tmp_path / "art"
    shutil.copytree(task_artifact, art)
    with np.load(art / "weights.npz") as z:
        arrays = {k: z[k] for k in z.files if not k.startswith("attn/")}
    np.savez(art / "weights.npz", **arrays)
    x, y = _kanji_task(1, 0)
    np.savez(tmp_path / "s.npz", x=x, y=y)
    assert _cli("adapt", "run", art, "--support", tmp_path / "s.npz", "--steps", "1") == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "attention networks are missing" in err, err
