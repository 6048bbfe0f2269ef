"""A training stage inside a device's TVM RPC session (registered by runtime/device_server.py), and the
host-side proxy with the same methods as stages.Stage.

    edgetvm.ptrain.load(config_json) -> "ok"       the stage's library, weights and optimizer state (files
                                                    written by the coordinator before the run)
    edgetvm.ptrain.forward(mb, keep, blob(a)) -> blob(y)
    edgetvm.ptrain.backward(mb, blob(gy)) -> blob(ga)       (stage 0: no array)
    edgetvm.ptrain.backward_last(mb, gl, blob(labels)) -> blob(ga)
    edgetvm.ptrain.step() -> "ok"                   the optimizer on the accumulated gradients
    edgetvm.ptrain.get(kind, i) -> tensor           kind: "param", "state" or "grad"
    edgetvm.ptrain.set_grads(blob(grads)) -> 0      replicas: the summed gradients
    edgetvm.ptrain.info() -> JSON                   counts, busy seconds (compute, measured here), losses

Activations and gradients travel as the calls' arguments and results: device -> coordinator -> next
device (TVM RPC sessions are a star), each over the devices' own shaped links. They travel as one bytes
value a call (runtime/tensors.pack): a TVM tensor made on the session and read back costs three more
round trips a call (allocate, copy, fetch), each waking a device that has a fraction of a CPU.
"""

from __future__ import annotations

import json

from edgetvm.runtime.tensors import pack, unpack

_stage = None


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


# A stage's kernels take TVM tensors made from the arrays (stages._tensor copies them: a stashed input is
# the stage's own, not a view of a call's argument).

def forward(mb, keep, blob) -> bytes:
    return pack([_stage.forward(int(mb), unpack(blob)[0], keep=bool(keep))])


def backward(mb, blob) -> bytes:
    ga = _stage.backward(int(mb), unpack(blob)[0])
    return pack([] if ga is None else [ga])


def backward_last(mb, gl, blob) -> bytes:
    ga = _stage.backward_last(int(mb), unpack(blob)[0], float(gl))
    return pack([] if ga is None else [ga])


def step() -> str:
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
    return json.dumps({"busy_s": _stage.busy_s, "cpu_s": _stage.cpu_s, "peak_stash": _stage.peak_stash, "n_params": len(_stage.weights),
                       "n_state": len(_stage.state), "n_grads": len(_stage.grads or []),
                       "losses": {str(k): v for k, v in _stage.take_losses().items()}})


def register(tvm) -> None:
    from edgetvm.pipetrain import stages  # noqa: F401 - imported before the server joins its cgroups

    for name, f in (("load", load), ("forward", forward), ("backward", backward), ("backward_last", backward_last),
                    ("step", step), ("get", get), ("set_grads", set_grads), ("info", info)):
        tvm.register_global_func(f"edgetvm.ptrain.{name}", f, override=True)


class RemoteStage:
    """Stage s on a device: the same methods as stages.Stage, each one RPC call (losses with `info`)."""

    def __init__(self, sess, name: str, config: dict):
        self.sess, self.name = sess, name
        f = sess.get_function
        self._forward, self._backward = f("edgetvm.ptrain.forward"), f("edgetvm.ptrain.backward")
        self._backward_last, self._step = f("edgetvm.ptrain.backward_last"), f("edgetvm.ptrain.step")
        self._get, self._set_grads, self._info = f("edgetvm.ptrain.get"), f("edgetvm.ptrain.set_grads"), \
            f("edgetvm.ptrain.info")
        f("edgetvm.ptrain.load")(json.dumps(config))
        self._losses: dict[int, float] = {}
        self._busy = self._cpu = 0.0
        self.peak_stash = 0

    def forward(self, mb: int, a, keep: bool = True):
        return unpack(self._forward(int(mb), bool(keep), pack([a])))[0].copy()

    def backward(self, mb: int, g):
        out = unpack(self._backward(int(mb), pack([g])))
        return out[0].copy() if out else None

    def backward_last(self, mb: int, labels, gl: float):
        import numpy as np

        out = unpack(self._backward_last(int(mb), float(gl), pack([np.asarray(labels, np.int64)])))
        return out[0].copy() if out else None

    def step(self) -> None:
        self._step()

    def _refresh(self) -> dict:
        info = json.loads(self._info())
        self._losses.update({int(k): v for k, v in info["losses"].items()})
        self._busy, self._cpu, self.peak_stash = info["busy_s"], info["cpu_s"], info["peak_stash"]
        return info

    def stats(self) -> dict:
        self._refresh()
        return {"busy_s": self._busy, "cpu_s": self._cpu, "peak_stash": self.peak_stash}

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
