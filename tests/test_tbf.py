"""The tbf model: what a shaped link's token bucket does to a split frame's RPC messages."""

import json
import subprocess
import time

import pytest
from test_link import needs_root

from edgetvm.costmodels import tbf
from edgetvm.partition import cuts

RATE, BURST = 125_000.0, 3200   # 1 Mbit/s, the bucket runtime/link.py gives it


def test_a_message_is_counted_in_ethernet_frames_with_their_headers():
    assert tbf.frames(0) == [66]                       # an acknowledgement
    assert tbf.frames(100) == [166]
    assert tbf.frames(3000) == [1514, 1514, 104 + 66]  # 1448 + 1448 + 104


def test_a_quiet_link_passes_its_bucket_at_once_and_meters_the_rest_at_its_rate():
    b = tbf.Bucket(RATE, BURST)
    assert b.send(0.0, 1000) == 0.0
    left = BURST - 1066
    # 5,000 bytes more in 4 frames (5,264 with headers): what the bucket lacks waits for the rate.
    assert b.send(0.0, 5000) == pytest.approx((5264 - left) / RATE)


def test_the_bucket_holds_no_more_than_its_size_however_long_the_link_was_quiet():
    b = tbf.Bucket(RATE, BURST)
    b.send(0.0, 3000)
    sent = 10_000 + 7 * 66
    assert b.send(100.0, 10_000) == pytest.approx(100.0 + (sent - BURST) / RATE)


def test_messages_leave_in_order():
    b = tbf.Bucket(RATE, 1514)
    first = b.send(0.0, 3000)                       # 1514 at once, then 1514 + 170 at the rate
    assert first == pytest.approx((1514 + 170) / RATE)
    assert b.send(0.0, 10) == pytest.approx(first + 76 / RATE)


def _shaper():
    return cuts.Shaper(RATE, BURST, RATE, BURST)


def test_a_frame_whose_device_computes_crosses_the_link_faster_than_a_compute_free_one():
    """While the device part computes, both buckets refill, so its frame's messages wait less for
    tokens than those of frames sent back to back; the additive model charges both the same."""
    link = cuts.Link(0.95e6, shaper=_shaper())
    p = {"device_s": 0.0, "server_s": 0.0, "bytes": 8, "tensors": 1, "sizes": [8]}
    idle, idle_cycle = cuts.shaped_wire(p, link, device_wall_s=0.0)
    busy, _ = cuts.shaped_wire(p, link, device_wall_s=0.003)
    assert busy < 0.5 * idle
    # Back to back, frames follow each other at the rate of their bytes through the busier direction
    # (server -> device: the call, the read's two requests, the free); the free's wait for tokens
    # delays the next frame, not this one's results.
    per_frame = (84 + 80 + 42 + 40 + 4 * 66) / RATE
    assert idle_cycle == pytest.approx(per_frame, rel=0.02)
    assert idle == pytest.approx(per_frame - (40 + 66) / RATE, rel=0.05)


def test_a_tensor_far_bigger_than_the_bucket_crosses_at_the_rate():
    link = cuts.Link(0.95e6, shaper=_shaper())
    n = 200_000
    p = {"device_s": 0.0, "server_s": 0.0, "bytes": n, "tensors": 1, "sizes": [n]}
    wire, _ = cuts.shaped_wire(p, link, device_wall_s=0.01, idle_max_s=0.01, burst=8)
    assert wire == pytest.approx(n * 1514 / 1448 / RATE, rel=0.03)


def test_the_round_trip_beyond_the_buckets_is_what_calibration_frames_took_beyond_their_simulation():
    idle = [0.05, 0.002, 0.03]
    up, down = cuts._buckets(_shaper())
    t, simulated = 0.0, []
    for i in range(24):
        t += idle[i // 8] if i % 8 == 0 else 0.0
        start = t
        done, t = cuts.calibration_frame(up, down, t)
        simulated.append(done - start)
    assert cuts.calibration_round_trip(_shaper(), simulated, idle, 8) == pytest.approx(0.0, abs=1e-9)
    slower = [s + 3 * 0.0002 for s in simulated]
    assert cuts.calibration_round_trip(_shaper(), slower, idle, 8) == pytest.approx(0.0002, rel=0.3)


def test_a_device_under_its_quota_is_predicted_with_the_gap_the_buckets_leave_it():
    """A device-heavy frame under a quarter-core quota: the buckets refill while it computes, so its
    few bytes wait little, and the device, with little gap between its parts, meets its quota more:
    the prediction settles the two, as measured (ResNet at 1 Mbit/s: 6.3 ms predicted, 6.6 measured,
    of which 3.7 were reads stretched by the throttled device)."""
    cpu = cuts.DeviceCPU(0.25, 0.01, tick_phase_s=0.001)
    p = {"device_s": 0.0017 / cpu.share, "server_s": 0.0, "bytes": 40, "tensors": 1, "sizes": [40]}
    shaped = cuts.Link(0.95e6, shaper=_shaper())
    total, dev = cuts.parts_latency(p, shaped, cpu, idle_max_s=0.01, burst=8)
    unsettled = cuts._under_quota(0.0017, cuts.shaped_wire(p, shaped, 0.0017, 0.01, 8)[1], cpu, 0.01, 8)
    assert dev > unsettled
    settled_gap = cuts.shaped_wire(p, shaped, dev, 0.01, 8)[1]
    assert dev == pytest.approx(cuts._under_quota(0.0017, settled_gap, cpu, 0.01, 8), rel=0.05)


def test_the_time_per_byte_read_is_what_a_read_after_an_idle_time_took_beyond_the_buckets_and_the_device():
    sh = cuts.Shaper(12.5e6, 6237, 12.5e6, 6237)
    up, down = cuts._buckets(sh)
    read_s = cuts._read(up, down, 0.0, 32768, 5e-5, byte_s=28e-9)
    # Of 28 ns a byte, the device's own CPU (8 ns, measured from its cgroup) is charged to the device.
    assert cuts.calibration_read_byte(sh, 5e-5, 8e-9, 32768, read_s) == pytest.approx(20e-9, rel=1e-6)


def test_without_a_shaper_the_prediction_is_the_additive_one():
    p = {"device_s": 0.001, "server_s": 0.002, "bytes": 1000, "tensors": 1}
    cpu = cuts.DeviceCPU(1.0, 0.1)
    link = cuts.Link(8e6, per_tensor_s=1e-3, call_s=5e-4)
    assert cuts.parts_latency(p, link, cpu)[0] == pytest.approx(0.001 + 1e-3 + 1e-3 + 5e-4 + 0.002)


class _Counting(tbf.Bucket):
    def __init__(self):
        super().__init__(1e12, 1e12)
        self.bytes = self.packets = 0

    def send(self, t, payload):
        sizes = tbf.frames(payload)
        self.bytes += sum(sizes)
        self.packets += len(sizes)
        return t


def _tbf_sent(link) -> dict[str, tuple[int, int]]:
    out = {}
    for name, side in zip(("down", "up"), link._sides()):
        qs = json.loads(subprocess.run(["tc", "-s", "-j", *side, "qdisc", "show", "dev", link._dev(side)],
                                       capture_output=True, text=True, check=True).stdout)
        q = next(q for q in qs if q.get("root"))
        out[name] = (q["bytes"], q["packets"])
    return out


@needs_root
def test_a_calibration_frame_sends_what_the_model_says_each_way():
    """The message sizes are TVM RPC's: counted here by the link's own qdiscs, against the model's."""
    import tvm

    from edgetvm.runtime.device import EmulatedDevice
    from edgetvm.runtime.link import EmulatedLink
    from edgetvm.runtime.tensors import to_numpy

    up, down = _Counting(), _Counting()
    cuts.calibration_frame(up, down, 0.0)
    n = 20
    with EmulatedLink("20Mbit") as link, EmulatedDevice(None, link=link) as dev:
        sess = dev.session()
        d = sess.cpu()

        def frame():
            out = tvm.runtime.empty((2,), "float32", d)
            to_numpy(out)
            del out

        frame()
        time.sleep(0.1)
        before = _tbf_sent(link)
        for _ in range(n):
            frame()
            time.sleep(0.005)   # each frame's acknowledgements sent before the next frame
        time.sleep(0.1)
        after = _tbf_sent(link)
        del sess
    for name, model in (("down", down), ("up", up)):
        got_bytes = (after[name][0] - before[name][0]) / n
        got_packets = (after[name][1] - before[name][1]) / n
        assert got_packets == pytest.approx(model.packets, abs=0.25), name
        assert got_bytes == pytest.approx(model.bytes, abs=24), name
