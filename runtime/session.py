"""Run a compiled model on this machine or on a board over TVM RPC (direct or through a tracker)."""

from __future__ import annotations

import atexit
import os
import platform
import shutil
import socket
import statistics
import tempfile
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import tvm
from tvm import relax, rpc

from edgetvm.errors import UserError


def model_threads() -> None:
    """TVM's thread pool for a process that runs a compiled model here: one thread per CPU this process may
    use, every task on a worker thread. TVM's own default halves the hardware threads on x86 (it takes
    them for hyperthread pairs), which on this 2-core VM meant one thread: every earlier "2-thread"
    figure against onnxruntime was one TVM thread against two. With two threads, tasks on worker threads
    (TVM_EXCLUDE_WORKER0=0) rather than the first on the calling thread measured, idle, three
    alternations of separate processes: ResNet 1.45-2.55 -> 1.36-1.59 ms, the transformer 1.25-1.36 ->
    0.64-0.71, VGG 0.92-1.06 -> 0.55-0.61, MobileNetV3 1.05-1.19 -> 0.72-0.78. Set before the pool
    starts: the pool is made here, and the environment left as it was (processes this one starts, and a
    caller that runs `edgetvm run` in-process, keep their own settings); a user's own settings win, and
    a pool that already runs is kept. Emulated devices set their own thread count; the LLM commands keep
    TVM's default (their many small kernels per token: 140 -> 119 tokens/s with worker threads only).
    The figures above predate 99b1ae8; from it until make_pool pinned the count, the workers idled."""
    import os

    make_pool({"TVM_NUM_THREADS": str(len(os.sched_getaffinity(0))), "TVM_EXCLUDE_WORKER0": "0"})


def make_pool(settings: dict[str, str], override: bool = False) -> int:
    """Makes TVM's thread pool (if it does not run yet) with `settings` in the environment, a user's own
    winning unless `override`, then leaves the environment as it was; the pool's thread count."""
    import os

    saved = {k: os.environ.get(k) for k in settings}
    for k, v in settings.items():
        if override:
            os.environ[k] = v
        else:
            os.environ.setdefault(k, v)
    try:
        threads = tvm.get_global_func("runtime.NumThreads")()   # the pool reads the settings when it is made
        if threads > 1 and saved.get("TVM_NUM_THREADS") is None and "TVM_NUM_THREADS" in settings:
            # TVM reads TVM_NUM_THREADS again at every parallel launch, and without it (restored below) falls
            # back to half the hardware threads: one on a 2-CPU machine, and then every parallel loop ran on
            # the calling thread while the pool's workers idled. Configuring the pool with its CPUs fixes
            # the count for the process. Every worker may run on any of them (mode -3) rather than be pinned
            # to one: a pinned worker whose CPU another process holds stalls every parallel loop until it is
            # scheduled again (ResNet beside the test suite: 89 and 3.8 ms per run pinned, 36 and 1.6 unpinned).
            cpus = sorted(os.sched_getaffinity(0))[:threads]
            if len(cpus) == threads:
                tvm.get_global_func("runtime.config_threadpool")(-3, threads, [str(c) for c in cpus])
        return threads
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k)
            else:
                os.environ[k] = v
from edgetvm.runtime.artifact import Artifact
from edgetvm.runtime.tensors import checked_inputs, to_numpy, to_tvm

CONNECT_TIMEOUT_S = 5.0


def parse_address(text: str, flag: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise UserError(f"{flag} '{text}' is not HOST:PORT; write it like {flag} 127.0.0.1:9090")
    return host, int(port)


def _reachable(host: str, port: int, what: str, hint: str) -> None:
    """Fail in seconds, with the address, where TVM would hang or fail with a C++ backtrace."""
    try:
        socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as e:
        reason = "timed out" if isinstance(e, TimeoutError) else (e.strerror or str(e))
        raise UserError(f"cannot reach the {what} at {host}:{port} ({reason}); {hint}") from None


def connect(rpc_addr: str | None = None, tracker_addr: str | None = None, key: str | None = None,
            session_timeout: int = 0, relay: Callable[[str, int], tuple[str, int]] | None = None):
    """An RPC session to a board, or None for this machine. `relay(host, port)` -> the address to dial
    instead of the board's (a counting relay), also for the board a tracker hands out."""
    if rpc_addr and tracker_addr:
        raise UserError("give either --rpc or --tracker, not both")
    if rpc_addr:
        host, port = parse_address(rpc_addr, "--rpc")
        _reachable(host, port, "RPC server", "start one on the board with "
                   "`python -m tvm.exec.rpc_server --host 0.0.0.0 --port PORT` (or `edgetvm board emulate`)")
        if relay:
            host, port = relay(host, port)
        return rpc.connect(host, port, session_timeout=session_timeout)
    if tracker_addr:
        if not key:
            raise UserError("--tracker needs --key, the key the board registered under")
        host, port = parse_address(tracker_addr, "--tracker")
        _reachable(host, port, "RPC tracker", "start one with `python -m tvm.exec.rpc_tracker --port PORT`")
        tracker = rpc.connect_tracker(host, port)
        keys = _tracker_keys(tracker)
        if key not in keys:
            # The tracker would queue the request until such a server appears: forever, if none does.
            raise UserError(f"no board is registered under key '{key}' at tracker {host}:{port} "
                            f"(keys there: {', '.join(sorted(keys)) or 'none'}); start the board's server "
                            f"with --tracker {host}:{port} --key {key}")
        if relay is None:
            return tracker.request(key, priority=1, session_timeout=session_timeout)
        # The tracker answers with the board's address and a match key, then TVM dials the board itself
        # (tvm.rpc.client.connect, a module global): dial the relay instead, for this request only.
        from tvm.rpc import client

        dial = client.connect

        def through_relay(url, port, *args, **kwargs):
            return dial(*relay(url, port), *args, **kwargs)

        client.connect = through_relay
        try:
            return tracker.request(key, priority=1, session_timeout=session_timeout, max_retry=1)
        finally:
            client.connect = dial
    if key:
        raise UserError("--key only makes sense with --tracker HOST:PORT")
    return None


def _tracker_keys(tracker) -> set[str]:
    keys = set()
    for info in tracker.summary().get("server_info", []):
        # Servers register as "server:KEY".
        keys.add(info["key"].split(":", 1)[-1])
    return keys


@dataclass
class Timing:
    seconds: list[float]

    @property
    def min_ms(self): return min(self.seconds) * 1e3

    @property
    def median_ms(self): return statistics.median(self.seconds) * 1e3

    @property
    def max_ms(self): return max(self.seconds) * 1e3


class Runner:
    """The artifact's `main`, loaded on a device with its weights in place, called with numpy inputs."""

    def __init__(self, art: Artifact, remote=None, weights: str = "map"):
        """weights="map": zero-copy views of the weight file; "copy": read into memory, as most runtimes do."""
        self.art, self.remote = art, remote
        arch = art.board["arch"]
        if remote is None:
            if arch != platform.machine():
                raise UserError(f"{art.path} was compiled for board '{art.board['name']}' ({arch}) and cannot "
                                f"run on this {platform.machine()} machine; run it on the board with "
                                f"--rpc HOST:PORT or --tracker HOST:PORT --key KEY")
            self.dev = tvm.cpu()
            lib = _load_library(art.library)
            if weights == "copy":
                self.weights = [to_tvm(w, self.dev) for w in art.weights()]
            else:
                # Zero-copy: TVM reads the weights straight from the mapped file.
                self.weights = [tvm.runtime.from_dlpack(w) for w in art.weights()]
        else:
            self.dev = remote.cpu()
            # Named by its hash: the parts of several split artifacts are all "model.so", and a session
            # that loads a second file of the same name gets the first (dlopen reuses the handle).
            digest = art.manifest.get("files", {}).get(art.library.name, "")[:16]
            remote_name = f"{digest}-{art.library.name}" if digest else art.library.name
            remote.upload(str(art.library), target=remote_name)
            lib = remote.load_module(remote_name)
            self.weights = [to_tvm(w, self.dev) for w in art.weights()]
        self.vm = _virtual_machine(lib, self.dev, art.library)
        self.entry = art.manifest.get("entry", "main")  # a split artifact's parts are `device`, `server`
        self.bound = _bind_on_device(remote, lib, self.entry, self.weights) if remote is not None else None
        if remote is None:
            _check_signature(self.vm, self.entry, len(art.inputs), len(self.weights), art)

    def args(self, inputs: dict[str, np.ndarray]) -> list:
        """The inputs checked and placed on the device, then the weights: what the entry function takes."""
        return [to_tvm(x, self.dev) for x in checked_inputs(self.art.inputs, inputs)] + self.weights

    def call(self, args: list) -> list:
        """The entry function's outputs, left where they were computed."""
        try:
            if self.bound is not None:  # the weights wait on the device: send the inputs alone
                out = self.bound(*args[:len(args) - len(self.weights)])
            else:
                out = self.vm[self.entry](*args)
        except (ValueError, TypeError, RuntimeError) as e:
            if not _argument_check(e):
                raise
            raise UserError(f"{self.art.library} refuses the inputs and weights {self.art.path}/manifest.json "
                            f"describes ({_first_line(e)}); the artifact is inconsistent: recompile the model") from None
        if isinstance(out, tvm.runtime.Tensor):
            return [out]
        if self.remote is not None and not isinstance(out, (list, tuple)):
            # A tuple left on a board comes back as a remote handle: take it apart there, an item per
            # round trip. Its size is the manifest's (asking the board would be one more round trip).
            if not hasattr(self, "_array_item"):
                self._array_item = self.remote.get_function("ffi.ArrayGetItem")
            return [self._array_item(out, i) for i in range(len(self.art.outputs))]
        return list(out)

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        outs = [to_numpy(o) for o in self.call(self.args(inputs))]
        got = [(o.dtype.name, tuple(o.shape)) for o in outs]
        want = [(i.dtype, tuple(i.shape)) for i in self.art.outputs]
        if got != want:  # a manifest edited to match its hashes but not its library
            raise UserError(f"{self.art.library} returned {_tensors(got)}, but {self.art.path}/manifest.json lists "
                            f"{_tensors(want)}; the artifact is inconsistent: recompile the model")
        return {info.name: o for info, o in zip(self.art.outputs, outs)}

    def time(self, inputs: dict[str, np.ndarray], repeat: int = 10, min_repeat_ms: int = 0) -> Timing:
        """Per-call latency measured on the device itself (over RPC: no network time included)."""
        args = self.args(inputs)
        self.vm[self.entry](*args)  # warm-up: first-touch of the weights, thread pool start
        f = self.vm.time_evaluator(self.entry, self.dev, number=1, repeat=repeat, min_repeat_ms=min_repeat_ms)
        return Timing(list(f(*args).results))


def _bind_on_device(remote, lib, entry: str, weights: list):
    """The entry function with the weights bound on the device, where its RPC server registered
    `edgetvm.device.bind` (emulated devices do; a plain `tvm.exec.rpc_server` does not: None)."""
    try:
        bind = remote.get_function("edgetvm.device.bind")
    except (AttributeError, RuntimeError, ValueError):
        return None
    return bind(lib, entry, *weights)


_LOADED: dict[str, tuple[int, int]] = {}  # library path -> (inode, mtime) of the file dlopen'ed there


def _load_library(path):
    """The compiled library; one that dlopen or TVM refuses is a damaged artifact, not a bug here."""
    # dlopen hands back the library it already loaded from a path, so an artifact compiled again into the
    # same directory would run the old kernels in this process: a changed file is loaded from a copy
    path = os.path.abspath(path)
    st = os.stat(path) if os.path.exists(path) else None
    if st is not None and _LOADED.setdefault(path, (st.st_ino, st.st_mtime_ns)) != (st.st_ino, st.st_mtime_ns):
        fd, copy = tempfile.mkstemp(suffix=os.path.basename(path))
        os.close(fd)
        shutil.copyfile(path, copy)
        atexit.register(os.unlink, copy)
        path = copy
    try:
        return tvm.runtime.load_module(str(path))
    except (RuntimeError, ValueError) as e:  # tvm.error.InternalError is a RuntimeError
        raise UserError(f"cannot load {path} ({_first_line(e)}); recompile the model") from None


def _virtual_machine(lib, dev, path):
    try:
        return relax.VirtualMachine(lib, dev)
    except AttributeError:  # "Module has no function 'vm_load_executable'": a library, but not a model
        raise UserError(f"{path} is a shared library but not a model compiled by edgetvm; recompile the model") from None


def _check_signature(vm, entry: str, n_inputs: int, n_weights: int, art) -> None:
    """The entry function exists and takes as many arguments as the manifest has inputs and weights."""
    try:
        arity = vm._get_function_arity(entry)
    except (ValueError, RuntimeError):  # "Unknown function"
        raise UserError(f"{art.library} has no function '{entry}', the entry {art.path}/manifest.json names; "
                        f"recompile the model") from None
    if arity != n_inputs + n_weights:
        raise UserError(f"{art.library}'s {entry} takes {arity} arguments, but {art.path}/manifest.json lists "
                        f"{n_inputs} inputs and {n_weights} weights; the artifact is inconsistent: recompile the model")


def _argument_check(e: Exception) -> bool:
    """TVM's checks of a call's arguments against the compiled signature (shape, dtype, layout), which
    raise before any kernel reads them: a manifest that disagrees with its library."""
    text = str(e)
    return "ErrorContext(fn=" in text or ("Mismatched" in text and "on argument #" in text)


def _tensors(infos) -> str:
    return ", ".join(f"{dtype}[{','.join(map(str, shape))}]" for dtype, shape in infos) or "nothing"


def _first_line(e: Exception) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return (lines[0] if lines else type(e).__name__)[:200]
