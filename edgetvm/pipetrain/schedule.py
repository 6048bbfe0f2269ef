"""Schedules (GPipe, 1F1B), the controller that runs them over stages, and the training loop around it.

A step splits the batch into M micro-batches. GPipe: every stage runs all M forwards, then all M
backwards (last micro-batch first); 1F1B (PipeDream-flush): stage s of S runs min(S-s-1, M) forwards
to fill the pipeline, then alternates one forward and one backward, then drains the remaining
backwards. Either way the gradients of the M micro-batches are accumulated (each micro-batch's loss
gradient is 1/M) and each stage takes one optimizer step at the end: the same update as the unsplit
step on the whole batch. A stage may have R data-parallel replicas: micro-batch m goes to replica
m mod R, and the replicas' gradients are summed (the batch mean) before every replica takes the same step.

The controller runs one thread per stage replica (a TVM RPC session's calls release the GIL), which
executes its schedule's operations in order, waiting for activations from the stage before and
gradients from the stage after (the tensors themselves, or, for stages on connected devices, word that
they are on their way device to device); it measures each replica's wall time in calls (busy on the stage's
side, measured there) and idle time (waiting for its inputs: fill, drain and bubbles).
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import numpy as np

from edgetvm import data as data_mod
from edgetvm import train
from edgetvm.errors import UserError


def gpipe(n_stages: int, m: int, s: int) -> list[tuple[str, int]]:
    return [("F", i) for i in range(m)] + [("B", i) for i in reversed(range(m))]


def one_f_one_b(n_stages: int, m: int, s: int) -> list[tuple[str, int]]:
    w = min(n_stages - s - 1, m)
    ops = [("F", i) for i in range(w)]
    for i in range(m - w):
        ops += [("F", w + i), ("B", i)]
    return ops + [("B", i) for i in range(m - w, m)]


SCHEDULES = {"gpipe": gpipe, "1f1b": one_f_one_b}

# The dtype replicas exchange their gradients in. float16 halves the bytes of the gradient sum, which
# costs a data-parallel stage on a device with a fraction of a CPU more than its kernels (TVM RPC copies
# a bytes argument at ~13 ns a byte on each end); the sum is still taken in float32 (DDP's fp16
# compression hook, without its division: a micro-batch's gradients are already 1/M of the batch's).
REDUCE_DTYPES = ("float32", "float16")


def wire_dtype(dtype: str) -> np.dtype:
    if dtype not in REDUCE_DTYPES:
        raise UserError(f"replicas exchange gradients in {' or '.join(REDUCE_DTYPES)}, not '{dtype}'; "
                        "pass one of those")
    return np.dtype(dtype)


def sum_gradients(parts, dtype: str = "float32") -> np.ndarray:
    """The replicas' gradients (one array each) summed in replica order in float32; with dtype float16 each
    part, and then the sum, rounded to it first, as they cross the wire (every replica steps on the same
    rounded sum)."""
    wire = wire_dtype(dtype)
    out = None
    for part in parts:
        part = part.astype(wire, copy=False)
        out = part.astype(np.float32) if out is None else np.add(out, part, out=out)
    return out if wire == np.float32 else out.astype(wire).astype(np.float32)


def schedule_ops(kind: str, n_stages: int, m: int, s: int, replica: int = 0, replicas: int = 1):
    if kind not in SCHEDULES:
        raise UserError(f"unknown schedule '{kind}'; use gpipe or 1f1b")
    return [(op, mb) for op, mb in SCHEDULES[kind](n_stages, m, s) if mb % replicas == replica]


def check_micro_batches(batch: int, m: int, replicas=(1,)) -> int:
    if m < 1 or batch % m:
        raise UserError(f"--micro-batches {m} does not divide the batch of {batch}; use a divisor of {batch}")
    for r in replicas:
        if m % r:
            raise UserError(f"a stage with {r} replicas needs the micro-batch count ({m}) to be a multiple of {r}")
    return batch // m


class StageFailed(RuntimeError):
    pass


class _Mailbox:
    def __init__(self):
        self.items: dict = {}
        self.cond = threading.Condition()
        self.error: BaseException | None = None

    def put(self, key, value) -> None:
        with self.cond:
            self.items[key] = value
            self.cond.notify_all()

    def fail(self, e: BaseException) -> None:
        with self.cond:
            if self.error is None:
                self.error = e
            self.cond.notify_all()

    def get(self, key):
        with self.cond:
            while key not in self.items:
                if self.error is not None:
                    raise StageFailed("another stage failed")
                self.cond.wait(0.5)
            return self.items.pop(key)


class Controller:
    """Runs a schedule over `replicas[s]` (the replicas of stage s; objects with Stage's methods)."""

    def __init__(self, replicas: list[list], schedule: str, micro_batches: int, names: list[list[str]] | None = None,
                 reduce_dtype: str = "float32"):
        self.replicas, self.kind, self.m = replicas, schedule, int(micro_batches)
        self.reduce_dtype = wire_dtype(reduce_dtype).name   # refused here, not in the first step
        self.S = len(replicas)
        self.names = names or [[f"stage {s}" + (f" replica {r}" if len(reps) > 1 else "")
                                for r in range(len(reps))] for s, reps in enumerate(replicas)]
        check_micro_batches(self.m, self.m, [len(r) for r in replicas])
        self.pool = ThreadPoolExecutor(sum(len(r) for r in replicas))
        # Stages on devices connected to their neighbours and mates (device.RemoteStage.connect_neighbours)
        # hand activations, gradients and gradient sums to each other; the mailbox then carries only "sent"
        # (None).
        self.direct = all(getattr(st, "sends_direct", False) for reps in replicas for st in reps)
        self._busy = None    # each replica's busy seconds at the end of the last step (None: ask)
        self.totals = {(s, r): {"wall_s": 0.0, "call_s": 0.0, "busy_s": 0.0, "idle_s": 0.0}
                       for s in range(self.S) for r in range(len(replicas[s]))}

    def _run(self, s: int, r: int, xs, ys, box: _Mailbox, t0: float) -> dict:
        st = self.replicas[s][r]
        last = s == self.S - 1
        call = 0.0
        try:
            for op, mb in schedule_ops(self.kind, self.S, self.m, s, r, len(self.replicas[s])):
                if op == "F":
                    a = xs[mb] if s == 0 else box.get(("a", s, mb))
                    c0 = time.perf_counter()
                    y = st.forward(mb, a, **self._to(s + 1, mb))
                    call += time.perf_counter() - c0
                    if not last:
                        box.put(("a", s + 1, mb), y)
                else:
                    if last:
                        c0 = time.perf_counter()
                        ga = st.backward_last(mb, ys[mb], 1.0 / self.m, **self._to(s - 1, mb))
                    else:
                        g = box.get(("g", s, mb))
                        c0 = time.perf_counter()
                        ga = st.backward(mb, g, **self._to(s - 1, mb))
                    call += time.perf_counter() - c0
                    if s > 0:
                        box.put(("g", s - 1, mb), ga)
            if self.direct:
                # this stage's weights are done with for the step: its replicas sum their gradients and
                # step while the stages before it still run their backwards
                self._step(s, r, len(self.replicas[s]))
        except StageFailed as err:
            box.fail(err)
            raise
        except BaseException as e:  # noqa: BLE001 - named and passed on
            err = StageFailed(f"{self.names[s][r]} failed: {_short(e)}")
            first = box.error is None
            box.fail(err)
            if first:
                self._abort(str(err))
            raise err from None
        return {"wall_s": time.perf_counter() - t0, "call_s": call}

    def _to(self, s: int, mb: int) -> dict:
        """The replica of stage s that micro-batch mb's tensor goes to, when the stages send directly."""
        if not self.direct or s < 0 or s >= self.S:
            return {}
        return {"to": mb % len(self.replicas[s])}

    def _abort(self, message: str) -> None:
        """Wakes every device call that waits for a tensor from a neighbour: it will not come."""
        for reps in self.replicas:
            for st in reps:
                if hasattr(st, "abort"):
                    try:
                        st.abort(message)
                    except BaseException:  # noqa: BLE001 - a dead device has nothing to wake
                        pass

    def step(self, x: np.ndarray, y: np.ndarray) -> dict:
        """One training step on the batch (x, y); returns its loss, wall time and per-replica times."""
        mbs = len(x) // self.m
        xs = [x[i * mbs:(i + 1) * mbs] for i in range(self.m)]
        ys = [y[i * mbs:(i + 1) * mbs] for i in range(self.m)]
        box = _Mailbox()
        keys = [(s, r) for s, reps in enumerate(self.replicas) for r in range(len(reps))]
        if self._busy is None:
            self._busy = {k: self._call(*k, "stats")["busy_s"] for k in keys}
        before, self._busy = self._busy, None
        t0 = time.perf_counter()
        futures = {(s, r): self.pool.submit(self._run, s, r, xs, ys, box, t0)
                   for s, reps in enumerate(self.replicas) for r in range(len(reps))}
        runs = {}
        for key, f in futures.items():
            try:
                runs[key] = f.result()
            except StageFailed:
                pass
        if box.error is not None:
            raise box.error
        # gradients of a stage's replicas summed (each micro-batch's already weighs 1/M), then one step each;
        # stages on connected devices sum among themselves (device.reduce) and stepped in _run
        for s, reps in enumerate(self.replicas):
            if len(reps) > 1 and not self.direct:
                gs = [self._call(s, r, "get_grads") for r in range(len(reps))]
                total = [sum_gradients(parts, self.reduce_dtype) for parts in zip(*gs)]
                for r in range(len(reps)):
                    self._call(s, r, "set_grads", total)
        if not self.direct:
            steps = [self.pool.submit(self._step, s, r) for s, reps in enumerate(self.replicas) for r in range(len(reps))]
            for f in steps:
                f.result()
        wall = time.perf_counter() - t0
        # every replica's counters at once (a call each, on devices with a fraction of a CPU); they are
        # also the next step's starting counters
        after = dict(zip(keys, self.pool.map(self._counters, keys)))
        self._busy = {k: busy for k, (_, busy) in after.items()}
        losses = {i: v for got, _ in after.values() for i, v in got.items()}
        out = {"loss": float(np.mean([losses[i] for i in range(self.m)])), "seconds": wall, "stages": {}}
        for (s, r), run in runs.items():
            busy = self._busy[(s, r)] - before[(s, r)]
            rec = {"busy_s": busy, "call_s": run["call_s"], "idle_s": max(0.0, wall - busy)}
            out["stages"][(s, r)] = rec
            for k in ("busy_s", "call_s", "idle_s"):
                self.totals[(s, r)][k] += rec[k]
            self.totals[(s, r)]["wall_s"] += wall
        return out

    def _counters(self, key) -> tuple[dict, float]:
        """(the losses it holds if it is a last-stage replica, its busy seconds so far)."""
        if key[0] == self.S - 1:
            return self._call(*key, "take_losses"), self._call(*key, "stats", False)["busy_s"]
        return {}, self._call(*key, "stats")["busy_s"]

    def _call(self, s: int, r: int, method: str, *args):
        try:
            return getattr(self.replicas[s][r], method)(*args)
        except BaseException as e:  # noqa: BLE001
            raise StageFailed(f"{self.names[s][r]} failed: {_short(e)}") from None

    def _step(self, s: int, r: int, reduce: int = 1) -> None:
        try:
            if reduce > 1:
                self.replicas[s][r].reduce(r, reduce, self.reduce_dtype)    # and steps
            else:
                self.replicas[s][r].step()
        except BaseException as e:  # noqa: BLE001
            msg = f"{self.names[s][r]} failed in its optimizer step: {_short(e)}"
            if reduce > 1:
                self._abort(msg)   # its mates wait for its gradients
            raise StageFailed(msg) from None

    def logits(self, x: np.ndarray, micro_batch: int) -> np.ndarray:
        """Forward passes only (replica 0 of each stage), micro-batch by micro-batch, the last chunk padded."""
        self._busy = None    # these forwards are no step's
        out = []
        for i in range(0, len(x), micro_batch):
            a = np.asarray(x[i:i + micro_batch], np.float32)
            n = len(a)
            if n < micro_batch:
                a = np.concatenate([a, np.zeros((micro_batch - n, *a.shape[1:]), np.float32)])
            for s, reps in enumerate(self.replicas):
                a = reps[0].forward(-1, a, keep=False, **({"to": 0} if self.direct and s < self.S - 1 else {}))
            out.append(a[:n])
        return np.concatenate(out)

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)


def _short(e: BaseException) -> str:
    text = [t for t in str(e).strip().splitlines() if t.strip()]
    named = [t for t in text if "device '" in t]
    return ((named or text or [type(e).__name__])[-1])[:300]


class PipelineTrainer:
    """What train.save_checkpoint and train.evaluate need from a trainer, over a controller's stages."""

    def __init__(self, plan, controller: Controller, batch: int, seed: int):
        self.plan, self.controller, self.batch, self.seed = plan, controller, batch, seed
        self.model, self.optimizer_config = plan.model, plan.optimizer

    @property
    def params(self) -> dict[str, np.ndarray]:
        out = {}
        for names, reps in zip(self.plan.stage_weights(), self.controller.replicas):
            out.update(zip(names, reps[0].params()))
        return out

    @property
    def optimizer_state(self) -> list[np.ndarray]:
        return [a for reps in self.controller.replicas for a in reps[0].optimizer_state()]

    def logits(self, x: np.ndarray) -> np.ndarray:
        return self.controller.logits(x, self.plan.micro_batch)


def fit(plan, controller: Controller, data: data_mod.DataSet, epochs: int, batch: int, seed: int = 0,
        checkpoint: str | Path | None = None, progress: bool = True, max_steps: int | None = None,
        on_step: Callable[[dict], None] | None = None) -> dict:
    """Train through the controller for `epochs` epochs (batches as train.fit draws them); a checkpoint in
    train.py's format after every epoch (written atomically: a failure leaves the last one intact).
    Returns {"history": [per epoch], "curve": [(wall s, loss)], "stages": per-replica totals}."""
    trainer = PipelineTrainer(plan, controller, batch, seed)
    show = train._Progress(progress)
    steps = data_mod.steps_per_epoch(data.train, batch)
    if max_steps is not None:
        steps = min(steps, max_steps)
    history, curve, start = [], [], time.perf_counter()
    for epoch in range(epochs):
        t0, total, seen = time.perf_counter(), 0.0, 0
        for i, (x, y) in enumerate(data_mod.batches(data.train, batch, seed, epoch)):
            if i >= steps:
                break
            try:
                rec = controller.step(x, y)
            except StageFailed as e:
                saved = f"; the last saved weights ({checkpoint}) are intact" if checkpoint and Path(
                    checkpoint).exists() else "; no checkpoint was saved yet"
                raise UserError(f"training stopped at epoch {epoch + 1}, step {i + 1}: {e}{saved}") from None
            total += rec["loss"]
            seen += len(x)
            curve.append((time.perf_counter() - start, rec["loss"]))
            if on_step:
                on_step(rec)
            el = time.perf_counter() - t0
            show.update(f"epoch {epoch + 1}/{epochs}  step {i + 1}/{steps}  loss {total / (i + 1):.4f}  "
                        f"{seen / el:.0f} samples/s")
        seconds = time.perf_counter() - t0
        val = train.evaluate(trainer, data.val)
        record = {"epoch": epoch + 1, "loss": total / max(steps, 1), "val_loss": val["loss"],
                  "val_accuracy": val["accuracy"], "seconds": seconds, "samples_per_s": seen / seconds}
        history.append(record)
        if checkpoint is not None:
            train.save_checkpoint(checkpoint, trainer, epoch + 1, history)
        show.done(f"epoch {epoch + 1}/{epochs}  loss {record['loss']:.4f}  val acc {100 * val['accuracy']:.2f}%  "
                  f"{record['samples_per_s']:.0f} samples/s  {seconds:.1f} s")
    return {"history": history, "curve": curve, "trainer": trainer}


def local_replicas(plan, replicas=None, init_seed: int = 0) -> list[list]:
    """Every stage (with `replicas[s]` copies) in this process, from train.init_params(model, seed)."""
    from edgetvm.pipetrain.stages import Stage

    ex = plan.executable()
    params = train.init_params(plan.model, init_seed)
    replicas = replicas or [1] * plan.n_stages
    out = []
    for s, names in enumerate(plan.stage_weights()):
        out.append([Stage(ex, plan.n_stages, s, [params[n] for n in names], plan.initial_state(s))
                    for _ in range(replicas[s])])
    return out
