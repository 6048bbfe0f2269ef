"""When a message crosses a link shaped by a `tbf` qdisc, simulated as the kernel meters it.

tbf keeps a bucket of byte tokens that fills at the shaped rate up to `burst` bytes; a packet leaves
when the bucket holds its size (whole Ethernet frames: TCP payload in segments of up to 1,448 bytes,
each with 66 bytes of Ethernet, IP and TCP headers) and takes that many tokens; packets leave in
order. So a link that was quiet passes `burst` bytes at once and meters what follows at the rate: a
frame whose device part computes for a few milliseconds finds the bucket refilled for its small RPC
messages, and compute-free frames sent back to back do not. An additive model (bytes / rate + a
fixed time per message) fitted on the one cannot predict the other (docs/partition.md).

Each direction of a veth pair has its own tbf and so its own bucket (runtime/link.py). What the bucket
does not cover, the two ends' own work per message and per byte, the cost model calibrates
(edgetvm/partition/cuts.py).
"""

from __future__ import annotations

import math

SEGMENT_BYTES = 1448    # TCP payload per Ethernet frame (MTU 1500, with timestamps)
HEADER_BYTES = 66       # Ethernet 14 + IP 20 + TCP 32 per frame, which tbf counts


def frames(payload: int) -> list[int]:
    """The Ethernet frames' sizes (as tbf counts them) of a message of `payload` TCP bytes."""
    n = max(1, math.ceil(payload / SEGMENT_BYTES))
    sizes = [SEGMENT_BYTES + HEADER_BYTES] * (n - 1)
    return sizes + [payload - SEGMENT_BYTES * (n - 1) + HEADER_BYTES]


class Bucket:
    """One tbf's token bucket over time: `send` a message from a time on, get when its last frame left."""

    def __init__(self, rate_bytes_s: float, burst_bytes: float):
        # tbf drops a frame bigger than its bucket; runtime/link.py gives it two full frames at least.
        self.rate, self.burst = rate_bytes_s, max(burst_bytes, SEGMENT_BYTES + HEADER_BYTES)
        self.tokens, self.at = float(burst_bytes), 0.0   # full at time 0: the link was quiet
        self.free_at = 0.0                              # when the last queued frame left

    def _fill(self, t: float) -> None:
        if t > self.at:
            self.tokens = min(self.burst, self.tokens + (t - self.at) * self.rate)
            self.at = t

    def send(self, t: float, payload: int) -> float:
        for size in frames(payload):
            t = max(t, self.free_at)
            self._fill(t)
            if self.tokens < size:
                t += (size - self.tokens) / self.rate
                self._fill(t)
            self.tokens -= size
            self.free_at = t
        return t
