"""KV-cache eviction benchmark: perplexity, decode tokens/s and KV bytes per policy and budget.

Text: gensim's lee_background.cor (real English news), read from the gensim wheel (a zip) in
~/.cache/edgetvm/data, fetched there the first time (edgetvm.data.english_text; gensim is never installed). Perplexity is exact for every policy: the first `budget` tokens are
prefilled in chunks (no eviction can happen yet), every later token is decoded one at a time
against a cache of at most `budget` tokens. Decode tokens/s is measured over those one-token
steps (for the full cache: over --full-decode greedy steps after the text, same cache).

    python bench/kv.py --tokens 4096 --fractions 0.2 --out ~/.cache/edgetvm/kv.jsonl
    python bench/kv.py --tokens 1024 --fractions 0.2 --policies streaming --llama-cpp auto
Results are appended to --out as JSON lines as each run ends, and printed as a table.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np


def lee_text() -> str:
    from edgetvm.data import english_text

    return english_text()


def paged_peer(ids, fraction: float, sinks: int, chunk: int = 64) -> dict:
    """TVM's PagedKVCache with sliding window + sinks: perplexity (same protocol) and decode tok/s."""
    from edgetvm.llm.paged import PagedModel

    m = PagedModel()
    n = len(ids)
    budget = max(sinks + 1, int(round(fraction * n)))
    page = 16
    cache = m.new_cache(n + page, window=budget - sinks, sinks=sinks, page_size=page, chunk=chunk)
    t0 = time.perf_counter()
    nll, i, n_dec, t_dec = 0.0, 0, 0, 0.0
    while i < n - 1:
        step = min(chunk, budget - i, n - 1 - i) if i < budget else 1
        ts = time.perf_counter()
        lg = m.forward(cache, ids[i:i + step]).astype(np.float64)
        if step == 1:
            n_dec += 1
            t_dec += time.perf_counter() - ts
        mx = lg.max(-1, keepdims=True)
        lse = mx[:, 0] + np.log(np.exp(lg - mx).sum(-1))
        nll += float((lse - lg[np.arange(step), ids[i + 1:i + step + 1]]).sum())
        i += step
    cfg = m.cfg
    # Pages are allocated for max_total_seq_len (n + one page) up front: that is the KV memory held.
    kv = 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * 4 * ((n + page + page - 1) // page) * page
    return {"policy": "tvm-paged-window+sinks", "fraction": fraction, "budget": budget,
            "ppl": float(np.exp(nll / (n - 1))), "tokens": n - 1, "seconds": time.perf_counter() - t0,
            "decode_tokens": n_dec, "decode_tok_s": n_dec / t_dec if t_dec else None, "kv_bytes": kv,
            "compile_s": m.compile_s}


def llama_cpp_row(ids, python: str, steps: int) -> dict | None:
    """llama.cpp on the same GGUF (its Q4_1/Q8_0 weights, f16 cache): perplexity over the same ids
    with the full cache (logits_all), then `steps` greedy decode steps after the whole text."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from decode import BUILD_HINT, LlamaCpp, find_peer

    from edgetvm.llm.gguf_model import load_weights, model_path

    peer = find_peer(None if python == "auto" else python)
    if peer is None:
        print(f"llama.cpp row SKIPPED: no python with llama_cpp ({python}); build it with:\n    {BUILD_HINT}", flush=True)
        return None
    n = len(ids)
    t0 = time.perf_counter()
    w = LlamaCpp(peer, model_path("smollm2-135m"), os.cpu_count(), n + max(steps, 1) + 16)
    r = w.ask(cmd="ppl", ids=list(ids))
    d = w.ask(cmd="decode", ids=list(ids), steps=steps) if steps else {"tok_s": None}
    w.close()
    cfg = load_weights()[0]
    return {"policy": "llama.cpp-full", "fraction": 1.0, "budget": n, "ppl": r["ppl"], "tokens": n - 1,
            "seconds": time.perf_counter() - t0, "decode_tokens": steps, "decode_tok_s": d["tok_s"],
            "kv_bytes": 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * 2 * n, "llama_cpp": w.info["version"],
            "note": "llama.cpp computes with the GGUF's Q4_1/Q8_0 weights (ours: fp32 dequantized from them)"}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--policies", default="window,streaming,h2o,tova")
    ap.add_argument("--fractions", default="0.2,0.1,0.5")
    ap.add_argument("--sinks", type=int, default=4)
    ap.add_argument("--full-decode", type=int, default=16, help="decode steps timed for the full cache")
    ap.add_argument("--no-full", action="store_true", help="skip the full-cache run")
    ap.add_argument("--paged", default="0.2",
                    help="budget fractions for TVM's PagedKVCache peer (sliding window + sinks) on the same "
                         "tokens; empty to skip")
    ap.add_argument("--llama-cpp", default=None, metavar="PYTHON",
                    help="python of a venv with llama-cpp-python (see bench/decode.py for building it): adds a "
                         "llama.cpp full-cache row (perplexity on the same token ids, decode tok/s); 'auto' "
                         "uses ~/.cache/edgetvm/llamacpp-venv if it is there")
    ap.add_argument("--out", default=str(Path.home() / ".cache" / "edgetvm" / "kv.jsonl"))
    args = ap.parse_args(argv)

    from edgetvm.llm.runtime import Model, perplexity

    t0 = time.perf_counter()
    model = Model()
    print(f"model loaded + compiled in {time.perf_counter() - t0:.1f} s (compile {model.compile_s:.1f} s)", flush=True)
    ids = model.tokenizer.encode(lee_text()).ids[: args.tokens]
    n = len(ids)
    print(f"text: lee_background.cor, {n} tokens", flush=True)
    runs = [] if args.no_full else [("full", 1.0)]
    runs += [(p, float(f)) for f in args.fractions.split(",") if f for p in args.policies.split(",") if p]
    out = Path(args.out).expanduser()
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = []
    for policy, frac in runs:
        budget = n if policy == "full" else max(args.sinks + 1, int(round(frac * n)))
        extra = args.full_decode if policy == "full" else 0
        r = perplexity(model, ids, policy, budget + extra, sinks=args.sinks, extra_decode=extra)
        r["kv_bytes_text"] = r["kv_bytes"] * budget // (budget + extra)
        r.update(policy=policy, fraction=frac, budget=budget, text="lee_background.cor", time=time.time())
        rows.append(r)
        _emit(out, r)
    del model
    for frac in [float(f) for f in args.paged.split(",") if f]:
        r = paged_peer(ids, frac, args.sinks)
        rows.append(r)
        _emit(out, r)
    if args.llama_cpp:
        r = llama_cpp_row(ids, args.llama_cpp, args.full_decode)
        if r is not None:
            rows.append(r)
            _emit(out, r)
    full = [r for r in rows if r["policy"] == "full"]
    print(f"\nlee_background.cor, {n} tokens, sinks {args.sinks}; ppl vs full cache; "
          "decode tok/s over the one-token steps")
    print(f"{'policy':24s} {'budget':>11s} {'ppl':>9s} {'vs full':>8s} {'decode tok/s':>12s} {'KV MiB':>8s}")
    for r in rows:
        rel = f"{100 * (r['ppl'] / full[0]['ppl'] - 1):+7.2f}%" if full else "       -"
        dec = f"{r['decode_tok_s']:12.2f}" if r.get("decode_tok_s") else f"{'-':>12s}"
        b = f"{r['budget']} ({r['fraction']:.0%})"
        print(f"{r['policy']:24s} {b:>11s} {r['ppl']:9.3f} {rel:>8s} {dec} {r['kv_bytes'] / 2**20:8.2f}")


def _emit(out: Path, r: dict) -> None:
    r.setdefault("time", time.time())
    with open(out, "a") as f:
        f.write(json.dumps(r) + "\n")
    dec = f"{r['decode_tok_s']:6.2f}" if r.get("decode_tok_s") else "     -"
    print(f"{r['policy']:9s} {r['fraction']:4.0%} budget {r['budget']:5d}  tokens {r['tokens'] + 1:5d}  "
          f"ppl {r['ppl']:8.3f}  decode {dec} tok/s  KV {r['kv_bytes'] / 2**20:7.2f} MiB  ({r['seconds']:.0f} s)",
          flush=True)


if __name__ == "__main__":
    main()
