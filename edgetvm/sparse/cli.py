"""`edgetvm dress MODEL --data D --levels 0,0.5,0.7,0.9 -o OUT`: train one backbone whose nested row-sparse
subnets share its weights, and write an ONNX file that carries them (OUT.onnx) or compile it (OUT a dir).

    edgetvm dress lenet5 --data mnist --levels 0,0.5,0.7,0.9 -o lenet5-dress.onnx
    edgetvm compile lenet5-dress.onnx -o lenet5-dress        # one library, one weight store, K subnets
    edgetvm run lenet5-dress --budget-trace trace.txt        # per inference, the subnet that fits

The dense network is trained first (checkpointed in --workdir and reused, as `edgetvm quantize` does),
then all subnets jointly (edgetvm/sparse/train.py). The ONNX file's weights are the densest subnet's
(onnxruntime runs that one); its metadata holds the levels, each subnet's test accuracy and every sparse
weight's row ranking, from which `edgetvm compile` builds the rank-major store and the sparse kernels.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

from edgetvm.errors import UserError


def parse_levels(text: str) -> tuple[float, ...]:
    from edgetvm.sparse import masks

    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise UserError(f"--levels {text}: not a comma-separated list of numbers; pass e.g. 0,0.5,0.7,0.9") from None
    return masks.check_levels(values)


def parse_weights(text: str | None):
    if text is None:
        return None
    try:
        return [float(v) for v in text.split(",")]
    except ValueError:
        raise UserError(f"--loss-weights {text}: not a comma-separated list of numbers; pass e.g. 1,1,1,1") from None


def add_dress_parser(sub) -> None:
    s = sub.add_parser("dress", help="train nested row-sparse subnets over one backbone (DRESS)")
    s.add_argument("model", help="the network to train: lenet5, vgg_small")
    s.add_argument("--data", default="mnist", help="mnist, fashion-mnist or digits (default mnist)")
    s.add_argument("--levels", default="0,0.5,0.7,0.9",
                   help="sparsity of each subnet, increasing, each in [0, 1) (default 0,0.5,0.7,0.9)")
    s.add_argument("--loss-weights", help="weight of each subnet's loss (default equal; normalised to sum 1)")
    s.add_argument("-o", "--output", required=True, help="FILE.onnx, or a directory: the compiled artifact")
    s.add_argument("--target", "-t", default="host", help="board to compile for when -o is a directory")
    s.add_argument("--fp32-epochs", type=int, default=10, help="epochs of dense training first (default 10)")
    s.add_argument("--epochs", type=int, default=5, help="epochs of joint training (default 5)")
    s.add_argument("--lr", type=float, default=0.01, help="joint training's learning rate (default 0.01)")
    s.add_argument("--train-limit", type=int, help="use only the first N training images (faster)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--workdir", help="checkpoints (default $EDGETVM_CACHE/dress)")
    s.add_argument("--quiet", action="store_true", help="no progress lines")
    s.set_defaults(func=cmd_dress)


def write_onnx(model, subnets, path: Path) -> None:
    """The densest subnet's weights as ONNX, the subnets in its metadata; written atomically."""
    import onnx

    from edgetvm import train
    from edgetvm.sparse import masks

    proto = train.to_onnx(model, subnets.params, batch=1, metadata={
        masks.METADATA_KEY: masks.to_metadata(subnets.levels, subnets.orders, subnets.accuracy)})
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        onnx.save(proto, tmp)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def cmd_dress(args) -> None:
    from edgetvm import data, train
    from edgetvm.quant.cli import limited, models, pretrained
    from edgetvm.runtime.leftovers import cache_root
    from edgetvm.sparse import train as sparse_train

    table = models()
    if args.model not in table:
        raise UserError(f"unknown model {args.model!r}; dress trains one of {', '.join(table)}")
    levels = parse_levels(args.levels)
    loss_weights = sparse_train.check_loss_weights(parse_weights(args.loss_weights), len(levels))
    if args.epochs < 0 or args.fp32_epochs < 0:
        raise UserError("--epochs and --fp32-epochs must not be negative")
    out = Path(args.output)
    board = None
    if out.suffix != ".onnx":
        from edgetvm.targets import load_board

        board = load_board(args.target)  # a bad board name fails now, not after the training
    ds = limited(data.load(args.data, seed=args.seed), args.train_limit)
    model = table[args.model](n_classes=ds.n_classes, input_shape=ds.image_shape)
    work = Path(args.workdir) if args.workdir else cache_root() / "dress"
    progress = not args.quiet
    fp32 = pretrained(model, ds, args.fp32_epochs, args.seed, work, progress)
    sub = sparse_train.joint_train(model, ds, levels, fp32.params, args.epochs, loss_weights, lr=args.lr,
                                   seed=args.seed, progress=progress)
    fp32_acc = train.evaluate(fp32, ds.test)["accuracy"]
    print(f"{args.model} on {ds.name}: dense {100 * fp32_acc:.2f}%; subnets " + ", ".join(
        f"{s:.0%} sparse {100 * a:.2f}%" for s, a in zip(levels, sub.accuracy)))
    if board is None:
        write_onnx(model, sub, out)
        print(f"wrote {out}; compile it with: edgetvm compile {out} --target host -o OUT")
        return
    from edgetvm.compiler import compile_model

    with tempfile.TemporaryDirectory() as tmp:
        q = Path(tmp) / f"{args.model}-dress.onnx"
        write_onnx(model, sub, q)
        result = compile_model(q, board, out, log=lambda m: print(m, file=sys.stderr))
    d = result.manifest["dress"]
    print(f"compiled for {board.name} -> {out}: {len(levels)} subnets over one store of "
          f"{d['store_bytes']:,} bytes (+{d['dense_bytes']:,} dense)")
