"""Run a split artifact: the device part where the frame is, its crossing tensors over the link, the
server part, on TVM RPC sessions (an emulated device behind a shaped link, or real boards).

The frame starts on the device: it is placed there before the clock starts, as a camera would. A
crossing tensor travels when the server side reads it from the device's session, so on an emulated
link it crosses the shaped veth pair. When frames stream, two threads overlap the stages: the
device computes and sends frame i+1 while the server computes frame i (the GIL is released in
TVM's FFI calls, so the threads really overlap).
"""

from __future__ import annotations

import queue
import statistics
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edgetvm.runtime.artifact import open_artifact
from edgetvm.runtime.session import Runner
from edgetvm.runtime.tensors import checked_inputs, to_numpy, to_tvm


READS_AFTER_IDLE = 8   # 32 KiB reads that find the link's buckets full, in calibrate_device
BURST = 8   # frames per burst when latency is measured in bursts after random idle times


@dataclass
class FrameTimes:
    device_s: float
    transfer_s: float
    server_s: float

    @property
    def total_s(self) -> float:
        return self.device_s + self.transfer_s + self.server_s


@dataclass
class StreamResult:
    frames: int
    seconds: float
    latencies_s: list[float] = field(default_factory=list)

    @property
    def fps(self) -> float:
        return self.frames / self.seconds


class SplitRunner:
    def __init__(self, path: str | Path, manifest: dict, device_session=None, server_session=None):
        self.manifest = manifest
        self.device = Runner(open_artifact(Path(path) / "device"), device_session)
        self.server = Runner(open_artifact(Path(path) / "server"), server_session)
        self.data = [(i["value"], i["name"]) for i in manifest["inputs"]]

    def place(self, inputs: dict[str, np.ndarray]) -> dict:
        """The frame's data inputs as tensors on the device, where the frame starts."""
        from edgetvm.passes.onnx_import import TensorInfo

        infos = [TensorInfo(i["name"], tuple(i["shape"]), i["dtype"]) for i in self.manifest["inputs"]]
        arrays = checked_inputs(infos, inputs)
        return {v: to_tvm(a, self.device.dev) for (v, _), a in zip(self.data, arrays)}

    def device_step(self, placed: dict) -> tuple[dict, float, float]:
        """Run the device part and bring its crossing tensors across: (values, compute s, transfer s)."""
        t0 = time.perf_counter()
        outs = self.device.call([placed[v] for v in self.manifest["parts"]["device"]["inputs"]] + self.device.weights)
        t1 = time.perf_counter()
        got = {v: to_numpy(o) for v, o in zip(self.manifest["parts"]["device"]["outputs"], outs)}
        # A data input the server reads crosses the link as well.
        got.update({v: to_numpy(placed[v]) for v in self.manifest["parts"]["server"]["inputs"] if v in placed})
        return got, t1 - t0, time.perf_counter() - t1

    def server_step(self, values: dict) -> tuple[dict, float]:
        t0 = time.perf_counter()
        ins = self.manifest["parts"]["server"]["inputs"]
        outs = self.server.call([to_tvm(values[v], self.server.dev) for v in ins] + self.server.weights)
        res = {v: o.numpy() for v, o in zip(self.manifest["parts"]["server"]["outputs"], outs)}
        return res, time.perf_counter() - t0

    def outputs(self, device_vals: dict, server_vals: dict) -> dict[str, np.ndarray]:
        merged = {**device_vals, **server_vals}
        return {o["name"]: merged[o["value"]] for o in self.manifest["outputs"]}

    def run(self, inputs: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], FrameTimes]:
        placed = self.place(inputs)
        dv, dev_s, xfer_s = self.device_step(placed)
        sv, srv_s = self.server_step(dv)
        return self.outputs(dv, sv), FrameTimes(dev_s, xfer_s, srv_s)

    def latency(self, inputs, repeat: int = 10, idle_max_s: float = 0.0, burst: int = BURST, rel_sem: float = 0.0,
                max_frames: int = 400, max_s: float = float("inf"), seed: int = 0) -> list[FrameTimes]:
        """Times of at least `repeat` frames run one after another. With `idle_max_s`, in bursts of
        `burst` frames, each burst after an idle time uniform in [0, idle_max_s): under a CFS quota,
        frames run back to back lock onto one phase of the period and their mean depends on which.
        With `rel_sem`, bursts are added until the standard error of the bursts' mean latency is at
        most that share of it (or `max_frames`); after `max_s`, two bursts are enough."""
        import random

        rng = random.Random(seed)
        burst = burst if idle_max_s > 0 else 1
        placed = self.place(inputs)
        self.server_step(self.device_step(placed)[0])  # warm-up
        out: list[FrameTimes] = []
        t0 = time.perf_counter()

        def more() -> bool:
            if len(out) >= 2 * burst and time.perf_counter() - t0 >= max_s:
                return False   # long frames (a slow link's): their few are enough, CFS's phases matter little
            if len(out) < repeat:
                return True
            if rel_sem <= 0 or len(out) >= max_frames:
                return False
            return burst_sem(out, burst) > rel_sem

        while more():
            if idle_max_s > 0:
                time.sleep(rng.uniform(0.0, idle_max_s))
            for _ in range(burst):
                dv, dev_s, xfer_s = self.device_step(placed)
                _, srv_s = self.server_step(dv)
                out.append(FrameTimes(dev_s, xfer_s, srv_s))
        return out

    def stream(self, inputs, frames: int = 20) -> StreamResult:
        """Frames through device+link and server stages at once; frames/s and per-frame latency."""
        placed = self.place(inputs)
        self.server_step(self.device_step(placed)[0])
        handoff: queue.Queue = queue.Queue(maxsize=2)
        done: list[float] = []
        errors: list[BaseException] = []

        def device_stage():
            try:
                for _ in range(frames):
                    start = time.perf_counter()
                    dv, _, _ = self.device_step(placed)
                    handoff.put((start, dv))
            except BaseException as e:  # noqa: BLE001 - re-raised in the caller
                errors.append(e)
            handoff.put(None)

        t0 = time.perf_counter()
        th = threading.Thread(target=device_stage, name="split-device", daemon=True)
        th.start()
        while (item := handoff.get()) is not None:
            start, dv = item
            self.server_step(dv)
            done.append(time.perf_counter() - start)
        th.join()
        if errors:
            raise errors[0]
        return StreamResult(len(done), time.perf_counter() - t0, done)


def calibrate_device(device, session, bandwidth_bps: float, rounds: int = 60, seed: int = 0):
    """The device's CPU per RPC call, per tensor sent and per byte sent, and the link as frames see it,
    measured on `device` (an EmulatedDevice: its cgroup's CPU time) over `session` with calls of a global
    function, reads of a 1 KiB and a 32 KiB tensor, and frames without compute (a tensor made on the
    device, read, freed) in bursts after random idle times, as `SplitRunner.latency` runs frames; the
    quota is lifted meanwhile so that throttling does not count as CPU. The link: its time per tensor
    beyond the bytes and per call (the additive model), and where the device has an emulated link, each
    direction's tbf as the kernel reports it, an RPC round trip's time beyond its buckets (from the
    frames) and per byte read beyond them and the device's CPU (from 32 KiB reads after idle times).
    (cuts.DeviceCPU, cuts.Link)"""
    import random

    import tvm

    from edgetvm.costmodels import cfs
    from edgetvm.partition import cuts

    quota = device.cgroup.cg.cpu / "cpu.cfs_quota_us"
    period_us = int((device.cgroup.cg.cpu / "cpu.cfs_period_us").read_text())
    kept = quota.read_text().strip()
    ping = session.get_function("runtime.NumThreads")
    dev = session.cpu()
    small, big = (tvm.runtime.tensor(np.zeros(n // 4, "float32"), dev) for n in (1024, 32768))

    def per_round(fn) -> tuple[float, float]:
        fn()
        c0, t0 = device.cpu_seconds(), time.perf_counter()
        for _ in range(rounds):
            fn()
        return (device.cpu_seconds() - c0) / rounds, (time.perf_counter() - t0) / rounds

    quota.write_text("-1")
    try:
        call_cpu, _ = per_round(ping)
        small_cpu, small_wall = per_round(lambda: to_numpy(small))
        big_cpu, _ = per_round(lambda: to_numpy(big))
        # A frame's link time is not its messages' times added up: the link's token bucket (tbf) lets a
        # few hundred bytes through at once after an idle moment and meters them at its rate when busy,
        # and a read is two round trips. So time frames as they come: a call that returns a tensor, its
        # read and its free, BURST at a time after idle times up to a CFS period.
        rng, frames, idles = random.Random(seed), [], []
        for _ in range(max(2, rounds // BURST)):
            idles.append(rng.uniform(0.0, period_us / 1e6))
            time.sleep(idles[-1])
            for _ in range(BURST):
                t0 = time.perf_counter()
                out = tvm.runtime.empty((2,), "float32", dev)
                to_numpy(out)
                frames.append(time.perf_counter() - t0)
                del out
        # Reads that find the link's buckets full, as a frame's reads mostly do (see cuts.calibration_read_byte).
        shaper = shaper_of(device.link) if getattr(device, "link", None) is not None else None
        big_reads = []
        if shaper is not None:
            refill_s = max(shaper.up_burst / shaper.up_rate, shaper.down_burst / shaper.down_rate)
            for _ in range(READS_AFTER_IDLE):
                time.sleep(2 * refill_s)
                t0 = time.perf_counter()
                to_numpy(big)
                big_reads.append(time.perf_counter() - t0)
    finally:
        quota.write_text(kept)
    tick_phase_s = cfs.while_armed(ping, lambda: cfs.tick_phase(min(device.cgroup.cpus))) if int(kept) > 0 else None
    byte_s = max(0.0, (big_cpu - small_cpu) / (32768 - 1024))
    tensor_s = max(0.0, small_cpu - 1024 * byte_s)
    per_tensor_s = max(0.0, small_wall - 1024 * 8 / bandwidth_bps)
    call_s = max(0.0, statistics.fmean(frames) - per_tensor_s - 8 * 8 / bandwidth_bps)
    share = int(kept) / period_us if int(kept) > 0 else 1.0
    cpu = cuts.DeviceCPU(min(share, 1.0), period_us / 1e6, call_cpu, tensor_s, byte_s, tick_phase_s)
    round_trip_s = read_byte_s = 0.0
    if shaper is not None:
        round_trip_s = cuts.calibration_round_trip(shaper, frames, idles, BURST)
        read_byte_s = cuts.calibration_read_byte(shaper, round_trip_s, byte_s, 32768, statistics.median(big_reads))
    return cpu, cuts.Link(bandwidth_bps, per_tensor_s, call_s, shaper, round_trip_s, read_byte_s)


def shaper_of(link):
    """An EmulatedLink's two tbf qdiscs as the cost model takes them, or None where an end is not a tbf."""
    from edgetvm.partition.cuts import Shaper

    q = link.qdiscs()
    if any(q[side]["kind"] != "tbf" for side in ("host", "device")):
        return None
    return Shaper(q["device"]["rate_mbit"] * 1e6 / 8, q["device"]["burst_bytes"],
                  q["host"]["rate_mbit"] * 1e6 / 8, q["host"]["burst_bytes"])


def mean_times(times: list[FrameTimes]) -> FrameTimes:
    """Mean of each part: under a CFS quota a device's frames alternate between full speed and a wait
    for the next period, so their median says little about the time a frame takes on average."""
    return FrameTimes(statistics.fmean(t.device_s for t in times), statistics.fmean(t.transfer_s for t in times),
                      statistics.fmean(t.server_s for t in times))


def burst_sem(times: list[FrameTimes], burst: int) -> float:
    """Standard error of the mean latency over bursts of `burst` frames, over that mean."""
    xs = [statistics.fmean(t.total_s for t in times[i:i + burst]) for i in range(0, len(times), burst)]
    return statistics.stdev(xs) / len(xs) ** 0.5 / statistics.fmean(xs) if len(xs) > 1 else float("inf")


def median_times(times: list[FrameTimes]) -> FrameTimes:
    return FrameTimes(statistics.median(t.device_s for t in times), statistics.median(t.transfer_s for t in times),
                      statistics.median(t.server_s for t in times))
