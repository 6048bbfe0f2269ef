"""A training stage inside a device's TVM RPC session (registered by runtime/device_server.py), and the
host-side proxy with the same methods as stages.Stage.

    edgetvm.ptrain.load(config_json) -> "ok"       the stage's library, weights and optimizer state (files
                                                    written by the coordinator before the run)
    edgetvm.ptrain.forward(mb, keep, a) -> y
    edgetvm.ptrain.backward(mb, gy) -> ga           (stage 0: an empty tensor)
    edgetvm.ptrain.backward_last(mb, gl, labels) -> ga
    edgetvm.ptrain.step() -> "ok"                   the optimizer on the accumulated gradients
    edgetvm.ptrain.get(kind, i) -> tensor           kind: "param", "state" or "grad"
    edgetvm.ptrain.set_grads(*tensors) -> 0         replicas: the summed gradients
    edgetvm.ptrain.info() -> JSON                   counts, busy seconds (compute, measured here), losses

Activations and gradients travel as the calls' arguments and results: device -> coordinator -> next
device (TVM RPC sessions are a star), each over the devices' own shaped links.
"""

from __future__ import annotations

import json

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


def _t(a):
    import numpy as np
    import tvm

    if a is None:
        return tvm.runtime.tensor(np.zeros((0,), "float32"), tvm.cpu())
    return a if isinstance(a, tvm.runtime.Tensor) else tvm.runtime.tensor(a, tvm.cpu())


# The tensors a call receives go to the stage's kernels as they are, and its results come back as
# TVM tensors: no numpy copies on the device's quota.

def forward(mb, keep, a):
    import tvm

    # A call's argument lives only as long as the call: the stashed input must be the stage's own copy.
    x = a.copyto(tvm.cpu()) if keep else a
    return _stage.forward(int(mb), x, keep=bool(keep), raw=True)


def backward(mb, g):
    return _t(_stage.backward(int(mb), g, raw=True))


def backward_last(mb, gl, labels):
    return _t(_stage.backward_last(int(mb), labels, float(gl), raw=True))


def step() -> str:
    _stage.step()
    return "ok"


def get(kind: str, i: int):
    arrays = {"param": _stage.params, "state": _stage.optimizer_state, "grad": _stage.get_grads}[kind]()
    return _t(arrays[int(i)])


def set_grads(*tensors) -> int:
    _stage.set_grads([t.numpy() for t in tensors])
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

    def _t(self, a):
        import numpy as np
        import tvm

        a = np.asarray(a)
        return tvm.runtime.tensor(a if a.flags.c_contiguous else a.copy(), self.sess.cpu())

    def forward(self, mb: int, a, keep: bool = True):
        return self._forward(int(mb), bool(keep), self._t(a)).numpy()

    def backward(self, mb: int, g):
        out = self._backward(int(mb), self._t(g)).numpy()
        return None if out.size == 0 else out

    def backward_last(self, mb: int, labels, gl: float):
        import numpy as np

        out = self._backward_last(int(mb), float(gl), self._t(np.asarray(labels, np.int64))).numpy()
        return None if out.size == 0 else out

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
        self._set_grads(*[self._t(g) for g in grads])
