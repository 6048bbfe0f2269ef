"""A training stage inside a device's TVM RPC session (registered by runtime/device_server.py), and the
host-side proxy with the same methods as stages.Stage.

    edgetvm.ptrain.load(config_json) -> "ok"       the stage's library, weights and optimizer state (files
                                                    written by the coordinator before the run)
    edgetvm.ptrain.listen() -> port                 a TVM RPC server of the session's own, for the
                                                    neighbouring stages' devices (see below)
    edgetvm.ptrain.connect(peers_json) -> "ok"      sessions to the next and previous stages' replicas
    edgetvm.ptrain.forward(mb, keep, to, blob(a)) -> blob(y)
    edgetvm.ptrain.backward(mb, to, blob(gy)) -> blob(ga)   (stage 0: no array)
    edgetvm.ptrain.backward_last(mb, gl, to, blob(labels)) -> blob(ga)
    edgetvm.ptrain.push(kind, mb, blob) -> 0        (a neighbour's call) an activation ("a") or gradient
                                                    ("g") into this stage's inbox, or a replica's
                                                    weight gradients ("s") or their sum ("t")
    edgetvm.ptrain.reduce(replica, n, dtype) -> "ok"
                                                    replicas: the gradients summed device to device, each
                                                    replica summing an n-th (reduce-scatter, all-gather),
                                                    sent in dtype, then the optimizer step
    edgetvm.ptrain.step() -> "ok"                   the optimizer on the accumulated gradients
    edgetvm.ptrain.get(kind, i) -> tensor           kind: "param", "state" or "grad"
    edgetvm.ptrain.set_grads(blob(grads)) -> 0      replicas: the summed gradients
    edgetvm.ptrain.info() -> JSON                   counts, busy seconds (compute, measured here), losses
    edgetvm.ptrain.abort(message) -> 0              (the coordinator, over the listener) wake a call that
                                                    waits for its inbox: another stage failed

Activations and gradients go from device to device. A TVM RPC server serves one session at a time and
the coordinator holds each device's, so `listen` starts a second TVM RPC server inside the session's
process (TVM's own server loop, one thread per connection, sharing the stage's inbox); `connect` makes
the device a client of its neighbours' listeners. With `to` >= 0 a call pushes its result to replica
`to` of the neighbouring stage (by a sender thread, while this device goes on with its next call) and
returns no array; a call given no array takes its input from the inbox, waiting until it has come.
With `to` = -1 (and with no neighbours: the profile, one device) results come back to the coordinator.
Either way tensors travel as one bytes value a call (runtime/tensors.pack): a TVM tensor made on the
session and read back costs three more round trips a call (allocate, copy, fetch), each waking a device
that has a fraction of a CPU.
"""

from __future__ import annotations

import json
import queue
import threading

from edgetvm.runtime.tensors import pack, unpack

_stage = None
PING_S = 2.0        # a call waiting for its inbox checks this often that its neighbours still answer


class _Inbox:
    """What the neighbours pushed, by (kind, micro-batch)."""

    def __init__(self):
        self.items: dict = {}
        self.cond = threading.Condition()
        self.error: str | None = None

    def put(self, key, value) -> None:
        with self.cond:
            self.items[key] = value
            self.cond.notify_all()

    def fail(self, message: str) -> None:
        with self.cond:
            self.error = message
            self.cond.notify_all()

    def take(self, key):
        import time

        checked = time.monotonic()
        with self.cond:
            while key not in self.items:
                if self.error:
                    raise RuntimeError(self.error)
                self.cond.wait(0.2)
                if time.monotonic() - checked > PING_S:
                    # a neighbour killed mid-send would leave this call waiting forever
                    self.cond.release()
                    try:
                        for p in _peers.values():
                            p.check()
                    finally:
                        self.cond.acquire()
                    checked = time.monotonic()
            return self.items.pop(key)


class _Peer:
    """A session of this device's own to a neighbouring stage's listener; a thread sends what is queued,
    in order, so this device computes its next micro-batch while the last one's result travels."""

    def __init__(self, spec: dict):
        from tvm import rpc

        self.name = spec["name"]
        try:
            self.sess = rpc.connect(spec["addr"][0], int(spec["addr"][1]), session_timeout=0)
            self._push, self._ping = (self.sess.get_function(f"edgetvm.ptrain.{n}") for n in ("push", "ping"))
        except Exception as e:  # noqa: BLE001 - named
            raise RuntimeError(f"device '{self.name}' cannot be reached ({_short(e)})") from None
        self.lock = threading.Lock()     # a session is one conversation: the sender and check() take turns
        self.queue: queue.Queue = queue.Queue()
        self.error: str | None = None
        threading.Thread(target=self._loop, daemon=True, name=f"edgetvm-ptrain-send-{self.name}").start()

    def _loop(self) -> None:
        while True:
            kind, mb, arrays = self.queue.get()
            try:
                if self.error is None:
                    blob = arrays if isinstance(arrays, bytes) else pack(arrays)
                    with self.lock:
                        self._push(kind, mb, blob)
            except Exception as e:  # noqa: BLE001 - raised by this device's next call
                self.error = f"device '{self.name}' stopped answering ({_short(e)})"
            finally:
                self.queue.task_done()

    def send(self, kind: str, mb: int, arrays) -> None:
        """Queue arrays (or a blob already packed, for a value sent to several peers) for the peer."""
        if self.error:
            raise RuntimeError(self.error)
        self.queue.put((kind, int(mb), arrays))

    def flush(self) -> None:
        self.queue.join()
        if self.error:
            raise RuntimeError(self.error)

    def check(self) -> None:
        if self.error:
            raise RuntimeError(self.error)
        if self.lock.acquire(blocking=False):  # busy sending: it answers
            try:
                self._ping()
            except Exception as e:  # noqa: BLE001
                self.error = f"device '{self.name}' stopped answering ({_short(e)})"
                raise RuntimeError(self.error) from None
            finally:
                self.lock.release()


def _short(e: BaseException) -> str:
    text = [t for t in str(e).strip().splitlines() if t.strip()]
    return (text[-1] if text else type(e).__name__)[:200]


_inbox = _Inbox()
_peers: dict[tuple[str, int], _Peer] = {}      # ("next" | "prev" | "mate", replica) -> its session
_listener = None


def load(config_json: str) -> str:
    global _stage
    import numpy as np
    import tvm

    from edgetvm.pipetrain.stages import Stage

    cfg = json.loads(config_json)
    ex = tvm.runtime.load_module(cfg["library"])
    with np.load(cfg["arrays"]) as z:
        weights = [z[f"w{i}"] for i in range(cfg["n_weights"])]
        state = [z[f"s{i}"] for i in range(cfg["n_state"])]
    _stage = Stage(ex, int(cfg["n_stages"]), int(cfg["s"]), weights, state)
    return "ok"


def _serve(conn) -> None:
    """TVM's RPC server handshake (tvm.rpc.server._listen_loop's, any key), then its server loop."""
    import struct

    from tvm.rpc import _ffi_api, base

    try:
        if struct.unpack("<i", base.recvall(conn, 4))[0] != base.RPC_MAGIC:
            return
        base.recvall(conn, struct.unpack("<i", base.recvall(conn, 4))[0])
        key = b"server:edgetvm.ptrain"
        conn.sendall(struct.pack("<ii", base.RPC_CODE_SUCCESS, len(key)) + key)
        _ffi_api.ServerLoop(conn.fileno())
    except Exception:  # noqa: BLE001 - a neighbour that went away: its own session says so
        pass
    finally:
        conn.close()


def listen() -> int:
    """The port of this session's own TVM RPC server (every address of the device's namespace)."""
    import socket

    global _listener
    if _listener is None:
        _listener = socket.socket()
        _listener.bind(("0.0.0.0", 0))
        _listener.listen(8)

        def accept():
            while True:
                conn, _ = _listener.accept()
                threading.Thread(target=_serve, args=(conn,), daemon=True).start()

        threading.Thread(target=accept, daemon=True, name="edgetvm-ptrain-listen").start()
    return _listener.getsockname()[1]


def connect(peers_json: str) -> str:
    """{"next": [{"name", "addr": [host, port]}, ...], "prev": [...], "mate": [... or None]}: the listeners
    of the neighbouring stages' replicas and of this stage's other replicas (None: this one)."""
    for side, specs in json.loads(peers_json).items():
        for r, spec in enumerate(specs):
            if spec is not None:
                _peers[(side, r)] = _Peer(spec)
    return "ok"


def push(kind, mb, blob) -> int:
    _inbox.put((str(kind), int(mb)), unpack(blob, own=True))  # the call's argument is not ours to keep
    return 0


def ping() -> int:
    return 0


def abort(message) -> int:
    _inbox.fail(str(message))
    return 0


def _input(kind: str, mb: int, blob):
    arrays = unpack(blob)
    return arrays[0] if arrays else _inbox.take((kind, mb))[0]


def _result(side: str, to: int, kind: str, mb: int, a) -> bytes:
    if a is None:
        return pack([])
    if to >= 0:
        _peers[(side, to)].send(kind, mb, [a])
        return pack([])
    return pack([a])


# A stage's kernels take TVM tensors made from the arrays (stages._tensor copies them: a stashed input is
# the stage's own, not a view of a call's argument).

def forward(mb, keep, to, blob) -> bytes:
    mb = int(mb)
    return _result("next", int(to), "a", mb, _stage.forward(mb, _input("a", mb, blob), keep=bool(keep)))


def backward(mb, to, blob) -> bytes:
    mb = int(mb)
    return _result("prev", int(to), "g", mb, _stage.backward(mb, _input("g", mb, blob)))


def backward_last(mb, gl, to, blob) -> bytes:
    ga = _stage.backward_last(int(mb), unpack(blob)[0], float(gl))
    return _result("prev", int(to), "g", int(mb), ga)


def reduce(replica, n, dtype="float32") -> str:
    """The n replicas' accumulated gradients summed in replica order (as the coordinator sums them,
    schedule.sum_gradients, in `dtype` on the wire), the work split n ways: replica r owns the r-th n-th
    of the gradients (flattened, concatenated), every replica sends each owner its share (reduce-scatter),
    each owner sums its share in replica order and sends the sum to the others (all-gather). A replica's
    link and CPU carry 2(n-1)/n of the gradients each way, all replicas at once; through one replica, its
    link carried 2(n-1) times them. Then the optimizer step, in the same call (a call costs a device with a
    fraction of a CPU several ms)."""
    import numpy as np

    from edgetvm.pipetrain.schedule import sum_gradients, wire_dtype

    replica, n, wire = int(replica), int(n), wire_dtype(str(dtype))
    grads = _stage.get_grads()
    flat = np.concatenate([g.reshape(-1) for g in grads]).astype(wire, copy=False)
    cuts = np.linspace(0, flat.size, n + 1).astype(np.int64)
    for r in range(n):
        if r != replica:
            _peers[("mate", r)].send("s", replica, [flat[cuts[r]:cuts[r + 1]]])
    mine = sum_gradients([flat[cuts[replica]:cuts[replica + 1]] if r == replica else _inbox.take(("s", r))[0]
                          for r in range(n)], wire.name)
    blob = pack([mine.astype(wire, copy=False)])
    for r in range(n):
        if r != replica:
            _peers[("mate", r)].send("t", replica, blob)
    total = np.concatenate([mine if r == replica else _inbox.take(("t", r))[0].astype(np.float32, copy=False)
                            for r in range(n)])
    offsets = np.cumsum([0] + [g.size for g in grads])
    _stage.set_grads([total[offsets[i]:offsets[i + 1]].reshape(g.shape) for i, g in enumerate(grads)])
    return step()


def step() -> str:
    # everything this device sent has arrived before the step counts as done
    for p in _peers.values():
        p.flush()
    _stage.step()
    return "ok"


def get(kind: str, i: int):
    import tvm

    arrays = {"param": _stage.params, "state": _stage.optimizer_state, "grad": _stage.get_grads}[kind]()
    return tvm.runtime.tensor(arrays[int(i)], tvm.cpu())


def set_grads(blob) -> int:
    _stage.set_grads([a.copy() for a in unpack(blob)])
    return 0


def info() -> str:
    import time

    # proc_s: the whole process's CPU (every thread: the RPC servers' packing and copies too)
    return json.dumps({"busy_s": _stage.busy_s, "cpu_s": _stage.cpu_s, "proc_s": time.process_time(),
                       "peak_stash": _stage.peak_stash, "n_params": len(_stage.weights),
                       "n_state": len(_stage.state), "n_grads": len(_stage.grads or []),
                       "losses": {str(k): v for k, v in _stage.take_losses().items()}})


def register(tvm) -> None:
    from edgetvm.pipetrain import stages  # noqa: F401 - imported before the server joins its cgroups

    for name, f in (("load", load), ("forward", forward), ("backward", backward), ("backward_last", backward_last),
                    ("step", step), ("get", get), ("set_grads", set_grads), ("info", info), ("listen", listen),
                    ("connect", connect), ("push", push), ("ping", ping), ("abort", abort), ("reduce", reduce)):
        tvm.register_global_func(f"edgetvm.ptrain.{name}", f, override=True)


class RemoteStage:
    """Stage s on a device: the same methods as stages.Stage, each one RPC call (losses with `info`).

    After `connect_neighbours`, forward/backward take `to` (the neighbouring stage's replica to push the
    result to: the call returns None) and take None for an input that a neighbour pushed."""

    def __init__(self, sess, name: str, config: dict):
        self.sess, self.name = sess, name
        f = sess.get_function
        self._forward, self._backward = f("edgetvm.ptrain.forward"), f("edgetvm.ptrain.backward")
        self._backward_last, self._step = f("edgetvm.ptrain.backward_last"), f("edgetvm.ptrain.step")
        self._get, self._set_grads, self._info = f("edgetvm.ptrain.get"), f("edgetvm.ptrain.set_grads"), \
            f("edgetvm.ptrain.info")
        f("edgetvm.ptrain.load")(json.dumps(config))
        self._losses: dict[int, float] = {}
        self._busy = self._cpu = self._proc = 0.0
        self.peak_stash = 0
        self.sends_direct = False
        self.listener: tuple[str, int] | None = None
        self._side = None

    def listen(self, host: str) -> tuple[str, int]:
        """Starts the device's listener; `host`: the device's address as its neighbours reach it."""
        self.listener = (host, int(self.sess.get_function("edgetvm.ptrain.listen")()))
        return self.listener

    def connect_neighbours(self, nxt: list["RemoteStage"], prev: list["RemoteStage"],
                           mates: list["RemoteStage"] = ()) -> None:
        from tvm import rpc

        spec = {side: [None if st is self else {"name": st.name, "addr": list(st.listener)} for st in sts]
                for side, sts in (("next", nxt), ("prev", prev), ("mate", mates))}
        self.sess.get_function("edgetvm.ptrain.connect")(json.dumps(spec))
        # A second way in, for abort(): the session is busy while its call waits for the inbox.
        self._side = rpc.connect(*self.listener, session_timeout=0)
        self.sends_direct = True

    def abort(self, message: str) -> None:
        if self._side is not None:
            self._side.get_function("edgetvm.ptrain.abort")(message)

    @staticmethod
    def _blob(a) -> bytes:
        return pack([] if a is None else [a])

    @staticmethod
    def _out(blob):
        out = unpack(blob)
        return out[0].copy() if out else None

    def forward(self, mb: int, a, keep: bool = True, to: int = -1):
        return self._out(self._forward(int(mb), bool(keep), int(to), self._blob(a)))

    def backward(self, mb: int, g, to: int = -1):
        return self._out(self._backward(int(mb), int(to), self._blob(g)))

    def backward_last(self, mb: int, labels, gl: float, to: int = -1):
        import numpy as np

        return self._out(self._backward_last(int(mb), float(gl), int(to), pack([np.asarray(labels, np.int64)])))

    def step(self) -> None:
        self._step()

    def reduce(self, replica: int, n: int, dtype: str = "float32") -> None:
        self.sess.get_function("edgetvm.ptrain.reduce")(int(replica), int(n), str(dtype))

    def _refresh(self) -> dict:
        info = json.loads(self._info())
        self._losses.update({int(k): v for k, v in info["losses"].items()})
        self._busy, self._cpu, self.peak_stash = info["busy_s"], info["cpu_s"], info["peak_stash"]
        self._proc = info["proc_s"]
        return info

    def stats(self, refresh: bool = True) -> dict:
        """Counters as of now, or (refresh=False) as of the last call that brought them (take_losses)."""
        if refresh:
            self._refresh()
        return {"busy_s": self._busy, "cpu_s": self._cpu, "peak_stash": self.peak_stash, "proc_s": self._proc}

    def take_losses(self) -> dict[int, float]:
        self._refresh()
        out, self._losses = self._losses, {}
        return out

    def _arrays(self, kind: str, n_key: str) -> list:
        n = self._refresh()[n_key]
        return [self._get(kind, i).numpy() for i in range(n)]

    def params(self):
        return self._arrays("param", "n_params")

    def optimizer_state(self):
        return self._arrays("state", "n_state")

    def get_grads(self):
        return self._arrays("grad", "n_grads")

    def set_grads(self, grads) -> None:
        self._set_grads(pack(grads))
