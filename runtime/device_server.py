"""The process an EmulatedDevice runs: TVM's RPC server, loaded first and then moved into the device.

    python -m edgetvm.runtime.device_server --host H --port P [--tracker H:P --key K] [--cgroup DIR ...]

It imports TVM and registers the functions below, then writes its pid into each --cgroup
directory, then serves. TVM's server forks a child per session, so every session runs inside the
cgroups with TVM already loaded: a device at a tenth of a core would otherwise spend half a minute
importing TVM under its quota, and the import's memory is the runtime's, not the device's (as
latte/measure.py does, the limit counts what the work allocates). The listening loop is TVM's own
(tvm.rpc.server.PopenRPCServerState, what tvm.rpc.Server runs in its popen worker) run in this
process, so the pid the caller started is the server and nothing is imported twice.

Functions a session can call (`session.get_function(NAME)`):
    edgetvm.device.whereami() -> JSON: pid, cgroup path per controller, network namespace, TVM_NUM_THREADS
    edgetvm.device.sha256(tensor) -> hex digest of the tensor's bytes, as they are on the device
    edgetvm.device.send(host, port, tag, pace, *tensors) -> bytes queued: the tensors go to a receiver at
        host:port over a TCP connection of the device's own, sent by a thread of the session while
        the session computes (the device's radio and processor work at once; runtime/cutedge.py)
    edgetvm.pipe.* -> a pipeline stage's node (runtime/pipeline_device.py)
    edgetvm.update.* -> a weight patch applied to an artifact on the device (runtime/patch.py)
    edgetvm.ptrain.* -> a pipeline training stage (edgetvm/pipetrain/device.py)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import queue
import socket
import struct
import threading
from pathlib import Path


def whereami() -> str:
    cgroups = {}
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        for c in controllers.split(","):
            cgroups[c or "unified"] = path
    return json.dumps({"pid": os.getpid(), "cgroups": cgroups, "netns": os.readlink("/proc/self/ns/net"),
                       "tvm_num_threads": os.environ.get("TVM_NUM_THREADS")})


def sha256(tensor) -> str:
    return hashlib.sha256(tensor.numpy().tobytes()).hexdigest()


def bind(lib, entry: str, *weights):
    """`entry` of a loaded model with its weights bound here, on the device: a frame's call over RPC then
    carries its inputs alone, not a handle per weight (~8 KB a call for a MobileNetV3's ~100 weights)."""
    import tvm
    from tvm import relax

    func = relax.VirtualMachine(lib, tvm.cpu())[entry]
    # Copies the function owns: the tensors passed in are the session's, and with several parts bound
    # in one session (runtime/cutedge.py) calls through the earlier ones got another part's weights.
    weights = [tvm.runtime.tensor(w.numpy(), tvm.cpu()) for w in weights]
    return tvm.runtime.convert(lambda *inputs: func(*inputs, *weights))


class _Sender:
    """One TCP connection from the device to a receiver; a thread sends the queued messages in order.
    A message: tag (u64), tensor count (u32), each tensor's byte length (u64), then the bytes."""

    def __init__(self, host: str, port: int):
        self.sock = socket.create_connection((host, port), timeout=30)
        self.sock.settimeout(None)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.messages: queue.Queue = queue.Queue()
        threading.Thread(target=self._loop, daemon=True, name="edgetvm-send").start()

    def _loop(self) -> None:
        while True:
            tag, pace, payloads = self.messages.get()
            if pace > 0:
                # The socket paces itself at the link's rate: the bytes wait here, in the device's own
                # buffer, not in the shaped link's queue, where they would hold up every RPC reply.
                self.sock.setsockopt(socket.SOL_SOCKET, SO_MAX_PACING_RATE, int(pace))
            header = struct.pack("!QI", tag, len(payloads)) + b"".join(struct.pack("!Q", len(p)) for p in payloads)
            try:
                self.sock.sendall(header)
                for p in payloads:
                    self.sock.sendall(p)  # releases the GIL while the shaped link drains
            except OSError:
                return  # the receiver went away: the run is over


_senders: dict[tuple[str, int], _Sender] = {}
SO_MAX_PACING_RATE = getattr(socket, "SO_MAX_PACING_RATE", 47)  # Linux, bytes per second


def send(host: str, port: int, tag: int, pace_bytes_per_s: int, *tensors) -> int:
    """Queues the tensors' bytes for the receiver at host:port, paced at `pace_bytes_per_s` (0: not
    paced), and returns at once: the sending thread runs while the next call computes (TVM's RPC loop
    holds no GIL while a kernel runs)."""
    payloads = [t.numpy().tobytes() for t in tensors]
    key = (str(host), int(port))
    if key not in _senders:
        _senders[key] = _Sender(*key)
    _senders[key].messages.put((int(tag), int(pace_bytes_per_s), payloads))
    return sum(len(p) for p in payloads)


def register_functions() -> None:
    import tvm

    tvm.register_global_func("edgetvm.device.whereami", whereami, override=True)
    tvm.register_global_func("edgetvm.device.sha256", sha256, override=True)
    tvm.register_global_func("edgetvm.device.bind", bind, override=True)
    tvm.register_global_func("edgetvm.device.send", send, override=True)
    from edgetvm.runtime import pipeline_device  # the pipeline's node functions (runtime/pipeline.py)

    pipeline_device.register(tvm)
    from edgetvm.runtime import patch  # edgetvm.update.apply: a weight patch applied on the device

    patch.register(tvm)
    from edgetvm.pipetrain import device as pipetrain_device  # edgetvm.ptrain.*: a training stage

    pipetrain_device.register(tvm)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m edgetvm.runtime.device_server")
    parser.add_argument("--host", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--tracker", help="HOST:PORT of the RPC tracker to register with")
    parser.add_argument("--key", default="", help="key to register under")
    parser.add_argument("--cgroup", action="append", default=[], help="cgroup directory to join after start-up")
    args = parser.parse_args(argv)

    from tvm.rpc.server import PopenRPCServerState

    register_functions()
    for directory in args.cgroup:
        Path(directory, "cgroup.procs").write_text(str(os.getpid()))
    tracker = None
    if args.tracker:
        host, port = args.tracker.rsplit(":", 1)
        tracker = (host, int(port))
    # port_end = port + 1: without it the server silently moves to the next port when its own is taken.
    state = PopenRPCServerState(args.host, args.port, args.port + 1, tracker_addr=tracker, key=args.key)
    state.thread.join()


if __name__ == "__main__":
    main()
