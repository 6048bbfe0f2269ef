"""Pipeline training with tensors device to device against through the coordinator, A/B in one process
(docs/pipetrain.md).

    python bench/pipetrain_direct.py [--bounds 0,15,16,19] [--replicas 2,1,1] [--schedule 1f1b]
                                     [--width 1.0] [--batch 128] [--micro-batches 4] [--rounds 6]

The same stages twice on emulated devices (sbc-a53 over ethernet-100mbit, one set each, alive together):
once connected device to device (EmulatedStages' default), once with every activation, gradient and
gradient sum through this process (direct=False). Rounds of 3 steps alternate between them (the order
flips every round) on the same batches from the same weights. Printed: the median step time of each,
their ratio, the bytes a step moved over the coordinator's connections, and the largest difference of
their weights at the end (0: the transfers change no float).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bounds", default="0,15,16,19")
    ap.add_argument("--replicas", default="2,1,1", help="devices per stage")
    ap.add_argument("--schedule", default="1f1b")
    ap.add_argument("--devices", default="sbc-a53")
    ap.add_argument("--link", default="ethernet-100mbit")
    ap.add_argument("--width", type=float, default=1.0)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--micro-batches", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=6)
    args = ap.parse_args(argv)

    import numpy as np

    from edgetvm import train
    from edgetvm.pipetrain import schedule as sch
    from edgetvm.pipetrain.emulate import EmulatedStages, parse_devices
    from edgetvm.pipetrain.stages import StagePlan, alexnet, check_bounds

    model = alexnet(width=args.width)
    bounds = check_bounds(model, tuple(int(b) for b in args.bounds.split(",")))
    sizes = [int(r) for r in args.replicas.split(",")]
    mb = sch.check_micro_batches(args.batch, args.micro_batches, sizes)
    devices = parse_devices(f"{2 * sum(sizes)}x{args.devices}@{args.link}")
    plan = StagePlan(model, bounds, mb, train.OptimizerConfig("momentum", 0.01))
    params = train.init_params(model, 0)
    rng = np.random.default_rng(0)
    batches = [(rng.random((args.batch, 1, 28, 28)).astype("float32"), rng.integers(0, 10, args.batch))
               for _ in range(3)]

    def groups(first):
        it = iter(devices[first:])
        return [[next(it) for _ in range(k)] for k in sizes]

    with EmulatedStages(plan, groups(0), params) as a, \
            EmulatedStages(plan, groups(sum(sizes)), params, direct=False) as b:
        runs = {"device to device": (a, sch.Controller(a.replicas, args.schedule, args.micro_batches, a.names)),
                "via coordinator": (b, sch.Controller(b.replicas, args.schedule, args.micro_batches, b.names))}
        for _, c in runs.values():
            c.step(*batches[0])   # the sessions' first calls
        times = {k: [] for k in runs}
        moved = {k: [] for k in runs}
        for r in range(args.rounds):
            for k, (es, c) in (list(runs.items()) if r % 2 == 0 else list(reversed(runs.items()))):
                b0 = es.coordinator_bytes()
                times[k] += [c.step(x, y)["seconds"] for x, y in batches]
                moved[k].append((es.coordinator_bytes() - b0) / len(batches))
        weights = {k: sch.PipelineTrainer(plan, c, args.batch, 0).params for k, (_, c) in runs.items()}
        for _, c in runs.values():
            c.close()
    print(f"{model.name} (width {args.width}), stages {bounds} on {sizes} {args.devices} over {args.link}, "
          f"{args.schedule}, {args.micro_batches} micro-batches of {mb}:")
    for k in runs:
        print(f"  {k:17s} median step {statistics.median(times[k]):.3f} s, over the coordinator "
              f"{statistics.median(moved[k]) / 1e6:.2f} MB/step ({len(times[k])} steps)")
    ratio = statistics.median(times["device to device"]) / statistics.median(times["via coordinator"])
    diff = max(float(np.abs(weights["device to device"][n] - weights["via coordinator"][n]).max())
               for n in weights["via coordinator"])
    print(f"  ratio device to device / via coordinator: {ratio:.3f}; largest weight difference {diff:g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
