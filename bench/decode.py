"""Decode speed: our compiled decoder (fp32 / q8 / q4 weights) vs llama.cpp vs TVM's PagedKVCache.

One claim per script: greedy single-token decode tokens/s at the same number of cached tokens
(default 256 and 1024), measured in the same run, engines interleaved in every repeat (the order
rotates), medians printed with ratios ours / llama.cpp. Optionally (--ppl-tokens) perplexity on
the same token ids with the full cache, ours per weight format and llama.cpp's.

What is compared:
* ours: `edgetvm.llm.runtime.Model(weights=...)`, full-cache policy, our TIR attention kernel.
  fp32 = weights dequantized from the GGUF to fp32, TVM matmuls; q8 = 8-bit groups re-quantized
  from them; q4 = the GGUF's own Q4_1 blocks (exactly llama.cpp's weights); q8/q4 use our own
  dequantizing TIR kernels. The tied head is the GGUF's Q8_0 for q8/q4.
* llama.cpp: llama-cpp-python built from source, the same GGUF file (its Q4_1 / Q8_0 weights),
  in a subprocess with ANOTHER venv's python (bench/llamacpp_peer.py), same thread count.
  Build that venv once:
      python3 -m venv ~/.cache/edgetvm/llamacpp-venv
      CMAKE_BUILD_PARALLEL_LEVEL=2 ~/.cache/edgetvm/llamacpp-venv/bin/pip install llama-cpp-python
  then it is found there (or pass --llama-cpp PYTHON, or set EDGETVM_LLAMACPP_PYTHON); without it
  the llama.cpp rows are skipped with a note.
* tvm-paged: the same model on TVM's PagedKVCache (edgetvm.llm.paged, fp32 weights), full cache.

Tokens are the first tokens of gensim's lee_background.cor (see bench/kv.py for the data).

    python bench/decode.py                       # contexts 256,1024; 3 repeats; fp32,q8,q4
    python bench/decode.py --contexts 256 --repeats 5 --weights q4 --ppl-tokens 1024
    python bench/decode.py --model A.Q8_0.gguf,B.Q4_K_M.gguf --weights native --no-paged --ppl-tokens 512
                                                 # a row per file (quantization): ours (its blocks kept, the
                                                 # `native` formats) vs llama.cpp on the same file and threads
Every measurement is appended to --out as a JSON line; the table is printed at the end. The
machine's load average and whether another benchmark was running are printed with it: figures
taken on a busy machine say so.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
CACHE = Path(os.environ.get("EDGETVM_CACHE", Path.home() / ".cache" / "edgetvm"))
DEFAULT_PEER = CACHE / "llamacpp-venv" / "bin" / "python"
BUILD_HINT = ("python3 -m venv ~/.cache/edgetvm/llamacpp-venv && CMAKE_BUILD_PARALLEL_LEVEL=2 "
              "~/.cache/edgetvm/llamacpp-venv/bin/pip install llama-cpp-python")


class LlamaCpp:
    """The llama.cpp worker subprocess (bench/llamacpp_peer.py under the peer venv's python)."""

    def __init__(self, python: str, gguf: Path, threads: int, n_ctx: int):
        self.p = subprocess.Popen([python, str(HERE / "llamacpp_peer.py"), str(gguf), str(threads), str(n_ctx)],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        hello = self.p.stdout.readline()
        if not hello:
            raise RuntimeError(f"llama.cpp worker under {python} did not start (see its stderr above)")
        self.info = json.loads(hello)

    def ask(self, **req) -> dict:
        self.p.stdin.write(json.dumps(req) + "\n")
        self.p.stdin.flush()
        return json.loads(self.p.stdout.readline())

    def close(self) -> None:
        self.p.stdin.close()
        self.p.wait(timeout=30)


def find_peer(arg: str | None) -> str | None:
    cand = (arg if arg != "auto" else None) or os.environ.get("EDGETVM_LLAMACPP_PYTHON") or str(DEFAULT_PEER)
    if not Path(cand).exists():
        return None
    ok = subprocess.run([cand, "-c", "import llama_cpp"], capture_output=True).returncode == 0
    return cand if ok else None


def greedy(forward, lg, steps: int) -> tuple[list[int], float]:
    """`steps` greedy tokens from logits `lg`; returns them and the seconds spent in `forward` alone."""
    made, t_dec = [], 0.0
    for _ in range(steps):
        tok = int(np.argmax(lg))
        made.append(tok)
        ts = time.perf_counter()
        lg = forward([tok])[-1]
        t_dec += time.perf_counter() - ts
    return made, t_dec


def decode_ours(model, ids, steps: int) -> dict:
    s = model.session("full", len(ids) + steps + 1)
    t0 = time.perf_counter()
    lg = s.prefill(ids)[-1]
    prefill_s = time.perf_counter() - t0
    made, t_dec = greedy(s.forward, lg, steps)
    return {"tok_s": steps / t_dec, "tokens": made, "prefill_s": prefill_s}


def decode_paged(pm, ids, steps: int, chunk: int = 64) -> dict:
    cache = pm.new_cache(len(ids) + steps + 16, chunk=chunk)
    t0 = time.perf_counter()
    for i in range(0, len(ids), chunk):
        lg = pm.forward(cache, ids[i:i + chunk])[-1]
    prefill_s = time.perf_counter() - t0
    made, t_dec = greedy(lambda toks: pm.forward(cache, toks), lg, steps)
    return {"tok_s": steps / t_dec, "tokens": made, "prefill_s": prefill_s}


def busy() -> str:
    others = subprocess.run(["pgrep", "-af", "bench/(kv|latte|tune).py"], capture_output=True, text=True).stdout
    others = [l for l in others.splitlines() if str(os.getpid()) != l.split()[0] and "pgrep" not in l]
    la = os.getloadavg()
    return (f"load average {la[0]:.2f} {la[1]:.2f} {la[2]:.2f} on {os.cpu_count()} cpus; "
            + (f"other benchmarks running: {'; '.join(o.split(None, 1)[1][:60] for o in others)}" if others
               else "no other benchmark running"))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--contexts", default="256,1024", help="cached tokens before the timed decode steps")
    ap.add_argument("--steps", type=int, default=32, help="greedy decode steps timed per measurement")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--weights", default="fp32,q8,q4", help="our weight formats to run (native: the file's blocks)")
    ap.add_argument("--model", default="smollm2-135m", help="comma-separated GGUF files or model names; every "
                    "engine runs on each (llama.cpp on the same file)")
    ap.add_argument("--no-paged", action="store_true", help="skip TVM's PagedKVCache")
    ap.add_argument("--llama-cpp", default=None, metavar="PYTHON",
                    help=f"python of a venv with llama-cpp-python (default: $EDGETVM_LLAMACPP_PYTHON or {DEFAULT_PEER})")
    ap.add_argument("--threads", type=int, default=os.cpu_count(),
                    help="threads for every engine (TVM_NUM_THREADS for ours and tvm-paged, n_threads for llama.cpp)")
    ap.add_argument("--ppl-tokens", type=int, default=0, help="also perplexity over this many tokens, full cache")
    ap.add_argument("--logits-tokens", type=int, default=0, help="also compare our logits with llama.cpp's and the "
                    "numpy reference's (dequantized weights) on this many token ids")
    ap.add_argument("--out", default=str(CACHE / "decode.jsonl"))
    ap.add_argument("--target", help="a board (e.g. rpi4): run there instead, see board_bench")
    ap.add_argument("--rpc", metavar="HOST:PORT", help="with --target: the board's RPC server (default: start the "
                                                       "emulated aarch64 board)")
    ap.add_argument("--tokens", type=int, default=8, help="with --target: greedy tokens to compare")
    ap.add_argument("--memory-budgets", metavar="FRACTIONS",
                    help="instead: tokens/s of the host build under --memory-budget at these fractions of its "
                         "weight bytes (e.g. 0.5,0.25) against the unbudgeted run, interleaved; see budget_bench")
    args = ap.parse_args(argv)
    if args.target:
        from edgetvm.runtime.signals import sigterm_raises

        with sigterm_raises():  # `kill` unwinds too: the emulated board and its mounts are removed
            return board_bench(args)
    if args.memory_budgets:
        return budget_bench(args)

    os.environ["TVM_NUM_THREADS"] = str(args.threads)  # read when TVM's thread pool starts
    sys.path.insert(0, str(HERE))
    from kv import lee_text

    from edgetvm.llm.gguf_model import load_tokenizer, model_path
    from edgetvm.llm.runtime import Model, perplexity

    contexts = [int(c) for c in args.contexts.split(",") if c]
    fmts = [f for f in args.weights.split(",") if f]
    names_ = [m for m in args.model.split(",") if m]
    label = {m: (Path(m).stem if m.endswith(".gguf") else m) for m in names_}
    ids_by = {m: load_tokenizer(m).encode(lee_text()).ids for m in names_}
    need = max(contexts + [args.ppl_tokens])
    if min(len(v) for v in ids_by.values()) < need:
        sys.exit("the text has too few tokens; lower --contexts/--ppl-tokens")
    print(f"start: {busy()}", flush=True)

    peer = find_peer(args.llama_cpp)
    llamas = {}
    if peer is None:
        print(f"llama.cpp: SKIPPED, no python with llama_cpp at {args.llama_cpp or DEFAULT_PEER}; build it with:\n"
              f"    {BUILD_HINT}", flush=True)
    else:
        for mname in names_:
            llamas[mname] = LlamaCpp(peer, model_path(mname), args.threads, need + args.steps + 16)
            print(f"llama.cpp: llama-cpp-python {llamas[mname].info['version']} under {peer}, {args.threads} threads, "
                  f"{model_path(mname).name}", flush=True)

    engines, models, engine_model = {}, {}, {}
    multi = len(names_) > 1
    tag = lambda mname, e: f"{label.get(mname, mname)}/{e}" if multi else e
    for mname in names_:
        for f in fmts:
            t0 = time.perf_counter()
            m = Model(mname, weights=f)
            print(f"{tag(mname, 'ours-' + f)}: loaded + compiled in {time.perf_counter() - t0:.0f} s, "
                  f"weights read per token {m.weight_bytes / 2**20:.0f} MiB; {m.describe()}", flush=True)
            models[tag(mname, f"ours-{f}")] = m
            engines[tag(mname, f"ours-{f}")] = lambda ids, steps, m=m: decode_ours(m, ids, steps)
            engine_model[tag(mname, f"ours-{f}")] = mname
        if mname in llamas:
            engines[tag(mname, "llama.cpp")] = lambda ids, steps, l=llamas[mname]: l.ask(cmd="decode", ids=list(ids),
                                                                                          steps=steps)
            engine_model[tag(mname, "llama.cpp")] = mname
    if not args.no_paged:
        from edgetvm.llm.paged import PagedModel

        pm = PagedModel()
        engines["tvm-paged"] = lambda ids, steps: decode_paged(pm, ids, steps)
        engine_model["tvm-paged"] = "smollm2-135m"
        ids_by.setdefault("smollm2-135m", load_tokenizer().encode(lee_text()).ids)

    out = Path(args.out).expanduser()
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = []
    names = list(engines)
    for r in range(args.repeats):
        order = names[r % len(names):] + names[:r % len(names)]  # rotate who goes first
        for c in contexts:
            for name in order:
                ids = ids_by[engine_model[name]][:c]
                res = engines[name](ids, args.steps)
                row = {"engine": name, "context": c, "steps": args.steps, "repeat": r, "tok_s": res["tok_s"],
                       "prefill_s": res["prefill_s"], "tokens": res["tokens"], "time": time.time()}
                rows.append(row)
                with open(out, "a") as fh:
                    fh.write(json.dumps(row) + "\n")
                print(f"  repeat {r} ctx {c:5d} {name:24s} {res['tok_s']:7.2f} tok/s  (prefill {res['prefill_s']:.1f} s)",
                      flush=True)

    ppl = {}
    if args.ppl_tokens:
        for name, m in models.items():
            ppl[name] = perplexity(m, ids_by[engine_model[name]][:args.ppl_tokens], "full")["ppl"]
        for mname, l in llamas.items():
            ppl[tag(mname, "llama.cpp")] = l.ask(cmd="ppl", ids=list(ids_by[mname][:args.ppl_tokens]))["ppl"]
        with open(out, "a") as fh:
            fh.write(json.dumps({"ppl": ppl, "tokens": args.ppl_tokens, "time": time.time()}) + "\n")
    if args.logits_tokens:
        check_logits(args.logits_tokens, names_, models, engine_model, llamas, ids_by, tag)
    for l in llamas.values():
        l.close()
    end = busy()
    ref_of = lambda n: tag(engine_model[n], "llama.cpp") if n in engine_model else None

    print(f"\ngreedy decode tokens/s, median of {args.repeats} interleaved repeats of {args.steps} steps "
          f"after the given cached tokens (full cache); {end}")
    print(f"{'engine':24s} {'cached':>7s} {'tok/s':>8s} {'min-max':>15s} {'vs llama.cpp':>13s} {'same greedy':>12s}")
    for c in contexts:
        med = {n: statistics.median(x["tok_s"] for x in rows if x["engine"] == n and x["context"] == c) for n in names}
        for n in names:
            xs = [x["tok_s"] for x in rows if x["engine"] == n and x["context"] == c]
            ref = ref_of(n)
            ratio = f"{med[n] / med[ref]:12.2f}x" if ref in med else f"{'(skipped)':>13s}"
            ref_tokens = next((x["tokens"] for x in rows if x["engine"] == ref and x["context"] == c), None)
            same = "-"
            if ref_tokens is not None and n != ref:
                toks = next(x["tokens"] for x in rows if x["engine"] == n and x["context"] == c)
                k = next((i for i, (a, b) in enumerate(zip(toks, ref_tokens)) if a != b), len(toks))
                same = f"{k}/{len(toks)}"
            print(f"{n:24s} {c:7d} {med[n]:8.2f} {min(xs):7.2f}-{max(xs):<7.2f} {ratio} {same:>12s}")
    if ppl:
        print(f"\nperplexity, full cache, the same first {args.ppl_tokens} token ids "
              "(llama.cpp computes with the file's weights and its own quantized activations):")
        for n, v in ppl.items():
            ref = ref_of(n) if n in engine_model else None
            rel = f"  ({100 * (v / ppl[ref] - 1):+.2f}% vs llama.cpp)" if ref in ppl and n != ref else ""
            print(f"  {n:24s} {v:8.3f}{rel}")


def check_logits(n: int, names_, models, engine_model, llamas, ids_by, tag) -> None:
    """Ours vs the numpy reference (the file's dequantized weights, fp32) vs llama.cpp on the same n ids:
    max |difference| over the largest |logit|, and how often the argmax agrees."""
    from edgetvm.llm import reference as R
    from edgetvm.llm.gguf_model import load_weights

    print(f"\nlogits on the first {n} token ids (full cache, fp32 KV for ours): max|a-b| / max|b|, argmax agreement")
    for mname in names_:
        ids = ids_by[mname][:n]
        ref = R.forward(*load_weights(mname), ids)
        lc = np.asarray(llamas[mname].ask(cmd="ppl", ids=list(ids), logits=n)["logits"]) if mname in llamas else None
        cmp = lambda a, b: f"{np.abs(a - b).max() / np.abs(b).max():.2e} / {(a.argmax(-1) == b.argmax(-1)).mean():.2f}"
        if lc is not None:
            print(f"  {tag(mname, 'reference'):24s} vs llama.cpp {cmp(ref, lc)}")
        for name, m in models.items():
            if engine_model[name] != mname:
                continue
            got = m.session("full", n, kv_dtype="float32").forward(ids)
            line = f"  {name:24s} vs reference {cmp(got, ref)}"
            print(line + (f"; vs llama.cpp {cmp(got, lc)}" if lc is not None else ""), flush=True)


def _group_hwm(pgid: int) -> int:
    """The largest VmHWM among a process group's processes (the emulated board's server and sessions)."""
    best = 0
    for st in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(st.read_text().rsplit(")", 1)[1].split()[2]) != pgid:
                continue
            for line in (st.parent / "status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    best = max(best, int(line.split()[1]) * 1024)
        except (OSError, ValueError, IndexError):
            continue
    return best


def board_bench(args) -> None:
    """On a board: what emulation can say honestly. Greedy tokens against the host build, bytes crossing
    the link per token, bytes of weights and KV cache each token reads, and (emulated board) the peak
    resident set of its qemu process. Speed is not reported: emulation runs 15-25x slower than a core,
    and unevenly; time the decode on a real board (`edgetvm generate --target BOARD --rpc ... -v`)."""
    import contextlib

    from edgetvm.llm import library
    from edgetvm.llm.board import BoardModel, cached_artifact, open_llm_artifact
    from edgetvm.llm.runtime import generate
    from edgetvm.runtime import emulated_board
    from edgetvm.runtime.session import connect, parse_address
    from edgetvm.runtime.wire import CountingProxy
    from edgetvm.targets import load_board

    fmt = args.weights.split(",")[-1]
    board = load_board(args.target)
    prompt = "The capital of France is"
    host = BoardModel(open_llm_artifact(cached_artifact("smollm2-135m", fmt, load_board("host"))))
    art = open_llm_artifact(cached_artifact("smollm2-135m", fmt, board))
    want = list(generate(host, prompt, max_new=args.tokens, policy="streaming", budget=64, stop_at_eos=False))
    with contextlib.ExitStack() as stack:
        rpc, emu = args.rpc, None
        if rpc is None:
            if board.arch != "aarch64":
                sys.exit(f"no emulated board for {board.arch}: give --rpc HOST:PORT of a {board.name}")
            emu = stack.enter_context(emulated_board.EmulatedBoard())
            rpc = f"127.0.0.1:{emu.port}"
        # The session goes through a counting relay: what each step costs the board's link, measured.
        host, port = parse_address(rpc, "--rpc")
        proxy = CountingProxy(host, port)
        stack.callback(proxy.close)
        bm = BoardModel(art, connect(f"127.0.0.1:{proxy.port}"), rpc)
        upload, upload_wire = bm.bytes_sent, proxy.counts()
        s = bm.session("streaming", 64)
        ids = bm.tokenizer.encode(prompt).ids
        got = [s.greedy_prefill(ids)]
        wire = [proxy.counts()]
        for _ in range(args.tokens - 1):
            got.append(s.greedy_next(got[-1]))
            wire.append(proxy.counts())
        hwm = _group_hwm(emu.proc.pid) if emu else None
    text = bm.tokenizer.decode(got)
    steps = max(1, len(wire) - 1)
    per_step = [(wire[-1][k] - wire[0][k]) / steps for k in (0, 1)]
    kv = library.state_bytes(bm.cfg, bm.kv_dtype, 64) // 2  # a decode step reads about half the state: K, V, rotated K
    print(f"{board.name} ({board.arch}) over {rpc}{' (emulated: qemu-aarch64)' if emu else ''}, {fmt} weights")
    print(f"  greedy tokens equal the host build's: {text == ''.join(want)} ({len(got)} tokens: {text!r})")
    print(f"  uploaded once: {upload / 2**20:.1f} MiB of weights ({upload_wire[0] / 2**20:.1f} MiB on the wire, "
          f"library and session set-up included)")
    print(f"  per decode step on the wire (TCP payload through a counting relay, RPC framing and handles "
          f"included): {per_step[0]:.0f} B sent, {per_step[1]:.0f} B received; the token fed back stays on the board")
    print(f"  memory read per decoded token on the board: {bm.weight_bytes / 2**20:.1f} MiB of weights + up to "
          f"{kv / 2**20:.2f} MiB of KV cache (64 tokens)")
    if hwm:
        print(f"  peak resident set of the board's processes: {hwm / 2**20:.0f} MiB (qemu's own memory included)")
    print("  speed: not measured; emulation says nothing about a real board's tokens/s: run "
          f"`edgetvm generate --target {board.name} --rpc HOST:PORT -v` on one")


def budget_bench(args) -> None:
    """Decode tokens/s on this machine within a memory budget of a fraction of the weights (the layers then
    stream through the swap runtime) against the same artifact unbudgeted, in interleaved repeats; with
    each run's planned peak. The whole-process peak is not separable per run here: `edgetvm generate
    --memory-budget ... --report` measures one run's."""
    from types import SimpleNamespace

    from edgetvm.llm import memory
    from edgetvm.llm.board import BoardModel, cached_artifact, open_llm_artifact
    from edgetvm.targets import load_board

    os.environ["TVM_NUM_THREADS"] = str(args.threads)
    sys.path.insert(0, str(HERE))
    from kv import lee_text

    model_name, fmt = args.model.split(",")[0], args.weights.split(",")[-1]
    board = load_board("host")
    art = open_llm_artifact(cached_artifact(model_name, fmt, board))
    wbytes = art.manifest["weight_bytes"]
    runs = {"unbudgeted": (BoardModel(art), None)}
    for f in (float(x) for x in args.memory_budgets.split(",") if x):
        budget = int(f * wbytes)
        try:
            m, _, plan = memory.budgeted_model(art, None, "this machine", board, budget, SimpleNamespace(kv_budget=None))
        except Exception as e:  # a budget no plan fits: say so, keep the others
            print(f"budget {f:g} x weights ({budget / 2**20:.1f} MiB): {e}")
            continue
        runs[f"{f:g} x weights"] = (m, plan)
    context = int(args.contexts.split(",")[0])
    ids = runs["unbudgeted"][0].tokenizer.encode(lee_text()).ids[:context]
    rates: dict[str, list[float]] = {k: [] for k in runs}
    for r in range(args.repeats):
        for name, (m, plan) in runs.items():
            s = m.session("streaming", max(64, min(context + args.steps + 8, plan.kv_tokens if plan else 4096)))
            tok = s.greedy_prefill(ids)
            t0 = time.perf_counter()
            for _ in range(args.steps):
                tok = s.greedy_next(tok)
            rates[name].append(args.steps / (time.perf_counter() - t0))
            print(f"  repeat {r} {name:18s} {rates[name][-1]:7.2f} tok/s", flush=True)
    base = statistics.median(rates["unbudgeted"])
    print(f"\n{model_name} {fmt} on this machine, {args.threads} threads, {args.steps} greedy steps after {context} "
          f"tokens, median of {args.repeats} interleaved repeats; weights {wbytes / 2**20:.1f} MiB")
    print(f"{'run':18s} {'budget MiB':>10s} {'planned peak MiB':>16s} {'layers':>9s} {'tok/s':>8s} {'vs unbudgeted':>14s}")
    for name, (m, plan) in runs.items():
        med = statistics.median(rates[name])
        print(f"{name:18s} {(plan.budget / 2**20 if plan else float('nan')):10.1f} "
              f"{(plan.planned_peak / 2**20 if plan else float('nan')):16.1f} "
              f"{('streamed' if plan and plan.stream else 'resident'):>9s} {med:8.2f} {med / base:13.2f}x")


if __name__ == "__main__":
    main()
