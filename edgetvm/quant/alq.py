"""ALQ: adaptive loss-aware quantisation to multi-bit networks below one bit per weight.

Qu, Zhou, Cheng, Thiele, "Adaptive Loss-aware Quantization for Multi-bit Networks", CVPR 2020
(arXiv 1912.08883). The loss around the current weights is modelled as a quadratic whose gradient and
diagonal Hessian are AMSGrad's moments (pseudo-gradient lr * m_hat, pseudo-Hessian sqrt(v_max_hat)), and
the multi-bit form (multibit.py) is optimised against that model directly, with no full-precision
shadow weights and no straight-through estimator:

  basis step       each weight takes the bit pattern (over its group's bases) whose value is nearest the
                   model's optimum w - g/H, then the group's alphas are refitted in closed form
                   (Hessian-weighted least squares) and the alpha-domain moments are carried over;
  coordinate step  an AMSGrad step on the alphas, with their gradient B^T g;
  bitwidth pruning the modelled loss increase of dropping a basis, -g_a * alpha + alpha^2 * H_a / 2,
                   ranks every active basis of every layer together, and the least important go, spread
                   over a pruning epoch, until the average bitwidth reaches this round's target: a group
                   may lose all of its bases.

Gradients come from the TVM-compiled training step of edgetvm.train (the network is run with the
reconstructed weights); these steps are numpy. Biases stay float32 and follow AMSGrad too.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from edgetvm.quant.multibit import MultiBit, grouped, rows_of

BETA1, BETA2, EPS = 0.9, 0.999, 1e-8


def _table(m: int) -> np.ndarray:
    """All 2^m sign patterns, (2^m, m), +-1."""
    idx = np.arange(2 ** m)[:, None]
    return np.where((idx >> np.arange(m)) & 1, 1.0, -1.0).astype(np.float32)


@dataclass
class AMSGrad:
    """AMSGrad moments of one array (w domain or alpha domain)."""
    m: np.ndarray
    v: np.ndarray
    vmax: np.ndarray
    t: int = 0

    @classmethod
    def like(cls, a: np.ndarray) -> "AMSGrad":
        z = np.zeros_like(a, dtype=np.float32)
        return cls(z.copy(), z.copy(), z.copy())

    def update(self, g: np.ndarray, lr: float) -> tuple[np.ndarray, np.ndarray]:
        """Fold in gradient g; return (pseudo-gradient, pseudo-Hessian): the step is -pg / ph."""
        self.t += 1
        self.m = BETA1 * self.m + (1 - BETA1) * g
        self.v = BETA2 * self.v + (1 - BETA2) * g * g
        self.vmax = np.maximum(self.vmax, self.v)
        return self.model(lr)

    def model(self, lr: float) -> tuple[np.ndarray, np.ndarray]:
        t = max(self.t, 1)
        pg = (lr / (1 - BETA1 ** t)) * self.m
        ph = (np.sqrt(self.vmax) + EPS) / np.sqrt(1 - BETA2 ** t)
        return pg.astype(np.float32), ph.astype(np.float32)


@dataclass
class Layer:
    """A quantised weight with its optimiser state in both domains."""
    mb: MultiBit
    w_state: AMSGrad = None          # over the (rows, groups, group) view of the weight
    a_state: AMSGrad = None          # over the alphas

    def __post_init__(self):
        if self.w_state is None:
            self.w_state = AMSGrad.like(np.zeros(self.mb.bases.shape[:2] + (self.mb.group,), np.float32))
        if self.a_state is None:
            self.a_state = AMSGrad.like(self.mb.alpha)

    def grad_rows(self, g: np.ndarray) -> np.ndarray:
        return grouped(rows_of(self.mb.name, g), self.mb.group) * self.mb.valid()

    def grad_alpha(self, g_rows: np.ndarray) -> np.ndarray:
        """d loss / d alpha_i = b_i . g over the group, for active bases."""
        return (self.mb.bases * g_rows[:, :, None, :]).sum(axis=3, dtype=np.float32) * self.mb.active

    def basis_step(self, g: np.ndarray, lr: float) -> None:
        mb = self.mb
        g_rows = self.grad_rows(g)
        pg, ph = self.w_state.update(g_rows, lr)
        valid = mb.valid()
        target = mb.reconstruct_rows() - pg / ph
        # every weight picks the pattern of its group's bases nearest the target
        M = mb.max_bases
        table = _table(M)                                                 # (P, M)
        values = (mb.alpha * mb.active) @ table.T                         # (R, G, P)
        best = np.abs(target[..., None] - values[:, :, None, :]).argmin(axis=3)   # (R, G, n)
        signs = table[best]                                               # (R, G, n, M)
        mb.bases = np.where(mb.active[..., None], np.moveaxis(signs, 3, 2), 1).astype(np.int8)
        # closed-form alphas for the new bases under the quadratic model: (B H B^T) a = B H t; a group
        # keeps its old alphas where the refit would not lower the model (a near-singular system)
        B = mb.bases.astype(np.float32) * valid[None, :, None, :]
        BH = B * ph[:, :, None, :]
        gram = BH @ B.transpose(0, 1, 3, 2)
        scale = np.maximum(gram.diagonal(axis1=2, axis2=3).mean(axis=2), 1e-30)[..., None, None].astype(np.float32)
        gram += np.eye(M, dtype=np.float32) * ((~mb.active)[..., None] + np.float32(1e-5) * scale)
        rhs = (BH @ target[..., None])[..., 0] * mb.active
        fit = np.linalg.solve(gram, rhs[..., None])[..., 0] * mb.active

        def model_value(a):
            w = (a[..., None] * B).sum(axis=2)
            return (ph * (w - target) ** 2).sum(axis=2)

        old = mb.alpha * mb.active
        better = np.isfinite(fit).all(axis=2) & (model_value(fit) <= model_value(old))
        mb.alpha = np.where(better[..., None], fit, old).astype(np.float32)
        mb.normalise()
        # the alpha-domain moments follow the new bases (as the paper's implementation does)
        B = mb.bases.astype(np.float32) * valid[None, :, None, :]   # bases may have flipped in normalise
        st = self.a_state
        st.m = (B @ self.w_state.m[..., None])[..., 0] * mb.active
        st.v = (valid[None, :, None, :] * self.w_state.v[:, :, None, :]).sum(axis=3) * mb.active
        st.vmax = (valid[None, :, None, :] * self.w_state.vmax[:, :, None, :]).sum(axis=3) * mb.active
        st.t = self.w_state.t

    def coordinate_step(self, g: np.ndarray, lr: float) -> None:
        g_rows = self.grad_rows(g)
        self.w_state.update(g_rows, lr)          # kept current for the next basis step
        pg, ph = self.a_state.update(self.grad_alpha(g_rows), lr)
        self.mb.alpha = (self.mb.alpha - pg / ph) * self.mb.active
        self.mb.normalise()

    def importance(self, g: np.ndarray, lr: float) -> np.ndarray:
        """Modelled loss increase of pruning each basis (R, G, M); +inf where there is none."""
        g_rows = self.grad_rows(g)
        self.w_state.update(g_rows, lr)
        pg, ph = self.a_state.update(self.grad_alpha(g_rows), lr)
        a = self.mb.alpha
        d = -pg * a + 0.5 * a * a * ph
        return np.where(self.mb.active, d, np.inf)


@dataclass
class Bias:
    """A float parameter (bias) trained by AMSGrad alongside."""
    value: np.ndarray
    state: AMSGrad = None

    def __post_init__(self):
        if self.state is None:
            self.state = AMSGrad.like(self.value)

    def step(self, g: np.ndarray, lr: float) -> None:
        pg, ph = self.state.update(g, lr)
        self.value = (self.value - pg / ph).astype(np.float32)


def average_bits(layers: dict[str, Layer]) -> float:
    return sum(lay.mb.bits() for lay in layers.values()) / sum(lay.mb.n_weights() for lay in layers.values())


def prune(layers: dict[str, Layer], scores: dict[str, np.ndarray], n_bits: int) -> int:
    """Drop the least important bases across all layers until `n_bits` bits are gone (or none is left);
    returns the bits removed."""
    if n_bits <= 0:
        return 0
    names = list(layers)
    flat = [np.where(layers[n].mb.active, scores[n], np.inf).reshape(-1) for n in names]
    cost = [np.broadcast_to(layers[n].mb.group_sizes()[None, :, None], scores[n].shape).reshape(-1)
            for n in names]
    owner = np.concatenate([np.full(len(f), i) for i, f in enumerate(flat)])
    pos = np.concatenate([np.arange(len(f)) for f in flat])
    s, c = np.concatenate(flat), np.concatenate(cost)
    order = np.argsort(s, kind="stable")
    order = order[np.isfinite(s[order])]
    take = order[:np.searchsorted(np.cumsum(c[order]), n_bits) + 1]
    for i, n in enumerate(names):
        mine = pos[take[owner[take] == i]]
        if len(mine):
            mb = layers[n].mb
            act = mb.active.reshape(-1)
            act[mine] = False
            mb.active = act.reshape(mb.active.shape)
            mb.alpha *= mb.active
    return int(c[take].sum())


@dataclass
class Schedule:
    """ALQ's phases, scaled down from the paper's (R=4 rounds of 20 basis, 10 coordinate and 1 pruning
    epochs, then 70 of post-training) for a 2-core machine; `lr_decay` per epoch within a phase."""
    rounds: int = 4
    basis_epochs: int = 2
    coordinate_epochs: int = 1
    prune_epochs: int = 1
    post_epochs: int = 4
    lr: float = 1e-3
    lr_decay: float = 0.8
    max_bases: int = 4
    group: int = 64

    def phases(self) -> list[tuple[str, int, int]]:
        """(phase, round, epoch within the phase) of every epoch, in order."""
        out = []
        for r in range(self.rounds):
            out += [("basis", r, e) for e in range(self.basis_epochs)]
            out += [("coordinate", r, e) for e in range(self.coordinate_epochs)]
            out += [("prune", r, e) for e in range(self.prune_epochs)]
        for e in range(self.post_epochs):
            out += [("post-basis" if e % 2 == 0 else "post-coordinate", self.rounds, e)]
        return out


@dataclass
class State:
    """Everything a run needs to continue: the layers, the biases, and where it is."""
    layers: dict[str, Layer]
    biases: dict[str, Bias]
    epoch: int = 0                              # epochs of Schedule.phases() done
    start_bits: float = 0.0
    history: list = field(default_factory=list)


def round_target(start: float, target: float, r: int, rounds: int) -> float:
    """The average bitwidth after pruning round r: geometric from the sketch's to the target."""
    return float(start * (target / start) ** ((r + 1) / rounds))


# ---- the run -------------------------------------------------------------------------------------------------


def init_state(params: dict[str, np.ndarray], quantised: list[str], schedule: Schedule) -> State:
    from edgetvm.quant.multibit import sketch

    layers = {n: Layer(sketch(n, params[n], schedule.group, schedule.max_bases)) for n in quantised}
    biases = {n: Bias(np.asarray(p, np.float32).copy()) for n, p in params.items() if n not in layers}
    state = State(layers, biases)
    state.start_bits = average_bits(layers)
    return state


def current_params(state: State) -> dict[str, np.ndarray]:
    out = {n: lay.mb.weight() for n, lay in state.layers.items()}
    out |= {n: b.value for n, b in state.biases.items()}
    return out


def run_epoch(state: State, trainer, ds, schedule: Schedule, target_bits: float, phase: str, r: int,
              e: int, epoch_index: int, show=None) -> dict:
    """One epoch of `phase` (basis, coordinate, prune, post-basis, post-coordinate); returns its record."""
    from edgetvm import data as data_mod

    if phase.startswith("post"):
        lr = schedule.lr * 0.95 ** (e + 1)
    else:
        lr = schedule.lr * schedule.lr_decay ** (e + 1)
    kind = phase.split("-")[-1]
    steps = data_mod.steps_per_epoch(ds.train, trainer.batch)
    total_w = sum(lay.mb.n_weights() for lay in state.layers.values())
    goal = round_target(state.start_bits, target_bits, r, schedule.rounds) if kind == "prune" else None
    loss_sum = 0.0
    for i, (x, y) in enumerate(data_mod.batches(ds.train, trainer.batch, trainer.seed, 10_000 + epoch_index)):
        trainer.set_params(current_params(state))
        loss, grads = trainer.gradients(x, y)
        loss_sum += loss
        for n, b in state.biases.items():
            b.step(grads[n], lr)
        if kind == "basis":
            for n, lay in state.layers.items():
                lay.basis_step(grads[n], lr)
        elif kind == "coordinate":
            for n, lay in state.layers.items():
                lay.coordinate_step(grads[n], lr)
        else:
            scores = {n: lay.importance(grads[n], lr) for n, lay in state.layers.items()}
            bits_now = sum(lay.mb.bits() for lay in state.layers.values())
            excess = bits_now - goal * total_w
            prune(state.layers, scores, int(np.ceil(excess / (steps - i))) if excess > 0 else 0)
        if show is not None:
            show.update(f"{phase} r{r + 1} epoch {e + 1}  step {i + 1}/{steps}  loss {loss_sum / (i + 1):.4f}  "
                        f"bits {average_bits(state.layers):.3f}")
    return {"phase": phase, "round": r + 1, "lr": lr, "loss": loss_sum / max(steps, 1),
            "bits": average_bits(state.layers)}


def _save(path, state: State, meta: dict) -> None:
    import json
    import os
    from pathlib import Path

    arrays = {}
    for n, lay in state.layers.items():
        mb = lay.mb
        arrays |= {f"L/{n}/bases": mb.bases, f"L/{n}/alpha": mb.alpha, f"L/{n}/active": mb.active}
        for dom, st in (("w", lay.w_state), ("a", lay.a_state)):
            arrays |= {f"L/{n}/{dom}/m": st.m, f"L/{n}/{dom}/v": st.v, f"L/{n}/{dom}/vmax": st.vmax}
    for n, b in state.biases.items():
        arrays |= {f"B/{n}/value": b.value, f"B/{n}/m": b.state.m, f"B/{n}/v": b.state.v,
                   f"B/{n}/vmax": b.state.vmax}
    meta = meta | {"epoch": state.epoch, "start_bits": state.start_bits, "history": state.history,
                   "t": {n: [lay.w_state.t, lay.a_state.t] for n, lay in state.layers.items()},
                   "bt": {n: b.state.t for n, b in state.biases.items()},
                   "layers": {n: [list(lay.mb.shape), lay.mb.group] for n, lay in state.layers.items()}}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            np.savez(f, meta=np.array(json.dumps(meta)), **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _load(path) -> tuple[State, dict]:
    import json
    import zipfile

    from edgetvm.errors import UserError
    from edgetvm.quant.multibit import MultiBit

    try:
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(str(z["meta"]))
            layers = {}
            for n, (shape, group) in meta["layers"].items():
                mb = MultiBit(n, tuple(shape), group, z[f"L/{n}/bases"], z[f"L/{n}/alpha"], z[f"L/{n}/active"])
                tw, ta = meta["t"][n]
                sts = [AMSGrad(z[f"L/{n}/{d}/m"], z[f"L/{n}/{d}/v"], z[f"L/{n}/{d}/vmax"], t)
                       for d, t in (("w", tw), ("a", ta))]
                layers[n] = Layer(mb, *sts)
            biases = {n: Bias(z[f"B/{n}/value"], AMSGrad(z[f"B/{n}/m"], z[f"B/{n}/v"], z[f"B/{n}/vmax"], t))
                      for n, t in meta["bt"].items()}
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
        raise UserError(f"checkpoint {path} cannot be read ({e}); delete it to start over") from None
    return State(layers, biases, meta["epoch"], meta["start_bits"], meta["history"]), meta


def quantize(model, params: dict[str, np.ndarray], ds, target_bits: float, schedule: Schedule | None = None,
             batch: int = 64, seed: int = 0, checkpoint=None, progress: bool = True,
             quantised: list[str] | None = None, start: State | None = None) -> State:
    """ALQ from pretrained float `params` of a train.Model to `target_bits` average bits per weight.

    Every conv and linear weight is quantised unless `quantised` names the ones to. With `checkpoint`,
    the state is written there after every epoch and a run resumes from it (the batches depend only on
    the seed and the epoch, so a resumed run ends where an uninterrupted one would). With `start` (the
    State of an earlier run at more bits), the run continues from it instead of sketching: several
    targets in one progressive pruning, as the paper's schedule prunes."""
    from pathlib import Path

    from edgetvm import train
    from edgetvm.errors import UserError

    schedule = schedule or Schedule()
    if not 0 < target_bits <= 8:
        raise UserError(f"target bitwidth {target_bits} is outside (0, 8]; pass e.g. --bits 0.4")
    quantised = quantised or [n for n, p in params.items() if n.endswith(".weight") and p.ndim in (2, 4)]
    if not quantised:
        raise UserError(f"{model.name} has no conv or linear weight to quantise")
    meta = {"model": repr(model), "target_bits": target_bits, "schedule": repr(schedule), "seed": seed,
            "batch": batch, "data": ds.name, "from_bits": None if start is None else average_bits(start.layers)}
    if checkpoint is not None and Path(checkpoint).exists():
        state, old = _load(checkpoint)
        differ = [k for k in meta if old.get(k) != meta[k]]
        if differ:
            raise UserError(f"checkpoint {checkpoint} was written with another {', '.join(differ)}; "
                            "delete it or pass another checkpoint path")
    elif start is not None:
        import copy

        state = State(copy.deepcopy(start.layers), copy.deepcopy(start.biases))
        state.start_bits = average_bits(state.layers)
    else:
        state = init_state(params, quantised, schedule)
    trainer = train.Trainer(model, batch, seed=seed)
    show = train._Progress(progress)
    phases = schedule.phases()
    if state.epoch == 0 and not state.history:
        trainer.set_params(current_params(state))
        val = train.evaluate(trainer, ds.val)
        state.history.append({"phase": "sketch" if start is None else "start", "bits": state.start_bits,
                              "val_accuracy": val["accuracy"]})
        show.done(f"{state.history[-1]['phase']}  bits {state.start_bits:.3f}  val acc {100 * val['accuracy']:.2f}%")
    for index in range(state.epoch, len(phases)):
        phase, r, e = phases[index]
        record = run_epoch(state, trainer, ds, schedule, target_bits, phase, r, e, index, show)
        trainer.set_params(current_params(state))
        val = train.evaluate(trainer, ds.val)
        record |= {"epoch": index + 1, "val_accuracy": val["accuracy"]}
        state.history.append(record)
        state.epoch = index + 1
        if checkpoint is not None:
            _save(checkpoint, state, meta)
        show.done(f"{phase:15s} r{r + 1} epoch {index + 1}/{len(phases)}  loss {record['loss']:.4f}  "
                  f"val acc {100 * val['accuracy']:.2f}%  bits {record['bits']:.3f}")
    return state
