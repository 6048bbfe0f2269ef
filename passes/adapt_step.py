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
  - a ReLU keeps its sign mask, one bit an element (not its float input), packed eight to a byte by a
    kernel that reads the ReLU's output (so conv + bias + ReLU still fuse) and unpacked by the kernel that
    applies it; a ReLU followed by a non-overlapping max pool keeps one bit for both (where the input was
    positive and the maximum). `mask_bits=8` keeps one bool byte an element instead (the earlier build, for
    comparison: the same arithmetic, so the same gradients to the bit);
  - the step returns the updated slices W[:, S] - lr * dW[:, S] (plain SGD), not whole tensors; `lr` is
    one number or {name: one step size per selected channel} (p-Meta's learned, channel-wise rates), both
    compiled in as constants, or "input": the step then takes one more argument per updated parameter, in
    `updated_names` order after the parameters, a float32 vector of one step size per selected channel
    (p-Meta's task-conditioned attention gives each task its own rates: one compiled step serves them all).
Mean softmax cross-entropy over the batch, like train.py's steps. Max-pool gradients go to every input
equal to the window's maximum (TVM's to the first): they differ only on exact ties of positive values.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax, te, tirx

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


# ---- one-bit masks --------------------------------------------------------------------------------
# A mask of shape S is kept as ceil(prod(S) / 8) bytes, bit b of byte i being element 8 i + b of S in C
# order. Packing and unpacking are TE kernels: relax has no bit-level tensor ops, and one kernel each way
# means the bool mask never exists at full size.

def _unravel(idx, shape):
    coords = []
    for d in reversed(shape):
        coords.append(tirx.floormod(idx, d))
        idx = tirx.floordiv(idx, d)
    return coords[::-1]


def _packed_len(shape) -> int:
    return (int(np.prod(shape)) + 7) // 8


def _pack(shape, cond):
    """A TE function (*tensors) -> uint8 (ceil(n / 8),): bit j set where cond(tensors, coords of element j)."""
    total = int(np.prod(shape))

    def f(*tensors):
        def byte(i):
            acc = None
            for b in range(8):
                idx = i * 8 + b
                # past the last element: a valid index to read, a zero bit
                coords = _unravel(tirx.min(idx, total - 1), shape)
                on = tirx.all(idx < total, cond(tensors, coords))
                term = tirx.if_then_else(on, tirx.const(1 << b, "uint8"), tirx.const(0, "uint8"))
                acc = term if acc is None else acc | term
            return acc
        return te.compute((_packed_len(shape),), byte, name="mask_bits")
    return f


def _bit(bits, coords, shape):
    """Element `coords` of a mask of `shape` packed by _pack, as float32 0 or 1."""
    idx = coords[0]
    for c, d in zip(coords[1:], shape[1:]):
        idx = idx * d + c
    return tirx.Cast("float32", (bits[tirx.floordiv(idx, 8)] >> tirx.Cast("uint8", tirx.floormod(idx, 8)))
                     & tirx.const(1, "uint8"))


def _pool_window_max(k):
    """Where the input (C order, cropped to whole windows) equals its window's maximum and, with `positive`,
    is above zero: the elements a ReLU + max pool (or a max pool) passes gradients to."""
    def cond(tensors, coords, positive):
        x, z = tensors
        n, c, r, s = coords
        v = x[n, c, r, s]
        eq = v == z[n, c, tirx.floordiv(r, k[0]), tirx.floordiv(s, k[1])]
        return tirx.all(eq, v > tirx.const(0.0, "float32")) if positive else eq
    return cond


def _pool_bits(bb, x, pooled, k, positive: bool, name: str) -> tuple:
    """What the backward pass keeps of a max pool of x (with `positive`: of a ReLU then the pool): one bit
    an element of the whole windows, where x is its window's maximum (and above zero)."""
    n, c, hh, ww = _shape(x)
    oh, ow = _shape(pooled)[2:]
    crop_hw = (oh * k[0], ow * k[1])
    cond = _pool_window_max(k)
    bits = bb.emit_te(_pack((n, c, *crop_hw), lambda t, co: cond(t, co, positive)), x, pooled,
                      primfunc_name_hint=name)
    return ("pool_bits", bits, k, (hh, ww), crop_hw)


def _unpack_pool(k, in_hw, crop_hw):
    """TE (g pooled, bits) -> the gradient at the pool's input: g up-sampled over each window times its bit,
    zero in the rows and columns the pool dropped; the same products as repeat * mask, then pad."""
    def f(g, bits):
        n_, c_ = (int(v) for v in g.shape[:2])
        shape = (n_, c_, *crop_hw)

        def val(n, c, r, s):
            inside = tirx.all(r < crop_hw[0], s < crop_hw[1])
            rr, ss = tirx.min(r, crop_hw[0] - 1), tirx.min(s, crop_hw[1] - 1)
            return tirx.if_then_else(inside, g[n, c, tirx.floordiv(rr, k[0]), tirx.floordiv(ss, k[1])]
                                     * _bit(bits, (n, c, rr, ss), shape), tirx.const(0.0, "float32"))
        return te.compute((n_, c_, *in_hw), val, name="unpack_pool")
    return f


def _unpack_mul(shape):
    """TE (g, bits) -> g times the mask (a ReLU's backward)."""
    def f(g, bits):
        return te.compute(shape, lambda *co: g[co] * _bit(bits, co, shape), name="unpack_relu")
    return f


def adapt_step(mod: tvm.IRModule, mask: dict, lr: float | dict = 0.01, output: str = "update",
               func: str = "backbone", mask_bits: int = 1) -> tvm.IRModule:
    """`mod` plus `adapt_step(x, y, *params) -> (loss, *slices)` updating only `mask`'s slices of `func`'s params;
    ReLU and max-pool masks kept with `mask_bits` (1 or 8) bits an element."""
    if output not in ("update", "grad"):
        raise ValueError(f"output must be 'update' or 'grad', not {output!r}")
    if isinstance(lr, str) and lr != "input":
        raise ValueError(f"lr must be a number, a dict of per-channel rates or 'input', not {lr!r}")
    if mask_bits not in (1, 8):
        raise ValueError(f"mask_bits must be 1 (packed) or 8 (one bool byte), not {mask_bits!r}")
    packed = mask_bits == 1
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
    # lr="input": the per-channel step sizes are arguments (one vector per updated parameter), not constants
    rate_in = {n: relax.Var(f"rate.{n}", relax.TensorType((len(sel[n]),), "float32"))
               for n in updated} if lr == "input" and output == "update" else {}
    op = relax.op
    bb = relax.BlockBuilder()
    with bb.function("adapt_step", [nx, ny, *nparams, *rate_in.values()]):
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
                        if needs_back and packed:
                            # y > 0 iff h > 0: reading y, not h, leaves h free to fuse into the conv
                            saved[i] = _pool_bits(bb, y, z, k, positive=True, name="pack_relu_pool_mask")
                        elif needs_back:
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
                    if needs_back and packed:
                        shape = _shape(y)
                        bits = bb.emit_te(_pack(shape, lambda t, co: t[0][tuple(co)] > tirx.const(0.0, "float32")),
                                          y, primfunc_name_hint="pack_relu_mask")
                        saved[i] = ("relu_bits", bits, shape)
                    elif needs_back:
                        saved[i] = ("relu", bb.emit(op.greater(h, relax.const(0.0))))
                elif kind == "pool":
                    k = info
                    y = bb.emit(op.nn.max_pool2d(h, k, k))
                    if needs_back and packed:
                        saved[i] = _pool_bits(bb, h, y, k, positive=False, name="pack_pool_mask")
                    elif needs_back:
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
                    if entry[0] == "relu_bits":
                        g = bb.emit_te(_unpack_mul(entry[2]), g, entry[1], primfunc_name_hint="unpack_relu_mask")
                    elif entry[0] == "pool_bits":
                        _, bits, k, in_hw, crop_hw = entry
                        g = bb.emit_te(_unpack_pool(k, in_hw, crop_hw), g, bits, primfunc_name_hint="unpack_pool_mask")
                    elif entry[0] == "relu":
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
                if rate_in:                # per-channel step sizes given at run time
                    shape = [1] * len(_shape(P[name]))
                    shape[axis] = len(s)
                    rate = op.reshape(rate_in[name], shape)
                elif isinstance(lr, dict):   # a step size per selected channel
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
    built = bb.get()
    out_mod = tvm.IRModule(dict(mod.functions_items()), attrs=mod.attrs)
    for gv, fn in built.functions_items():    # the step and its mask-packing kernels
        out_mod[gv] = fn.with_attr("global_symbol", "adapt_step") if gv.name_hint == "adapt_step" else fn
    return relax.transform.Normalize()(out_mod)


def updated_names(mask: dict, names) -> list[str]:
    """The parameters the step updates, in the order it returns their slices."""
    return [n for n in names if len(selected(mask, n))]
