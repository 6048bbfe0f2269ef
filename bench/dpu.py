"""Deep Partial Updating against full, random partial, global-only and magnitude updating, in one run.

    python bench/dpu.py                                       # small: 3 rounds, MLP on MNIST-5k
    python bench/dpu.py --setups mlp:mnist,vgg_small:fashion-mnist --rounds 5 -k 0.01 --board

For every setup (model:data) it runs `edgetvm update simulate`'s rounds (edgetvm/update/dpu.py: TVM
gradients, every method on its own deployed artifact, patches applied for real) and reports per method
  acc diff      mean over the rounds of (test accuracy - full updating's), in points
  bytes/round   mean patch bytes as sent (0 for a round without update; full: the weight file)
  of full       that as a share of a full update's weight file
With --board, every method's patches are replayed in order on an emulated aarch64 board over TVM RPC
(runtime/patch.py serving there): `board ms` is the apply time the board measured (emulated: 15-25x
slower than a real core, so plumbing, not speed) and `wire B` the bytes the RPC session sent per round,
counted by a relay on this side (the patch plus the call's framing); full updating's wire bytes are an
upload of the whole weight file through the same relay.

Goals of the issue: at k = 1%, mean accuracy within 0.5 points of full updating on both models, random
partial updating clearly worse, bytes per round <= 2% of a full update.
"""

from __future__ import annotations

import argparse
import gc
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from edgetvm.update import dpu  # noqa: E402


def replay_on_board(result: dict, workdir: Path) -> dict:
    """Per method: board-measured apply seconds and wire bytes of each round's patch, on an emulated board."""
    from tvm import rpc

    from edgetvm.runtime import emulated_board
    from edgetvm.runtime.wire import CountingProxy
    from edgetvm.update.patch import apply_rpc, deploy_rpc

    out = {}
    with emulated_board.EmulatedBoard(functions=True) as board:
        addr = f"127.0.0.1:{board.port}"
        for m in result["config"]["methods"]:
            # TVM's RPC server serves one session at a time: close each before apply_rpc opens its own.
            session = rpc.connect(board.host, board.port, session_timeout=600)
            deploy_rpc(session, workdir / "initial", f"bench-{m}")
            del session
            gc.collect()   # the session object has reference cycles: end the session now
            rows = []
            for rec in sorted((r for r in result["records"] if r["method"] == m and r.get("patch")),
                              key=lambda r: r["round"]):
                rep = apply_rpc(f"bench-{m}", Path(rec["patch"]).read_bytes(), rpc=addr)
                rows.append({"round": rec["round"], "board_s": rep["seconds"], "wire": rep["wire_bytes"]["sent"]})
            out[m] = rows
        # A full download, measured the same way: the weight file uploaded through the counting relay.
        proxy = CountingProxy(board.host, board.port)
        s2 = rpc.connect("127.0.0.1", proxy.port, session_timeout=600)
        before = proxy.counts()[0]
        s2.upload(str(workdir / "initial" / "weights.bin"), target="full-weights.bin")
        out["_full_upload_wire"] = proxy.counts()[0] - before
        proxy.close()
    # The emulated board's rootfs is shared and cached: leave nothing deployed in it.
    from edgetvm.runtime import patch as rpatch

    for m in result["config"]["methods"]:
        shutil.rmtree(emulated_board.cache_dir() / "rootfs" / rpatch.DEPLOY_DIR.lstrip("/") / f"bench-{m}",
                      ignore_errors=True)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--setups", default="mlp:mnist", help="model:data,... (default mlp:mnist)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("-k", type=float, default=0.01)
    ap.add_argument("--train-limit", type=int, default=None, help="first N training images (Fashion: use ~6000)")
    ap.add_argument("--epochs-initial", type=int, default=5)
    ap.add_argument("--epochs-update", type=int, default=2)
    ap.add_argument("--epochs-finetune", type=int, default=2)
    ap.add_argument("--seeds", default="0", help="comma-separated seeds; every setup runs once per seed (default 0)")
    ap.add_argument("--board", action="store_true", help="replay the patches on an emulated aarch64 board")
    ap.add_argument("--workdir", help="keep the deployed artifacts and patches here")
    ap.add_argument("--json", help="write all figures here")
    args = ap.parse_args(argv)
    try:
        seeds = [int(x) for x in args.seeds.split(",")]
    except ValueError:
        ap.error(f"--seeds {args.seeds!r} is not a comma-separated list of integers")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for setup in args.setups.split(","):
            model, data = setup.split(":")
            runs = []
            for seed in seeds:
                cfg = dpu.Config(model=model, data=data, rounds=args.rounds, k=args.k, train_limit=args.train_limit,
                                 epochs_initial=args.epochs_initial, epochs_update=args.epochs_update,
                                 epochs_finetune=args.epochs_finetune, seed=seed)
                work = Path(args.workdir or tmp) / f"{model}-{data}-seed{seed}"
                t0 = time.perf_counter()
                res = dpu.simulate(cfg, work, lambda text: print(text, file=sys.stderr) if ":" in text else None)
                res["seconds"] = time.perf_counter() - t0
                if args.board:
                    res["board"] = replay_on_board(res, work)
                runs.append(res)
                report(f"{setup} seed {seed}", res)
            results[setup] = {"runs": runs, "over_seeds": over_seeds(runs)}
            if len(runs) > 1:
                report_seeds(setup, seeds, results[setup]["over_seeds"])
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


def over_seeds(runs: list[dict]) -> dict:
    """Per method: each seed's mean accuracy difference to full updating and byte share, with their mean."""
    out = {}
    for m in runs[0]["summary"]:
        diffs = [r["summary"][m].get("accuracy_diff_to_full", 0.0) for r in runs]
        shares = [r["summary"][m]["bytes_share"] for r in runs]
        out[m] = {"acc_diffs": diffs, "mean_acc_diff": float(sum(diffs) / len(diffs)),
                  "min_acc_diff": min(diffs), "max_acc_diff": max(diffs),
                  "bytes_shares": shares, "mean_bytes_share": float(sum(shares) / len(shares)),
                  "updates": sum(r["summary"][m]["updates"] for r in runs),
                  "rounds": sum(r["config"]["rounds"] for r in runs)}
    return out


def report_seeds(setup: str, seeds: list[int], agg: dict) -> None:
    print(f"\n{setup} over seeds {','.join(map(str, seeds))}: accuracy difference to full updating (points, "
          f"mean of each seed's rounds) and bytes per round as a share of a full update")
    print(f"{'method':<10} {'mean diff':>9} {'min':>7} {'max':>7} {'of full':>8} {'updates':>8}   per seed")
    for m, a in agg.items():
        per = " ".join(f"{100 * d:+.2f}" for d in a["acc_diffs"])
        print(f"{m:<10} {100 * a['mean_acc_diff']:+9.2f} {100 * a['min_acc_diff']:+7.2f} "
              f"{100 * a['max_acc_diff']:+7.2f} {100 * a['mean_bytes_share']:7.2f}% "
              f"{a['updates']:>4}/{a['rounds']:<3}   {per}")


def report(setup: str, res: dict) -> None:
    cfg = res["config"]
    print(f"\n{setup}: {cfg['rounds']} rounds, k = {cfg['k']:g}, {res['n_weights']:,} weights, full update "
          f"{res['full_bytes']:,} bytes ({res['seconds']:.0f} s on a loaded 2-core machine: timings are noisy)")
    board = res.get("board", {})
    print(f"{'method':<10} {'mean acc':>9} {'acc diff':>9} {'bytes/round':>12} {'of full':>8} {'updates':>8}"
          + (f" {'board ms':>9} {'wire B':>9}" if board else ""))
    for m, s in res["summary"].items():
        line = (f"{m:<10} {100 * s['mean_accuracy']:8.2f}% {100 * s.get('accuracy_diff_to_full', 0):+8.2f} "
                f"{s['mean_bytes']:12,.0f} {100 * s['bytes_share']:7.2f}% {s['updates']:>5}/{cfg['rounds']}")
        if board:
            rows = board.get(m, [])
            ms = 1e3 * sum(r["board_s"] for r in rows) / max(len(rows), 1)
            wire = sum(r["wire"] for r in rows) / cfg["rounds"]
            if m == "full":
                wire = board["_full_upload_wire"]
            line += f" {ms:9.1f} {wire:9,.0f}"
        print(line)


if __name__ == "__main__":
    sys.exit(main())
