"""Predicting a pipelined training step from measured per-layer costs, and the partition/resource search.

Profile (per device kind, measured where the stages will run: here, or in an emulated device's RPC
session): the model cut after every layer, each one-layer stage's forward, backward (which recomputes
its forward) and optimizer step timed on the device (compute only, as the stage measures it), and every
call's time seen from the coordinator minus that compute, fitted as a fixed cost per call plus a cost
per byte moved (the tensors over the device's link and TVM RPC's packing).

Prediction: a candidate is a number of partitions K, the layer bounds of the K stages and the devices of
each stage (more than one: data-parallel replicas). Its step time is the schedule simulated op by op:
each replica's thread runs its GPipe or 1F1B operations in order, an operation starts when its thread
is free and its input exists (the stage before's forward, the stage after's backward), and lasts the
stage's compute (sum of its layers') plus its call's fixed cost and the per-byte cost of what the
coordinator sends or gets (the first stage's input, the last stage's labels and logits); a tensor from
stage to stage makes one hop, device to device, that delays its receiver by its per-byte cost (through
the coordinator instead, `direct=False`: both calls pay for it); pipeline fill and drain come out of
the simulation. Then the replicas' gradient sums (through the coordinator), the optimizer
step, and the controller's own calls.

Search: for 1..N devices and every way to split them into K consecutive groups (a group: one stage's
replicas), the layer bounds that minimise the bottleneck stage, then the simulated step time; every
candidate is printed, the fastest wins.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field

import numpy as np

from edgetvm import train
from edgetvm.errors import UserError
from edgetvm.pipetrain import schedule as sch
from edgetvm.pipetrain.stages import StagePlan, activation_shapes


@dataclass
class Profile:
    kind: str
    forward_s: list[float]
    backward_s: list[float]
    step_s: list[float]
    call_s: float              # fixed cost of one call beyond its compute
    byte_s: float              # cost per byte moved by a call
    scale: list = field(default_factory=lambda: [1.0, 1.0, 1.0])   # calibrate()'s factors
    # the device's own CPU per byte a call moves (RPC (un)packing and copies, every thread of its session),
    # in seconds at its CPU quota: what a device-to-device hop takes from the compute of both its ends
    byte_cpu_s: float = 0.0
    # a data-parallel stage's gradient sum (device.reduce), measured by measure_reduce: per wire dtype, the
    # seconds of its own work (flattening, rounding to the dtype, summing, packing, setting the sum, the
    # optimizer step, the call) and the bytes per weight its gradients take on the wire (pack sends zeros
    # as a bitmap); and the replicas' CPU per byte exchanged beyond the link's time. Empty: raw bytes at
    # the link's time plus byte_cpu_s at both ends, one call
    reduce_s: dict = field(default_factory=dict)
    grad_wire: dict = field(default_factory=dict)
    reduce_byte_s: float = 0.0

    def to_json(self) -> dict:
        return self.__dict__.copy()


def _fit(samples: list[tuple[int, float]]) -> tuple[float, float]:
    x = np.array([b for b, _ in samples], float)
    y = np.array([t for _, t in samples], float)
    if len(set(x)) < 2:
        return max(0.0, float(np.median(y))), 0.0
    A = np.stack([np.ones_like(x), x], 1)
    c, b = np.linalg.lstsq(A, y, rcond=None)[0]
    return max(0.0, float(c)), max(0.0, float(b))


def profile(model: train.Model, micro_batch: int, make_stage, kind: str = "host", repeats: int = 3,
            optimizer: train.OptimizerConfig = train.OptimizerConfig(), log=lambda msg: None,
            speed: float | None = None, quota: float = 1.0) -> Profile:
    """Per-layer costs: `make_stage(plan, s)` gives stage s of the every-layer plan (a Stage or RemoteStage).
    With `speed` (a device's CPU quota), compute is its CPU seconds over the quota: a short call under a
    CFS quota runs unthrottled until the period's budget is spent, so its wall time says too little."""
    L = len(model.layers)
    plan = StagePlan(model, tuple(range(L + 1)), micro_batch, optimizer)
    acts = activation_shapes(model, micro_batch)
    rng = np.random.default_rng(0)
    fwd, bwd, opt, comm, comm_cpu = [], [], [], [], []
    t0 = time.perf_counter()
    for s in range(L):
        st = make_stage(plan, s)
        a = rng.standard_normal((micro_batch, *model.input_shape) if s == 0 else acts[s - 1]).astype(np.float32)
        g = rng.standard_normal(acts[s]).astype(np.float32)
        labels = rng.integers(0, model.n_classes, micro_batch)
        last = s == L - 1
        out_bytes, back_bytes = g.nbytes, (a.nbytes if s > 0 else 0)
        times = {"F": [], "B": [], "O": []}
        for rep in range(repeats + 1):
            for op in ("F", "B", "O"):
                st0 = st.stats()
                c0 = time.perf_counter()
                if op == "F":
                    st.forward(rep, a)
                    moved = a.nbytes + out_bytes
                elif op == "B":
                    st.backward_last(rep, labels, 1.0) if last else st.backward(rep, g)
                    moved = back_bytes + (labels.nbytes if last else g.nbytes)
                else:
                    st.step()
                    moved = 0
                call = time.perf_counter() - c0
                st1 = st.stats()
                busy = st1["busy_s"] - st0["busy_s"]
                dev_s = busy if speed is None else (st1["cpu_s"] - st0["cpu_s"]) / speed
                if rep > 0:  # the first round warms caches and the session
                    times[op].append(dev_s)
                    comm.append((moved, max(0.0, call - busy)))
                    if "proc_s" in st1:
                        outside = st1["proc_s"] - st0["proc_s"] - (st1["cpu_s"] - st0["cpu_s"])
                        comm_cpu.append((moved, outside / quota))
        if last:
            st.take_losses()
        fwd.append(float(np.median(times["F"])))
        bwd.append(float(np.median(times["B"])))
        opt.append(float(np.median(times["O"])))
    c, b = _fit(comm)
    b_cpu = _fit(comm_cpu)[1] if comm_cpu else 0.0
    log(f"profiled {model.name} on {kind} (micro-batch {micro_batch}): forward {sum(fwd) * 1e3:.1f} ms, backward "
        f"{sum(bwd) * 1e3:.1f} ms, optimizer {sum(opt) * 1e3:.1f} ms; a call {c * 1e3:.2f} ms + {b * 1e9:.2f} ms/MB, "
        f"of which the device's CPU {b_cpu * 1e9:.2f} ms/MB ({time.perf_counter() - t0:.0f} s)")
    return Profile(kind, fwd, bwd, opt, c, b, byte_cpu_s=b_cpu)


def profile_here(model, micro_batch, optimizer=train.OptimizerConfig(), log=lambda msg: None) -> Profile:
    from edgetvm.pipetrain.stages import Stage

    def make(plan, s):
        names = plan.stage_weights()[s]
        params = train.init_params(plan.model)
        return Stage(plan.executable(), plan.n_stages, s, [params[n] for n in names], plan.initial_state(s))

    prof = profile(model, micro_batch, make, "host", optimizer=optimizer, log=log)
    calibrate(prof, model, micro_batch, lambda plan: make(plan, 0), optimizer, log)
    return prof


def profile_device(model, micro_batch, device, optimizer=train.OptimizerConfig(), log=lambda msg: None,
                   sample=None) -> Profile:
    """The per-layer profile measured on one emulated device of `device`'s kind (one session, stage by stage),
    and the replicas' gradient sum on two (measure_reduce; `sample`: a training batch (x, y) for it)."""
    import contextlib
    import shutil
    import tempfile
    from pathlib import Path

    from edgetvm.pipetrain.device import RemoteStage
    from edgetvm.runtime.link import EmulatedLink
    from edgetvm.runtime.pipeline import FleetDevice

    with contextlib.ExitStack() as stack:
        tmp = Path(tempfile.mkdtemp(prefix="edgetvm-pipetrain-"))
        stack.callback(shutil.rmtree, tmp, True)
        link = stack.enter_context(EmulatedLink(device.link))
        dev = stack.enter_context(FleetDevice(device.profile, link, device.host_cpu, device.name))
        sess = dev.session()
        params = train.init_params(model)
        def make(plan, s):
            lib = tmp / f"stages{len(plan.bounds) - 1}.so"
            if not lib.exists():
                plan.executable().export_library(str(lib))
            names = plan.stage_weights()[s]
            state = plan.initial_state(s)
            arrays = tmp / f"s{s}.npz"
            np.savez(arrays, **{f"w{i}": params[n] for i, n in enumerate(names)},
                     **{f"s{i}": a for i, a in enumerate(state)})
            return RemoteStage(sess, device.name, {"library": str(lib), "arrays": str(arrays), "n_weights": len(names),
                                                   "n_state": len(state), "n_stages": plan.n_stages, "s": s})

        prof = profile(model, micro_batch, make, device.kind, optimizer=optimizer, log=log,
                       quota=device.profile.cpu_quota)
        calibrate(prof, model, micro_batch, lambda plan: make(plan, 0), optimizer, log)
    measure_reduce(prof, model, micro_batch, device, optimizer, log, sample=sample)
    return prof


def measure_reduce(prof: Profile, model, micro_batch: int, device, optimizer, log=lambda msg: None, m: int = 4,
                   rounds: int = 4, sample=None) -> None:
    """The data-parallel gradient sum (device.reduce) timed on two devices of `device`'s kind, each on its
    own link, connected as replicas are (EmulatedStages), on the gradients of m real micro-batches: per wire
    dtype, with one replica (its own work: `Profile.reduce_s`) and with both (each sends and receives half
    of the packed gradients twice); the difference over the bytes, less the link's time, is the replicas'
    CPU per byte (`reduce_byte_s`), and pack's size of the gradients per weight is `grad_wire`. Predicted
    as raw bytes at the link's rate plus the RPC's per-byte CPU, the 64-step float16 runs took 11-14%
    longer than predicted: the sum's own work does not halve with the bytes, and the exchange costs the
    replicas 2x the RPC's CPU per byte."""
    import dataclasses
    import os
    from concurrent.futures import ThreadPoolExecutor

    from edgetvm.pipetrain.emulate import EmulatedStages
    from edgetvm.pipetrain.schedule import REDUCE_DTYPES
    from edgetvm.pipetrain.stages import StagePlan
    from edgetvm.runtime.tensors import pack

    t_start = time.perf_counter()
    ncpu = len(os.sched_getaffinity(0))
    cpu = device.host_cpu or 0
    pair = [dataclasses.replace(device, name=f"{device.name}a", host_cpu=cpu),
            dataclasses.replace(device, name=f"{device.name}b", host_cpu=(cpu + 1) % ncpu)]
    plan = StagePlan(model, (0, len(model.layers)), micro_batch, optimizer)
    if sample is not None:   # the zero gradients, so the packed bytes, depend on the data
        xs = np.asarray(sample[0][:micro_batch], np.float32).reshape(micro_batch, *model.input_shape)
        labels = np.asarray(sample[1][:micro_batch])
    else:
        rng = np.random.default_rng(2)
        xs = rng.standard_normal((micro_batch, *model.input_shape)).astype(np.float32)
        labels = rng.integers(0, model.n_classes, micro_batch)
    one: dict = {d: [] for d in REDUCE_DTYPES}
    two: dict = {d: [] for d in REDUCE_DTYPES}
    with EmulatedStages(plan, [pair], train.init_params(model)) as es, ThreadPoolExecutor(2) as pool:
        reps = es.replicas[0]

        def accumulate(st) -> None:
            for i in range(m):
                st.forward(i, xs)
                st.backward_last(i, labels, 1.0 / m)
            st.take_losses()

        for r in range(rounds + 1):
            for dtype in REDUCE_DTYPES:
                list(pool.map(accumulate, reps))
                if not prof.grad_wire:
                    flat = np.concatenate([g.reshape(-1) for g in reps[0].get_grads()])
                    prof.grad_wire = {d: (len(pack([flat.astype(d)])) - 4) / flat.size for d in REDUCE_DTYPES}
                    n_weights = flat.size
                c0 = time.perf_counter()
                reps[0].reduce(0, 1, dtype)
                c1 = time.perf_counter()
                reps[1].step()
                list(pool.map(accumulate, reps))
                c2 = time.perf_counter()
                list(pool.map(lambda i: reps[i].reduce(i, 2, dtype), range(2)))
                c3 = time.perf_counter()
                if r:   # the first round warms the calls and connections up
                    one[dtype].append(c1 - c0)
                    two[dtype].append(c3 - c2)
    # means: as for a call (calibrate), a spent quota makes the times bimodal
    prof.reduce_s = {d: float(np.mean(one[d])) for d in REDUCE_DTYPES}
    link_s = _link_byte_s(device)
    # two replicas: each sends and receives half the packed gradients, twice (reduce-scatter, all-gather)
    per_byte = [(np.mean(two[d]) - prof.reduce_s[d]) / (prof.grad_wire[d] * n_weights) for d in REDUCE_DTYPES]
    prof.reduce_byte_s = max(0.0, float(np.mean(per_byte)) - link_s)
    log(f"measured the gradient sum of two {device.kind} replicas: "
        + ", ".join(f"{d} {np.mean(two[d]) * 1e3:.1f} ms (its own work {prof.reduce_s[d] * 1e3:.1f} ms, "
                    f"{prof.grad_wire[d]:.2f} B/weight)" for d in REDUCE_DTYPES)
        + f"; the replicas' CPU {prof.reduce_byte_s * 1e9:.1f} ms/MB beyond the link "
          f"({time.perf_counter() - t_start:.0f} s)")


def calibrate(prof: Profile, model, micro_batch: int, make_whole, optimizer, log=lambda msg: None,
              m: int = 4, rounds: int = 3) -> None:
    """Scale the per-layer compute times so that they add up to the whole model's step measured as a
    step runs (m forwards and backwards back to back, then the optimizer): a device under a CFS quota
    runs a short call at full speed until the period's budget is spent, so calls timed one at a time
    look faster than the same calls in a sustained step. The factors are logged."""
    plan = StagePlan(model, (0, len(model.layers)), micro_batch, optimizer)
    st = make_whole(plan)
    rng = np.random.default_rng(1)
    xs = rng.standard_normal((micro_batch, *model.input_shape)).astype(np.float32)
    labels = rng.integers(0, model.n_classes, micro_batch)
    f_t, b_t, o_t, over = [], [], [], []
    moved_f = xs.nbytes + 4 * micro_batch * model.n_classes
    for r in range(rounds + 1):
        for i in range(m):
            b0 = st.stats()["busy_s"]
            c0 = time.perf_counter()
            st.forward(i, xs)
            c1 = time.perf_counter()
            b1 = st.stats()["busy_s"]
            c2 = time.perf_counter()
            st.backward_last(i, labels, 1.0 / m)
            c3 = time.perf_counter()
            b2 = st.stats()["busy_s"]
            if r:
                f_t.append(b1 - b0)
                b_t.append(b2 - b1)
                over += [c1 - c0 - (b1 - b0) - prof.byte_s * moved_f, c3 - c2 - (b2 - b1) - prof.byte_s * labels.nbytes]
        b0 = st.stats()["busy_s"]
        st.step()
        if r:
            o_t.append(st.stats()["busy_s"] - b0)
        st.take_losses()
    kf = float(np.median(f_t)) / max(sum(prof.forward_s), 1e-9)
    kb = float(np.median(b_t)) / max(sum(prof.backward_s), 1e-9)
    ko = float(np.median(o_t)) / max(sum(prof.step_s), 1e-9)
    prof.forward_s = [t * kf for t in prof.forward_s]
    prof.backward_s = [t * kb for t in prof.backward_s]
    prof.step_s = [t * ko for t in prof.step_s]
    prof.scale = [kf, kb, ko]
    # the mean, not the median: a call that meets a spent quota waits for the next CFS period, so the
    # excess is bimodal (24 calls: 17 at 0.8-1.9 ms, 7 at 7.9-16 ms), and the median jumped from one mode
    # to the other between profiles (1.6 or 7.5-8.7 ms); a step's calls add up to the mean
    prof.call_s = max(prof.call_s, float(np.mean(over)))
    log(f"calibrated {prof.kind} against the whole model's sustained step: forward x{kf:.2f}, backward x{kb:.2f}, "
        f"optimizer x{ko:.2f}; a call {prof.call_s * 1e3:.2f} ms beyond its compute")


# ---------------------------------------------------------------- prediction


@dataclass
class Candidate:
    bounds: tuple
    groups: list                        # per stage: the devices (FleetDevice-like: .name, .kind) of its replicas
    step_s: float = 0.0
    busiest_s: float = 0.0              # the busiest replica's compute and calls in a step
    memory_ok: bool = True
    note: str = ""

    @property
    def n_devices(self) -> int:
        return sum(len(g) for g in self.groups)

    def describe(self) -> str:
        stages = " | ".join(f"{self.bounds[s]}-{self.bounds[s + 1] - 1}:" + ",".join(d.name for d in g)
                            for s, g in enumerate(self.groups))
        if not self.memory_ok:
            return f"{len(self.groups)} partitions [{stages}]: does not fit ({self.note})"
        return (f"{len(self.groups)} partitions [{stages}]: predicted {self.step_s * 1e3:.1f} ms/step "
                f"(busiest replica {self.busiest_s * 1e3:.1f} ms, fill/drain and waiting "
                f"{(self.step_s - self.busiest_s) * 1e3:.1f} ms)")


def _stage_cost(prof: Profile, a: int, b: int):
    return sum(prof.forward_s[a:b]), sum(prof.backward_s[a:b]), sum(prof.step_s[a:b])


PAYLOAD_SHARE = 1448 / 1514     # TCP payload per Ethernet frame: what a shaped link carries of its rate


def _link_byte_s(device) -> float:
    """Seconds per byte on the device's link (runtime/link.py shapes whole frames)."""
    return 8.0 / (PAYLOAD_SHARE * device.link.bandwidth_mbit * 1e6)


def simulate(model, micro_batch: int, bounds, groups, profiles: dict[str, Profile], schedule: str, m: int,
             n_weights: list[int] | None = None, direct: bool = True,
             reduce_dtype: str = "float32") -> tuple[float, float]:
    """(predicted step seconds, busiest replica's seconds) of the schedule over these stages and devices.

    direct (stages on devices, emulate.EmulatedStages): a tensor between stages makes one hop, device to
    device, packed once, by the sender's thread while the sender computes on: it delays its receiver's
    operation by the hop (the per-byte cost once, and waiting for the sender's and receiver's links, which
    carry one tensor at a time) and occupies neither stage's calls. Otherwise (through
    the coordinator) it is a result of the sender's call and an argument of the receiver's, and each
    call pays for it. reduce_dtype: the replicas' gradients cross in it (schedule.sum_gradients)."""
    S = len(bounds) - 1
    acts = activation_shapes(model, micro_batch)
    in_bytes = [4 * micro_batch * int(np.prod(model.input_shape))] + [4 * int(np.prod(acts[bounds[s] - 1]))
                                                                       for s in range(1, S)]
    out_bytes = [4 * int(np.prod(acts[bounds[s + 1] - 1])) for s in range(S)]
    label_bytes = 8 * micro_batch
    cost = {}
    for s in range(S):
        for r, d in enumerate(groups[s]):
            p = profiles[d.kind]
            f, bw, o = _stage_cost(p, bounds[s], bounds[s + 1])
            last = s == S - 1
            if direct:
                # the coordinator sends stage 0 its input and the last stage its labels, and gets logits back;
                # a tensor from or to a neighbour costs this device's CPU (sender thread, listener)
                hop_in, hop_out = (in_bytes[s] if s else 0), (0 if last else out_bytes[s])
                cf = f + p.call_s + p.byte_s * ((in_bytes[s] if s == 0 else 0) + (out_bytes[s] if last else 0)) \
                    + p.byte_cpu_s * (hop_in + hop_out)
                cb = bw + p.call_s + p.byte_s * (label_bytes if last else 0) + p.byte_cpu_s * (hop_in + hop_out)
            else:
                cf = f + p.call_s + p.byte_s * (in_bytes[s] + out_bytes[s])
                cb = bw + p.call_s + p.byte_s * ((label_bytes if last else out_bytes[s]) + (in_bytes[s] if s else 0))
            cost[(s, r)] = (cf, cb, o, p)
    ops = {(s, r): sch.schedule_ops(schedule, S, m, s, r, len(groups[s])) for s in range(S) for r in range(len(groups[s]))}

    # direct: a tensor's hop holds the sender's uplink and the receiver's downlink (each device has one link
    # to this machine's switch) for its per-byte cost; it leaves when its op ends, in the first gap both
    # links have (a calendar: the loop below reaches the threads' ops out of time order)
    held: dict = {}
    arrive: dict = {}

    def send(sender, receiver, key, t: float, nbytes: int) -> None:
        dur = nbytes * max(_link_byte_s(groups[sender[0]][sender[1]]), _link_byte_s(groups[receiver[0]][receiver[1]]))
        busy_links = held.setdefault(("up", sender), []) + held.setdefault(("down", receiver), [])
        start, moved = t, True
        while moved:
            moved = False
            for a, b in busy_links:
                if a < start + dur and start < b:
                    start, moved = b, True
        if dur > 0:
            held[("up", sender)].append((start, start + dur))
            held[("down", receiver)].append((start, start + dur))
        arrive[key] = start + dur

    ptr = {k: 0 for k in ops}
    clock = {k: 0.0 for k in ops}
    busy = {k: 0.0 for k in ops}
    doneF, doneB = {}, {}
    progress = True
    while progress:
        progress = False
        for (s, r), lst in ops.items():
            while ptr[(s, r)] < len(lst):
                op, mb = lst[ptr[(s, r)]]
                if op == "F":
                    dep = 0.0 if s == 0 else (arrive.get(("a", s, mb)) if direct else doneF.get((s - 1, mb)))
                elif s == S - 1:
                    dep = doneF.get((s, mb))
                else:
                    dep = arrive.get(("g", s, mb)) if direct else doneB.get((s + 1, mb))
                if dep is None:
                    break
                c = cost[(s, r)][0 if op == "F" else 1]
                start = max(clock[(s, r)], dep)
                end = clock[(s, r)] = start + c
                busy[(s, r)] += c
                (doneF if op == "F" else doneB)[(s, mb)] = end
                if direct and op == "F" and s < S - 1:
                    send((s, r), (s + 1, mb % len(groups[s + 1])), ("a", s + 1, mb), end, out_bytes[s])
                elif direct and op == "B" and s > 0:
                    send((s, r), (s - 1, mb % len(groups[s - 1])), ("g", s - 1, mb), end, in_bytes[s])
                ptr[(s, r)] += 1
                progress = True
    if any(ptr[k] < len(v) for k, v in ops.items()):
        raise RuntimeError("schedule deadlocked in simulation")
    # replicas' gradient sums. Direct (device.reduce): each of R replicas sends and receives (R-1)/R of the
    # gradients twice (reduce-scatter, then all-gather), its uplink and downlink at once, its CPU paying
    # for both directions; a stage sums and steps once its replicas' last backward is done, while the
    # stages before it still run theirs (Controller._run). Else, after every stage is done, every
    # replica's gradients to the coordinator and the sums back, one replica after another
    grad_bytes = sch.wire_dtype(reduce_dtype).itemsize
    if direct:
        ends = []
        for s in range(S):
            R = len(groups[s])
            end = max(clock[(s, r)] for r in range(R))
            p = cost[(s, 0)][3]
            if R > 1 and reduce_dtype in p.reduce_s:
                # measured (measure_reduce): the sum's own work, optimizer step and call included, then its
                # packed bytes at the slowest replica's link and the replicas' CPU per byte
                nbytes = p.grad_wire[reduce_dtype] * (n_weights[s] if n_weights else 0)
                per_byte = max(_link_byte_s(d) for d in groups[s]) + p.reduce_byte_s
                ends.append(end + p.reduce_s[reduce_dtype] + 2 * (R - 1) / R * nbytes * per_byte)
                continue
            if R > 1:
                nbytes = grad_bytes * (n_weights[s] if n_weights else 0)
                per_byte = max(_link_byte_s(d) for d in groups[s]) + 2 * p.byte_cpu_s
                end += p.call_s + 2 * (R - 1) / R * nbytes * per_byte
            ends.append(end + max(cost[(s, r)][2] + cost[(s, r)][3].call_s for r in range(R)))
        t = max(ends)
    else:
        t = max(clock.values())
        for s in range(S):
            nbytes = grad_bytes * (n_weights[s] if n_weights else 0)
            if len(groups[s]) > 1:
                for r in range(len(groups[s])):
                    p = cost[(s, r)][3]
                    t += 2 * p.call_s + 2 * nbytes * p.byte_s
        t += max(cost[k][2] + cost[k][3].call_s for k in cost)
    # the controller's bookkeeping call after the step (busy counters, losses), every replica at once
    t += max(cost[k][3].call_s for k in cost)
    return t, max(busy[k] + cost[k][2] for k in busy)


def _compositions(n: int, k: int):
    for cuts in itertools.combinations(range(1, n), k - 1):
        b = (0, *cuts, n)
        yield [b[i + 1] - b[i] for i in range(k)]


def best_bounds(profiles, groups, L: int, m: int, model=None, micro_batch: int = 1, direct: bool = True,
                keep: int = 1):
    """Layer bounds minimising the slowest stage's per-step time (forward + backward of its share of the
    micro-batches on its slowest replica, with the bytes its calls move: each of its tensors once when the
    stages send directly, twice, coming and going, through the coordinator). keep > 1: the `keep` best,
    best first."""
    import heapq

    K = len(groups)
    acts = activation_shapes(model, micro_batch) if model is not None else None
    kept: list = []          # a max-heap of the best `keep` so far: (-val, bounds)
    best_val = float("inf")
    for cuts in itertools.combinations(range(1, L), K - 1):
        b = (0, *cuts, L)
        val = 0.0
        for s, g in enumerate(groups):
            moved = 0
            if acts is not None:
                moved = 4 * ((int(np.prod(acts[b[s + 1] - 1])) if s < K - 1 else 0) +
                             (int(np.prod(acts[b[s] - 1])) if s else 0))

            def per_device(d):
                p = profiles[d.kind]
                compute = sum(p.forward_s[b[s]:b[s + 1]]) + sum(p.backward_s[b[s]:b[s + 1]])
                if not direct:
                    return compute + 2 * moved * p.byte_s
                # out and back, in and back: the CPU pays for all of it, each link direction for half
                return max(compute + 2 * moved * p.byte_cpu_s, moved * _link_byte_s(d))

            per = max(per_device(d) for d in g)
            val = max(val, per * m / len(g))
            if val >= best_val:
                break
        if val < best_val:
            heapq.heappush(kept, (-val, b))
            if len(kept) > keep:
                heapq.heappop(kept)
            if len(kept) == keep:
                best_val = -kept[0][0]
    ranked = [b for _, b in sorted(kept, key=lambda vb: -vb[0])]
    return ranked[0] if keep == 1 else ranked


BOUNDS_SIMULATED = 8


def _candidate(model, micro_batch, m, bounds, groups, profiles, schedule, direct, optimizer, shapes,
               stage_memory_bytes, reduce_dtype="float32") -> Candidate:
    plan = StagePlan(model, bounds, micro_batch, optimizer)
    cand = Candidate(bounds, groups)
    for s, g in enumerate(groups):
        in_flight = m if schedule == "gpipe" else min(len(groups) - s, m)
        need = stage_memory_bytes(plan, s, in_flight)
        small = [d for d in g if need > 0.8 * d.profile.memory_bytes]
        if small:
            cand.memory_ok = False
            cand.note = f"stage {s} needs ~{need / 2**20:.0f} MiB, {small[0].name} has {small[0].profile.memory_mib:g}"
    if cand.memory_ok:
        nw = [sum(int(np.prod(shapes[nm])) for nm in names) for names in plan.stage_weights()]
        cand.step_s, cand.busiest_s = simulate(model, micro_batch, bounds, groups, profiles, schedule, m, nw, direct,
                                               reduce_dtype)
    return cand


def search(model, micro_batch: int, m: int, devices: list, profiles: dict[str, Profile], schedule: str,
           max_partitions: int | None = None, log=print, optimizer=train.OptimizerConfig(),
           direct: bool = True, reduce_dtype: str = "float32") -> list[Candidate]:
    """Every (devices used, grouping into consecutive stages) candidate with its best bounds and predicted step
    (direct: the stages hand tensors device to device, as EmulatedStages connects them; reduce_dtype: the
    dtype replicas exchange their gradients in)."""
    from edgetvm.pipetrain.emulate import stage_memory_bytes

    L = len(model.layers)
    shapes = train.param_shapes(model)
    out = []
    for n in range(1, len(devices) + 1):
        for k in range(1, min(n, L, max_partitions or L) + 1):
            for sizes in _compositions(n, k):
                if any(m % size for size in sizes):
                    continue
                it = iter(devices[:n])
                groups = [[next(it) for _ in range(size)] for size in sizes]
                # the bottleneck criterion sees neither fill and drain nor links shared by two hops: the few
                # best bounds by it are simulated, the fastest kept
                best = None
                for bounds in best_bounds(profiles, groups, L, m, model, micro_batch, direct, keep=BOUNDS_SIMULATED):
                    cand = _candidate(model, micro_batch, m, bounds, groups, profiles, schedule, direct, optimizer,
                                      shapes, stage_memory_bytes, reduce_dtype)
                    if best is None or (cand.memory_ok, -cand.step_s) > (best.memory_ok, -best.step_s):
                        best = cand
                log("  " + best.describe())
                out.append(best)
    ok = [c for c in out if c.memory_ok]
    if not ok:
        raise UserError("no candidate fits the devices' memory; use smaller micro-batches or bigger devices")
    return sorted(ok, key=lambda c: c.step_s)
