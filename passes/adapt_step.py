"""The masked adaptation step: a model's forward function -> a training step that updates only the selected slices.

    step = adapt_step(tvm.IRModule({"backbone": train.backbone(model, batch)}), mask, lr=0.05)
    # step["adapt_step"](x, y, *params) -> (loss, *new slices)       (output="grad": the gradients instead)

`mask` maps a parameter name to a boolean vector over its *input* channels (conv weight (O, C, KH, KW):
axis 1; linear weight (in, out): axis 0) or, for a bias, over its channels; parameters not in the mask,
or with no True entry, are frozen. The step is built by hand from the forward bindings, layer by layer,
not by relax.transform.Gradient, so that it holds only what the selected slices need:
  - no gradient of a frozen weight, and no backward pass below the lowest updated layer;
  - a conv or linear layer whose weight is updated keeps only the selected input channels of its input
    (dW[:, S] needs x[:, S] only); a frozen one keeps nothing (its input gradient needs its weight only);
  - a ReLU keeps its sign mask (bool, one byte an element; not its float input), a ReLU followed by a
    2x2 max pool keeps one bool mask for both (where the input was positive and the maximum);
  - the step returns the updated slices W[:, S] - lr * dW[:, S] (plain SGD), not whole tensors; `lr` is
    one number or {name: one step size per selected channel} (p-Meta's learned, channel-wise rates).
Mean softmax cross-entropy over the batch, like train.py's steps. Max-pool gradients go to every input
equal to the window's maximum (TVM's to the first): they differ only on exact ties of positive values.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax

_OPS = {name: tvm.ir.Op.get(f"relax.{name}") for name in
        ("nn.conv2d", "add", "reshape", "nn.relu", "nn.max_pool2d", "matmul")}


def _shape(e) -> tuple[int, ...]:
    return tuple(int(s) for s in e.ty.shape)


def _is(call, name: str) -> bool:
    return isinstance(call, relax.Call) and call.op.same_as(_OPS[name])


def selected(mask: dict, name: str) -> np.ndarray:
    """Sorted indices of the True entries of mask[name] (empty when absent)."""
    m = mask.get(name)
    return np.zeros(0, np.int64) if m is None else np.flatnonzero(np.asarray(m, bool))


def adapt_step(mod: tvm.IRModule, mask: dict, lr: float | dict = 0.01, output: str = "update",
               func: str = "backbone") -> tvm.IRModule:
    """`mod` plus `adapt_step(x, y, *params) -> (loss, *slices)` updating only `mask`'s slices of `func`'s params."""
    if output not in ("update", "grad"):
        raise ValueError(f"output must be 'update' or 'grad', not {output!r}")
    f = mod[func]
    x_in, params = f.params[0], list(f.params[1:])
    pnames = [p.name for p in params]
    for name in mask:
        if name not in pnames:
            raise ValueError(f"the mask names {name!r}, which {func} has no parameter of; it has {', '.join(pnames)}")
    bindings = [b for blk in f.body.blocks for b in blk.bindings]
    # ---- read the layers ------------------------------------------------------------------------
    pvar = {p: p.name for p in params}
    bias_of = {}      # var -> parameter name, for reshape(bias)
    layers = []       # (kind, out var, in var, info)
    for b in bindings:
        v = b.value
        if isinstance(v, relax.Var):
            layers.append(("alias", b.var, v, None))
        elif _is(v, "reshape") and v.args[0] in pvar:
            bias_of[b.var] = pvar[v.args[0]]
        elif _is(v, "nn.conv2d") and v.args[1] in pvar:
            a = v.attrs
            if (tuple(int(s) for s in a.strides) != (1, 1) or tuple(int(d) for d in a.dilation) != (1, 1)
                    or int(a.groups) != 1 or a.data_layout != "NCHW" or a.kernel_layout != "OIHW"):
                raise ValueError("adapt_step handles stride-1, ungrouped NCHW/OIHW convolutions only")
            layers.append(("conv", b.var, v.args[0], (pvar[v.args[1]], tuple(int(p) for p in a.padding))))
        elif _is(v, "matmul") and v.args[1] in pvar:
            layers.append(("linear", b.var, v.args[0], pvar[v.args[1]]))
        elif _is(v, "add") and (v.args[1] in bias_of or v.args[1] in pvar):
            name = bias_of.get(v.args[1]) or pvar[v.args[1]]
            layers.append(("bias", b.var, v.args[0], name))
        elif _is(v, "nn.relu"):
            layers.append(("relu", b.var, v.args[0], None))
        elif _is(v, "nn.max_pool2d"):
            a = v.attrs
            k = tuple(int(s) for s in a.pool_size)
            if (tuple(int(s) for s in a.strides) != k or any(int(p) for p in a.padding) or a.ceil_mode
                    or a.layout != "NCHW"):
                raise ValueError("adapt_step handles non-overlapping, unpadded NCHW max pools only")
            layers.append(("pool", b.var, v.args[0], k))
        elif _is(v, "reshape"):
            layers.append(("reshape", b.var, v.args[0], None))
        else:
            raise ValueError(f"adapt_step cannot differentiate {v.op if isinstance(v, relax.Call) else v}")
    sel = {n: selected(mask, n) for n in pnames}
    updated = [n for n in pnames if len(sel[n])]
    if not updated:
        raise ValueError("the mask selects nothing to update")
    uses = {}
    for i, (kind, out, inp, info) in enumerate(layers):
        if kind in ("conv", "linear", "bias") and info is not None:
            name = info[0] if kind == "conv" else info
            uses.setdefault(name, i)
    lowest = min(uses[n] for n in updated)

    # ---- build the step -----------------------------------------------------------------------------
    batch = _shape(x_in)[0]
    nx = relax.Var("x", x_in.ty)
    ny = relax.Var("y", relax.TensorType((batch,), "int64"))
    nparams = [relax.Var(p.name, p.ty) for p in params]
    P = dict(zip(pnames, nparams))
    op = relax.op
    bb = relax.BlockBuilder()
    with bb.function("adapt_step", [nx, ny, *nparams]):
        with bb.dataflow():
            env = {x_in: nx}
            saved = {}     # layer index -> what its backward needs
            i = 0
            while i < len(layers):
                kind, out, inp, info = layers[i]
                h = env[inp]
                needs_back = i >= lowest
                if kind == "alias":
                    y = h
                elif kind == "conv":
                    name, pad = info
                    y = bb.emit(op.nn.conv2d(h, P[name], padding=pad))
                    s = sel[name]
                    if len(s):  # keep only the input channels whose weights are updated
                        c = _shape(h)[1]
                        saved[i] = h if len(s) == c else bb.emit(op.take(h, relax.const(s.astype("int64")), axis=1, mode="clip"))
                elif kind == "linear":
                    y = bb.emit(op.matmul(h, P[info]))
                    s = sel[info]
                    if len(s):
                        c = _shape(h)[1]
                        saved[i] = h if len(s) == c else bb.emit(op.take(h, relax.const(s.astype("int64")), axis=1, mode="clip"))
                elif kind == "bias":
                    b = P[info]
                    if len(_shape(h)) == 4:
                        b = op.reshape(b, (1, _shape(b)[0], 1, 1))
                    y = bb.emit(op.add(h, b))
                elif kind == "relu":
                    y = bb.emit(op.nn.relu(h))
                    nxt = layers[i + 1] if i + 1 < len(layers) else None
                    if nxt is not None and nxt[0] == "pool" and nxt[2].same_as(out):
                        # ReLU then max pool: one mask for both
                        k = nxt[3]
                        z = bb.emit(op.nn.max_pool2d(y, k, k))
                        if needs_back:
                            n, c, hh, ww = _shape(y)
                            oh, ow = _shape(z)[2:]
                            crop = y if (hh, ww) == (oh * k[0], ow * k[1]) else \
                                bb.emit(op.strided_slice(y, [2, 3], [0, 0], [oh * k[0], ow * k[1]]))
                            up = op.repeat(op.repeat(z, k[0], axis=2), k[1], axis=3)
                            hc = h if crop is y else op.strided_slice(h, [2, 3], [0, 0], [oh * k[0], ow * k[1]])
                            saved[i] = ("relu_pool", bb.emit(op.logical_and(op.equal(crop, up),
                                                                             op.greater(hc, relax.const(0.0)))),
                                        k, (hh, ww))
                        env[out] = y
                        env[nxt[1]] = z
                        i += 2
                        continue
                    if needs_back:
                        saved[i] = ("relu", bb.emit(op.greater(h, relax.const(0.0))))
                elif kind == "pool":
                    k = info
                    y = bb.emit(op.nn.max_pool2d(h, k, k))
                    if needs_back:
                        n, c, hh, ww = _shape(h)
                        oh, ow = _shape(y)[2:]
                        crop = h if (hh, ww) == (oh * k[0], ow * k[1]) else \
                            bb.emit(op.strided_slice(h, [2, 3], [0, 0], [oh * k[0], ow * k[1]]))
                        up = op.repeat(op.repeat(y, k[0], axis=2), k[1], axis=3)
                        saved[i] = ("pool", bb.emit(op.equal(crop, up)), k, (hh, ww))
                elif kind == "reshape":
                    y = bb.emit(op.reshape(h, _shape(out)))
                env[out] = y
                i += 1
            logits = env[f.body.body] if isinstance(f.body.body, relax.Var) else None
            if logits is None:
                raise ValueError("adapt_step needs a function returning one tensor (the logits)")
            n_cls = _shape(logits)[1]
            ls = bb.emit(op.nn.log_softmax(logits, axis=1))
            onehot = bb.emit(op.one_hot(ny, relax.prim_value(tvm.tirx.FloatImm("float32", 1.0)),
                                        relax.prim_value(tvm.tirx.FloatImm("float32", 0.0)), n_cls, axis=1))
            loss = bb.emit(op.divide(op.negative(op.sum(op.multiply(ls, onehot))), relax.const(float(batch))))
            g = bb.emit(op.divide(op.subtract(op.exp(ls), onehot), relax.const(float(batch))))
            grads = {}
            # ---- backward, top layer down to the lowest updated one -----------------------------------
            i = len(layers) - 1
            while i >= lowest:
                kind, out, inp, info = layers[i]
                last = i == lowest
                if kind == "bias":
                    s = sel[info]
                    if len(s):
                        axes = [0, 2, 3] if len(_shape(g)) == 4 else [0]
                        db = op.sum(g, axis=axes)
                        if len(s) < _shape(P[info])[0]:
                            db = op.take(db, relax.const(s.astype("int64")), axis=0, mode="clip")
                        grads[info] = bb.emit(db)
                elif kind == "conv":
                    name, pad = info
                    if i in saved:
                        grads[name] = bb.emit(op.nn.conv2d(saved[i], g, padding=pad, data_layout="CNHW",
                                                           kernel_layout="IOHW", out_layout="CNHW"))
                    if not last:
                        g = bb.emit(op.nn.conv2d_transpose(g, P[name], padding=pad))
                elif kind == "linear":
                    if i in saved:
                        grads[info] = bb.emit(op.matmul(op.permute_dims(saved[i]), g))
                    if not last:
                        g = bb.emit(op.matmul(g, op.permute_dims(P[info])))
                elif kind == "reshape":
                    g = bb.emit(op.reshape(g, _shape(inp)))
                elif kind in ("relu", "pool"):
                    entry = saved.get(i)
                    if entry is None:           # a pool whose mask the ReLU below it keeps for both
                        entry = saved[i - 1]
                        i -= 1
                    if entry[0] == "relu":
                        g = bb.emit(op.multiply(g, op.astype(entry[1], "float32")))
                    else:
                        _, m, k, (hh, ww) = entry
                        up = op.repeat(op.repeat(g, k[0], axis=2), k[1], axis=3)
                        g = bb.emit(op.multiply(up, op.astype(m, "float32")))
                        gh, gw = _shape(g)[2:]
                        if (gh, gw) != (hh, ww):
                            g = bb.emit(op.nn.pad(g, [0, 0, 0, 0, 0, hh - gh, 0, ww - gw]))
                i -= 1
            outs = [loss]
            for name in updated:
                if name.endswith("bias") or len(_shape(P[name])) == 1:
                    axis = 0
                else:
                    axis = 1 if len(_shape(P[name])) == 4 else 0
                if output == "grad":
                    outs.append(grads[name])
                    continue
                s = sel[name]
                w = P[name] if len(s) == _shape(P[name])[axis] else op.take(P[name], relax.const(s.astype("int64")), mode="clip",
                                                                           axis=axis)
                if isinstance(lr, dict):   # a step size per selected channel
                    rate = np.asarray(lr[name], np.float32).reshape(-1)
                    rate = np.broadcast_to(rate, (len(s),)) if rate.size == 1 else rate
                    shape = [1] * len(_shape(P[name]))
                    shape[axis] = len(s)
                    rate = relax.const(np.ascontiguousarray(rate.reshape(shape)))
                else:
                    rate = relax.const(np.float32(lr))
                outs.append(bb.emit(op.subtract(w, op.multiply(rate, grads[name]))))
            result = bb.emit_output(relax.Tuple(outs))
        bb.emit_func_output(result)
    step = bb.get()["adapt_step"].with_attr("global_symbol", "adapt_step")
    out_mod = tvm.IRModule(dict(mod.functions_items()), attrs=mod.attrs)
    out_mod["adapt_step"] = step
    return relax.transform.Normalize()(out_mod)


def updated_names(mask: dict, names) -> list[str]:
    """The parameters the step updates, in the order it returns their slices."""
    return [n for n in names if len(selected(mask, n))]
