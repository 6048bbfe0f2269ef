"""Full-precision baselines trained with TVM's gradients: test accuracy and time.

    TVM_NUM_THREADS=1 python bench/train_fp32.py --model lenet5 --data mnist --epochs 10
    TVM_NUM_THREADS=1 python bench/train_fp32.py --model vgg_small --data fashion-mnist --epochs 1

Prints the compile time, one line per epoch (edgetvm.train.fit), then the test loss and accuracy and
the seconds per epoch. With --checkpoint the run resumes from, and leaves, a checkpoint there: the
pretrained parameters other features start from (train.read_checkpoint(path)["params"]).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from edgetvm import data, train  # noqa: E402

MODELS = {"lenet5": train.lenet5, "vgg_small": train.vgg_small}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=sorted(MODELS), default="lenet5")
    ap.add_argument("--data", choices=data.NAMES, default="mnist")
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=0.02)
    ap.add_argument("--optimizer", choices=("sgd", "momentum", "adam"), default="momentum")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--checkpoint", type=Path)
    args = ap.parse_args()

    ds = data.load(args.data, seed=args.seed)
    model = MODELS[args.model](n_classes=ds.n_classes, input_shape=ds.image_shape)
    t = time.perf_counter()
    trainer = train.Trainer(model, args.batch, args.optimizer, args.lr, seed=args.seed)
    compile_s = time.perf_counter() - t
    print(f"{args.model} on {args.data}: {len(ds.train)} train / {len(ds.val)} val / {len(ds.test)} test, "
          f"{sum(v.size for v in trainer.params.values())} parameters, step compiled in {compile_s:.1f} s, "
          f"TVM_NUM_THREADS={os.environ.get('TVM_NUM_THREADS', 'unset')}", flush=True)
    t = time.perf_counter()
    train.fit(trainer, ds, args.epochs, checkpoint=args.checkpoint)
    total_s = time.perf_counter() - t
    test = train.evaluate(trainer, ds.test)
    epoch_s = [h["seconds"] for h in trainer.history]
    print(json.dumps({"model": args.model, "data": args.data, "epochs": args.epochs, "batch": args.batch,
                      "lr": args.lr, "optimizer": args.optimizer, "seed": args.seed,
                      "test_accuracy": round(test["accuracy"], 4), "test_loss": round(test["loss"], 4),
                      "val_accuracy": round(trainer.history[-1]["val_accuracy"], 4),
                      "seconds_per_epoch": round(sum(epoch_s) / len(epoch_s), 1),
                      "seconds_total": round(total_s, 1), "compile_seconds": round(compile_s, 1)}))


if __name__ == "__main__":
    main()
