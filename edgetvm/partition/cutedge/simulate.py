"""Trace-driven simulation of a policy over measured per-layer profiles.

Frames go through three FIFO stages, as on the testbed (runtime/cutedge.py): the device computes its
part (at the slot's clock: work measured at f_max takes work x f_max / f), its radio sends the
crossing bytes (at the slot's rate times PAYLOAD_SHARE, starting once the frame's device part is
done: computing and sending overlap across frames), the server computes the rest (at its measured
speed; the server's energy is not the device's and is not counted). Arrivals come at the start of
their slot; rates are constant within a slot, events inside a slot are exact.

With `quota` (a `Quota`: the emulated device's CFS period) the device stage runs as the testbed's
does: a clock is a CPU quota per period, and a frame runs at the host's full speed while the period's
quota lasts, then waits for the next period (costmodels/cfs.Bandwidth), so its wall time depends on
where it falls in the period and on the frames before it; without it, at f / f_max of the work's
speed throughout (a real board's clock).

Energy per slot: busy power at the slot's clock x the time the processor computed, plus the radio's
power at the slot's rate and capacity x the time it sent. After the last slot of the arrival trace
the run goes on without arrivals (the link trace wrapping around) until every frame is done, or
`drain_slots` more slots have passed.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import numpy as np

from edgetvm.costmodels import cfs
from edgetvm.partition.cutedge.controller import PAYLOAD_SHARE, Action, Observation, Policy


STAGES = ("device", "send", "server")


def _mark(fr, stage: str, start: float, end: float | None = None) -> None:
    m = fr.marks.setdefault(stage, [start, start])
    if end is not None:
        m[1] = end


@dataclass(frozen=True)
class Quota:
    """An emulated device's clock as CFS enforces it: `period_s`, the ticks `tick_phase_s` after each
    period boundary (cfs.tick_phase), and slot 0 starting `start_s` after a boundary; and the testbed's
    controller, whose turn at each slot's start delays the slot's frames by `turn_s` (Testbed.turn)."""
    period_s: float
    tick_phase_s: float = 0.0
    start_s: float = 0.0
    turn_s: float = 0.0


@dataclass
class Frame:
    id: int
    arrival: float
    cut: object
    work_left: float          # share of its device stage still to go (1 at arrival)
    bytes_left: float
    server_left: float
    ready: float = 0.0        # when it reached its current stage
    cpu_left: float | None = None   # with a Quota: CPU seconds of its device stage still to run
    done: float | None = None
    marks: dict = field(default_factory=dict)   # stage -> [start, end], as the testbed records them


@dataclass
class SlotRecord:
    slot: int
    arrivals: int
    capacity_mbit: float
    q_ms: float
    b_kb: float
    cut: str
    f_mhz: float
    rate_mbit: float
    cpu_busy_s: float
    tx_busy_s: float
    energy_j: float


@dataclass
class Result:
    policy: str
    slot_s: float
    horizon_slots: int
    slots: list[SlotRecord] = field(default_factory=list)
    latencies_s: list[float] = field(default_factory=list)
    completed_in_horizon: int = 0
    arrived: int = 0
    unfinished: int = 0
    frames: list = field(default_factory=list)   # (arrival, marks) of every finished frame
    started: float | None = None   # the testbed's: slot 0's start, time.perf_counter()

    def stage_means_ms(self) -> dict:
        """Mean time a finished frame spent waiting for and in each stage (device, send, server), and the
        device's processor and radio busy time per finished frame (what its energy is charged for), ms."""
        out, prev = {}, None
        for stage in STAGES:
            waits, runs = [], []
            for arrival, marks in self.frames:
                if stage not in marks:
                    continue
                start, end = marks[stage]
                before = arrival if prev is None else marks.get(prev, (arrival, arrival))[1]
                waits.append(start - before)
                runs.append(end - start)
            out[f"{stage} wait"] = float(np.mean(waits) * 1e3) if waits else 0.0
            out[stage] = float(np.mean(runs) * 1e3) if runs else 0.0
            prev = stage
        n = max(len(self.latencies_s), 1)
        out["cpu busy"] = sum(s.cpu_busy_s for s in self.slots) / n * 1e3
        out["radio busy"] = sum(s.tx_busy_s for s in self.slots) / n * 1e3
        return out

    def summary(self) -> dict:
        lat = np.array(self.latencies_s) if self.latencies_s else np.array([np.nan])
        energy = sum(s.energy_j for s in self.slots)
        done = len(self.latencies_s)
        h = self.slots[:self.horizon_slots]
        return {"policy": self.policy, "frames": self.arrived, "completed": done, "unfinished": self.unfinished,
                "energy_j": energy, "energy_per_frame_mj": energy / done * 1e3 if done else float("nan"),
                "power_w": energy / (len(self.slots) * self.slot_s),
                "throughput_fps": self.completed_in_horizon / (self.horizon_slots * self.slot_s),
                "latency_mean_ms": float(np.mean(lat) * 1e3), "latency_p95_ms": float(np.percentile(lat, 95) * 1e3),
                "q_mean_ms": float(np.mean([s.q_ms for s in h])), "b_mean_kb": float(np.mean([s.b_kb for s in h])),
                "mean_f_mhz": float(np.mean([s.f_mhz for s in h if s.cpu_busy_s > 0] or [np.nan])),
                "slots": len(self.slots)}


def _serve_work(queue: deque, start: float, end: float, speed: float, out: list) -> float:
    """Device stage: FIFO, a frame taking its cut's stage_time at `speed` (s of f_max work per s), the
    processor busy for work_s / speed of it, spread evenly; finished frames to `out` with their time.
    Returns the busy time."""
    now, busy = start, 0.0
    while queue and now < end:
        fr = queue[0]
        begin = max(now, fr.ready)
        if begin >= end:
            break
        total = fr.cut.stage_time(speed)
        need = fr.work_left * total       # work_left: the share of the stage still to go
        share_busy = (fr.cut.work_s / speed) / total if total > 0 else 0.0
        _mark(fr, "device", begin)
        if begin + need <= end:
            busy += need * share_busy
            now = begin + need
            fr.work_left = 0.0
            fr.ready = now
            _mark(fr, "device", begin, now)
            out.append(queue.popleft())
        else:
            fr.work_left -= (end - begin) / total
            busy += (end - begin) * share_busy
            now = end
    return busy


def _serve_quota(queue: deque, start: float, end: float, cpu: cfs.Bandwidth, cpus: float, out: list) -> float:
    """Device stage under a CFS quota: FIFO, a frame's processor time (work_s at f_max x `cpus`, the top
    clock's CPUs) run by `cpu` (full speed while the quota lasts), the runqueue idle between frames, as
    between two RPC calls. A cut's call_s is not added: it was measured as the stage's excess over the
    uniform clock's time (0 for every cut calibrated on this machine). Returns the CPU seconds used."""
    now, used = start, 0.0
    while queue and now < end:
        fr = queue[0]
        begin = max(now, fr.ready)
        if begin >= end:
            break
        if fr.cpu_left is None:
            fr.cpu_left = fr.cut.work_s * cpus
            _mark(fr, "device", begin)
        total = fr.cut.work_s * cpus
        now, left = cpu.run(begin, fr.cpu_left, until=end)
        used += fr.cpu_left - left
        fr.cpu_left = left
        fr.work_left = left / total if total > 0 else 0.0
        if left > 0:
            break
        cpu.idle(now)
        fr.ready = now
        _mark(fr, "device", fr.marks["device"][0], now)
        out.append(queue.popleft())
    return used


def _serve_bytes(queue: deque, start: float, end: float, bytes_per_s: float, out: list) -> float:
    now, busy = start, 0.0
    while queue and now < end:
        fr = queue[0]
        begin = max(now, fr.ready)
        if begin >= end:
            break
        need = fr.bytes_left / bytes_per_s
        _mark(fr, "send", begin)
        if begin + need <= end:
            busy += need
            now = begin + need
            fr.bytes_left = 0.0
            fr.ready = now
            _mark(fr, "send", begin, now)
            out.append(queue.popleft())
        else:
            fr.bytes_left -= (end - begin) * bytes_per_s
            busy += end - begin
            now = end
    return busy


def _serve_server(queue: deque, start: float, end: float, done: list) -> None:
    now = start
    while queue and now < end:
        fr = queue[0]
        begin = max(now, fr.ready)
        if begin >= end:
            break
        _mark(fr, "server", begin)
        if begin + fr.server_left <= end:
            now = begin + fr.server_left
            fr.server_left = 0.0
            fr.done = now
            _mark(fr, "server", begin, now)
            done.append(queue.popleft())
        else:
            fr.server_left -= end - begin
            now = end


def simulate(policy: Policy, energy, arrivals, capacity, drain_slots: int | None = None,
             payload_share: float = PAYLOAD_SHARE, quota: Quota | None = None) -> Result:
    """Run `policy` over the traces (numpy arrays of frames and Mbit/s per slot, same slot length as
    arrivals.slot_s when given Trace objects); with `quota`, the device as the emulation runs it."""
    tau = arrivals.slot_s
    a = np.asarray(arrivals.values)
    c = np.asarray(capacity.values, dtype=float)
    horizon = len(a)
    drain = horizon if drain_slots is None else drain_slots
    res = Result(policy.name, tau, horizon)
    devq: deque = deque()
    sendq: deque = deque()
    srvq: deque = deque()
    fid = 0
    t = 0
    if quota is not None:
        # slot 0 starts at time 0, `start_s` after a period boundary
        top = cfs.quota_s(energy.quota(energy.f_max), quota.period_s)
        cpu = cfs.Bandwidth(top, quota.period_s, period_offset=-quota.start_s,
                            tick_offset=quota.tick_phase_s - quota.start_s)
    while t < horizon or ((devq or sendq or srvq) and t < horizon + drain):
        A = int(a[t]) if t < horizon else 0
        cap = float(c[t % len(c)])
        t0 = t * tau
        obs = Observation(t, A, cap, sum(f.work_left * f.cut.work_s for f in devq) * 1e3,
                          sum(f.bytes_left for f in sendq) / 1e3)
        act: Action = policy.decide(obs)
        policy.update(obs, act)
        for _ in range(A):
            cut = act.cut
            devq.append(Frame(fid, t0, cut, 1.0, float(cut.bytes), cut.server_s,
                              ready=t0 + (quota.turn_s if quota is not None else 0.0)))
            fid += 1
        res.arrived += A
        speed = energy.speed(act.f_mhz)
        computed: list = []
        if quota is None:
            cpu_busy = _serve_work(devq, t0, t0 + tau, float(speed), computed)
        else:
            # busy time as the testbed charges it: CPU time over the slot's quota
            q = cfs.quota_s(energy.quota(act.f_mhz), quota.period_s)
            cpu.set_quota(q, t0)
            cpu_busy = _serve_quota(devq, t0, t0 + tau, cpu, top / quota.period_s, computed) / (q / quota.period_s)
        sendq.extend(computed)
        bps = act.rate_mbit * 1e6 / 8 * payload_share
        sent: list = []
        tx_busy = _serve_bytes(sendq, t0, t0 + tau, bps, sent) if bps > 0 else 0.0
        srvq.extend(sent)
        finished: list = []
        _serve_server(srvq, t0, t0 + tau, finished)
        for fr in finished:
            res.latencies_s.append(fr.done - fr.arrival)
            res.frames.append((fr.arrival, fr.marks))
            if fr.done <= horizon * tau:
                res.completed_in_horizon += 1
        e = float(energy.busy_power_w(act.f_mhz)) * cpu_busy + float(energy.radio.power_w(act.rate_mbit, cap)) * tx_busy
        res.slots.append(SlotRecord(t, A, cap, obs.q_ms, obs.b_kb, act.cut.label, act.f_mhz, act.rate_mbit,
                                    cpu_busy, tx_busy, e))
        t += 1
    res.unfinished = len(devq) + len(sendq) + len(srvq)
    return res
