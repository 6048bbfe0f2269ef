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
    ap.add_argument("--weights", default="fp32,q8,q4", help="our weight formats to run")
    ap.add_argument("--no-paged", action="store_true", help="skip TVM's PagedKVCache")
    ap.add_argument("--llama-cpp", default=None, metavar="PYTHON",
                    help=f"python of a venv with llama-cpp-python (default: $EDGETVM_LLAMACPP_PYTHON or {DEFAULT_PEER})")
    ap.add_argument("--threads", type=int, default=os.cpu_count(),
                    help="threads for every engine (TVM_NUM_THREADS for ours and tvm-paged, n_threads for llama.cpp)")
    ap.add_argument("--ppl-tokens", type=int, default=0, help="also perplexity over this many tokens, full cache")
    ap.add_argument("--out", default=str(CACHE / "decode.jsonl"))
    args = ap.parse_args(argv)

    os.environ["TVM_NUM_THREADS"] = str(args.threads)  # read when TVM's thread pool starts
    sys.path.insert(0, str(HERE))
    from kv import lee_text

    from edgetvm.llm.gguf_model import load_tokenizer, model_path
    from edgetvm.llm.runtime import Model, perplexity

    contexts = [int(c) for c in args.contexts.split(",") if c]
    fmts = [f for f in args.weights.split(",") if f]
    ids_all = load_tokenizer().encode(lee_text()).ids
    need = max(contexts + [args.ppl_tokens])
    if len(ids_all) < need:
        sys.exit(f"the text has only {len(ids_all)} tokens; lower --contexts/--ppl-tokens")
    print(f"start: {busy()}", flush=True)

    peer = find_peer(args.llama_cpp)
    llama = None
    if peer is None:
        print(f"llama.cpp: SKIPPED, no python with llama_cpp at {args.llama_cpp or DEFAULT_PEER}; build it with:\n"
              f"    {BUILD_HINT}", flush=True)
    else:
        llama = LlamaCpp(peer, model_path("smollm2-135m"), args.threads, need + args.steps + 16)
        print(f"llama.cpp: llama-cpp-python {llama.info['version']} under {peer}, {args.threads} threads", flush=True)

    engines, models = {}, {}
    for f in fmts:
        t0 = time.perf_counter()
        m = Model(weights=f)
        print(f"ours-{f}: loaded + compiled in {time.perf_counter() - t0:.0f} s, "
              f"weights read per token {m.weight_bytes / 2**20:.0f} MiB", flush=True)
        models[f] = m
        engines[f"ours-{f}"] = lambda ids, steps, m=m: decode_ours(m, ids, steps)
    if not args.no_paged:
        from edgetvm.llm.paged import PagedModel

        pm = PagedModel()
        engines["tvm-paged"] = lambda ids, steps: decode_paged(pm, ids, steps)
    if llama is not None:
        engines["llama.cpp"] = lambda ids, steps: llama.ask(cmd="decode", ids=list(ids), steps=steps)

    out = Path(args.out).expanduser()
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = []
    names = list(engines)
    for r in range(args.repeats):
        order = names[r % len(names):] + names[:r % len(names)]  # rotate who goes first
        for c in contexts:
            ids = ids_all[:c]
            for name in order:
                res = engines[name](ids, args.steps)
                row = {"engine": name, "context": c, "steps": args.steps, "repeat": r, "tok_s": res["tok_s"],
                       "prefill_s": res["prefill_s"], "tokens": res["tokens"], "time": time.time()}
                rows.append(row)
                with open(out, "a") as fh:
                    fh.write(json.dumps(row) + "\n")
                print(f"  repeat {r} ctx {c:5d} {name:10s} {res['tok_s']:7.2f} tok/s  (prefill {res['prefill_s']:.1f} s)",
                      flush=True)

    ppl = {}
    if args.ppl_tokens:
        ids = ids_all[:args.ppl_tokens]
        for f in fmts:
            ppl[f"ours-{f}"] = perplexity(models[f], ids, "full")["ppl"]
        if llama is not None:
            ppl["llama.cpp"] = llama.ask(cmd="ppl", ids=list(ids))["ppl"]
        with open(out, "a") as fh:
            fh.write(json.dumps({"ppl": ppl, "tokens": len(ids), "time": time.time()}) + "\n")
    if llama is not None:
        llama.close()
    end = busy()

    print(f"\ngreedy decode tokens/s, median of {args.repeats} interleaved repeats of {args.steps} steps "
          f"after the given cached tokens (full cache); {end}")
    print(f"{'engine':12s} {'cached':>7s} {'tok/s':>8s} {'min-max':>15s} {'vs llama.cpp':>13s} {'same greedy':>12s}")
    for c in contexts:
        med = {n: statistics.median(x["tok_s"] for x in rows if x["engine"] == n and x["context"] == c) for n in names}
        ref_tokens = next((x["tokens"] for x in rows if x["engine"] == "llama.cpp" and x["context"] == c), None)
        for n in names:
            xs = [x["tok_s"] for x in rows if x["engine"] == n and x["context"] == c]
            ratio = f"{med[n] / med['llama.cpp']:12.2f}x" if "llama.cpp" in med else f"{'(skipped)':>13s}"
            same = "-"
            if ref_tokens is not None and n != "llama.cpp":
                toks = next(x["tokens"] for x in rows if x["engine"] == n and x["context"] == c)
                k = next((i for i, (a, b) in enumerate(zip(toks, ref_tokens)) if a != b), len(toks))
                same = f"{k}/{len(toks)}"
            print(f"{n:12s} {c:7d} {med[n]:8.2f} {min(xs):7.2f}-{max(xs):<7.2f} {ratio} {same:>12s}")
    if ppl:
        print(f"\nperplexity, full cache, the same first {args.ppl_tokens} token ids "
              "(llama.cpp computes with the GGUF's Q4_1/Q8_0 weights and its own quantized activations):")
        for n, v in ppl.items():
            rel = f"  ({100 * (v / ppl['llama.cpp'] - 1):+.2f}% vs llama.cpp)" if "llama.cpp" in ppl and n != "llama.cpp" else ""
            print(f"  {n:12s} {v:8.3f}{rel}")


if __name__ == "__main__":
    main()
