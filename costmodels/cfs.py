"""Wall time of CPU work under a CFS bandwidth quota, simulated as the kernel enforces it.

A device emulated with a CPU quota (cgroup v1 `cpu.cfs_quota_us` per `cpu.cfs_period_us`) does not
run a job at quota/period of its speed: a short job that finds quota left in the current period runs
at full speed, one that meets the end of it waits for the next period, and the kernel notices that a
job has spent its quota only at a scheduler tick (every 4 ms at HZ=250), so a job overruns and pays
the debt in the next periods. Whether a frame's device part takes 1.5 ms or 10 ms depends on where
it falls; the mean over a run of frames depends on the work, the gap between frames (the link and
the server) and the quota, and dividing the work by the quota share gets it wrong both ways (the
device-only ResNet measured +20% over work/share at a quarter of a core, a MobileNetV3 -15%).

The simulation follows kernel/sched/fair.c: a global pool refilled to the quota at every period
boundary (unused quota does not carry over); the cgroup's runqueue takes runtime from the pool a
slice at a time (`sched_cfs_bandwidth_slice_us`, 5 ms, or what the pool has); runtime is charged as
the task runs and checked at ticks and when the task wakes; a runqueue whose runtime is spent and
finds the pool empty is throttled until a period boundary repays its debt from the refilled pool;
an idle runqueue returns all but 1 ms of its runtime to the pool. Ticks and period boundaries run
on their own clocks: `mean_wall` averages over their offsets, or takes the ticks' phase.

Two clocks decide a frame's fate, and a run of frames knows neither: where its frames start in the
period, and where the ticks fall in it. Frames run back to back keep one start phase (the same cut
measured +21%, -17% and -26% of its prediction in one run); bursts of frames after random idle times
(`idle_max_s`) sample every phase, so a run's mean converges to the one simulated over start phases as
bursts are added. The ticks' phase is fixed for a device's life and differs between devices (a 3.3 ms
part every 90 ms: 4.5 to 7.5 ms a frame over tick phases): `tick_phase` reads it from the kernel, so
that an emulated device is predicted for its own phase. Idle times cost CPU too: after one the same
work costs more CPU on this VM (MobileNetV3, one thread, 100 calls each after an idle time uniform in
[0, x): 0.70 ms of CPU for x = 0 and 2 ms, 0.75-0.79 for 10 ms, 1.0-1.08 for 50 ms), which no profile
taken back to back shows, so only a burst's first frame waits.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

TICK_S = 0.004          # CONFIG_HZ=250 (this kernel; `grep CONFIG_HZ= /boot/config-$(uname -r)`)
SLICE_S = 0.005         # /proc/sys/kernel/sched_cfs_bandwidth_slice_us
MIN_RUNTIME_S = 0.001   # min_cfs_rq_runtime: what an idle runqueue keeps


def _timers(cpu: int, timer_list: str) -> tuple[list[float], float | None] | None:
    """(the expiry of every armed CFS period timer, the next scheduler tick of `cpu`), seconds of
    CLOCK_MONOTONIC (time.perf_counter's clock here), from the kernel's timer list (root only)."""
    try:
        text = open(timer_list).read()
    except OSError:
        return None
    periods, tick, here = [], None, None
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("cpu: "):
            here = int(line.split()[1])
        elif ", sched_cfs_period_timer" in line or (here == cpu and tick is None and (
                ", tick_nohz_handler" in line or ", tick_sched_timer" in line)):
            expires = int(lines[i + 1].split("expires at ")[1].split("-")[0]) * 1e-9
            if "sched_cfs_period_timer" in line:
                periods.append(expires)
            else:
                tick = expires
    return periods, tick


def tick_phase(cpu: int = 0, timer_list: str = "/proc/timer_list") -> float | None:
    """Where the scheduler ticks of `cpu` fall after the boundaries of the one CFS period timer now
    armed (seconds in [0, TICK_S)), read from the kernel's timer list (root only); None when that is
    unreadable or not one period timer is armed. A cgroup's period timer keeps its phase for its
    life and ticks keep theirs (measured: the same phase after 3 s of frames and idle), so this fixes
    for one emulated device what `mean_wall` otherwise averages over: whether a frame that overruns
    its quota is caught at once or runs on to the next tick (ResNet's device part after random idle
    times: 6.0 to 6.2 ms over tick phases; the detector's first layers at 5 Mbit/s, 4.5 to 7.5)."""
    got = _timers(cpu, timer_list)
    if got is None or len(got[0]) != 1 or got[1] is None:
        return None
    return (got[1] - got[0][0]) % TICK_S


def period_boundary(timer_list: str = "/proc/timer_list") -> float | None:
    """A boundary of the one CFS period timer now armed (its next expiry, in time.perf_counter's clock),
    or None: a run that starts its slots on a boundary puts them where a simulation starting at 0 does."""
    got = _timers(0, timer_list)
    return got[0][0] if got is not None and len(got[0]) == 1 else None


def while_armed(ping, read, seconds: float = 1.0):
    """`read()` (tick_phase, period_boundary) once it gives a value, calling `ping()` (an RPC call to the
    device) before each try: calls keep the device's period timer armed while another's lapses (a
    profile's cgroup, a device just removed: its timer runs out within a period or two); None after
    `seconds`."""
    import time

    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        ping()
        if (got := read()) is not None:
            return got
    return None


def quota_s(cpus: float, period_s: float) -> float:
    """The quota cpu.cfs_quota_us takes for `cpus` of a period: whole microseconds, 1 ms at least (CFS
    refuses less)."""
    return max(1000, round(cpus * period_s * 1e6)) / 1e6


def _next(t: float, grid: float, offset: float) -> float:
    """The first point of the grid offset + k*grid strictly after t."""
    return offset + (math.floor((t - offset) / grid + 1e-9) + 1) * grid


class Bandwidth:
    """One cgroup's CFS bandwidth state (the global pool, the runqueue's runtime) over time: `run` a job
    of CPU work from a time on, `idle` after it, `set_quota` as a write to cpu.cfs_quota_us does
    (the pool refilled at once; the period timer keeps its phase). One runnable task."""

    def __init__(self, quota_s: float, period_s: float, period_offset: float = 0.0, tick_offset: float = 0.0,
                 tick_s: float = TICK_S):
        self.quota_s, self.period_s, self.tick_s = quota_s, period_s, tick_s
        self.period_offset, self.tick_offset = period_offset, tick_offset
        self.pool, self.runtime = quota_s, 0.0
        self.refilled_at = math.floor(-period_offset / period_s)   # the period whose refill the pool holds

    @property
    def unlimited(self) -> bool:
        return self.quota_s <= 0 or self.quota_s >= self.period_s

    def set_quota(self, quota_s: float, now: float) -> None:
        if quota_s != self.quota_s:
            self.quota_s, self.pool = quota_s, quota_s
            self.refilled_at = math.floor((now - self.period_offset) / self.period_s + 1e-9)

    def _refill(self, now: float) -> None:
        k = math.floor((now - self.period_offset) / self.period_s + 1e-9)
        if k > self.refilled_at:
            self.pool, self.refilled_at = self.quota_s, k

    def _take(self, now: float) -> None:
        self._refill(now)
        got = min(SLICE_S - self.runtime, self.pool)
        if got > 0:
            self.runtime += got
            self.pool -= got

    def run(self, t: float, work_s: float, until: float = math.inf) -> tuple[float, float]:
        """Run `work_s` CPU seconds from `t`, stopping at `until` if not done: (the time it stopped, the
        work left)."""
        if self.unlimited:
            end = min(t + work_s, until)
            return end, work_s - (end - t)
        left = work_s
        if self.runtime <= 0:
            self._take(t)
        while left > 1e-12 and t < until - 1e-12:
            if self.runtime <= 0:
                # Throttled: each period boundary repays the debt from the refilled pool.
                t = min(_next(t, self.period_s, self.period_offset), until)
                if t < until:
                    self._take(t)
                continue
            tick = _next(t, self.tick_s, self.tick_offset)
            boundary = _next(t, self.period_s, self.period_offset)
            step = min(left, tick - t, boundary - t, until - t)
            t += step
            left -= step
            self.runtime -= step
            if left <= 1e-12:
                break
            if t >= boundary - 1e-12:
                self._refill(t)
            if t >= tick - 1e-12 and self.runtime <= 0:
                self._take(t)   # the tick charges the spent runtime and asks the pool for more
        return t, max(left, 0.0)

    def idle(self, now: float) -> None:
        """The runqueue goes idle: it keeps 1 ms of runtime and gives the rest back to this period's pool."""
        if self.unlimited:
            return
        self._refill(now)
        if self.runtime > MIN_RUNTIME_S:
            self.pool += self.runtime - MIN_RUNTIME_S
            self.runtime = MIN_RUNTIME_S


def simulate(work_s: float, gap_s: float, quota_s: float, period_s: float, frames: int = 120,
             period_offset: float = 0.0, tick_offset: float = 0.0, tick_s: float = TICK_S,
             idle_s: Sequence[float] = ()) -> list[float]:
    """Wall seconds of each of `frames` jobs of `work_s` CPU seconds, each started `gap_s` (plus
    `idle_s[i]` after job i) after the last one ended, in a cgroup with `quota_s` of CPU per
    `period_s` (one runnable task)."""
    cpu = Bandwidth(quota_s, period_s, period_offset, tick_offset, tick_s)
    if cpu.unlimited:
        return [work_s] * frames
    t, out = 0.0, []
    for i in range(frames):
        end, _ = cpu.run(t, work_s)
        out.append(end - t)
        cpu.idle(end)
        t = end + gap_s + (idle_s[i] if i < len(idle_s) else 0.0)
    return out


def mean_wall(work_s: float, gap_s: float, quota_s: float, period_s: float, frames: int = 120,
              offsets: int = 8, warmup: int = 4, idle_max_s: float = 0.0, burst: int = 1,
              tick_phase_s: float | None = None) -> float:
    """Mean wall time per job in a run of jobs separated by `gap_s` (and, with `idle_max_s`, a random
    idle time uniform in [0, idle_max_s) after every `burst` jobs), averaged over `offsets` relative
    offsets of the tick and period clocks, or with the ticks `tick_phase_s` after each period boundary
    (`tick_phase`) over `offsets` start times (the first `warmup` jobs of each run left out)."""
    total, n = 0.0, 0
    # With the phase known the clocks' pattern repeats every lcm(period, tick) (20 ms for 10 and 4):
    # start times sample all of it, since a phase read at one period boundary is the next one's +- a
    # period mod the tick.
    span = period_s if tick_phase_s is None else math.lcm(round(period_s * 1e6), round(TICK_S * 1e6)) * 1e-6
    for i in range(offsets):
        shift = span * i / offsets
        if tick_phase_s is None:
            ticks = TICK_S * ((i * 0.37) % 1.0)
        else:
            ticks = (shift + tick_phase_s) % TICK_S
        rng = random.Random(i)
        idle = [rng.uniform(0.0, idle_max_s) if (j + 1) % burst == 0 else 0.0
                for j in range(frames + warmup)] if idle_max_s > 0 else ()
        times = simulate(work_s, gap_s, quota_s, period_s, frames + warmup, period_offset=shift, tick_offset=ticks,
                         idle_s=idle)
        total += sum(times[warmup:])
        n += len(times) - warmup
    return total / n
