"""`edgetvm quantize METHOD MODEL --data D --bits B -o OUT`: train, quantise, and write an ONNX file that
carries its multi-bit weights (OUT.onnx) or compile it for a board (OUT a directory).

    edgetvm quantize alq lenet5 --data mnist --bits 0.4 -o lenet5-q.onnx
    edgetvm compile lenet5-q.onnx --target rpi4 -o lenet5-rpi4      # bit-packed kernels, packed weights
    edgetvm quantize alq vgg_small --data fashion-mnist --bits 0.66 --target host -o vgg-host/

The float model is trained first (momentum SGD, checkpointed per epoch in --workdir, reused by later
runs), then quantised: `alq` (edgetvm/quant/alq.py), or a baseline trained with the straight-through
estimator, `bwn` (1 bit) or `uniform2` (2 bits). The ONNX file's float weights are exactly what the
multi-bit weights decode to, so onnxruntime runs the quantised network too; `edgetvm compile` finds the
multi-bit form in the file's metadata and computes with the bits.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

from edgetvm.errors import UserError

METHODS = ("alq", "bwn", "uniform2")


def models():
    from edgetvm import train

    return {"lenet5": train.lenet5, "vgg_small": train.vgg_small}


def add_quantize_parser(sub) -> None:
    s = sub.add_parser("quantize", help="train a network into multi-bit weights (ALQ, BWN, uniform 2-bit)")
    s.add_argument("method", choices=METHODS, help="alq: adaptive loss-aware quantisation (any average "
                   "bitwidth, below 1 too); bwn: 1 bit; uniform2: 2 bits")
    s.add_argument("model", help=f"the network to train: {', '.join(models())}")
    s.add_argument("--data", default="mnist", help="mnist, fashion-mnist or digits (default mnist)")
    s.add_argument("--bits", type=float, default=0.4, help="alq: target average bits per weight, in (0, 8] "
                   "(default 0.4)")
    s.add_argument("-o", "--output", required=True, help="FILE.onnx, or a directory: the compiled artifact")
    s.add_argument("--target", "-t", default="host", help="board to compile for when -o is a directory")
    s.add_argument("--fp32-epochs", type=int, default=10, help="epochs of float training first (default 10)")
    s.add_argument("--rounds", type=int, default=4, help="alq: pruning rounds (default 4)")
    s.add_argument("--basis-epochs", type=int, default=2, help="alq: basis epochs per round (default 2)")
    s.add_argument("--post-epochs", type=int, default=4, help="alq: post-training epochs (default 4)")
    s.add_argument("--ste-epochs", type=int, default=8, help="bwn/uniform2: epochs (default 8)")
    s.add_argument("--group", type=int, default=64, help="weights per group (a multiple of 32; default 64)")
    s.add_argument("--max-bases", type=int, default=4, help="alq: bases per group at the start (default 4)")
    s.add_argument("--train-limit", type=int, help="use only the first N training images (faster)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--workdir", help="checkpoints (default $EDGETVM_CACHE/quantize); a killed run resumes")
    s.add_argument("--quiet", action="store_true", help="no progress lines")
    s.set_defaults(func=cmd_quantize)


def _workdir(arg) -> Path:
    from edgetvm.runtime.leftovers import cache_root

    return Path(arg) if arg else cache_root() / "quantize"


def limited(ds, n: int | None):
    from edgetvm import data

    if n is None:
        return ds
    if n < 64:
        raise UserError(f"--train-limit {n} is smaller than one batch (64); pass at least 64")
    return dataclasses.replace(ds, train=data.Split(ds.train.x[:n], ds.train.y[:n]))


@dataclasses.dataclass
class Result:
    """A quantised network: its float parameters (the decoded weights), packed weights and figures."""
    method: str
    params: dict
    packed: dict
    bits: float
    test_accuracy: float
    history: list
    state: object = None        # alq: the final alq.State (a later, lower target can start from it)


def pretrained(model, ds, epochs: int, seed: int, workdir: Path, progress: bool = True):
    from edgetvm import train

    ck = workdir / f"{model.name}-{ds.name}-n{len(ds.train)}-s{seed}-fp32.npz"
    return train.fit(model, ds, epochs, lr=0.02, seed=seed, checkpoint=ck, progress=progress)


def quantise(method: str, model, ds, bits: float, fp32, seed: int = 0, workdir: Path | None = None,
             schedule=None, ste_epochs: int = 8, group: int = 64, progress: bool = True, start=None) -> Result:
    """Quantise the pretrained `fp32` trainer's parameters by `method`; evaluates the decoded network."""
    from edgetvm import train
    from edgetvm.quant import alq, baselines, multibit

    params = fp32.params
    if method == "alq":
        schedule = schedule or alq.Schedule(group=group)
        ck = None if workdir is None else \
            workdir / f"{model.name}-{ds.name}-n{len(ds.train)}-s{seed}-alq-{bits:g}-g{schedule.group}.npz"
        if ck is not None and start is not None:
            ck = ck.with_name(ck.stem + f"-from{alq.average_bits(start.layers):.4f}.npz")
        state = alq.quantize(model, params, ds, bits, schedule, seed=seed, checkpoint=ck, progress=progress,
                             start=start)
        layers = {n: lay.mb for n, lay in state.layers.items()}
        biases = {n: b.value for n, b in state.biases.items()}
        history = state.history
    elif method in baselines.KINDS:
        layers, biases = baselines.train_ste(method, model, params, ds, ste_epochs, group=group, seed=seed,
                                             progress=progress)
        history = []
    else:
        raise UserError(f"unknown method {method!r}; use one of {', '.join(METHODS)}")
    packed = {n: multibit.pack(mb) for n, mb in layers.items()}
    decoded = {n: multibit.unpack(p) for n, p in packed.items()} | biases
    trainer = train.Trainer(model, fp32.batch, seed=seed)
    trainer.set_params(decoded)
    acc = train.evaluate(trainer, ds.test)["accuracy"]
    n_bits = sum(mb.bits() for mb in layers.values())
    n_weights = sum(mb.n_weights() for mb in layers.values())
    return Result(method, decoded, packed, n_bits / n_weights, acc, history,
                  state if method == "alq" else None)


def write_onnx(model, result: Result, path: Path) -> None:
    """The quantised network as ONNX (decoded float weights + the packed form in its metadata), atomically."""
    import onnx

    from edgetvm import train
    from edgetvm.quant import multibit

    proto = train.to_onnx(model, result.params, batch=1, metadata={
        multibit.METADATA_KEY: multibit.to_metadata(result.packed),
        "edgetvm.quantize": json.dumps({"method": result.method, "average_bits": result.bits,
                                        "test_accuracy": result.test_accuracy})})
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        onnx.save(proto, tmp)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def cmd_quantize(args) -> None:
    from edgetvm import data
    from edgetvm.quant import alq, multibit

    table = models()
    if args.model not in table:
        raise UserError(f"unknown model {args.model!r}; quantize trains one of {', '.join(table)}")
    if args.method == "alq" and not 0 < args.bits <= 8:
        raise UserError(f"--bits {args.bits:g} is outside (0, 8]; pass the target average bits per weight, "
                        "e.g. --bits 0.4")
    multibit.check_group(args.group)
    out = Path(args.output)
    board = None
    if out.suffix != ".onnx":
        from edgetvm.targets import load_board

        board = load_board(args.target)  # a bad board name fails now, not after the training
    ds = limited(data.load(args.data, seed=args.seed), args.train_limit)
    model = table[args.model](n_classes=ds.n_classes, input_shape=ds.image_shape)
    work = _workdir(args.workdir)
    progress = not args.quiet
    fp32 = pretrained(model, ds, args.fp32_epochs, args.seed, work, progress)
    schedule = alq.Schedule(rounds=args.rounds, basis_epochs=args.basis_epochs, post_epochs=args.post_epochs,
                            group=args.group, max_bases=args.max_bases)
    res = quantise(args.method, model, ds, args.bits, fp32, args.seed, work, schedule, args.ste_epochs,
                   args.group, progress)
    from edgetvm import train

    fp32_acc = train.evaluate(fp32, ds.test)["accuracy"]
    stored = sum(multibit.packed_bytes(p) for p in res.packed.values())
    floats = sum(int(np.prod(p["shape"])) * 4 for p in res.packed.values())
    print(f"{args.model} on {ds.name}: {args.method} {res.bits:.3f} bits per weight, test accuracy "
          f"{100 * res.test_accuracy:.2f}% (float32 {100 * fp32_acc:.2f}%), quantised weights "
          f"{stored:,} bytes packed vs {floats:,} as float32 ({floats / stored:.1f}x smaller)")
    if board is None:
        write_onnx(model, res, out)
        print(f"wrote {out}; compile it with: edgetvm compile {out} --target host -o OUT")
        return
    from edgetvm.compiler import compile_model

    with tempfile.TemporaryDirectory() as tmp:
        q = Path(tmp) / f"{args.model}-{args.method}.onnx"
        write_onnx(model, res, q)
        result = compile_model(q, board, out, log=lambda m: print(m, file=sys.stderr))
    print(f"compiled for {board.name} -> {out} ({result.manifest['weight_bytes']:,} bytes of weights)")
