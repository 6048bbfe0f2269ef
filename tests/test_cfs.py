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
