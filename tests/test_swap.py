"""SwapNet: blocks fit the budget, the plan is optimal for its cost model, outputs are bit-identical to the
in-memory build, and under a real cgroup memory limit the in-memory build dies where the swapped one runs."""

import itertools
import os
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from edgetvm import zoo
from edgetvm.cli import main
from edgetvm.compiler import compile_model, random_inputs
from edgetvm.errors import UserError
from edgetvm.passes import swap
from edgetvm.runtime import cgroup
from edgetvm.runtime.artifact import open_artifact
from edgetvm.runtime.session import Runner
from edgetvm.runtime.swap import SwapRunner
from edgetvm.targets import load_board

MIB = 1 << 20


def build_pair(tmp, name, budget, **kw):
    """In-memory and swapping builds; `budget` is for the model's data, the runtime's reserve comes on top."""
    budget += swap.RUNTIME_RESERVE
    path = tmp / f"{name}.onnx"
    onnx.save(zoo.load(name, **kw), path)
    shapes = None if kw else zoo.default_input_shapes(name)
    compile_model(path, load_board("host"), tmp / "mem", shapes)
    compile_model(path, load_board("host"), tmp / "swap", shapes, memory_budget=budget)
    return open_artifact(tmp / "mem"), open_artifact(tmp / "swap")


def assert_plan_fits(plan):
    blocks = plan["blocks"]
    for i, b in enumerate(blocks):
        nxt = blocks[i + 1]["weight_bytes"] if plan["prefetch"] and i + 1 < len(blocks) else 0
        assert b["planned_bytes"] + nxt <= plan["budget"]
    assert plan["predicted_peak"] <= plan["budget"]


def test_dense_stack_at_4x_oversubscription_is_bit_identical(tmp_path):
    mem, sw = build_pair(tmp_path, "dense_stack", 4 * MIB, n=4, d=1024)  # 16 MiB of weights
    plan = sw.manifest["swap"]
    assert len(plan["blocks"]) > 1
    assert_plan_fits(plan)
    x = random_inputs(mem.inputs, seed=2)
    want = Runner(mem).run(x)
    for prefetch, drop in [(True, True), (False, True), (True, False)]:
        got = SwapRunner(sw, prefetch=prefetch, drop_cache=drop).run(x)
        for k in want:
            np.testing.assert_array_equal(got[k], want[k])


def test_residual_network_keeps_skip_values_alive_across_blocks(tmp_path):
    mem, sw = build_pair(tmp_path, "resnet", int(1.2 * MIB))
    plan = sw.manifest["swap"]
    assert len(plan["blocks"]) > 1
    assert_plan_fits(plan)
    produced = set(plan["data_inputs"])
    for b in plan["blocks"]:
        assert set(b["inputs"]) <= produced, "a block reads a value no earlier block kept"
        produced |= set(b["outputs"])
    # Some cut carries the main path and a skip value together: residual edges stay alive across blocks.
    assert any(len(b["inputs"]) > 1 for b in plan["blocks"])
    x = random_inputs(mem.inputs, seed=3)
    want, got = Runner(mem).run(x), SwapRunner(sw).run(x)
    for k in want:
        np.testing.assert_array_equal(got[k], want[k])


def test_small_blocks_are_read_into_one_staging_buffer_not_mapped(tmp_path):
    # The ResNet's blocks are all below COPY_BELOW: with the page cache kept, each is copied into one
    # buffer the size of the largest block, which its weights' tensors point into.
    mem, sw = build_pair(tmp_path, "resnet", int(1.2 * MIB))
    blocks = sw.manifest["swap"]["blocks"]
    runner = SwapRunner(sw, drop_cache=False)
    assert runner.copy and len(blocks) > 1
    assert runner.staging.nbytes == max(b["range"][1] for b in blocks)
    x = random_inputs(mem.inputs, seed=6)
    want = Runner(mem).run(x)
    for _ in range(2):  # the second call overwrites the buffer the first left behind
        got = runner.run(x)
        for k in want:
            np.testing.assert_array_equal(got[k], want[k])
    off, n = blocks[-1]["range"]
    with open(sw.weights_path, "rb") as f:
        f.seek(off)
        assert runner.staging[:n].tobytes() == f.read(n)
    # Where the budget has no block's worth to spare for the buffer, a strict run maps instead.
    strict = SwapRunner(sw, drop_cache=True)
    assert not strict.copy
    got = strict.run(x)
    for k in want:
        np.testing.assert_array_equal(got[k], want[k])


def test_blocks_read_from_disk_in_pieces_by_several_threads_are_bit_identical(tmp_path):
    # 13 MiB leaves the 4 MiB a strict run needs for 2 MiB folios; the 8 MiB blocks are then read
    # from disk by several threads at once, every call (the page cache is dropped before each).
    mem, sw = build_pair(tmp_path, "dense_stack", 13 * MIB, n=4, d=1024)
    runner = SwapRunner(sw, drop_cache=True)
    assert runner.huge and runner.readers is not None
    assert max(b["range"][1] for b in sw.manifest["swap"]["blocks"]) > 2 * (2 << 20)
    x = random_inputs(mem.inputs, seed=7)
    want = Runner(mem).run(x)
    for _ in range(2):
        runner.drop_page_cache()
        got = runner.run(x)
        for k in want:
            np.testing.assert_array_equal(got[k], want[k])
    runner.close()


def test_layer_bigger_than_the_budget_is_split_inside_the_layer(tmp_path):
    # One 2048x2048 layer holds 16 MiB; the budget is 6 MiB.
    mem, sw = build_pair(tmp_path, "dense_stack", 6 * MIB, n=2, d=2048)
    names = [w["name"] for w in sw.manifest["weights"]]
    assert any(".part" in n for n in names)
    assert max(w["nbytes"] for w in sw.manifest["weights"]) <= 6 * MIB
    assert_plan_fits(sw.manifest["swap"])
    # Pieces of one layer that run in the same block are one kernel, not several and a concat.
    for b in sw.manifest["swap"]["blocks"]:
        layers = [names[i].rpartition(".part")[0] for i in b["weights"] if ".part" in names[i]]
        assert len(layers) == len(set(layers)), b
    x = random_inputs(mem.inputs, seed=4)
    want, got = Runner(mem).run(x), SwapRunner(sw).run(x)
    for k in want:
        np.testing.assert_array_equal(got[k], want[k])


def test_infeasible_budget_names_the_minimum_and_that_minimum_compiles(tmp_path, capsys):
    path = tmp_path / "resnet.onnx"
    onnx.save(zoo.load("resnet"), path)
    rc = main(["compile", str(path), "--memory-budget", "256KiB", "-o", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "at least" in err
    assert not (tmp_path / "o").exists()
    need = float(err.split("at least ")[1].split(" MiB")[0])
    assert main(["compile", str(path), "--memory-budget", f"{need:.2f}MiB", "-o", str(tmp_path / "o")]) == 0


def test_budget_that_does_not_parse(tmp_path, capsys):
    rc = main(["compile", "whatever.onnx", "--memory-budget", "64 potatoes", "-o", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "--memory-budget" in err and "MiB" in err and len(err.splitlines()) == 1


def test_truncated_weight_file_is_refused(tmp_path, capsys):
    _, sw = build_pair(tmp_path, "dense_stack", 4 * MIB, n=2, d=1024)
    with open(sw.weights_path, "r+b") as f:
        f.truncate(os.path.getsize(sw.weights_path) // 2)
    rc = main(["run", str(sw.path)])
    err = capsys.readouterr().err
    assert rc == 2 and "weights.bin" in err and "sha256" in err


def test_run_report_prints_blocks_and_peaks(tmp_path, capsys):
    _, sw = build_pair(tmp_path, "dense_stack", 4 * MIB, n=4, d=1024)
    assert main(["run", str(sw.path), "--report", "--repeat", "2"]) == 0
    out = capsys.readouterr().out
    assert "block_0" in out and "predicted peak" in out and "VmHWM" in out
    assert "weights: mapped" in out and "page cache dropped per block" in out


def _synthetic_ops(rng, n):
    ops = []
    for i in range(n):
        ops.append(swap.Op(i, None, f"k{i}", [i], [], 0, int(rng.integers(0, 64)), float(rng.integers(1, 9)) * 1e9,
                           live=int(rng.integers(1, 64))))
    return ops, [int(rng.integers(16, 200)) for _ in range(n)]


def _brute_force(ops, wbytes, budget, board):
    n, best = len(ops), None
    load_bw = board.mem_bandwidth_gbs * 1e9
    for cuts in itertools.product([0, 1], repeat=n - 1):
        edges = [0] + [i + 1 for i, c in enumerate(cuts) if c] + [n]
        blocks = [swap._block(ops, a, b, wbytes, board) for a, b in zip(edges[:-1], edges[1:])]
        if any(b.planned_bytes + (blocks[i + 1].weight_bytes if i + 1 < len(blocks) else 0) > budget
               for i, b in enumerate(blocks)):
            continue
        load = [b.weight_bytes / load_bw + swap.BLOCK_OVERHEAD_S for b in blocks]
        t = load[0] + sum(max(blocks[i].compute_s, load[i + 1]) for i in range(len(blocks) - 1)) + blocks[-1].compute_s
        t += swap.BLOCK_CALL_S * len(blocks)
        best = t if best is None else min(best, t)
    return best


@pytest.mark.parametrize("seed", range(6))
def test_cut_points_are_optimal_for_the_cost_model(seed):
    """The dynamic programme finds the same predicted latency as trying every set of cut points."""
    from dataclasses import replace

    rng = np.random.default_rng(seed)
    ops, wbytes = _synthetic_ops(rng, 11)
    board = replace(load_board("rpi4"), peak_gflops_per_core=0.25, mem_bandwidth_gbs=1e-7)
    budget = int(rng.integers(450, 700))
    want = _brute_force(ops, wbytes, budget, board)
    if want is None:
        with pytest.raises(UserError):
            swap.plan_blocks(ops, wbytes, budget, board)
    else:
        plan = swap.plan_blocks(ops, wbytes, budget, board)
        assert plan.predicted_s == pytest.approx(want, rel=1e-12)


# ---------------------------------------------------------------- a real memory limit

no_cgroup = cgroup.unavailable_reason()


@pytest.mark.skipif(no_cgroup is not None, reason=f"cgroup v1 unavailable: {no_cgroup}")
def test_under_a_real_memory_limit_in_memory_dies_and_swapped_runs(tmp_path):
    budget = 32 * MIB
    mem, sw = build_pair(tmp_path, "dense_stack", budget, n=8, d=2048)  # 128 MiB of weights: 4x the budget
    assert mem.manifest["weight_bytes"] >= 4 * budget
    x = random_inputs(mem.inputs, seed=5)
    np.save(tmp_path / "x.npy", x["x"])
    want = Runner(mem).run(x)
    exe = str(Path(sys.executable).with_name("edgetvm"))

    def evict(art):
        # Page cache is charged to whoever first reads it: make the run in the cgroup read it.
        fd = os.open(art.weights_path, os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)

    def run(cg, art, *extra):
        evict(art)
        return cg.run([exe, "run", str(art.path), "--repeat", "1", *extra],
                      capture_output=True, text=True, timeout=600)

    # The runtime's own baseline: the same command on a model with almost no weights, no limit.
    tiny = tmp_path / "tiny.onnx"
    onnx.save(zoo.load("dense_stack", n=1, d=64), tiny)
    compile_model(tiny, load_board("host"), tmp_path / "tiny")
    with cgroup.Cgroup() as cg:
        assert run(cg, open_artifact(tmp_path / "tiny")).returncode == 0
        baseline = cg.max_usage
    limit = budget + baseline

    # Without any limit the swapped run stays near budget + baseline by itself (its own page dropping,
    # not the kernel's reclaim): within 15% of the budget for inputs, outputs and allocator slack.
    with cgroup.Cgroup() as cg:
        assert run(cg, sw, "--input", f"x={tmp_path / 'x.npy'}").returncode == 0
        unlimited_peak = cg.max_usage
    assert unlimited_peak - baseline <= 1.15 * budget, f"{(unlimited_peak - baseline) / MIB:.1f} MiB above baseline"

    with cgroup.Cgroup(memory_bytes=limit) as cg:
        proc = run(cg, mem, "--input", f"x={tmp_path / 'x.npy'}", "--weights", "copy")
        assert proc.returncode != 0 and cg.oom_kills >= 1, proc.stderr[-2000:]

    with cgroup.Cgroup(memory_bytes=limit) as cg:
        proc = run(cg, sw, "--input", f"x={tmp_path / 'x.npy'}", "--output", str(tmp_path / "y.npz"))
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert cg.oom_kills == 0
        assert cg.max_usage <= limit
        print(f"\nweights {mem.manifest['weight_bytes'] / MIB:.0f} MiB, budget {budget / MIB:.0f} MiB, runtime "
              f"baseline {baseline / MIB:.0f} MiB, limit {limit / MIB:.0f} MiB: in-memory OOM-killed; swapped peak "
              f"{cg.max_usage / MIB:.0f} MiB; with no limit {(unlimited_peak - baseline) / MIB:.1f} MiB above baseline")
    got = np.load(tmp_path / "y.npz")
    for k in want:
        np.testing.assert_array_equal(got[k], want[k])


def _bench():
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_swap", Path(__file__).resolve().parent.parent / "bench" / "swap.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.skipif(no_cgroup is not None, reason=f"cgroup v1 unavailable: {no_cgroup}")
# The pretrained MobileNetV3 case takes about a minute: slow, so the default run stays within CI's budget.
@pytest.mark.parametrize("name,kw", [("vgg", {"width": 0.5, "image": 64}),
                                     pytest.param("ocr_cls", {}, marks=pytest.mark.slow),
                                     ("dense_stack", {"n": 4, "d": 1024})])
def test_memory_charged_to_a_swapping_run_stays_within_its_budget(name, kw, tmp_path):
    """A budget is a promise: what the kernel charges a run's cgroup (page cache included), above the
    same runtime loaded and idle, stays within it at 4x and 6x oversubscription, as bench/swap.py
    builds them; a budget the plan cannot keep is refused instead."""
    bench = _bench()
    board = load_board("host")
    src = zoo.path(name, tmp_path, **kw)
    shapes = zoo.default_input_shapes(name, **kw)
    mem = compile_model(src, board, tmp_path / "mem", shapes)
    weights = mem.manifest["weight_bytes"]
    for k in (4, 6):
        budget = weights // k
        try:
            art = compile_model(src, board, tmp_path / f"x{k}", shapes, memory_budget=budget)
        except UserError as e:
            assert "it needs at least" in str(e)
            # weights / k cannot hold the activations: oversubscribe the weights on top of them, as the bench does
            budget = bench.activation_floor(src, shapes, board) + weights // k
            art = compile_model(src, board, tmp_path / f"x{k}", shapes, memory_budget=budget)
        _, charged = bench.peak_above_baseline(art.path)
        assert charged <= budget, f"{name} at {k}x: {charged / MIB:.2f} MiB charged for {budget / MIB:.2f}"
