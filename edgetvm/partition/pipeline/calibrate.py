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
each device's busy time per frame. Last, the node itself: a head node with a one-kernel part streams
frames to a sink, and what its session process spends per frame beyond those calls is the node's own
work (the VM call and its tensor conversions, the queues, the hand-offs between its threads), which
no kernel profile and no call probe sees.
"""

from __future__ import annotations

import contextlib
import json
import tempfile
import time
from pathlib import Path

SMALL, LARGE = 64, 256 * 1024     # bytes per probe call: the fixed cost, and the cost per byte
CALLS = 30                        # probe calls per size (a tenth of a CPU: ~1 s of wall time for the large)
FRAMES = 40                       # frames through the node probe


def _fit(small_s: float, large_s: float) -> tuple[float, float]:
    per_byte = max(0.0, (large_s - small_s) / (LARGE - SMALL))
    return max(0.0, small_s - per_byte * SMALL), per_byte


def _probe_part(work) -> dict:
    """A part whose kernel does next to nothing (a ReLU of 16 values), compiled for this machine: what a
    node costs per frame besides its kernels and its calls."""
    import numpy as np
    from tvm import relax

    from edgetvm.partition import split
    from edgetvm.passes import pipeline

    bb = relax.BlockBuilder()
    x = relax.Var("in0", relax.TensorType((1, 16), "float32"))
    with bb.function("stage", [x], attrs={"num_input": 1}):
        with bb.dataflow():
            out = bb.emit_output(relax.Tuple([bb.emit(relax.op.nn.relu(x))]))
        bb.emit_func_output(out)
    pipeline.export(pipeline.build(bb.get(), split._host().target()), str(work / "probe.so"))
    np.savez(work / "probe.npz")
    return {"device": "probe", "library": "probe.so", "weights": "probe.npz", "band": None, "input_rows": [None]}


def _node_cpu_s(sess, dev, part: dict, work, sink_addr) -> float:
    """CPU seconds per frame of a head node streaming FRAMES small frames to the sink (its calls included,
    and one call of the probe's clock)."""
    import numpy as np

    from edgetvm.runtime.tensors import pack

    out = work / f"sink-{dev.port}"
    out.mkdir()
    cfg = {"role": "head", "name": dev.fleet_name, "plan_dir": str(work), "part": part, "inputs": ["in0"],
           "outputs": ["y"], "carry": [], "send": ["y"], "mates": [],
           "next": {"name": "sink", "addr": list(sink_addr), "config": {"role": "sink", "name": "sink", "dir": str(out)}}}
    sess.get_function("edgetvm.pipe.start")(json.dumps(cfg))
    put = sess.get_function("edgetvm.pipe.put")
    blob, names = pack([np.ones((1, 16), "float32")]), json.dumps(["in0"])

    def stream(first: int, count: int) -> None:
        for f in range(first, first + count):
            put(f, names, blob)
        deadline = time.monotonic() + 120
        while not all((out / f"f{f}.npz").exists() for f in range(first, first + count)):
            if (out / "error.json").exists() or time.monotonic() > deadline:
                raise RuntimeError(f"the node probe on {dev.fleet_name} did not deliver its frames")
            time.sleep(0.002)

    # The session process's own clock (every thread of it, where the node runs): the cgroup's per-process
    # tick counts are too coarse for a few dozen small frames.
    cpu = sess.get_function("edgetvm.pipe.cpu_s")
    stream(0, 2)  # loads the part, opens the session to the sink
    c0 = cpu()
    stream(2, FRAMES)
    return (cpu() - c0) / FRAMES


def calibrate(fleet, log=lambda *a: None) -> dict[str, dict]:
    """Per device kind of `fleet`: {"call_recv_s", "byte_recv_s", "call_send_s", "byte_send_s",
    "byte_join_s"} in seconds of the device (CPU seconds over its quota). Needs root (cgroups, namespaces)."""
    import numpy as np

    from edgetvm.runtime.device import EmulatedDevice
    from edgetvm.runtime.pipeline import FleetDevice
    from edgetvm.runtime.tensors import pack
    from edgetvm.runtime.link import EmulatedLink

    kinds = {}
    for d in fleet.devices:
        kinds.setdefault(d.kind, d)
    out = {}
    with contextlib.ExitStack() as stack:
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="edgetvm-calibrate-")))
        part = _probe_part(work)
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
            calls = call_recv + byte_recv * SMALL + call_send + byte_send * SMALL
            node = max(0.0, _node_cpu_s(sess, dev, part, work, (link.host_address, sink.port)) / q - calls)
            out[kind] = {"call_recv_s": call_recv, "byte_recv_s": byte_recv, "call_send_s": call_send,
                         "byte_send_s": byte_send, "byte_join_s": join, "frame_s": node}
            log(f"calibrated {kind}: a call received {call_recv * 1e3:.2f} ms + {byte_recv * 1e9:.2f} ms/MB, "
                f"sent {call_send * 1e3:.2f} ms + {byte_send * 1e9:.2f} ms/MB, band slicing and joining "
                f"{join * 1e9:.2f} ms/MB, a node's own work {node * 1e3:.2f} ms a frame "
                f"({time.perf_counter() - t0:.0f} s)")
            with contextlib.suppress(Exception):
                sess._sess = None
    return out
