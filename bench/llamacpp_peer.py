"""llama.cpp peer worker: runs under a SEPARATE venv's python that has llama-cpp-python (edgetvm's
venv does not need it). bench/decode.py and bench/kv.py start it and talk JSON lines over
stdin/stdout; it imports only llama_cpp and numpy.

    python3 -m venv ~/.cache/edgetvm/llamacpp-venv
    CMAKE_BUILD_PARALLEL_LEVEL=2 ~/.cache/edgetvm/llamacpp-venv/bin/pip install llama-cpp-python

(builds llama.cpp from PyPI's sdist with cmake; about 20-40 minutes on 2 cores.)

Requests (one JSON object per line) and replies:
  {"cmd": "ppl", "ids": [...], "logits": k}       -> {"ppl", "tokens", "seconds"[, "logits": first k rows]}
      full cache, logits for every token (logits_all), the same token ids as ours
  {"cmd": "decode", "ids": [...], "steps": S}     -> {"tok_s", "tokens", "prefill_s"}
      prefill `ids`, then S greedy single-token evals, timed one by one
"""

from __future__ import annotations

import json
import sys
import time

import numpy as np


def main() -> None:
    import llama_cpp
    from llama_cpp import Llama

    path, threads, n_ctx = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    common = dict(model_path=path, n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads, n_batch=512,
                  verbose=False, seed=0)
    dec = Llama(logits_all=False, **common)
    n_vocab = dec.n_vocab()

    def last_logits():
        # With logits_all=False, llama-cpp-python 0.3.36 leaves `scores` zero: read llama.cpp's buffer.
        p = llama_cpp.llama_get_logits_ith(dec._ctx.ctx, -1)
        return np.ctypeslib.as_array(p, shape=(n_vocab,))
    ppl_llm = None
    out = sys.stdout
    out.write(json.dumps({"ready": True, "version": llama_cpp.__version__, "threads": threads}) + "\n")
    out.flush()
    for line in sys.stdin:
        req = json.loads(line)
        if req["cmd"] == "ppl":
            if ppl_llm is None:
                ppl_llm = Llama(logits_all=True, **common)
            ids = req["ids"]
            ppl_llm.reset()
            t0 = time.perf_counter()
            ppl_llm.eval(ids)
            lg = np.asarray(ppl_llm.scores[: len(ids)], dtype=np.float64)
            mx = lg.max(-1, keepdims=True)
            lse = mx[:, 0] + np.log(np.exp(lg - mx).sum(-1))
            nll = lse[:-1] - lg[np.arange(len(ids) - 1), ids[1:]]
            reply = {"ppl": float(np.exp(nll.mean())), "tokens": len(ids) - 1,
                     "seconds": time.perf_counter() - t0}
            if req.get("logits"):  # the first rows of logits, for comparing engines on the same tokens
                reply["logits"] = lg[: int(req["logits"])].astype(np.float32).tolist()
        elif req["cmd"] == "decode":
            ids, steps = req["ids"], int(req["steps"])
            dec.reset()
            t0 = time.perf_counter()
            dec.eval(ids)
            prefill_s = time.perf_counter() - t0
            made, t_dec = [], 0.0
            for _ in range(steps):
                tok = int(np.argmax(last_logits()))
                made.append(tok)
                ts = time.perf_counter()
                dec.eval([tok])
                t_dec += time.perf_counter() - ts
            reply = {"tok_s": steps / t_dec, "tokens": made, "prefill_s": prefill_s}
        else:
            reply = {"error": f"unknown cmd {req['cmd']!r}"}
        out.write(json.dumps(reply) + "\n")
        out.flush()


if __name__ == "__main__":
    main()
