"""The CFS bandwidth model: what a job of CPU work takes on a device emulated by a CPU quota."""

import pytest

from edgetvm.costmodels import cfs

Q, P = 0.0025, 0.010   # a quarter of a core, the kernel's default 100 ms period shortened as the devices do


def test_a_short_job_that_finds_quota_left_runs_at_full_speed():
    times = cfs.simulate(0.001, gap_s=0.05, quota_s=Q, period_s=P, frames=20)
    assert times == pytest.approx([0.001] * 20)


def test_back_to_back_jobs_get_the_quota_share_in_the_long_run():
    work = 0.00625
    mean = cfs.mean_wall(work, gap_s=0.0, quota_s=Q, period_s=P)
    assert mean == pytest.approx(work / (Q / P), rel=0.02)


def test_a_gap_between_jobs_is_absorbed_by_the_throttled_time():
    """Quota-bound, a job and its gap together take work/share: the device's wall time per job is
    work/share minus the gap, not work/share."""
    work, gap = 0.00625, 0.002
    assert cfs.mean_wall(work, gap, Q, P) == pytest.approx(work / (Q / P) - gap, rel=0.03)


def test_a_job_that_overruns_the_quota_before_a_tick_pays_it_back_later():
    """The kernel notices a spent quota only at a tick: a 3 ms job that starts a period runs through on
    2.5 ms of quota, and the next job, 0.1 ms later, waits for the next period's refill."""
    times = cfs.simulate(0.003, gap_s=0.0001, quota_s=Q, period_s=P, frames=3, tick_offset=0.0035)
    assert times[0] == pytest.approx(0.003)
    assert times[1] == pytest.approx((P - 0.0031) + 0.003)


def test_without_a_quota_work_is_wall_time():
    assert cfs.simulate(0.004, 0.0, quota_s=P, period_s=P, frames=3) == [0.004] * 3


def _one_op(device_s, server_s, out_bytes=4000):
    from edgetvm.costmodels.profile import Graph
    from edgetvm.partition import cuts

    g = Graph([{"index": 0, "kernel": "k", "reads": ["in0"], "weights": [], "out": "v0"}],
              {"in0": 40000, "v0": out_bytes}, ["in0"], ["v0"])
    return cuts.Costs(g, [device_s], [server_s])


def test_a_cut_predicted_with_the_device_cpu_it_costs_to_call_and_send():
    """A device-heavy cut at a quarter core is quota-bound: kernels, the call's round trip and the
    sending all cost CPU, and a frame takes that work over the share; the wire and server come after."""
    from edgetvm.partition import cuts

    costs = _one_op(device_s=0.020, server_s=0.001)   # 5 ms of CPU at full speed, stored at the share
    cpu = cuts.DeviceCPU(share=0.25, period_s=P, call_s=50e-6, tensor_s=50e-6, byte_s=10e-9)
    link = cuts.Link(100e6, per_tensor_s=1e-4)
    work = cuts.device_work(costs.parts(frozenset({0})), cpu)
    assert work == pytest.approx(0.005 + 50e-6 + 50e-6 + 4000 * 10e-9)
    total, dev = cuts.frame_latency(costs, frozenset({0}), link, cpu)
    wire = 4000 * 8 / 100e6 + 2 * 1e-4
    assert dev == pytest.approx(work / 0.25 - wire, rel=0.05)
    assert total == pytest.approx(dev + wire)     # the result is the output: no server kernels
    # Server-only: the device only sends the 40 kB input, far below a period's quota: full speed.
    total, dev = cuts.frame_latency(costs, frozenset(), link, cpu)
    assert dev == pytest.approx(cuts.device_work(costs.parts(frozenset()), cpu), rel=0.01)


def test_an_idle_time_after_a_job_lets_the_next_start_in_a_refilled_period():
    """Two 2 ms jobs: back to back the second finds the period's quota spent and waits for the refill;
    after 50 ms of idle it runs at full speed."""
    back_to_back = cfs.simulate(0.002, gap_s=0.0001, quota_s=Q, period_s=P, frames=2, tick_offset=0.0035)
    assert back_to_back[1] > 2 * 0.002
    idle = cfs.simulate(0.002, gap_s=0.0001, quota_s=Q, period_s=P, frames=2, tick_offset=0.0035, idle_s=[0.05])
    assert idle == pytest.approx([0.002, 0.002])


def test_minutes_of_simulated_frames_end():
    """At t of a minute and more a tick computed from t rounds onto t itself; the simulation once
    stepped by zero there forever (the detector's server-only cut at 5 Mbit/s: a frame every 0.55 s)."""
    times = cfs.simulate(0.0033, 0.55, Q, P, frames=400, tick_offset=0.0011)
    assert len(times) == 400 and all(t > 0.0033 - 1e-9 for t in times)


TIMER_LIST = """now at 12055651839915 nsecs

cpu: 0
 clock 0:
active timers:
 #0: <00000000e034bdd8>, tick_nohz_handler, S:01
 # expires at 12065852000000-12065852000000 nsecs [in 160085 to 160085 nsecs]
 #1: <00000000a1b2c3d4>, sched_cfs_period_timer, S:01
 # expires at 12065855991889-12065855991889 nsecs [in 4152000 to 4152000 nsecs]
cpu: 1
 clock 0:
active timers:
 #0: <00000000e034bdd9>, tick_nohz_handler, S:01
 # expires at 12065853000000-12065853000000 nsecs [in 1160085 to 1160085 nsecs]
"""


def test_the_tick_phase_is_read_from_the_kernels_timer_list(tmp_path):
    """Ticks of CPU 0 at 12065852 ms, the period boundary at 12065855.991889 ms: ticks fall 0.008111 ms
    (mod 4) after each boundary; CPU 1's own tick does not count; two armed period timers (another
    cgroup's quota) leave it unknown."""
    path = tmp_path / "timer_list"
    path.write_text(TIMER_LIST)
    assert cfs.tick_phase(0, str(path)) == pytest.approx(0.000008111, abs=1e-9)
    assert cfs.tick_phase(1, str(path)) == pytest.approx((12065853000000 - 12065855991889) * 1e-9 % 0.004)
    path.write_text(TIMER_LIST + TIMER_LIST.split("cpu: 1")[0].split("active timers:\n")[1])
    assert cfs.tick_phase(0, str(path)) is None
    assert cfs.tick_phase(0, str(tmp_path / "missing")) is None


def test_a_period_boundary_is_read_in_the_clock_of_perf_counter(tmp_path):
    """The one armed period timer's expiry, in seconds of CLOCK_MONOTONIC, which time.perf_counter reads
    here (a run starts its slots on it); unknown with two armed timers or no timer list."""
    import time

    assert time.get_clock_info("perf_counter").implementation == "clock_gettime(CLOCK_MONOTONIC)"
    path = tmp_path / "timer_list"
    path.write_text(TIMER_LIST)
    assert cfs.period_boundary(str(path)) == pytest.approx(12065.855991889, abs=1e-9)
    path.write_text(TIMER_LIST + TIMER_LIST.split("cpu: 1")[0].split("active timers:\n")[1])
    assert cfs.period_boundary(str(path)) is None
    assert cfs.period_boundary(str(tmp_path / "missing")) is None


def test_a_quota_is_whole_microseconds_and_one_ms_at_least():
    assert cfs.quota_s(0.25, 0.010) == pytest.approx(0.0025)
    assert cfs.quota_s(0.05, 0.010) == pytest.approx(0.001)        # CFS refuses less than 1 ms
    assert cfs.quota_s(0.123456789, 0.1) == pytest.approx(0.012346)


def test_bandwidth_state_carries_over_between_jobs_as_simulate_runs_them():
    """Bandwidth.run/idle is what simulate loops over: the same wall times, job by job."""
    times = cfs.simulate(0.003, 0.02, 0.0025, 0.010, frames=12, tick_offset=0.0026)
    cpu, t, again = cfs.Bandwidth(0.0025, 0.010, tick_offset=0.0026), 0.0, []
    for _ in range(12):
        end, left = cpu.run(t, 0.003)
        assert left == 0.0
        again.append(end - t)
        cpu.idle(end)
        t = end + 0.02
    assert again == times
    # stopped at a time, the work left is what did not run
    end, left = cfs.Bandwidth(0.0025, 0.010).run(0.0, 0.003, until=0.002)
    assert (end, left) == (pytest.approx(0.002), pytest.approx(0.001))


def test_a_known_tick_phase_gives_the_mean_of_that_phase():
    """A 3.3 ms part every 90 ms: whether its overrun is caught depends on where ticks fall in the
    period; the phase read and the same phase one period on (+2 ms mod 4) predict the same."""
    means = {x: cfs.mean_wall(0.0033, 0.09, Q, P, idle_max_s=P, burst=8, tick_phase_s=x) for x in (0.0, 0.002, 0.0011, 0.0031)}
    assert means[0.0] == pytest.approx(means[0.002], rel=0.03)
    assert means[0.0011] == pytest.approx(means[0.0031], rel=0.05)
    assert means[0.0011] > 1.2 * means[0.0]
