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
on their own clocks, whose offset a run does not know: `frame_times` averages over offsets.
"""

from __future__ import annotations

import math

TICK_S = 0.004          # CONFIG_HZ=250 (this kernel; `grep CONFIG_HZ= /boot/config-$(uname -r)`)
SLICE_S = 0.005         # /proc/sys/kernel/sched_cfs_bandwidth_slice_us
MIN_RUNTIME_S = 0.001   # min_cfs_rq_runtime: what an idle runqueue keeps


def _next(t: float, grid: float, offset: float) -> float:
    """The first point of the grid offset + k*grid strictly after t."""
    return offset + (math.floor((t - offset) / grid + 1e-12) + 1) * grid


def simulate(work_s: float, gap_s: float, quota_s: float, period_s: float, frames: int = 120,
             period_offset: float = 0.0, tick_offset: float = 0.0, tick_s: float = TICK_S) -> list[float]:
    """Wall seconds of each of `frames` jobs of `work_s` CPU seconds, each started `gap_s` after the
    last one ended, in a cgroup with `quota_s` of CPU per `period_s` (one runnable task)."""
    if quota_s <= 0 or quota_s >= period_s:
        return [work_s] * frames
    t, pool, runtime = 0.0, quota_s, 0.0
    refilled_at = math.floor((t - period_offset) / period_s)   # the period whose refill the pool holds
    out = []

    def refill(now: float) -> None:
        nonlocal pool, refilled_at
        k = math.floor((now - period_offset) / period_s + 1e-12)
        if k > refilled_at:
            pool, refilled_at = quota_s, k

    def take(now: float) -> None:
        nonlocal pool, runtime
        refill(now)
        got = min(SLICE_S - runtime, pool)
        if got > 0:
            runtime += got
            pool -= got

    for _ in range(frames):
        start, left = t, work_s
        take(t) if runtime <= 0 else None
        while left > 1e-12:
            if runtime <= 0:
                # Throttled: each period boundary repays the debt from the refilled pool.
                t = _next(t, period_s, period_offset)
                take(t)
                continue
            tick = _next(t, tick_s, tick_offset)
            boundary = _next(t, period_s, period_offset)
            step = min(left, tick - t, boundary - t)
            t += step
            left -= step
            runtime -= step
            if left <= 1e-12:
                break
            if t >= boundary - 1e-12:
                refill(t)
            if t >= tick - 1e-12 and runtime <= 0:
                take(t)   # the tick charges the spent runtime and asks the pool for more
        out.append(t - start)
        # Idle: keep 1 ms of runtime, give the rest back to this period's pool.
        refill(t)
        if runtime > MIN_RUNTIME_S:
            pool += runtime - MIN_RUNTIME_S
            runtime = MIN_RUNTIME_S
        t += gap_s
    return out


def mean_wall(work_s: float, gap_s: float, quota_s: float, period_s: float, frames: int = 120,
              offsets: int = 8, warmup: int = 4) -> float:
    """Mean wall time per job in a run of jobs separated by `gap_s`, averaged over `offsets` relative
    offsets of the tick and period clocks (the first `warmup` jobs of each run left out)."""
    total, n = 0.0, 0
    for i in range(offsets):
        times = simulate(work_s, gap_s, quota_s, period_s, frames + warmup,
                         period_offset=period_s * i / offsets, tick_offset=TICK_S * ((i * 0.37) % 1.0))
        total += sum(times[warmup:])
        n += len(times) - warmup
    return total / n
