"""Deep Partial Updating (Qu, Liu, Thiele, ECCV 2022, arXiv 2007.03071), in rounds on real data.

A server deployed a model trained on a first slice of the training data; each round a new slice arrives.
Per round and per method, starting from that method's deployed weights w_prev:

  1. full update: train on all data so far (momentum SGD; gradients from the TVM-compiled step,
     Trainer.gradients), accumulating each weight's local contribution sum_t -dw_t * g_t (the loss
     decrease its own steps caused, to first order);
  2. score and select the top k of ALL weights (biases included):
       dpu        global contribution (w_full - w_prev)^2 and local contribution, each normalised by its
                  total, mixed half and half (`lam`);
       global     the global contribution alone;
       random     k of the weights at random (the paper's "random partial updating");
       magnitude  the largest |w_full - w_prev|, applied as they are (pruning the update; no fine-tuning,
                  which is what sets it apart from `global`);
       full       every weight (the reference: a full download);
  3. rewind the unselected weights to w_prev, fine-tune the selected ones only (their gradients alone);
  4. no update when the candidate is worse than the deployed model on the validation split: its mean
     cross-entropy there is not lower (MNIST-5k's 400 validation images move accuracy in steps of 0.25
     points, and an accuracy test refused most 1% candidates on ties and noise; the loss is continuous);
  5. otherwise the changed values go out as a patch (edgetvm/update/patch.py), which is applied to the
     method's own deployed artifact, and the next round starts from what the artifact then holds.

Accuracy is the deployed model's on the test split. Bytes per round are the patch's encoded size (the full
weight file for `full`, what a full download sends; 0 for a round without update).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from edgetvm.errors import UserError

METHODS = ("full", "dpu", "global", "random", "magnitude")
MODELS = ("mlp", "vgg_small", "lenet5")


@dataclass(frozen=True)
class Config:
    model: str = "mlp"
    data: str = "mnist"
    rounds: int = 5
    k: float = 0.01
    methods: tuple[str, ...] = METHODS
    initial_fraction: float = 0.4   # share of the training split the first model sees
    train_limit: int | None = None  # use only the first N training images (Fashion-MNIST has 54k)
    epochs_initial: int = 5
    epochs_update: int = 2          # the full update of each round
    epochs_finetune: int = 2        # fine-tuning the selected weights
    lr: float = 0.02
    momentum: float = 0.9
    batch: int = 64
    lam: float = 0.5                # dpu: weight of the global contribution against the local one
    coding: str = "f32"             # patch values: "f32" or "q8"
    seed: int = 0

    def check(self) -> None:
        from edgetvm.update.patch import check_k

        check_k(self.k)
        bad = [m for m in self.methods if m not in METHODS]
        if bad or not self.methods:
            raise UserError(f"unknown method {', '.join(bad) or '(none)'}; use some of {', '.join(METHODS)}")
        if self.model not in MODELS:
            raise UserError(f"unknown model {self.model!r}; use one of {', '.join(MODELS)}")
        if self.rounds < 1:
            raise UserError(f"--rounds {self.rounds} must be at least 1")
        if not 0 < self.initial_fraction < 1:
            raise UserError(f"--initial-fraction {self.initial_fraction:g} is outside (0, 1)")
        if self.coding not in ("f32", "q8"):
            raise UserError(f"--values {self.coding!r}: use f32 or q8")


@dataclass
class Lineage:
    """One method's deployed model: its artifact and the weights it holds."""
    method: str
    artifact: Path
    params: dict
    rng: np.random.Generator
    records: list = field(default_factory=list)


def build_model(cfg: Config, ds):
    from edgetvm import train

    return getattr(train, cfg.model)(n_classes=ds.n_classes, input_shape=ds.image_shape)


def sgd(trainer, params: dict, split, epochs: int, cfg: Config, epoch0: int, mask: dict | None = None,
        track: bool = False, progress: Callable[[str], None] | None = None, label: str = "") -> tuple[dict, dict | None]:
    """Momentum SGD from `params` on `split` with TVM-computed gradients; only masked weights move when
    `mask` is given. With `track`, also the local contributions sum_t -dw_t * g_t."""
    from edgetvm import data

    params = {n: np.array(a, np.float32) for n, a in params.items()}
    vel = {n: np.zeros_like(a) for n, a in params.items()}
    local = {n: np.zeros_like(a) for n, a in params.items()} if track else None
    steps = data.steps_per_epoch(split, trainer.batch)
    if steps == 0:
        raise UserError(f"{len(split)} training images are fewer than one batch ({trainer.batch}); use more data")
    lr, mu = np.float32(cfg.lr), np.float32(cfg.momentum)
    for e in range(epochs):
        for i, (x, y) in enumerate(data.batches(split, trainer.batch, cfg.seed, epoch0 + e)):
            trainer.set_params(params)
            loss, grads = trainer.gradients(x, y)
            for n, g in grads.items():
                step_g = g if mask is None else g * mask[n]
                vel[n] = mu * vel[n] + step_g
                dw = -lr * vel[n]
                if track:
                    local[n] += -dw * g
                params[n] += dw
            if progress is not None:
                progress(f"{label} epoch {e + 1}/{epochs} step {i + 1}/{steps} loss {loss:.3f}")
    return params, local


def scores(method: str, prev: dict, full: dict, local: dict, lam: float, rng: np.random.Generator) -> dict:
    """Per-weight scores whose top k are selected (see the module's docstring)."""
    glob = {n: (full[n].astype(np.float64) - prev[n]) ** 2 for n in prev}
    if method in ("global", "magnitude"):
        return glob
    if method == "random":
        return {n: rng.random(a.shape) for n, a in prev.items()}
    if method == "dpu":
        g_total = sum(float(a.sum()) for a in glob.values()) or 1.0
        l_total = sum(float(np.abs(a).sum()) for a in local.values()) or 1.0
        return {n: lam * glob[n] / g_total + (1 - lam) * local[n].astype(np.float64) / l_total for n in prev}
    raise ValueError(method)


def accuracy(trainer, params: dict, split) -> float:
    return evaluate(trainer, params, split)["accuracy"]


def evaluate(trainer, params: dict, split) -> dict[str, float]:
    from edgetvm import train

    trainer.set_params(params)
    return train.evaluate(trainer, split)


def simulate(cfg: Config, workdir: Path, progress: Callable[[str], None] | None = None) -> dict:
    """Run the rounds for every method; returns {"config", "full_bytes", "records": [...], "summary"}."""
    from edgetvm import data, train
    from edgetvm.compiler import compile_model
    from edgetvm.quant.cli import limited
    from edgetvm.runtime.artifact import open_artifact
    from edgetvm.targets import load_board
    from edgetvm.update.patch import WeightMap, apply_local, float_weights, make_patch, select_top

    cfg.check()
    say = progress or (lambda text: None)
    ds = limited(data.load(cfg.data, seed=cfg.seed), cfg.train_limit)
    model = build_model(cfg, ds)
    trainer = train.Trainer(model, cfg.batch, seed=cfg.seed)
    n = len(ds.train)
    n0 = int(cfg.initial_fraction * n)
    per_round = (n - n0) // cfg.rounds
    if per_round < 1:
        raise UserError(f"{n - n0} images left after the initial slice cannot feed {cfg.rounds} rounds")

    def seen(r: int):
        stop = n0 + r * per_round
        return data.Split(ds.train.x[:stop], ds.train.y[:stop])

    say("training the initial model")
    p0, _ = sgd(trainer, train.init_params(model, cfg.seed), seen(0), cfg.epochs_initial, cfg, 0,
                progress=say, label="initial")
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    import onnx

    onnx.save(train.to_onnx(model, p0), workdir / "initial.onnx")
    say("compiling the initial model")
    base = workdir / "initial"
    if base.exists():
        shutil.rmtree(base)
    host = load_board("host")
    compile_model(workdir / "initial.onnx", host, base, log=lambda m: None)
    full_bytes = open_artifact(base).weights_path.stat().st_size
    # The artifact stores packed and transposed weights: parameters <-> stored values.
    wmap = WeightMap(workdir / "initial.onnx", host.target())

    def held(artifact) -> dict:   # the parameters a deployed artifact holds
        return wmap.params_of(float_weights(open_artifact(artifact)))

    lineages = []
    for i, m in enumerate(cfg.methods):
        d = workdir / f"deployed-{m}"
        if d.exists():
            shutil.rmtree(d)
        shutil.copytree(base, d)
        lineages.append(Lineage(m, d, held(d), np.random.default_rng([cfg.seed, i])))
    acc0 = accuracy(trainer, p0, ds.test)
    records = [{"round": 0, "method": lin.method, "accuracy": acc0, "bytes": full_bytes, "updated": True,
                "changed": int(sum(a.size for a in p0.values())), "apply_s": 0.0} for lin in lineages]

    for r in range(1, cfg.rounds + 1):
        split = seen(r)
        epoch0 = 1000 * r   # each round its own batch orders (data.batches depends on (seed, epoch))
        for lin in lineages:
            m, prev = lin.method, lin.params
            label = f"round {r}/{cfg.rounds} {m}"
            full, local = sgd(trainer, prev, split, cfg.epochs_update, cfg, epoch0, track=(m == "dpu"),
                              progress=say, label=label + " full update")
            if m == "full":
                cand, mask = full, None
            else:
                mask = select_top(scores(m, prev, full, local, cfg.lam, lin.rng), cfg.k)
                cand = {n: np.where(mask[n], full[n], prev[n]) for n in prev}
                if m != "magnitude":
                    f_mask = {n: mk.astype(np.float32) for n, mk in mask.items()}
                    cand, _ = sgd(trainer, cand, split, cfg.epochs_finetune, cfg, epoch0 + 100, mask=f_mask,
                                  progress=say, label=label + " fine-tune")
            # No update when the candidate is worse than what is deployed (on held-out data, not the test set).
            improve = m == "full" or evaluate(trainer, cand, ds.val)["loss"] < evaluate(trainer, prev, ds.val)["loss"]
            improve = improve and any(np.any(cand[n] != prev[n]) for n in prev)   # an empty patch is no update
            rec = {"round": r, "method": m, "updated": bool(improve), "bytes": 0, "changed": 0, "apply_s": 0.0}
            if improve:
                blob = make_patch(open_artifact(lin.artifact), wmap.stored(cand), None if mask is None else
                                  wmap.stored({n: mk & (cand[n] != prev[n]) for n, mk in mask.items()}, False),
                                  cfg.coding, {"method": m, "round": r, "k": cfg.k})
                # Kept, so that a benchmark can replay the rounds on a board (bench/dpu.py).
                patch_path = workdir / "patches" / f"{m}-r{r}.patch"
                patch_path.parent.mkdir(exist_ok=True)
                patch_path.write_bytes(blob)
                rec["patch"] = str(patch_path)
                t0 = time.perf_counter()
                report = apply_local(lin.artifact, blob)
                rec["apply_s"] = time.perf_counter() - t0
                rec["changed"] = report["changed"]
                rec["bytes"] = full_bytes if m == "full" else len(blob)
                lin.params = held(lin.artifact)   # what the device now holds
            rec["accuracy"] = accuracy(trainer, lin.params, ds.test)
            records.append(rec)
            say(f"{label}: test accuracy {100 * rec['accuracy']:.2f}%, {rec['bytes']:,} bytes"
                + ("" if improve else " (no update: the candidate was worse)"))
    return {"config": dataclasses.asdict(cfg), "full_bytes": full_bytes, "n_weights":
            int(sum(a.size for a in p0.values())), "records": records, "summary": summarise(records, full_bytes)}


def summarise(records: list[dict], full_bytes: int) -> dict:
    """Per method: mean accuracy difference to full updating over rounds 1.., mean bytes per round and
    their share of a full update."""
    by = {}
    for rec in records:
        if rec["round"] > 0:
            by.setdefault(rec["method"], {})[rec["round"]] = rec
    ref = by.get("full")
    out = {}
    for m, rounds in by.items():
        accs = [rounds[r]["accuracy"] for r in sorted(rounds)]
        sizes = [rounds[r]["bytes"] for r in sorted(rounds)]
        row = {"mean_accuracy": float(np.mean(accs)), "mean_bytes": float(np.mean(sizes)),
               "bytes_share": float(np.mean(sizes)) / full_bytes,
               "updates": sum(rounds[r]["updated"] for r in rounds),
               "mean_apply_s": float(np.mean([rounds[r]["apply_s"] for r in rounds]))}
        if ref is not None:
            row["accuracy_diff_to_full"] = float(np.mean([rounds[r]["accuracy"] - ref[r]["accuracy"]
                                                          for r in sorted(rounds) if r in ref]))
        out[m] = row
    return out


def plot(result: dict, path: Path) -> None:
    """Accuracy and bytes per round, one line per method, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cfg = result["config"]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    for m in cfg["methods"]:
        recs = sorted((r for r in result["records"] if r["method"] == m), key=lambda r: r["round"])
        a1.plot([r["round"] for r in recs], [100 * r["accuracy"] for r in recs], marker="o", label=m)
        later = [r for r in recs if r["round"] > 0]
        a2.plot([r["round"] for r in later], [max(r["bytes"], 1) for r in later], marker="o", label=m)
    a1.set(xlabel="round", ylabel="test accuracy (%)",
           title=f"{cfg['model']} on {cfg['data']}, k = {cfg['k']:g}")
    a2.set(xlabel="round", ylabel="bytes sent (log)", yscale="log", title="bytes per round (0 shown as 1)")
    a1.legend()
    a2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_json(result: dict, path: Path) -> None:
    Path(path).write_text(json.dumps(result, indent=2) + "\n")
