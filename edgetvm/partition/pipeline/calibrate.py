"""Plan-time calibration of the pipeline's cost model on the emulated devices.

The per-layer profiles time the kernels alone. A frame through the pipeline also costs every device
processor time its kernels' profiles do not show, and under a device's CPU quota that time comes out
of the same processor: each RPC call it receives (TVM's unpacking, the blob's arrays), each call it
makes (the arrays packed into one blob, TVM's serializing, the socket), and a stage head's numpy work on
bands (slicing each band's input rows out of the frame, joining the output rows). As CutEdge measures a
device's per-frame overhead from its cgroup's CPU time (runtime/cutedge.py), this starts one device of
each kind of the fleet (its profile's cgroups, behind its link's shaping) and measures, in its session
process, CPU seconds per call and per byte for receiving and for sending, and per byte for the band
slicing and joining; divided by the kind's CPU quota they are device seconds, what dp.Problem adds to
each device's busy time per frame.
"""

from __future__ import annotations

import contextlib
import json
import time

SMALL, LARGE = 64, 256 * 1024     # bytes per probe call: the fixed cost, and the cost per byte
CALLS = 30                        # probe calls per size (a tenth of a CPU: ~1 s of wall time for the large)


def _fit(small_s: float, large_s: float) -> tuple[float, float]:
    per_byte = max(0.0, (large_s - small_s) / (LARGE - SMALL))
    return max(0.0, small_s - per_byte * SMALL), per_byte


def calibrate(fleet, log=lambda *a: None) -> dict[str, dict]:
    """Per device kind of `fleet`: {"call_recv_s", "byte_recv_s", "call_send_s", "byte_send_s",
    "byte_join_s"} in seconds of the device (CPU seconds over its quota). Needs root (cgroups, namespaces)."""
    import numpy as np

    from edgetvm.runtime.device import EmulatedDevice
    from edgetvm.runtime.pipeline import FleetDevice
    from edgetvm.runtime.pipeline_device import pack
    from edgetvm.runtime.link import EmulatedLink

    kinds = {}
    for d in fleet.devices:
        kinds.setdefault(d.kind, d)
    out = {}
    with contextlib.ExitStack() as stack:
        sink = EmulatedDevice(None, None)
        sink.host = "0.0.0.0"  # reached from the device's namespace at its link's host address
        stack.enter_context(sink)
        for kind, d in kinds.items():
            t0 = time.perf_counter()
            link = stack.enter_context(EmulatedLink(d.link))
            dev = stack.enter_context(FleetDevice(d.profile, link, d.host_cpu, d.name))
            sess = dev.session()
            cpu = sess.get_function("edgetvm.pipe.cpu_s")
            recv = sess.get_function("edgetvm.pipe.probe_recv")
            per = {}
            for size in (SMALL, LARGE):
                a = np.ones(size // 4, "float32")
                recv(pack([a]))
                c0 = cpu()
                for _ in range(CALLS):
                    recv(pack([a]))
                per[size] = (cpu() - c0) / CALLS
            q = d.profile.cpu_quota
            call_recv, byte_recv = _fit(per[SMALL] / q, per[LARGE] / q)
            send = sess.get_function("edgetvm.pipe.probe_send")
            s_small, s_large = (json.loads(send(link.host_address, sink.port, CALLS, n))["cpu_s"] / q
                                for n in (SMALL, LARGE))
            call_send, byte_send = _fit(s_small, s_large)
            join = json.loads(sess.get_function("edgetvm.pipe.probe_join")(CALLS, LARGE))["cpu_s_per_byte"] / q
            out[kind] = {"call_recv_s": call_recv, "byte_recv_s": byte_recv, "call_send_s": call_send,
                         "byte_send_s": byte_send, "byte_join_s": join}
            log(f"calibrated {kind}: a call received {call_recv * 1e3:.2f} ms + {byte_recv * 1e9:.2f} ms/MB, "
                f"sent {call_send * 1e3:.2f} ms + {byte_send * 1e9:.2f} ms/MB, band slicing and joining "
                f"{join * 1e9:.2f} ms/MB ({time.perf_counter() - t0:.0f} s)")
            with contextlib.suppress(Exception):
                sess._sess = None
    return out
