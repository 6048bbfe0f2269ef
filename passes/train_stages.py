"""Cut a training step into consecutive pipeline stages: forward, backward and optimizer step per stage.

    mod = train_stages(IRModule({"backbone": train.backbone(model, micro_batch)}), cuts=[5, 11],
                       optimizer=MomentumSGD(0.01, 0.9))

The backbone (x, *weights) -> logits is one dataflow block; `cuts` are binding indices (a stage ends
before binding cuts[i]). At each cut exactly one activation may be live (a chain of layers), and every
weight belongs to one stage. For stage s of S the module gets

    stage{s}_forward(a, *w_s) -> y                                       (the last stage: logits)
    stage{s}_backward(a, *w_s, gy) -> (sum(y * gy), (ga, *gw_s))         (stage 0: no ga)
    stage{S-1}_backward(a, *w_s, labels, gl) -> ((gl * loss, loss), (ga, *gw_s))
    stage{s}_optimizer(w_s, gw_s, state_s) -> (w_s', state_s')           (with an optimizer)

where loss is the mean cross-entropy of the logits (as tvm.relax.training's CrossEntropyLoss) and gl
the gradient of the step's loss with respect to this micro-batch's loss (1/M for M micro-batches: the
accumulated gradients then equal those of the whole batch's mean). A backward is
relax.transform.Gradient of the vector-Jacobian product sum(y * gy): it recomputes its stage's forward
from the stashed input activation (GPipe's re-materialisation), so a stage keeps one input per
micro-batch in flight, not every intermediate.
"""

from __future__ import annotations

import tvm
from tvm import relax


def _sub(expr, env):
    if isinstance(expr, relax.Var):
        return env.get(expr, expr)
    if isinstance(expr, relax.Tuple):
        return relax.Tuple([_sub(f, env) for f in expr.fields])
    return expr


def _emit(bb, bindings, env) -> None:
    for b in bindings:
        v = b.value
        if isinstance(v, relax.Var):
            env[b.var] = env[v]
        elif isinstance(v, relax.Call):
            env[b.var] = bb.emit(relax.Call(v.op, [_sub(a, env) for a in v.args], v.attrs, v.ty_args))
        else:
            raise ValueError(f"train_stages: unsupported binding {type(v).__name__} ({b.var.name})")


def _uses(expr, out: set) -> None:
    if isinstance(expr, relax.Var):
        out.add(expr)
    elif isinstance(expr, relax.Tuple):
        for f in expr.fields:
            _uses(f, out)
    elif isinstance(expr, relax.Call):
        for a in expr.args:
            _uses(a, out)


def _var(v, name=None):
    return relax.Var(name or v.name, v.ty)


def train_stages(mod: tvm.IRModule, cuts: list[int], optimizer=None, entry: str = "backbone") -> tvm.IRModule:
    """A backbone's training step cut at `cuts` into consecutive stages, each with forward, backward, optimizer."""
    func = mod[entry]
    blocks = func.body.blocks
    if len(blocks) != 1:
        raise ValueError(f"train_stages: {entry} must be one dataflow block, it has {len(blocks)}")
    bindings = list(blocks[0].bindings)
    x, weights = func.params[0], list(func.params[1:])
    bounds = [0, *cuts, len(bindings)]
    if any(b <= a for a, b in zip(bounds, bounds[1:])):
        raise ValueError(f"train_stages: cuts {cuts} must increase strictly within 1..{len(bindings) - 1}")
    parts = [bindings[a:b] for a, b in zip(bounds, bounds[1:])]
    defined_in = {b.var: s for s, part in enumerate(parts) for b in part}
    used = []
    for part in parts:
        u: set = set()
        for b in part:
            _uses(b.value, u)
        used.append(u)
    inputs, stage_weights = [x], []
    for s, u in enumerate(used):
        ws = [w for w in weights if w in u]
        for w in ws:
            if any(w in used[t] for t in range(len(parts)) if t != s):
                raise ValueError(f"train_stages: weight {w.name} is used by more than one stage")
        stage_weights.append(ws)
        if s > 0:
            live = [v for v in u if defined_in.get(v, s) < s]
            if x in u or len(live) != 1:
                raise ValueError(f"train_stages: cut before binding {bounds[s]} has {len(live)} live "
                                 "activations; cut between layers")
            inputs.append(live[0])
        later = set().union(*used[s + 1:]) if s + 1 < len(parts) else set()
        leak = [b.var for b in parts[s][:-1] if b.var in later]
        if leak:
            raise ValueError(f"train_stages: {leak[0].name} of stage {s} is used after the next cut")
    outputs = [part[-1].var for part in parts]

    out = tvm.IRModule({gv: f for gv, f in mod.functions.items() if gv.name_hint != entry})
    last = len(parts) - 1
    for s, part in enumerate(parts):
        a = _var(inputs[s], "x" if s == 0 else "a")
        ws = [_var(w) for w in stage_weights[s]]
        env = {inputs[s]: a, **dict(zip(stage_weights[s], ws))}
        # forward
        bb = relax.BlockBuilder()
        with bb.function(f"stage{s}_forward", [a, *ws]):
            with bb.dataflow():
                _emit(bb, part, env)
                y = bb.emit_output(env[outputs[s]])
            bb.emit_func_output(y)
        fwd = bb.get()[f"stage{s}_forward"]
        out[f"stage{s}_forward"] = fwd
        # vector-Jacobian product, then its gradient
        a2 = _var(inputs[s], "x" if s == 0 else "a")
        ws2 = [_var(w) for w in stage_weights[s]]
        env2 = {inputs[s]: a2, **dict(zip(stage_weights[s], ws2))}
        name = f"stage{s}_vjp"
        bb = relax.BlockBuilder()
        yty = outputs[s].ty
        if s < last:
            gy = relax.Var("gy", yty)
            params = [a2, *ws2, gy]
            with bb.function(name, params):
                with bb.dataflow():
                    _emit(bb, part, env2)
                    y = env2[outputs[s]]
                    r = bb.emit_output(relax.op.sum(relax.op.multiply(y, gy)))
                bb.emit_func_output(r)
        else:
            n = [int(d) for d in yty.shape][0]
            labels = relax.Var("labels", relax.TensorType((n,), "int64"))
            gl = relax.Var("gl", relax.TensorType((), "float32"))
            params = [a2, *ws2, labels, gl]
            with bb.function(name, params):
                with bb.dataflow():
                    _emit(bb, part, env2)
                    logits = env2[outputs[s]]
                    loss = bb.emit(relax.op.nn.nll_loss(relax.op.nn.log_softmax(logits), labels, reduction="mean"))
                    scaled = bb.emit_output(relax.op.multiply(loss, gl))
                    loss = bb.emit_output(loss)
                bb.emit_func_output(relax.Tuple([scaled, loss]))
        vjp = bb.get()[name].with_attr("global_symbol", name)
        grads = ([a2] if s > 0 else []) + ws2
        tmp = tvm.IRModule({name: vjp})
        tmp = relax.transform.Gradient(name, require_grads=grads, target_index=0)(tmp)
        out[f"stage{s}_backward"] = tmp[f"{name}_adjoint"].with_attr("global_symbol", f"stage{s}_backward")
        if optimizer is not None and stage_weights[s]:
            opt = optimizer.init([_var(w) for w in stage_weights[s]])
            out[f"stage{s}_optimizer"] = opt.get_function().with_attr("global_symbol", f"stage{s}_optimizer")
    return out.with_attr("stage_weights", [[w.name for w in ws] for ws in stage_weights])
