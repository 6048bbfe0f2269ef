"""The pipeline's functions on a device server (registered by runtime/device_server.py).

One node per device session: `edgetvm.pipe.start(config)` loads the device's part (its library and
weights from the plan, placed on the device's storage before the run) and, for a stage head, opens
TVM RPC sessions of its own to its stage's other devices and to the next stage's head (or the sink),
and starts them the same way: the pipeline is a chain of sessions, each device the client of the
devices it sends to, so a tensor goes from one device to the next over their links, never through
the coordinator. (A TVM RPC server serves one session at a time, so each device has exactly one
client: its stage head, or the previous stage's head, or, for the first head, the coordinator.)

    edgetvm.pipe.start(config_json) -> "ok"
    edgetvm.pipe.put(frame, names_json, blob)       queue a frame's values for this head (blocks while
                                                    its queue is full: back-pressure up the chain)
    edgetvm.pipe.compute(blob) -> blob              a band of rows (a stage's non-head device)
    edgetvm.pipe.deliver(frame, names_json, blob)   the sink: results into a file for the coordinator

A blob is a call's tensors as one bytes argument (runtime/tensors.pack: a JSON header of shapes and
dtypes, then the arrays' bytes). A TVM tensor made on the receiving session costs two round trips
(allocate, copy) before the call's own, each one waking the receiving device: under a tenth of a CPU
that was most of a call's cost. One bytes argument is one round trip.

A head runs two threads: the worker (scatter the band inputs, its own band, gather) and the forwarder
(the previous frame's values to the next head), so compute and sending overlap and several frames are
in flight along the chain. The first failure (a peer that stops answering, a part that fails) is kept and
raised by the next `put`, naming the device, so it travels back up the chain to the coordinator; it
is also sent down the chain (`put` of frame -1 with the message) to the sink, which writes it where
the coordinator looks for results: a failure far down the chain stops the run at once, even when no
further frame would be put to carry it back up.
"""

from __future__ import annotations

import json
import os
import queue
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from edgetvm.runtime.tensors import pack, unpack

QUEUE_FRAMES = 2
_node = None


class _Part:
    def __init__(self, plan_dir: str, part: dict):
        import numpy as np
        import tvm
        from tvm import relax

        lib = tvm.runtime.load_module(str(Path(plan_dir) / part["library"]))
        self.vm = relax.VirtualMachine(lib, tvm.cpu())
        with np.load(Path(plan_dir) / part["weights"]) as z:
            self.weights = [tvm.runtime.tensor(z[f"arr_{i}"], tvm.cpu()) for i in range(len(z.files))]
        self.rows = part["input_rows"]

    def __call__(self, arrays: list) -> list:
        import tvm

        out = self.vm["stage"](*[tvm.runtime.tensor(a, tvm.cpu()) for a in arrays], *self.weights)
        return [out[i].numpy() for i in range(len(out))]

    def band_inputs(self, arrays: list) -> list:
        import numpy as np

        return [a if r is None else np.ascontiguousarray(a[:, :, r[0]:r[1]]) for a, r in zip(arrays, self.rows)]


class _Peer:
    """A session of this device's own to the device it sends to."""

    def __init__(self, spec: dict):
        from tvm import rpc

        self.name = spec["name"]
        try:
            self.sess = rpc.connect(spec["addr"][0], int(spec["addr"][1]), session_timeout=0)
            self.sess.get_function("edgetvm.pipe.start")(json.dumps(spec["config"]))
        except Exception as e:  # noqa: BLE001 - reported with the peer's name
            raise RuntimeError(f"device '{self.name}' did not start: {_short(e)}") from None
        self.put = self.sess.get_function("edgetvm.pipe.put")
        self.compute = self.sess.get_function("edgetvm.pipe.compute")
        self.deliver = self.sess.get_function("edgetvm.pipe.deliver")


def _short(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return (text[-1] if text else type(e).__name__)[:200]


class _Node:
    def __init__(self, cfg: dict):
        self.cfg, self.name, self.role = cfg, cfg["name"], cfg["role"]
        self.error: str | None = None
        if self.role == "sink":
            self.dir = Path(cfg["dir"])
            return
        self.part = _Part(cfg["plan_dir"], cfg["part"])
        if self.role == "mate":
            return
        self.mates = [(_Peer(m), m["rows"]) for m in cfg["mates"]]
        self.next = _Peer(cfg["next"])
        self.inbox: queue.Queue = queue.Queue(QUEUE_FRAMES)
        self.outbox: queue.Queue = queue.Queue(QUEUE_FRAMES)
        self.pool = ThreadPoolExecutor(max(1, len(self.mates)))
        threading.Thread(target=self._guard, args=(self._work,), daemon=True).start()
        threading.Thread(target=self._guard, args=(self._forward,), daemon=True).start()

    def _guard(self, loop) -> None:
        try:
            loop()
        except Exception as e:  # noqa: BLE001 - kept for the next put, and sent down the chain
            self.fail(str(e) if str(e).startswith("device '") else f"device '{self.name}': {_short(e)}")

    def fail(self, message: str) -> None:
        if self.error is None:
            import sys

            print(f"edgetvm pipeline: {message}", file=sys.stderr, flush=True)  # into the device's log
            self.error = message

    def put(self, frame: int, names: list[str], arrays: list) -> None:
        while True:
            if self.error:
                raise RuntimeError(self.error)
            try:
                self.inbox.put((frame, dict(zip(names, arrays))), timeout=0.2)
                return
            except queue.Full:
                continue

    def _band_on(self, peer: _Peer, part_rows, arrays):
        import numpy as np

        ins = [a if r is None else a[:, :, r[0]:r[1]] for a, r in zip(arrays, part_rows)]
        try:
            return unpack(peer.compute(pack(ins)))[0]
        except Exception as e:  # noqa: BLE001
            raise RuntimeError(f"device '{peer.name}' stopped answering ({_short(e)})") from None

    def _work(self) -> None:
        import numpy as np

        cfg = self.cfg
        while True:
            frame, values = self.inbox.get()
            arrays = [values[n] for n in cfg["inputs"]]
            if self.mates:
                futures = [self.pool.submit(self._band_on, peer, rows, arrays) for peer, rows in self.mates]
                own = self.part(self.part.band_inputs(arrays))[0]
                bands = [own] + [f.result() for f in futures]
                outs = [np.concatenate(bands, axis=2)]
            else:
                outs = self.part(arrays)
            result = dict(zip(cfg["outputs"], outs))
            result.update({n: values[n] for n in cfg["carry"]})
            while True:
                if self.error:
                    return
                try:
                    self.outbox.put((frame, result), timeout=0.2)
                    break
                except queue.Full:
                    continue

    def _forward(self) -> None:
        nxt = self.next
        names = self.cfg["send"]
        fn = nxt.deliver if self.cfg["next"]["config"]["role"] == "sink" else nxt.put
        while True:
            if self.error is not None:
                fn(-1, json.dumps({"error": self.error}), b"")  # if the next device is gone, the run sees it
                return
            try:
                frame, values = self.outbox.get(timeout=0.2)
            except queue.Empty:
                continue
            arrays = [values[n] for n in names]
            try:
                fn(frame, json.dumps(names), pack(arrays))
            except Exception as e:  # noqa: BLE001
                msg = _short(e)
                raise RuntimeError(msg if msg.startswith("device '") else
                                   f"device '{nxt.name}' stopped answering ({msg})") from None


def start(config_json: str) -> str:
    global _node
    _node = _Node(json.loads(config_json))
    return "ok"


def put(frame, names_json, blob) -> int:
    if int(frame) < 0:  # a failure up the chain
        _node.fail(json.loads(names_json)["error"])
        return 0
    _node.put(int(frame), json.loads(names_json), unpack(blob))
    return 0


def compute(blob) -> bytes:
    return pack(_node.part(unpack(blob))[:1])


def deliver(frame, names_json, blob) -> int:
    import numpy as np

    d = _node.dir
    if int(frame) < 0:  # a failure up the chain, for the coordinator
        (d / ".error.json").write_text(names_json)
        os.replace(d / ".error.json", d / "error.json")
        return 0
    tmp = d / f".f{int(frame)}.npz"
    np.savez(tmp, **dict(zip(json.loads(names_json), unpack(blob))))
    os.replace(tmp, d / f"f{int(frame)}.npz")  # the coordinator sees the whole file or none
    return 0


# ---------------------------------------------------------------- calibration (partition/pipeline/calibrate.py)
# The costs of moving a frame's tensors that the kernels' profiles do not see, measured in the device's
# session process as CPU seconds (time.process_time: every thread of the session): under the device's
# CPU quota they take the same processor as its kernels.

def cpu_s() -> float:
    import time

    return time.process_time()


def probe_recv(blob) -> int:
    """What a `put` does with what it receives, without queueing it."""
    unpack(blob)
    return 0


def probe_send(host: str, port: int, calls: int, nbytes: int) -> str:
    """CPU seconds per call of `calls` calls sending one tensor of `nbytes` bytes to the server at host:port
    (a head's forward of a frame: the arrays packed, then the call)."""
    import time

    import numpy as np
    from tvm import rpc

    sess = rpc.connect(host, int(port), session_timeout=0)
    fn = sess.get_function("edgetvm.pipe.probe_recv")
    a = np.ones(max(1, int(nbytes) // 4), "float32")
    fn(pack([a]))  # the connection's first call
    t0 = time.process_time()
    for _ in range(int(calls)):
        fn(pack([a]))
    return json.dumps({"cpu_s": (time.process_time() - t0) / int(calls)})


def probe_join(calls: int, nbytes: int) -> str:
    """CPU seconds per byte of a head's band work: slicing a band's input rows out of a frame and
    joining the bands' output rows (numpy copies)."""
    import time

    import numpy as np

    n = max(64, int(nbytes) // 4)
    x = np.ones((1, 4, n // 16, 4), "float32")
    t0 = time.process_time()
    for _ in range(int(calls)):
        h = x.shape[2]
        parts = [np.ascontiguousarray(x[:, :, : h // 2 + 1]), np.ascontiguousarray(x[:, :, h // 2:])]
        np.concatenate(parts, axis=2)
    return json.dumps({"cpu_s_per_byte": (time.process_time() - t0) / int(calls) / (2 * x.nbytes)})


def register(tvm) -> None:
    tvm.register_global_func("edgetvm.pipe.cpu_s", cpu_s, override=True)
    tvm.register_global_func("edgetvm.pipe.probe_recv", probe_recv, override=True)
    tvm.register_global_func("edgetvm.pipe.probe_send", probe_send, override=True)
    tvm.register_global_func("edgetvm.pipe.probe_join", probe_join, override=True)
    tvm.register_global_func("edgetvm.pipe.start", start, override=True)
    tvm.register_global_func("edgetvm.pipe.put", put, override=True)
    tvm.register_global_func("edgetvm.pipe.compute", compute, override=True)
    tvm.register_global_func("edgetvm.pipe.deliver", deliver, override=True)
