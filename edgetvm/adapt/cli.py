"""`edgetvm adapt meta-train|sample|run`: p-Meta few-shot adaptation (see docs/adapt.md).

    edgetvm adapt meta-train --method pmeta --iterations 150 -o pmeta/ --png pmeta-val.png
    edgetvm adapt meta-train --method pmeta --attention task -o pmeta-task/   # task-conditioned attention
    edgetvm adapt sample --k-shot 5 -o support.npz --query query.npz      # a test task of kanji renders
    edgetvm adapt run pmeta/ --support support.npz --steps 5 --query query.npz -o adapted.npz
    edgetvm adapt run pmeta/ --support support.npz --steps 5 --board rpi4 --rpc 127.0.0.1:9090   # on a board

A support file is an .npz with `x` (n, 1, 28, 28) or (n, 28, 28) images in [0, 1] (or uint8 0-255) and
`y` (n,) labels 0..N-1 of the model's N classes.
"""

from __future__ import annotations

import os
import sys
import time
import zipfile
from pathlib import Path

import numpy as np

from edgetvm.errors import UserError


def add_adapt_parser(sub) -> None:
    s = sub.add_parser("adapt", help="p-Meta: few-shot adaptation on the device that updates only the weights "
                       "that matter (meta-train on the host, adapt with a compiled masked step)")
    a = s.add_subparsers(dest="adapt_cmd", required=True)
    m = a.add_parser("meta-train", help="meta-train Conv4 on kanji renders: p-Meta, MAML, ANIL or bias-only")
    from edgetvm.adapt.meta import METHODS

    m.add_argument("--method", default="pmeta", help=f"{', '.join(METHODS)} (default pmeta)")
    m.add_argument("--iterations", type=int, default=150)
    m.add_argument("--n-way", type=int, default=5)
    m.add_argument("--k-shot", type=int, default=1)
    m.add_argument("--q-query", type=int, default=5, help="query images per class in meta-training")
    m.add_argument("--steps", type=int, default=5, help="adaptation (inner) steps")
    m.add_argument("--inner-lr", type=float, default=0.1)
    m.add_argument("--meta-lr", type=float, default=2e-3)
    m.add_argument("--meta-batch", type=int, default=4, help="tasks per meta-update")
    m.add_argument("--channels", type=int, default=32)
    m.add_argument("--sparsity", type=float, default=2.0, help="p-Meta: weight of the memory-aware sparsity")
    m.add_argument("--memory-budget", type=float, default=0.0, metavar="MIB",
                   help="p-Meta: the adaptation step's planned memory must fit this (MiB, the memory-lean step, "
                        "above the loaded weights; 0: no budget): the least important channels and layers are "
                        "dropped until it does")
    m.add_argument("--budget-shots", type=int, default=5, help="images per class the budget is planned at")
    from edgetvm.adapt.meta import ATTENTIONS

    m.add_argument("--attention", default="static", help=f"p-Meta's attention: {' or '.join(ATTENTIONS)} (default "
                   "static: one learned step size per channel for every task; task: scored per task from the support "
                   "set's first-step gradients, a layer scored 0 is left out of that task's step)")
    m.add_argument("--attention-threshold", type=float, default=0.05,
                   help="--attention task: scores below this are 0 (default 0.05)")
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("-o", "--output", required=True, help="the artifact directory to write")
    m.add_argument("--png", help="write meta-validation accuracy per iteration here")
    m.add_argument("--quiet", action="store_true", help="no progress line")
    m.set_defaults(func=cmd_meta_train)
    p = a.add_parser("sample", help="write one N-way K-shot task (support and query) as .npz files")
    p.add_argument("--data", default="kanji", help="kanji (test characters), mnist or fashion-mnist")
    p.add_argument("--n-way", type=int, default=5)
    p.add_argument("--k-shot", type=int, default=1)
    p.add_argument("--q-query", type=int, default=15)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("-o", "--output", required=True, help="support .npz")
    p.add_argument("--query", help="query .npz")
    p.set_defaults(func=cmd_sample)
    r = a.add_parser("run", help="adapt a meta-trained model to a support set with its compiled masked step")
    r.add_argument("artifact")
    r.add_argument("--support", required=True, help=".npz with x and y")
    r.add_argument("--steps", type=int, default=5)
    r.add_argument("--shots", type=int, help="use only the first K images of each class (default: all)")
    r.add_argument("--query", help=".npz with x and y: accuracy before and after adaptation")
    r.add_argument("-o", "--output", help="write the adapted weights here (.npz)")
    r.add_argument("--board", default="host", help="the board to compile for (default host)")
    r.add_argument("--rpc", metavar="HOST:PORT", help="run the step on the board serving TVM RPC here")
    r.add_argument("--lean", action="store_true", help="the memory-lean build (no im2col; slower here)")
    r.set_defaults(func=cmd_run)


def _progress(quiet: bool):
    from edgetvm.train import _Progress

    return _Progress(not quiet)


def cmd_meta_train(args) -> None:
    from edgetvm.adapt import meta

    cfg = meta.MetaConfig(method=args.method, n_way=args.n_way, k_shot=args.k_shot, q_query=args.q_query,
                          inner_steps=args.steps, inner_lr=args.inner_lr, meta_lr=args.meta_lr,
                          meta_batch=args.meta_batch, iterations=args.iterations, channels=args.channels,
                          sparsity=args.sparsity, memory_budget=args.memory_budget,
                          budget_shots=args.budget_shots, seed=args.seed, val_every=max(args.iterations // 10, 1),
                          attention=args.attention, attention_threshold=args.attention_threshold)
    cfg.check()
    out = Path(args.output)
    if not out.resolve().parent.is_dir() or not os.access(out.resolve().parent, os.W_OK):
        raise UserError(f"-o {out}: directory {out.resolve().parent} is missing or not writable; create it first")
    if args.png:
        png = Path(args.png).resolve()
        if not png.parent.is_dir():
            raise UserError(f"--png {args.png}: directory {png.parent} is missing; create it first")
    bar = _progress(args.quiet)
    val = {"acc": float("nan")}

    def progress(i, rec):
        if "val_accuracy" in rec:
            val["acc"] = rec["val_accuracy"]
        bar.update(f"{cfg.method}: iteration {i}/{cfg.iterations}  query acc {100 * rec['query_accuracy']:.0f}%  "
                   f"val acc {100 * val['acc']:.1f}%  updated {100 * rec['updated_share']:.1f}%  {rec['seconds']:.0f} s")

    learner = meta.meta_train(cfg, progress)
    bar.done(f"{cfg.method}: {cfg.iterations} iterations, val acc {100 * val['acc']:.1f}%, "
             f"updates {100 * learner.updated_share():.1f}% of the weights")
    meta.save(learner, out)
    print(f"wrote {out}: {cfg.method}, {cfg.n_way}-way, {'may update' if learner.attention else 'updates'} "
          + ", ".join(f"{n} {int(m.sum())}" for n, m in learner.mask().items())
          + (" (the union; the task-conditioned attention picks layers and scales channels per task)"
             if learner.attention else ""))
    if cfg.memory_budget:
        print(f"memory budget {cfg.memory_budget:g} MiB at {cfg.budget_shots}-shot: the step plans "
              f"{learner.planned / 2**20:.2f} MiB")
    if args.png:
        _plot(learner, Path(args.png))
        print(f"wrote {args.png}")


def _plot(learner, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    h = [r for r in learner.history if "val_accuracy" in r]
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.plot([r["iteration"] for r in h], [100 * r["val_accuracy"] for r in h], marker="o")
    c = learner.config
    ax.set_xlabel("meta-iteration")
    ax.set_ylabel(f"meta-val accuracy, {c.n_way}-way {c.k_shot}-shot (%)")
    ax.set_title(f"{c.method} (kanji renders)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}.png")
    try:
        fig.savefig(tmp, dpi=100)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
        plt.close(fig)


def cmd_sample(args) -> None:
    from edgetvm import data

    fs = data.load_fewshot(args.data)
    split = "test"
    sx, sy, qx, qy = data.sample_task(fs, split, args.n_way, args.k_shot, args.q_query,
                                      np.random.default_rng(args.seed))
    _save_npz(Path(args.output), x=sx, y=sy)
    print(f"wrote {args.output}: {args.n_way}-way {args.k_shot}-shot support from {args.data}/{split}")
    if args.query:
        _save_npz(Path(args.query), x=qx, y=qy)
        print(f"wrote {args.query}: {len(qy)} query images")


def _save_npz(path: Path, **arrays) -> None:
    if not path.resolve().parent.is_dir():
        raise UserError(f"{path}: directory {path.resolve().parent} is missing; create it first")
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def read_task(path: str, n_way: int, image_shape=(1, 28, 28), what: str = "--support") -> tuple[np.ndarray, np.ndarray]:
    """x (n, 1, 28, 28) float32 in [0, 1] and y (n,) int64 from an .npz; a one-line UserError if they do not
    fit a model of `n_way` classes."""
    try:
        with np.load(path, allow_pickle=False) as z:
            if "x" not in z.files or "y" not in z.files:
                raise UserError(f"{what} {path} has arrays {', '.join(z.files) or 'none'}; it needs x (images) "
                                "and y (labels)")
            x, y = z["x"], z["y"]
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise UserError(f"{what} {path} cannot be read as .npz ({e}); write it with numpy.savez(path, x=..., y=...)") from None
    if x.ndim == 3:
        x = x[:, None]
    if x.ndim != 4 or tuple(x.shape[1:]) != tuple(image_shape):
        raise UserError(f"{what} {path}: x has shape {tuple(x.shape)}, the model takes (n, "
                        f"{', '.join(map(str, image_shape))}) images; resize the images to 28x28 grey")
    if y.ndim != 1 or len(y) != len(x):
        raise UserError(f"{what} {path}: y has shape {tuple(y.shape)} for {len(x)} images; give one label per image")
    if not np.issubdtype(y.dtype, np.integer):
        raise UserError(f"{what} {path}: y holds {y.dtype} values; labels are integers 0..{n_way - 1}")
    if len(y) == 0:
        raise UserError(f"{what} {path} holds no images; give at least one per class")
    bad = sorted(set(int(v) for v in y if v < 0 or v >= n_way))
    if bad:
        raise UserError(f"{what} {path}: labels {bad[:5]} are outside the model's {n_way} classes 0..{n_way - 1}; "
                        f"relabel the support set (or meta-train with --n-way {max(bad) + 1})")
    missing = sorted(set(range(n_way)) - set(int(v) for v in y))
    if missing and what == "--support":
        raise UserError(f"{what} {path} has no image of class {missing[0]} (the model has {n_way} classes); "
                        "give at least one image per class")
    if x.dtype == np.uint8:
        x = x.astype(np.float32) / 255.0
    x = x.astype(np.float32)
    if not np.isfinite(x).all():
        raise UserError(f"{what} {path}: x holds NaN or infinite values")
    return x, y.astype(np.int64)


def take_shots(x, y, shots: int | None, n_way: int):
    """The first `shots` images of each class, sorted by class; a one-line UserError if a class has fewer."""
    if shots is None:
        return x, y
    if shots < 1:
        raise UserError(f"--shots {shots}: give at least 1")
    counts = np.bincount(y, minlength=n_way)
    if counts.min() < shots:
        c = int(counts.argmin())
        raise UserError(f"--shots {shots}: class {c} has only {counts[c]} images in the support set; "
                        f"use --shots {counts.min()} or add images")
    idx = np.concatenate([np.flatnonzero(y == c)[:shots] for c in range(n_way)])
    return x[idx], y[idx]


def cmd_run(args) -> None:
    from edgetvm.adapt import meta
    from edgetvm.adapt import step as st

    learner = meta.load(args.artifact)
    c = learner.config
    model = learner.model
    if args.steps < 1:
        raise UserError(f"--steps {args.steps}: give at least 1")
    x, y = read_task(args.support, c.n_way, model.input_shape)
    x, y = take_shots(x, y, args.shots, c.n_way)
    mask = st.check_mask(model, learner.mask())
    q = read_task(args.query, c.n_way, model.input_shape, "--query") if args.query else None
    if args.output:
        out = Path(args.output).resolve()
        if not out.parent.is_dir():
            raise UserError(f"-o {args.output}: directory {out.parent} is missing; create it first")
    from edgetvm.targets import load_board

    board = load_board(args.board)
    t0 = time.perf_counter()
    ta = None
    if args.rpc:
        params, losses, seconds, ta = _run_remote(learner, mask, x, y, args.steps, board, args.rpc, not args.lean)
    else:
        if not board.runs_on_host():
            raise UserError(f"board {args.board} runs its step over RPC: add --rpc HOST:PORT "
                            "(`edgetvm board emulate` serves an emulated aarch64 board)")
        if learner.attention is not None:   # statistics step, attention, then the task's masked step
            adapter = meta.TaskAdapter(learner, len(x), conv_as_matmul=not args.lean)
            ta = adapter.plan(x, y)
            step = adapter.step_for(ta["mask"])
            t1 = time.perf_counter()
            params, losses = step.adapt(x, y, learner.params, args.steps, rates=ta["rates"])
        else:
            step = st.MaskedStep(model, len(x), mask, lr=learner.rates, conv_as_matmul=not args.lean)
            t1 = time.perf_counter()
            params, losses = step.adapt(x, y, learner.params, args.steps)
        seconds = time.perf_counter() - t1
    if ta is not None:
        mask = ta["mask"]
        print("task attention: layer scores " + ", ".join(f"{l} {s:.2f}" for l, s in ta["scores"]["layer"].items())
              + "; updates " + ", ".join(dict.fromkeys(n.split(".")[0] for n in mask))
              + f" (statistics step on {c.n_way} images, one a class)")
    updated = sum(int(np.prod(learner.params[n].shape)) // st.mask_len(learner.params[n].shape) * int(m.sum())
                  for n, m in mask.items())
    total = sum(int(p.size) for p in learner.params.values())
    where = f"on {args.board} via {args.rpc}" if args.rpc else "here"
    print(f"{c.method}: {args.steps} steps on {len(x)} images {where}: loss "
          + " -> ".join(f"{v:.3f}" for v in (losses[0], losses[-1]))
          + f"; updated {updated:,} of {total:,} weights ({100 * updated / total:.1f}%), "
          f"{1e3 * seconds / args.steps:.1f} ms a step ({time.perf_counter() - t0:.1f} s with compiling)")
    if q is not None:
        from edgetvm.adapt.meta import accuracy, forward_fn

        qx, qy = q
        fwd = forward_fn(model, len(qx))
        print(f"query accuracy: {100 * accuracy(fwd(qx, learner.params), qy):.1f}% before, "
              f"{100 * accuracy(fwd(qx, params), qy):.1f}% after ({len(qy)} images)")
    if args.output:
        _save_npz(Path(args.output), **params)
        print(f"wrote {args.output}")


def _run_remote(learner, mask, x, y, steps: int, board, rpc_addr: str, fast: bool):
    """The masked step cross-compiled for `board`, run over TVM RPC; slices written back here between steps.
    With the task-conditioned attention, the statistics step (the union's gradients on one image a class) runs
    on the board first, the attention here, and the task's masked step is compiled with its rates."""
    import tempfile

    import tvm
    from tvm import relax

    from edgetvm import train
    from edgetvm.adapt import meta
    from edgetvm.adapt import step as st
    from edgetvm.passes import pipeline
    from edgetvm.runtime.session import connect
    from edgetvm.runtime.tensors import to_numpy

    model = learner.model
    remote = connect(rpc_addr, session_timeout=600)
    dev = remote.cpu()
    size, item = remote.get_function("ffi.ArraySize"), remote.get_function("ffi.ArrayGetItem")

    def load(mod, name):
        ex = pipeline.build(mod, board.target())
        with tempfile.TemporaryDirectory() as d:
            lib = Path(d) / f"{name}.so"
            pipeline.export(ex, str(lib), board.cross_compiler)
            remote.upload(str(lib))
        return relax.VirtualMachine(remote.load_module(f"{name}.so"), dev)["adapt_step"]

    def outputs(out):
        if not isinstance(out, (list, tuple)):   # a tuple left on the board: take it apart there
            out = [item(out, i) for i in range(size(out))]
        return out

    names = list(train.param_shapes(model))
    params = dict(learner.params)
    t = {n: tvm.runtime.tensor(params[n], dev) for n in names}
    ta = None
    if learner.attention is not None:
        idx = meta.stats_chunk(y, learner.config.n_way)
        stats = load(st.step_module(model, len(idx), mask, 0.0, output="grad", conv_as_matmul=fast), "adapt_stats")
        out = outputs(stats(tvm.runtime.tensor(x[idx], dev), tvm.runtime.tensor(y[idx], dev),
                            *[t[n] for n in names]))
        ta = learner.for_task({n: to_numpy(out[i + 1]) for i, n in enumerate(n for n in names if n in mask)})
        mask, rates = ta["mask"], ta["rates"]
    else:
        rates = learner.rates
    lr = {n: rates[n][mask[n]] for n in mask}
    f = load(st.step_module(model, len(x), mask, lr, conv_as_matmul=fast), "adapt_step")
    xs, ys = tvm.runtime.tensor(x, dev), tvm.runtime.tensor(y, dev)
    updated = [n for n in names if n in mask]
    losses, seconds = [], 0.0
    for _ in range(steps):
        t1 = time.perf_counter()
        out = outputs(f(xs, ys, *[t[n] for n in names]))
        seconds += time.perf_counter() - t1
        losses.append(float(to_numpy(out[0])))
        for i, n in enumerate(updated):
            w = np.array(params[n], copy=True)
            idx = np.flatnonzero(mask[n])
            if w.ndim == 4:
                w[:, idx] = to_numpy(out[i + 1])
            else:
                w[idx] = to_numpy(out[i + 1])
            params[n] = w
            t[n] = tvm.runtime.tensor(w, dev)
    return params, losses, seconds, ta
