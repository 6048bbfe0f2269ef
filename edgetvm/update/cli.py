"""`edgetvm update diff|apply|simulate`: weight patches for deployed models (Deep Partial Updating).

    edgetvm update diff OLD NEW -k 0.01 -o update.patch          # OLD, NEW: artifacts of the same model
    edgetvm update apply deployed/ update.patch                   # here
    edgetvm update apply deployed update.patch --rpc 10.0.0.7:9090   # on a board (/tmp/edgetvm-deployed/deployed)
    edgetvm update simulate --rounds 5 --model mlp --data mnist -k 0.01 --png dpu.png

A patch carries the base weight file's sha256, delta-coded positions and the values (float32, or 8-bit
with --values q8); applying it writes a new weight file and renames a new manifest in, so the artifact is
either the old one or the new one, never a mix; a patch for another base, or a truncated or damaged one,
is refused and the artifact stays byte-identical. See docs/update.md.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path



def _k(k: float) -> float:
    # Checked in the command, not by argparse: the one-line UserError and exit code 2 like any bad input.
    from edgetvm.update.patch import check_k

    return check_k(k)


def add_update_parser(sub) -> None:
    s = sub.add_parser("update", help="send a small share of a model's weights to deployed boards (DPU patches)")
    us = s.add_subparsers(dest="update_cmd", required=True)
    d = us.add_parser("diff", help="a patch from artifact OLD toward artifact NEW with the k share of weights "
                      "that changed most")
    d.add_argument("old")
    d.add_argument("new")
    d.add_argument("-k", type=float, default=0.01, help="share of all weights to send, in (0, 1] (default 0.01)")
    d.add_argument("-o", "--output", required=True, help="the patch file to write")
    d.add_argument("--values", choices=("f32", "q8"), default="f32", help="value coding (q8: 1 byte a value)")
    d.set_defaults(func=cmd_diff)
    a = us.add_parser("apply", help="apply a patch to an artifact, here or on a board over TVM RPC")
    a.add_argument("artifact", help="the deployed artifact (with --rpc/--tracker: its directory on the board, "
                   "relative to the board's EDGETVM_DEPLOY_DIR, default /tmp/edgetvm-deployed, unless absolute)")
    a.add_argument("patch")
    a.add_argument("--rpc", help="HOST:PORT of the board's RPC server")
    a.add_argument("--tracker", help="HOST:PORT of an RPC tracker")
    a.add_argument("--key", help="the board's key at the tracker")
    a.set_defaults(func=cmd_apply)
    m = us.add_parser("simulate", help="DPU rounds on real data against full, random, global-only and "
                      "magnitude updating; a PNG of accuracy and bytes per round")
    from edgetvm.update.dpu import METHODS, MODELS

    m.add_argument("--rounds", type=int, default=5)
    m.add_argument("--model", default="mlp", help=f"{', '.join(MODELS)} (default mlp)")
    m.add_argument("--data", default="mnist", help="mnist, fashion-mnist or digits (default mnist)")
    m.add_argument("-k", type=float, default=0.01, help="share of all weights updated per round (default 0.01)")
    m.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated (default {','.join(METHODS)})")
    m.add_argument("--train-limit", type=int, help="use only the first N training images")
    m.add_argument("--epochs-initial", type=int, default=5)
    m.add_argument("--epochs-update", type=int, default=2)
    m.add_argument("--epochs-finetune", type=int, default=2)
    m.add_argument("--lr", type=float, default=0.02)
    m.add_argument("--values", choices=("f32", "q8"), default="f32")
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--workdir", default="dpu-run", help="deployed artifacts per method (default ./dpu-run)")
    m.add_argument("--png", help="write accuracy and bytes per round here")
    m.add_argument("--json", help="write every round's figures here")
    m.add_argument("--quiet", action="store_true", help="no progress line")
    m.set_defaults(func=cmd_simulate)


def cmd_diff(args) -> None:
    from edgetvm.runtime.artifact import open_artifact
    from edgetvm.update.patch import diff, write_patch

    _k(args.k)
    old, new = open_artifact(args.old), open_artifact(args.new)
    blob = diff(old, new, args.k, args.values)
    write_patch(args.output, blob)
    from edgetvm.runtime.patch import decode

    p = decode(blob)
    size = old.weights_path.stat().st_size
    print(f"wrote {args.output}: {p.n_changed:,} values, {len(blob):,} bytes ({100 * len(blob) / size:.2f}% of "
          f"the {size:,}-byte weight file)")


def cmd_apply(args) -> None:
    from edgetvm.update.patch import apply_local, apply_rpc, read_patch

    blob = read_patch(args.patch)
    if args.rpc or args.tracker or args.key:
        r = apply_rpc(args.artifact, blob, args.rpc, args.tracker, args.key)
        wire = r.get("wire_bytes")
        where = args.rpc or f"{args.key} via {args.tracker}"
        print(f"applied on {where}: {r['changed']:,} values, weights now {r['weights_file']} "
              f"(sha256 {r['sha256'][:16]}), {r['seconds'] * 1e3:.1f} ms on the board; patch {len(blob):,} bytes"
              + (f", {wire['sent']:,} bytes sent on the wire" if wire else ""))
    else:
        r = apply_local(args.artifact, blob)
        print(f"applied to {args.artifact}: {r['changed']:,} values, weights now {r['weights_file']} "
              f"(sha256 {r['sha256'][:16]}), {r['seconds'] * 1e3:.1f} ms")


class Bar:
    """A progress line on stderr: rewritten in place on a terminal, throttled lines otherwise."""

    def __init__(self, enabled: bool):
        self.enabled, self.live, self.last = enabled, sys.stderr.isatty(), 0.0

    def __call__(self, text: str) -> None:
        if not self.enabled:
            return
        final = ":" in text and "step" not in text
        if final or time.monotonic() - self.last > (0.25 if self.live else 10):
            self.last = time.monotonic()
            if self.live:
                sys.stderr.write("\r" + text + "\033[K" + ("\n" if final else ""))
            else:
                sys.stderr.write(text + "\n")
            sys.stderr.flush()


def cmd_simulate(args) -> None:
    from edgetvm.update import dpu

    _k(args.k)
    cfg = dpu.Config(model=args.model, data=args.data, rounds=args.rounds, k=args.k,
                     methods=tuple(m.strip() for m in args.methods.split(",") if m.strip()),
                     train_limit=args.train_limit, epochs_initial=args.epochs_initial,
                     epochs_update=args.epochs_update, epochs_finetune=args.epochs_finetune, lr=args.lr,
                     coding=args.values, seed=args.seed)
    cfg.check()
    res = dpu.simulate(cfg, Path(args.workdir), Bar(not args.quiet))
    print(f"{cfg.model} on {cfg.data}, {cfg.rounds} rounds, k = {cfg.k:g}; full update {res['full_bytes']:,} bytes")
    print(f"{'method':<10} {'mean acc':>9} {'vs full':>8} {'bytes/round':>12} {'of full':>8} {'updates':>8}")
    for m, s in res["summary"].items():
        diff = s.get("accuracy_diff_to_full")
        print(f"{m:<10} {100 * s['mean_accuracy']:8.2f}% {'' if diff is None else f'{100 * diff:+7.2f}':>8} "
              f"{s['mean_bytes']:12,.0f} {100 * s['bytes_share']:7.2f}% {s['updates']:>5}/{cfg.rounds}")
    if args.json:
        dpu.write_json(res, Path(args.json))
        print(f"wrote {args.json}")
    if args.png:
        dpu.plot(res, Path(args.png))
        print(f"wrote {args.png}")
