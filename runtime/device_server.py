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
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
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
    return tvm.runtime.convert(lambda *inputs: func(*inputs, *weights))


def register_functions() -> None:
    import tvm

    tvm.register_global_func("edgetvm.device.whereami", whereami, override=True)
    tvm.register_global_func("edgetvm.device.sha256", sha256, override=True)
    tvm.register_global_func("edgetvm.device.bind", bind, override=True)


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
