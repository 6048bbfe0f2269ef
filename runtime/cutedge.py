"""CutEdge on the emulated testbed: a policy's decisions applied to a real device and link, frames
really computed and sent, in real time, slot by slot (edgetvm/partition/cutedge/).

The device is an EmulatedDevice (a TVM RPC server in the device profile's cgroups, inside the link's
network namespace); the link an EmulatedLink (a veth pair shaped by tbf on both ends). Each slot:

- clock: the device's CFS quota is set to cpu_quota x f / f_max of its period (cpu.cfs_quota_us), so
  its kernels really run slower at a lower clock;
- rate: both ends of the link are shaped to the chosen rate (`tc qdisc change ... tbf rate`), and the
  device's sender paces its socket at PAYLOAD_SHARE of it (SO_MAX_PACING_RATE): its bytes wait in the
  device's own buffer rather than in the shaped queue, where they would hold up the replies of the
  RPC calls that drive the device (with a 100 ms tbf queue a 8 ms call took 45-97 ms while 1 MB was
  sent; paced at 0.90 it took what it takes alone);
- frames: the slot's arrivals join the device's FIFO with the slot's cut. A thread here drives the
  device over RPC: computes the frame's device part there (its weights bound on the device), then
  calls the device's `edgetvm.device.send`, which queues the crossing tensors for a sending thread on
  the device and returns: the device computes frame i+1 while its radio sends frame i, over a TCP
  connection of its own through the shaped veth pair to a receiver here. A server thread here
  computes the server part of each frame as its bytes arrive.

Energy, from the power models over measured busy times: the processor's busy time in a slot is the
CPU time the device's cgroup used in it (/proc/PID/task/*/schedstat of its processes) over its quota
(CPUs), its energy that times P(f); the radio's busy time is the time the receiver spent receiving
frames in the slot (from a message's first byte to its last), its energy that times the radio power
at the slot's rate and capacity. The delay of a link profile is not used (the device's own connection
bypasses the delay relay): capacity traces carry the link's variation.

Everything changed is restored on exit, on errors and on Ctrl-C (quota, rate), then the device and
link are removed as usual.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import queue
import socket
import struct
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edgetvm.costmodels import cfs
from edgetvm.partition.cutedge.controller import PAYLOAD_SHARE, Observation
from edgetvm.partition.cutedge.simulate import Result, SlotRecord
from edgetvm.runtime.cgroup import cgroup_cpu_ns
from edgetvm.runtime.signals import deferred

MIN_RATE_MBIT = 0.05       # tbf needs a rate; the slowest a slot's chosen rate is shaped to
SETUP_RATE_MBIT = 1000     # while the parts and weights are uploaded


class Actuators:
    """The device's clock (its CFS quota) and the link's rate; `restore` puts back what was there."""

    def __init__(self, device, link, energy):
        self.cpu_dir = Path(device.cgroup.paths["cpu"])
        self.link, self.energy = link, energy
        self.period_us = int((self.cpu_dir / "cpu.cfs_period_us").read_text())
        self.saved_quota = (self.cpu_dir / "cpu.cfs_quota_us").read_text().strip()
        self.saved_rate = link.rate_mbit
        self.f_mhz = self.rate_mbit = None

    def quota_cpus(self, f_mhz: float) -> float:
        return cfs.quota_s(self.energy.quota(f_mhz), self.period_us / 1e6) / (self.period_us / 1e6)

    def set_clock(self, f_mhz: float) -> None:
        if f_mhz != self.f_mhz:
            (self.cpu_dir / "cpu.cfs_quota_us").write_text(str(round(self.quota_cpus(f_mhz) * self.period_us)))
            self.f_mhz = f_mhz

    def set_rate(self, mbit: float) -> None:
        mbit = max(MIN_RATE_MBIT, round(float(mbit), 4))
        if mbit != self.rate_mbit:
            self.link.set_rate(mbit)
            self.rate_mbit = mbit

    def restore(self) -> None:
        with deferred():  # a second Ctrl-C must not cut the restoring short
            with contextlib.suppress(OSError):
                (self.cpu_dir / "cpu.cfs_quota_us").write_text(self.saved_quota)
            if self.link.netns:
                with contextlib.suppress(RuntimeError):
                    self.link.set_rate(self.saved_rate)
            self.f_mhz = self.rate_mbit = None


@dataclass
class _Frame:
    id: int
    arrival: float
    cut: object
    done: float | None = None
    marks: dict = field(default_factory=dict)   # stage -> [start, end] (simulate.STAGES)

    def finished(self) -> bool:
        # The server may finish a frame before the device thread has noted when its send call returned.
        return self.done is not None and self.marks["device"][1] is not None


@dataclass
class _Message:
    tag: int
    first: float
    last: float
    nbytes: int


class Receiver:
    """The server side of the devices' sends: one TCP listener on the link's host address; each
    message (runtime/device_server.py `send`) handed to `on_message(tag, payloads, first, last)`."""

    def __init__(self, host: str, on_message):
        self.sock = socket.create_server((host, 0))
        self.port = self.sock.getsockname()[1]
        self.on_message = on_message
        self.received = 0          # bytes, counted as they arrive
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True, name="cutedge-receiver").start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _read(self, f, n: int) -> bytes:
        parts, left = [], n
        while left:
            chunk = f.read(min(left, 1 << 16))
            if not chunk:
                raise EOFError
            parts.append(chunk)
            left -= len(chunk)
            with self.lock:
                self.received += len(chunk)
        return b"".join(parts)

    def _serve(self, conn) -> None:
        f = conn.makefile("rb", buffering=0)
        try:
            while True:
                head = self._read(f, 12)
                first = time.perf_counter()
                tag, n = struct.unpack("!QI", head)
                lens = struct.unpack(f"!{n}Q", self._read(f, 8 * n))
                payloads = [self._read(f, ln) for ln in lens]
                self.on_message(tag, payloads, first, time.perf_counter())
        except (EOFError, OSError):
            return
        finally:
            conn.close()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()


def _split_dir(base: Path, costs, device_set) -> Path:
    return base / hashlib.sha256(repr(sorted(device_set)).encode()).hexdigest()[:12]


def compile_cuts(setup, cuts, splits_dir: Path, log=print) -> dict:
    """A split artifact per cut (kept in splits_dir, reused when it is there and intact)."""
    from edgetvm.errors import UserError
    from edgetvm.partition import split
    from edgetvm.targets import load_board

    splits_dir.mkdir(parents=True, exist_ok=True)
    out = {}
    for c in cuts:
        if c.device in out:
            continue
        path = _split_dir(splits_dir, setup.costs, c.device)
        try:
            manifest = split.open_split(path) if path.exists() else None
        except UserError:
            manifest = None
        if manifest is None or manifest["device_ops"] != sorted(c.device):
            import shutil

            shutil.rmtree(path, ignore_errors=True)
            log(f"  compiling the split {c.label} ({len(c.device)} device ops)")
            split.write_split(setup.model, c.device, load_board("host"), setup.server, path,
                              {"crossing": setup.costs.crossing(c.device)})
            manifest = split.open_split(path)
        out[c.device] = (path, manifest)
    return out


class Testbed:
    """The device, the link, the compiled cuts and the three stages; `run(policy)` replays the traces."""

    def __init__(self, setup, link, device, splits: dict, log=print):
        from edgetvm.compiler import random_inputs
        from edgetvm.runtime.split import SplitRunner

        self.s, self.link, self.device, self.log = setup, link, device, log
        self.act = Actuators(device, link, setup.energy)
        self.act.set_rate(SETUP_RATE_MBIT)
        self.session = device.session()
        self.send = self.session.get_function("edgetvm.device.send")
        self.runners = {d: SplitRunner(path, mf, self.session, None) for d, (path, mf) in splits.items()}
        first = next(iter(self.runners.values()))
        self.placed = first.place(random_inputs(setup.model.inputs, seed=0))  # the frame, already on the device
        self.frames: dict[int, _Frame] = {}
        self.messages: list[_Message] = []
        self.lock = threading.Lock()
        self.devq: queue.Queue = queue.Queue()
        self.srvq: queue.Queue = queue.Queue()
        self.pushed = 0
        self.in_device: deque = deque()          # frames not computed yet, in order
        self.current: tuple | None = None        # (frame, start) computing now
        self.next_id = 1
        self.receiver = Receiver(link.host_address, self._on_message)
        self.errors: list[BaseException] = []
        threading.Thread(target=self._device_loop, daemon=True, name="cutedge-device").start()
        threading.Thread(target=self._server_loop, daemon=True, name="cutedge-server").start()
        self._warm_up()

    # ------------------------------------------------------------------ the stages

    def _device_loop(self) -> None:
        try:
            while (fr := self.devq.get()) is not None:
                r = self.runners[fr.cut.device]
                parts = r.manifest["parts"]
                with self.lock:
                    self.in_device.popleft()
                    self.current = (fr, time.perf_counter())
                fr.marks["device"] = [self.current[1], None]
                values = {}
                if fr.cut.device:
                    outs = r.device.call([self.placed[v] for v in parts["device"]["inputs"]] + r.device.weights)
                    values = dict(zip(parts["device"]["outputs"], outs))
                tensors = [values[v] if v in values else self.placed[v] for v in parts["server"]["inputs"]]
                rate = self.act.rate_mbit or SETUP_RATE_MBIT
                with self.lock:
                    self.current = None
                    self.pushed += sum(int(np.prod(t.shape)) * np.dtype(t.dtype).itemsize for t in tensors)
                self.send(self.link.host_address, self.receiver.port, fr.id,
                          int(rate * 1e6 / 8 * PAYLOAD_SHARE), *tensors)
                fr.marks["device"][1] = time.perf_counter()
        except BaseException as e:  # noqa: BLE001 - reported by run()
            self.errors.append(e)

    def _on_message(self, tag, payloads, first, last) -> None:
        with self.lock:
            self.messages.append(_Message(tag, first, last, sum(map(len, payloads))))
        self.srvq.put((tag, payloads, first, last))

    def _server_loop(self) -> None:
        try:
            while (item := self.srvq.get()) is not None:
                tag, payloads, first, last = item
                fr = self.frames[tag]
                fr.marks["send"] = [first, last]
                fr.marks["server"] = [time.perf_counter(), None]
                r = self.runners[fr.cut.device]
                cross = {c["value"]: c for c in r.manifest["crossing"]}
                ins = r.manifest["parts"]["server"]["inputs"]
                values = {v: np.frombuffer(p, dtype=cross[v]["dtype"]).reshape(cross[v]["shape"])
                          for v, p in zip(ins, payloads)}
                r.server_step(values)
                fr.marks["server"][1] = time.perf_counter()
                fr.done = fr.marks["server"][1]
        except BaseException as e:  # noqa: BLE001
            self.errors.append(e)

    def _warm_up(self) -> None:
        """One frame through every cut (first calls, the device's sending connection)."""
        from edgetvm.partition.cutedge.controller import make_cut

        for d in self.runners:
            fr = self._admit(make_cut(self.s.costs, d), time.perf_counter())
            self._wait(lambda: fr.done is not None, 120)
        self.frames.clear()

    def _admit(self, cut, arrival: float) -> _Frame:
        fr = _Frame(self.next_id, arrival, cut)
        self.next_id += 1
        self.frames[fr.id] = fr
        with self.lock:
            self.in_device.append(fr)
        self.devq.put(fr)
        return fr

    def _wait(self, cond, timeout: float) -> bool:
        end = time.monotonic() + timeout
        while not cond():
            if self.errors:
                raise self.errors[0]
            if time.monotonic() > end:
                return False
            time.sleep(0.002)
        return True

    def calibrate(self, frames: int = 6, rounds: int = 5, rate_mbit: float | None = None,
                  per_slot: int | None = None, slot_s: float | None = None):
        """What a frame of every compiled cut costs here at f_max (controller.Measured), the link at
        `rate_mbit` (the capacity trace's mean): the processor's busy time (the cgroup's CPU time over its
        quota: kernels, the RPC call, the hand-over to the sender), the device stage's wall time beyond it
        (the calls' round trips, which do not scale with the clock), the server's wall time. Frames come
        `per_slot` at a time, a group every `slot_s` (or when the last is done, if later), as the arrival
        trace brings them (default: its mean frames per slot, at its slot length): a frame after an idle
        device costs it more CPU than one right after another (costmodels/cfs.py measured 0.70 against
        1.0 ms for MobileNetV3 after 50 ms idle), so frames one after another understated a run's energy
        by 25-47%. Rounds of `frames` frames per cut, cuts taking turns; the median round counts (single
        batches varied by up to 5x for the cheap cuts)."""
        from edgetvm.partition.cutedge.controller import Measured, Stage, make_cut

        rounds_of: dict = {d: [] for d in self.runners}
        if per_slot is None:
            per_slot = max(1, round(float(np.mean(self.s.arrivals.values))))
        if slot_s is None:
            slot_s = self.s.arrivals.slot_s
        try:
            self.act.set_rate(rate_mbit or SETUP_RATE_MBIT)
            self.act.set_clock(self.s.energy.f_max)
            q = self.act.quota_cpus(self.s.energy.f_max)
            for _ in range(rounds):
                for d in self.runners:
                    cut = make_cut(self.s.costs, d)
                    ns0, batch = cgroup_cpu_ns(self.act.cpu_dir), []
                    while len(batch) < frames:
                        t0 = time.perf_counter()
                        group = [self._admit(cut, t0) for _ in range(min(per_slot, frames - len(batch)))]
                        if not self._wait(lambda: all(f.finished() for f in group), 60):
                            raise RuntimeError(f"calibrating cut {cut.label}: a frame not done in 60 s")
                        batch += group
                        if len(batch) < frames:
                            time.sleep(max(0.0, t0 + slot_s - time.perf_counter()))
                    work = (cgroup_cpu_ns(self.act.cpu_dir) - ns0) / 1e9 / frames / q
                    stage, server = (float(np.median([x.marks[k][1] - x.marks[k][0] for x in batch]))
                                     for k in ("device", "server"))
                    rounds_of[d].append((work, stage, server))
                    self.frames.clear()
        finally:
            self.act.restore()   # the clock and the rate the testbed was set up with
            self.frames.clear()
        out = {}
        for d, rs in rounds_of.items():
            work, stage, server = np.median(np.array(rs), axis=0)
            out[d] = Stage(work_s=float(work), call_s=max(float(stage - work), 0.0), server_s=float(server))
        return Measured(out)

    # ------------------------------------------------------------------ observing

    def backlog(self, now: float) -> tuple[float, float]:
        """(device work left, ms at f_max; bytes computed and not yet received, kB)."""
        with self.lock:
            q = sum(f.cut.work_s for f in self.in_device)
            if self.current is not None:
                fr, start = self.current
                speed = self.s.energy.speed(self.act.f_mhz or self.s.energy.f_max)
                q += max(0.0, fr.cut.work_s - (now - start) * float(speed))
            b = self.pushed - self.receiver.received
        return q * 1e3, max(b, 0) / 1e3

    # ------------------------------------------------------------------ the device's CFS clocks

    def _timers(self, read):
        """`read()` of the kernel's timer list once this device's period timer is armed, or None."""
        return cfs.while_armed(self.session.get_function("runtime.NumThreads"), read)

    def quota(self, turn_s: float = 0.0):
        """The device's clock as CFS enforces it, for the simulation (simulate.Quota): its period, its
        ticks' phase, slot 0 on a period boundary as `run` starts it, the controller's `turn_s` (None
        where the kernel's timer list is unreadable)."""
        from edgetvm.partition.cutedge.simulate import Quota

        phase = self._timers(lambda: cfs.tick_phase(min(self.device.cgroup.cpus)))
        return None if phase is None else Quota(self.act.period_us / 1e6, phase, 0.0, turn_s)

    def turn(self, slots: int = 30) -> float:
        """The controller's turn, measured: how long after a slot starts its first frame starts on the
        device (waking, observing, deciding, setting the clock, admitting, the driver thread's call), the
        median over `slots` slots of the traces with the deepest compiled cut at the top clock."""
        from edgetvm.partition.cutedge.controller import Fixed, make_cut

        deepest = max(self.runners, key=len)
        res = self.run(Fixed("turn", make_cut(self.s.costs, deepest), self.s.energy), slots=slots)
        first: dict = {}
        for arrival, marks in res.frames:
            first[arrival] = min(first.get(arrival, np.inf), marks["device"][0])
        return float(np.median([m - a for a, m in first.items()])) if first else 0.0

    def _first_slot(self, earliest: float) -> float:
        """Slot 0's start: the first period boundary of the device's CFS timer after `earliest`, so that
        frames meet the quota where the simulation (`quota()`) has them meet it; `earliest` if unknown."""
        b = self._timers(cfs.period_boundary)
        if b is None:
            return earliest
        p = self.act.period_us / 1e6
        return b + max(0, int(np.ceil((earliest - b) / p))) * p

    # ------------------------------------------------------------------ a run

    def run(self, policy, drain_slots: int | None = None, slots: int | None = None) -> Result:
        """Replay the traces (their first `slots` slots) with `policy` deciding each slot, in real time."""
        s = self.s
        tau = s.arrivals.slot_s
        a, c = s.arrivals.values, s.link.values
        horizon = len(a) if slots is None else min(len(a), slots)
        drain = horizon if drain_slots is None else drain_slots
        res = Result(policy.name, tau, horizon)
        self.frames.clear()
        with self.lock:
            self.messages.clear()
        mine: list[_Frame] = []
        marks, quotas, acts = [], [], []
        t0 = res.started = self._first_slot(time.perf_counter() + 0.05)
        t = 0
        try:
            while True:
                busy = any(f.done is None for f in mine)
                if t >= horizon and (not busy or t >= horizon + drain):
                    break
                start = t0 + t * tau
                time.sleep(max(0.0, start - time.perf_counter()))
                if self.errors:
                    raise self.errors[0]
                now = time.perf_counter()
                marks.append((now, cgroup_cpu_ns(self.act.cpu_dir)))
                A = int(a[t]) if t < horizon else 0
                cap = float(c[t % len(c)])
                q_ms, b_kb = self.backlog(now)
                obs = Observation(t, A, cap, q_ms, b_kb)
                act = policy.decide(obs)
                policy.update(obs, act)
                self.act.set_clock(act.f_mhz)
                for _ in range(A):  # before the rate: tc takes milliseconds, the frames' sending comes later
                    mine.append(self._admit(act.cut, start))
                self.act.set_rate(act.rate_mbit)
                quotas.append(self.act.quota_cpus(act.f_mhz))
                acts.append((obs, act))
                res.arrived += A
                t += 1
            marks.append((time.perf_counter(), cgroup_cpu_ns(self.act.cpu_dir)))
        finally:
            self.act.restore()
        with self.lock:
            msgs = list(self.messages)
        for i, (obs, act) in enumerate(acts):
            (ts, ns0), (te, ns1) = marks[i], marks[i + 1]
            cpu_busy = min(te - ts, (ns1 - ns0) / 1e9 / quotas[i])
            tx_busy = _union_within([(m.first, m.last) for m in msgs], ts, te)
            e = float(s.energy.busy_power_w(act.f_mhz)) * cpu_busy + \
                float(s.energy.radio.power_w(act.rate_mbit, obs.capacity_mbit)) * tx_busy
            res.slots.append(SlotRecord(obs.slot, obs.arrivals, obs.capacity_mbit, obs.q_ms, obs.b_kb, act.cut.label,
                                        act.f_mhz, act.rate_mbit, cpu_busy, tx_busy, e))
        for fr in mine:
            if fr.done is not None:
                res.latencies_s.append(fr.done - fr.arrival)
                if fr.finished():
                    res.frames.append((fr.arrival, fr.marks))
                if fr.done <= t0 + horizon * tau:
                    res.completed_in_horizon += 1
        res.unfinished = sum(f.done is None for f in mine)
        if res.unfinished:  # let them finish before the next run, unaccounted
            self._wait(lambda: all(f.done is not None for f in mine), 120)
        return res

    def close(self) -> None:
        self.act.restore()
        self.devq.put(None)
        self.srvq.put(None)
        self.receiver.close()


def _union_within(intervals, lo: float, hi: float) -> float:
    """Length of the union of intervals, clipped to [lo, hi]."""
    segs = sorted((max(a, lo), min(b, hi)) for a, b in intervals if b > lo and a < hi)
    total, end = 0.0, lo
    for a, b in segs:
        a = max(a, end)
        if b > a:
            total += b - a
            end = b
    return total


@contextlib.contextmanager
def open_testbed(setup, cuts, splits_dir: Path, log=print):
    """A Testbed for `cuts` (each compiled as a split artifact) on a fresh emulated device behind a fresh
    link; on exit (errors and Ctrl-C included) the quota and rate are restored, then both removed."""
    from edgetvm.errors import UserError
    from edgetvm.latte.devices import cgroups_unavailable
    from edgetvm.runtime import link as link_mod
    from edgetvm.runtime.device import EmulatedDevice
    from edgetvm.runtime.link import EmulatedLink
    from edgetvm.targets.links import LinkProfile

    if reason := link_mod.unavailable_reason() or cgroups_unavailable():
        raise UserError(f"the emulated testbed is not available here: {reason}")
    splits = compile_cuts(setup, cuts, splits_dir, log)
    prof = LinkProfile(name="cutedge", description="capacity from a trace", bandwidth_mbit=SETUP_RATE_MBIT)
    with EmulatedLink(prof) as link, EmulatedDevice(setup.device, link=link) as device:
        link.unshaped(device.port)   # the RPC calls that drive the device are not its radio's traffic
        tb = Testbed(setup, link, device, splits, log)
        try:
            yield tb
        finally:
            tb.close()


def record_link(link_profile: str, slots: int, slot_ms: float, source=None):
    """A link trace recorded from the emulated link: a sender in the link's namespace keeps it full,
    the bytes received here per slot are its payload rate (Mbit/s). With `source`, the link's rate
    follows that capacity trace slot by slot (tc), so the recording is what tbf really delivers of it."""
    import subprocess
    import sys

    from edgetvm.errors import UserError
    from edgetvm.partition.cutedge.traces import Trace
    from edgetvm.runtime import link as link_mod
    from edgetvm.runtime.leftovers import owner_env
    from edgetvm.runtime.link import EmulatedLink

    if reason := link_mod.unavailable_reason():
        raise UserError(f"cannot record a link trace here: {reason}")
    if source is not None and abs(source.slot_ms - slot_ms) > 1e-9:
        raise UserError(f"--from trace has {source.slot_ms:g} ms slots; record with --slot-ms {source.slot_ms:g}")
    tau = slot_ms / 1e3
    counts = np.zeros(slots)
    with EmulatedLink(link_profile) as link:
        srv = socket.create_server((link.host_address, 0))
        port = srv.getsockname()[1]
        code = ("import socket,sys\ns=socket.create_connection((sys.argv[1],int(sys.argv[2])))\n"
                "b=bytes(1<<16)\nwhile True: s.sendall(b)\n")
        proc = subprocess.Popen(link.netns_command([sys.executable, "-c", code, link.host_address, str(port)]),
                                env={**os.environ, **owner_env()}, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            srv.settimeout(15)
            conn, _ = srv.accept()
            conn.settimeout(tau)
            t0 = time.perf_counter()
            for t in range(slots):
                if source is not None:
                    link.set_rate(max(MIN_RATE_MBIT, float(source.values[t % len(source)])))
                end = t0 + (t + 1) * tau
                while (now := time.perf_counter()) < end:
                    conn.settimeout(max(1e-3, end - now))
                    with contextlib.suppress(TimeoutError, socket.timeout):
                        counts[t] += len(conn.recv(1 << 20))
            conn.close()
        finally:
            proc.kill()
            proc.wait()
            srv.close()
    mbit = np.maximum(counts * 8 / tau / 1e6, 1e-3)
    meta = {"model": "recorded", "link_profile": link_profile,
            "from": str(source.path) if source is not None else "fixed rate",
            "note": "payload Mbit/s received per slot through the shaped veth pair"}
    return Trace("link", slot_ms, mbit, meta)
