"""Convolutions as im2col + matmul, so that training steps run on matmul kernels.

The default CPU schedule (schedule.py) runs matmuls at 20-35 GMAC/s on this host but the conv2d kernels
of a training step at 0.7-3 GMAC/s: relax.transform.Gradient expresses a conv's weight gradient as a
conv2d in CNHW/IOHW layouts whose output is the tiny kernel (its innermost axis has 3-5 elements to
vectorise) and its input gradient as a conv2d_transpose that pads and dilates first. Measured on a small
VGG step (batch 64, 28x28, one thread): 2.56 s per step with TVM's conv kernels, most of it in those two;
0.45 s with this pass. (LeNet5's 20- and 50-channel layers gain little: 0.24 -> 0.22 s; matmuls whose
innermost axis is not a multiple of the vector width run at 3-6 GMAC/s under the default schedule.)

This pass rewrites, in every Relax function of a module (after Gradient), each stride-1, dilation-1,
ungrouped float32 convolution of the three forms a training step contains:
  forward        conv2d NCHW/OIHW             y^T  = cols(x)^T (N*OH*OW, C*KH*KW) @ W^T (C*KH*KW, O)
  weight grad    conv2d CNHW/IOHW -> CNHW      dW^T = sum over n of cols(x)[n] (C*KH*KW, GH*GW) @ g[n]^T (GH*GW, O)
  input grad     conv2d_transpose NCHW/IOHW   dx   = the forward form on g with the kernel flipped
where cols is a gather of the zero-padded input (its own kernel). Any other convolution is left as it is.
The forward pass and the input gradient accumulate in the order TVM's conv kernels do (equal results);
the weight gradient sums per sample first (equal to float32 rounding, ~1e-6 relative).
"""

from __future__ import annotations

import tvm
from tvm import relax, te, tirx

from edgetvm.passes.schedule import DEPTHWISE

MAX_GROUPS = 8
OPAQUE = 8  # relax's OpPatternKind.kOpaque: FuseOps fuses nothing with the function
_CONV = tvm.ir.Op.get("relax.nn.conv2d")
_CONV_T = tvm.ir.Op.get("relax.nn.conv2d_transpose")
_MAX_POOL = tvm.ir.Op.get("relax.nn.max_pool2d")
_AVG_POOL = tvm.ir.Op.get("relax.nn.avg_pool2d")


def _shape(expr) -> tuple[int, ...] | None:
    try:
        return tuple(int(s) for s in expr.ty.shape)
    except (AttributeError, TypeError, ValueError):  # symbolic or unknown shape
        return None


def _plain(attrs, data: str, kernel: str, out: str, strided: bool = False, grouped: bool = False) -> bool:
    """Stride 1 (any, if `strided`), dilation 1, one group (any, if `grouped`), the given layouts: the forms
    this pass knows."""
    return ((strided or tuple(int(s) for s in attrs.strides) == (1, 1)) and tuple(int(d) for d in attrs.dilation) == (1, 1)
            and (grouped or int(attrs.groups) == 1) and attrs.data_layout == data and attrs.kernel_layout == kernel
            and attrs.out_layout == out and str(attrs.out_dtype) in ("", "void", "None", "float32"))


def _cols(x, kh: int, kw: int, pads, oh: int, ow: int, transposed: bool, strides=(1, 1), channels_last=False,
          groups=1):
    """The patches of the zero-padded x: (N, C, KH, KW, OH, OW), or transposed (N, OH, OW, C, KH, KW); of an
    NHWC x (`channels_last`), (N, OH, OW, KH, KW, C): each patch row a run of whole pixels; with `groups`
    (transposed), (G, N, OH, OW, C / G, KH, KW): each group's patches over its own channels.
    Six axes rather than the two of the matrix: flat indices would need a division and a remainder per
    element, which made this gather slower than the matmul it feeds."""
    if channels_last:
        n, h, w, c = (int(s) for s in x.shape)
    else:
        n, c, h, w = (int(s) for s in x.shape)
    top, left = pads[0], pads[1]
    zero = tirx.const(0, x.dtype)

    def pixel(b, ch, i, j, y, xx):
        y, xx = y * strides[0] + i - top, xx * strides[1] + j - left
        inside = tirx.all(y >= 0, y < h, xx >= 0, xx < w)
        return tirx.if_then_else(inside, x[b, y, xx, ch] if channels_last else x[b, ch, y, xx], zero)

    if channels_last:
        return te.compute((n, oh, ow, kh, kw, c), lambda b, y, xx, i, j, ch: pixel(b, ch, i, j, y, xx),
                          name="im2col_nhwc")
    if groups > 1:
        cg = c // groups
        return te.compute((groups, n, oh, ow, cg, kh, kw),
                          lambda g, b, y, xx, ch, i, j: pixel(b, g * cg + ch, i, j, y, xx), name="im2col_g")
    if transposed:
        return te.compute((n, oh, ow, c, kh, kw), lambda b, y, xx, ch, i, j: pixel(b, ch, i, j, y, xx),
                          name="im2col_t")
    return te.compute((n, c, kh, kw, oh, ow), pixel, name="im2col")


def _conv_channels_last(x, wt, pads, oh: int, ow: int):
    """y (N, OH, OW, O) = conv of x (N, C, H, W) with wt (C, KH, KW, O): the output channels innermost,
    where the default schedule vectorises them and tiles pixels x channels in registers."""
    n, c, h, w = (int(s) for s in x.shape)
    _, kh, kw, o = (int(s) for s in wt.shape)
    top, left = pads[0], pads[1]
    hp, wp = oh + kh - 1, ow + kw - 1
    zero = tirx.const(0, x.dtype)
    xp = te.compute((n, c, hp, wp), lambda b, ch, y, xx: tirx.if_then_else(
        tirx.all(y >= top, y < h + top, xx >= left, xx < w + left), x[b, ch, y - top, xx - left], zero), name="pad")
    rc, ry, rx = te.reduce_axis((0, c), "rc"), te.reduce_axis((0, kh), "ry"), te.reduce_axis((0, kw), "rx")
    return te.compute((n, oh, ow, o), lambda b, y, xx, f: te.sum(xp[b, rc, y + ry, xx + rx] * wt[rc, ry, rx, f],
                                                                 axis=[rc, ry, rx]), name="conv_nhwo")


def _depthwise_wide(x, w, pads, oh: int, ow: int, wide: int):
    """A depthwise conv (stride 1) computed over output rows `wide` long (a multiple of the vector), the
    columns past `ow` cut off: every vector whole, none masked."""
    n, c, h, wd = (int(s) for s in x.shape)
    _, _, kh, kw = (int(s) for s in w.shape)
    top, left = pads[0], pads[1]
    zero = tirx.const(0, x.dtype)
    xp = te.compute((n, c, oh + kh - 1, wide + kw - 1), lambda b, ch, y, xx: tirx.if_then_else(
        tirx.all(y >= top, y < h + top, xx >= left, xx < wd + left), x[b, ch, y - top, xx - left], zero), name="pad")
    ry, rx = te.reduce_axis((0, kh), "ry"), te.reduce_axis((0, kw), "rx")
    acc = te.compute((n, c, oh, wide), lambda b, ch, y, xx: te.sum(xp[b, ch, y + ry, xx + rx] * w[ch, 0, ry, rx],
                                                                   axis=[ry, rx]), name="depthwise_wide",
                     attrs={DEPTHWISE: 1})
    return te.compute((n, c, oh, ow), lambda b, ch, y, xx: acc[b, ch, y, xx], name="depthwise")


def _pool_wide(x, kind: str, size, strides, pads, oh: int, ow: int, wide: int, count_pad: bool, vector: int):
    """A max or average pool (NCHW) computed over output rows `wide` long (a multiple of the vector), the
    columns past `ow` cut off, as _depthwise_wide computes a depthwise conv: every vector whole, rows in
    registers, the padding inside each core's task."""
    n, c, h, wd = (int(v) for v in x.shape)
    (kh, kw), (sh, sw), (top, left) = size, strides, pads[:2]
    fill = tirx.min_value(x.dtype) if kind == "max" else tirx.const(0, x.dtype)
    # The padded input stored as `sw` phases (column j * sw + p at [p, j]), each a whole number of vectors
    # long: a strided window then loads whole vectors from one phase, not a gather, and the padding copy
    # (moved into each core's task by the schedule) is vectorised along j.
    cols = -(-((wide - 1) * sw + kw) // (sw * vector)) * vector
    xp = te.compute((n, c, (oh - 1) * sh + kh, sw, cols), lambda b, ch, y, p, j: tirx.if_then_else(
        tirx.all(y >= top, y < h + top, j * sw + p >= left, j * sw + p < wd + left),
        x[b, ch, y - top, j * sw + p - left], fill), name="pad")
    ry, rx = te.reduce_axis((0, kh), "ry"), te.reduce_axis((0, kw), "rx")
    reduce = te.max if kind == "max" else te.sum
    acc = te.compute((n, c, oh, wide), lambda b, ch, y, xx: reduce(
        xp[b, ch, y * sh + ry, rx % sw, xx + rx // sw], axis=[ry, rx]), name="pool_wide", attrs={DEPTHWISE: 1})
    if kind == "max":
        return te.compute((n, c, oh, ow), lambda b, ch, y, xx: acc[b, ch, y, xx], name="pool")

    def taps(i, k, stride, pad, extent, out):
        """The window's taps that count along one axis: all of them unless padding is left out of the mean."""
        if count_pad or (pad == 0 and (out - 1) * stride + k <= extent):
            return tirx.const(k, "int32")
        lo = i.astype("int32") * stride - pad
        return tirx.min(lo + k, extent) - tirx.max(lo, 0)

    return te.compute((n, c, oh, ow), lambda b, ch, y, xx: acc[b, ch, y, xx] / (
        taps(y, kh, sh, top, h, oh) * taps(xx, kw, sw, left, wd, ow)).astype(x.dtype), name="pool")


def _flip_swap(w):
    """(O, C, KH, KW) -> (C, O, KH, KW) rotated by 180 degrees: the kernel of the input gradient."""
    o, c, kh, kw = (int(s) for s in w.shape)
    return te.compute((c, o, kh, kw), lambda i, j, y, x: w[j, i, kh - 1 - y, kw - 1 - x], name="flip_kernel")


def _direct_rows(attrs, sa, sb, so, native: int) -> bool:
    """A stride-1 conv into rows of whole 4-pixel tiles that are not whole vectors of the target (x86: 8 or 16
    floats), with channel counts where computing it channels-innermost (conv_nhwo) measured faster than the
    NCHW schedule (rows an odd multiple of 8 on AVX-512: half-width vectors) or an im2col matmul (rows 4
    past a multiple of 8)."""
    # Single 3x3/5x5 convs, untuned, 2 threads, idle Xeon, median of alternating rounds, channels-innermost
    # against the path before: rows of 56/24/40 on AVX-512 (the NCHW conv on 8-float vectors) 64->64 2.2x,
    # 128->32 1.35x, 128->128 1.29x, 96->96 at 24 1.33x, 64->192 1.14x, 512->64 1.07x, 32->32 1.07x; rows of
    # 28/20/36 (im2col + matmul) 1.19-1.57x on AVX-512 and 1.03-1.47x on AVX2 (haswell builds). Slower: 16 or
    # 3 input channels (0.87x, 0.49x), 256 output channels (0.63-0.87x), 1x1 convs (0.43-1.02x: the
    # (pixels, channels) output transposed back to NCHW costs as much as the product). NEON's 4-float
    # vectors are whole in any such row.
    return (native >= 8 and so[3] % 4 == 0 and so[3] % native != 0
            and tuple(int(v) for v in attrs.strides) == (1, 1) and sb[2] * sb[3] > 1
            and sa[1] >= 32 and 32 <= so[1] <= 192 and int(attrs.groups) == 1)


@relax.expr_functor.mutator
class _ConvToMatmul(relax.PyExprMutator):
    def __init__(self, mod, vector=None, direct=0, native=0):
        super().__init__(mod)
        self.direct = direct  # forward convolutions with rows narrower than this as a channels-last direct conv
        self.native = native  # the target's fp32 lanes per vector register (0: unknown)
        self.rewritten = 0
        self.vector = vector  # if set: only forward convolutions whose output rows are not a multiple of it

    def forward(self, x, w, pads, strides=(1, 1), direct=False):
        n, c, h, wd = _shape(x)
        o, _, kh, kw = _shape(w)
        oh = (h + pads[0] + pads[2] - kh) // strides[0] + 1
        ow = (wd + pads[1] + pads[3] - kw) // strides[1] + 1
        # Rows of whole 4-pixel register tiles but narrower than a vector (VGG's 4x4 blocks): directly, with no
        # im2col gather that costs as much as the product. Wider rows that do not fit the tile, and strided
        # convs, as matmuls.
        if (direct or ow < self.direct) and ow % 4 == 0 and tuple(strides) == (1, 1):
            w_t = self.builder_.emit(relax.op.permute_dims(w, [1, 2, 3, 0]))
            y_t = self.builder_.emit_te(_conv_channels_last, x, w_t, pads, oh, ow, primfunc_name_hint="conv_nhwo")
            return relax.op.permute_dims(y_t, [0, 3, 1, 2])
        # Opaque to FuseOps: fused with the reshape below (and the producer's injective ops) the gather ran
        # over the flat (pixels, C*KH*KW) matrix, every element paying a dozen divisions and remainders to
        # find its pixel: 1.7 ms for DenseNet's 28 x 28 x 128 layer, 0.16 ms as its own 6-D kernel, whose
        # reshape is then a view. DenseNet-121 ran 1.8x faster, Inception-v1 1.5x.
        cols_t = self.builder_.emit_te(_cols, x, kh, kw, pads, oh, ow, True, tuple(strides), primfunc_name_hint="im2col_t",
                                       primfunc_attrs={"op_pattern": OPAQUE})
        cols_t = self.builder_.emit(relax.op.reshape(cols_t, (n * oh * ow, c * kh * kw)))
        w_t = self.builder_.emit(relax.op.permute_dims(relax.op.reshape(w, (o, c * kh * kw))))
        # (N*OH*OW, K) @ (K, O): one long matmul with the channels innermost runs at 15-25 GMAC/s here,
        # (O, K) @ (N, K, OH*OW) at 5-11
        y_t = self.builder_.emit(relax.op.matmul(cols_t, w_t))
        y = relax.op.permute_dims(relax.op.reshape(y_t, (n, oh * ow, o)), [0, 2, 1])
        return relax.op.reshape(y, (n, o, oh, ow))

    def grouped(self, x, w, pads, strides, g):
        """A conv of g groups as one gather of every group's patches, (G, N*OH*OW, K), one batched matmul with
        the groups' weights (G, K, O / G) (packed at compile time by pack_matmul.py), and the product put back
        in NCHW: three kernels whatever G, where a conv and a slice per group took 2G + 1."""
        n, c, h, wd = _shape(x)
        o, cg, kh, kw = _shape(w)
        oh = (h + pads[0] + pads[2] - kh) // strides[0] + 1
        ow = (wd + pads[1] + pads[3] - kw) // strides[1] + 1
        cols = self.builder_.emit_te(_cols, x, kh, kw, pads, oh, ow, True, tuple(strides), False, g,
                                     primfunc_name_hint="im2col_g", primfunc_attrs={"op_pattern": OPAQUE})
        cols = self.builder_.emit(relax.op.reshape(cols, (g, n * oh * ow, cg * kh * kw)))
        w_t = self.builder_.emit(relax.op.permute_dims(relax.op.reshape(w, (g, o // g, cg * kh * kw)), [0, 2, 1]))
        y = self.builder_.emit(relax.op.matmul(cols, w_t))                      # (G, N*OH*OW, O / G)
        y = relax.op.permute_dims(relax.op.reshape(y, (g, n, oh * ow, o // g)), [1, 0, 3, 2])
        return relax.op.reshape(y, (n, o, oh, ow))

    def weight_grad(self, x, g, pads, out_shape):
        n, c, h, w = _shape(x)
        _, o, gh, gw = _shape(g)
        kh, kw = out_shape[2], out_shape[3]
        cols = self.builder_.emit_te(_cols, x, kh, kw, pads, gh, gw, False, primfunc_name_hint="im2col")
        cols = self.builder_.emit(relax.op.reshape(cols, (n, c * kh * kw, gh * gw)))
        g_p = self.builder_.emit(relax.op.permute_dims(relax.op.reshape(g, (n, o, gh * gw)), [0, 2, 1]))
        # one (K, P) @ (P, O) product per sample, then a sum over the batch: 26-30 GMAC/s here, where
        # the single product with the batch folded into a 50,000-long reduction ran at 2-4
        per_sample = self.builder_.emit(relax.op.matmul(cols, g_p))
        dw_t = self.builder_.emit(relax.op.sum(per_sample, axis=[0]))
        return relax.op.reshape(relax.op.permute_dims(dw_t), (o, c, kh, kw))

    def pool(self, call):
        """A max or average pool into rows that are not a multiple of the vector, as _pool_wide; else None."""
        a = call.args[0]
        sa, so = _shape(a), _shape(call)
        attrs = call.attrs
        if self.vector is None or sa is None or so is None or len(sa) != 4 or str(a.ty.dtype) != "float32" \
                or attrs.layout != "NCHW" or attrs.out_layout != "NCHW" or bool(attrs.ceil_mode) \
                or tuple(int(d) for d in attrs.dilation) != (1, 1):
            return None
        vector = max(self.vector, self.native)  # the target's register: 16 floats on AVX-512
        size, strides = [int(v) for v in attrs.pool_size], [int(v) for v in attrs.strides]
        # An unpadded pool gains no padding pass to fold into the task. Where its windows tile the input
        # (each element read once, in place) the copy only adds traffic: DenseNet's 2 x 2 average pools into
        # rows of 14 ran 0.43x, of 7 0.96-0.99x (only rows of 28 gained, 2.0x). Into rows under half a vector
        # most of each wide row is waste: 0.23-0.92x (rows of 1 to 6), where padded ones still gained (rows
        # of 5 1.27x, of 7 4.2x).
        unpadded = not any(int(p) for p in attrs.padding)
        if so[3] % vector == 0 or (unpadded and (size == strides or 2 * so[3] < vector)):
            return None
        wide = -(-so[3] // vector) * vector
        return self.builder_.emit_te(
            _pool_wide, a, "max" if call.op.same_as(_MAX_POOL) else "avg", size, strides,
            [int(v) for v in attrs.padding], so[2], so[3], wide,
            bool(attrs.count_include_pad), vector, primfunc_name_hint="pool", primfunc_attrs={"op_pattern": 4})

    def visit_call_(self, call):
        call = super().visit_call_(call)
        if call.op in (_MAX_POOL, _AVG_POOL):
            out = self.pool(call)
            return call if out is None else out
        if call.op not in (_CONV, _CONV_T) or len(call.args) != 2:
            return call
        a, b = call.args
        sa, sb, so = _shape(a), _shape(b), _shape(call)
        if sa is None or sb is None or so is None or len(sa) != 4 or len(sb) != 4 \
                or any(str(e.ty.dtype) != "float32" for e in (a, b)):
            return call
        pads = tuple(int(p) for p in call.attrs.padding)
        strided = call.op.same_as(_CONV) and tuple(int(v) for v in call.attrs.strides) != (1, 1)
        # A strided conv only into rows narrower than 2 vectors: into wide ones (SqueezeNet's stem, rows of
        # 111) the matmul's (pixels, channels) output took 1.5x the conv's time to transpose back to NCHW.
        if strided and self.vector is not None and so[3] >= 2 * self.vector:
            return call
        inner = self.vector is not None and call.op.same_as(_CONV) and \
            _direct_rows(call.attrs, sa, sb, so, self.native)
        if self.vector is not None and not (call.op.same_as(_CONV) and (so[3] % self.vector or inner or
                                                                        (so[3] < self.direct and not strided))):
            return call
        # The narrow rewrite takes strided convs too: rows of 7 (Inception-v2's last stride-2 conv) left
        # the NCHW schedule scalar, 1.9 GMAC/s. (Training graphs keep theirs: Gradient writes them otherwise.)
        if call.op.same_as(_CONV) and _plain(call.attrs, "NCHW", "OIHW", "NCHW", strided=self.vector is not None):
            out = self.forward(a, b, pads, [int(v) for v in call.attrs.strides], direct=inner)
        elif call.op.same_as(_CONV) and self.vector is not None and 1 < int(call.attrs.groups) <= MAX_GROUPS \
                and sa[1] // int(call.attrs.groups) >= 8 \
                and _plain(call.attrs, "NCHW", "OIHW", "NCHW", strided=True, grouped=True):
            # A few groups (ShuffleNet's 1x1 convs in 4) as a matmul batched over the groups: the NCHW
            # schedule left their rows of 7, 14 or 28 scalar. ShuffleNet ran 2.2x faster with a conv per
            # group, then 1.36x faster again batched (5.95 -> 4.38 ms: a quarter of the fork-joins).
            # (Not depthwise convs: that would be one matmul per channel.)
            out = self.grouped(a, b, pads, [int(v) for v in call.attrs.strides], int(call.attrs.groups))
        elif call.op.same_as(_CONV) and self.vector is not None and int(call.attrs.groups) == sa[1] == sb[0] \
                and sb[1] == 1 and _plain(call.attrs, "NCHW", "OIHW", "NCHW", grouped=True):
            # Depthwise into rows that are not a multiple of 8 (ShuffleNet's 28, 14 and 7): TVM's schedule
            # masked each row's last vector and chained its taps through one accumulator. Rows computed
            # whole vectors wide and cut off, several rows as accumulators at once, the padding inside
            # each core's task: 1.3x (rows of 28) to 4.4x (7) faster, ShuffleNet 1.08x, the OCR detector 1.06x.
            wide = -(-so[3] // self.vector) * self.vector
            out = self.builder_.emit_te(_depthwise_wide, a, b, pads, so[2], so[3], wide,
                                        primfunc_name_hint="depthwise", primfunc_attrs={"op_pattern": 4})
        elif call.op.same_as(_CONV) and _plain(call.attrs, "CNHW", "IOHW", "CNHW"):
            # data a = x (N, C, H, W) read as CNHW, kernel b = dy (N, O, GH, GW) read as IOHW,
            # output (O, C, KH, KW) read as CNHW: exactly a weight gradient.
            out = self.weight_grad(a, b, pads, so)
        elif call.op.same_as(_CONV_T) and _plain(call.attrs, "NCHW", "IOHW", "NCHW") \
                and all(int(p) == 0 for p in call.attrs.output_padding):
            kh, kw = sb[2], sb[3]
            full = (kh - 1 - pads[0], kw - 1 - pads[1], kh - 1 - pads[2], kw - 1 - pads[3])
            if min(full) < 0:
                return call
            out = self.forward(a, self.builder_.emit_te(_flip_swap, b, primfunc_name_hint="flip_kernel"), full)
        else:
            return call
        self.rewritten += 1
        return out


def _rewrite(mutator: relax.PyExprMutator, mod: tvm.IRModule) -> tvm.IRModule:
    """`mod` with every Relax function through `mutator` (made on `mod`: it edits that module in place)."""
    for gv, func in mod.functions_items():
        if isinstance(func, relax.Function):
            mutator.builder_.update_func(gv, mutator.visit_expr(func))
    return relax.transform.Normalize()(mutator.builder_.get())


def conv_as_matmul(mod: tvm.IRModule) -> tvm.IRModule:
    """`mod` with its plain convolutions (and their gradients) rewritten as im2col + matmul."""
    copy = tvm.IRModule(dict(mod.functions_items()), attrs=mod.attrs)  # the mutator edits its module in place
    return _rewrite(_ConvToMatmul(copy), copy)


def narrow_conv_as_matmul(direct_below: int = 8, native: int = 0) -> tvm.transform.Pass:
    """Rewrite forward convolutions whose output rows are not a multiple of 8 (or are narrower than
    `direct_below`) with the output channels innermost."""
    # The default schedule vectorises a conv along its output rows, 8 lanes at a time: rows of 4 (VGG's
    # last blocks) left it scalar at 0.4 GMAC/s, rows of 30 or 15 (the PP-OCRv4 detector) predicated.
    # As a matmul the output channels are the vector axis: VGG 3.9x, the detector 1.8x faster. VGG's
    # 4x4 blocks then spent as long in the im2col gather as in the matmul: as a direct channels-last
    # conv (4 x 4 pixels x 16 channels of accumulators) VGG ran 0.88x the time; the detector's rows of
    # 30 and 15, which do not fit that tile, ran 1.15x slower that way and stay matmuls. Rows of 8 fill
    # only half an AVX-512 register: direct below 16 there, VGG's 8x8 blocks ran 1.2x faster and the CNN
    # 1.2x; with AVX2's 8 lanes they ran 1.05x slower that way, so below 8 elsewhere (pipeline.py).

    @tvm.transform.module_pass(opt_level=0, name="NarrowConvAsMatmul")
    def rewrite(mod: tvm.IRModule, _ctx=None) -> tvm.IRModule:
        copy = tvm.IRModule(dict(mod.functions_items()), attrs=mod.attrs)
        return _rewrite(_ConvToMatmul(copy, vector=8, direct=direct_below, native=native), copy)

    return rewrite


_DROPOUT = tvm.ir.Op.get("relax.nn.dropout")


@relax.expr_functor.mutator
class _NoDropout(relax.PyExprMutator):
    def visit_tuple_getitem_(self, op):
        op = super().visit_tuple_getitem_(op)
        if isinstance(op.tuple_value, relax.Var) and op.index == 0:
            bound = self.lookup_binding(op.tuple_value)
            if isinstance(bound, relax.Call) and bound.op.same_as(_DROPOUT):
                return bound.args[0]
        return op


@relax.expr_functor.mutator
class _ChannelsLastToMatmul(relax.PyExprMutator):
    def forward(self, x, w, pads, strides):
        n, h, wd, c = _shape(x)
        o, kh, kw, _ = _shape(w)
        oh = (h + pads[0] + pads[2] - kh) // strides[0] + 1
        ow = (wd + pads[1] + pads[3] - kw) // strides[1] + 1
        if (kh, kw) == (1, 1) and tuple(strides) == (1, 1) and not any(pads):
            cols = self.builder_.emit(relax.op.reshape(x, (n * oh * ow, c)))  # a view: no gather at all
        else:
            cols = self.builder_.emit_te(_cols, x, kh, kw, pads, oh, ow, True, tuple(strides), True,
                                         primfunc_name_hint="im2col_nhwc", primfunc_attrs={"op_pattern": OPAQUE})
            cols = self.builder_.emit(relax.op.reshape(cols, (n * oh * ow, kh * kw * c)))
        w_t = self.builder_.emit(relax.op.permute_dims(relax.op.reshape(w, (o, kh * kw * c))))
        return relax.op.reshape(self.builder_.emit(relax.op.matmul(cols, w_t)), (n, oh, ow, o))

    def visit_call_(self, call):
        call = super().visit_call_(call)
        if not call.op.same_as(_CONV) or len(call.args) != 2:
            return call
        a, b = call.args
        sa, sb = _shape(a), _shape(b)
        if sa is None or sb is None or len(sa) != 4 or any(str(e.ty.dtype) != "float32" for e in (a, b)) \
                or not _plain(call.attrs, "NHWC", "OHWI", "NHWC", strided=True):
            return call
        # Grouped convs stay direct NHWC convolutions: the rule that picks channels-last leaves them at most
        # a tenth of the work.
        return self.forward(a, b, tuple(int(p) for p in call.attrs.padding), [int(v) for v in call.attrs.strides])


def _odd_row_share(func: relax.Function) -> float:
    """The share of `func`'s convolution multiply-adds in ungrouped convs with rows not a multiple of 8: the
    ones the NCHW path computes as matmuls (narrow_conv_as_matmul), each followed by a transpose."""
    macs = {True: 0, False: 0}

    def visit(e):
        if isinstance(e, relax.Call) and e.op.same_as(_CONV) and len(e.args) == 2:
            so, sb = _shape(e), _shape(e.args[1])
            if so is not None and sb is not None and len(so) == 4 and len(sb) == 4:
                odd = int(e.attrs.groups) == 1 and so[3] % 8 != 0
                macs[odd] += so[0] * so[1] * so[2] * so[3] * sb[1] * sb[2] * sb[3]

    relax.analysis.post_order_visit(func.body, visit)
    return macs[True] / max(1, macs[True] + macs[False])


def channels_last(min_share: float = 0.9) -> tvm.transform.Pass:
    """Rewrite a CNN's activations channels-last (NHWC) and its convolutions as im2col + matmul in that layout,
    where at least `min_share` of its conv work is in convs the NCHW path makes matmuls anyway."""
    # In NCHW a conv as a matmul makes (pixels, channels) and pays a transpose back to NCHW per conv, and
    # a 1x1 conv an im2col copy of its input; channels-last, the matmul's output is the next layer's
    # input as it is and a 1x1 conv's input is its matrix (a reshape, no copy). Relax's ConvertLayout
    # moves the other layout-aware operators (pooling, concat, broadcasts, reductions) along and puts a
    # transpose where a layout cannot follow; a model it cannot convert (one with a stack) keeps NCHW.
    # Where a model's convs mostly have rows of whole vectors, the NCHW path runs them as direct
    # convolutions, faster than as matmuls behind an im2col gather. Every conv channels-last against the
    # NCHW path (untuned, 2 threads, idle Intel Xeon, median of alternating rounds; the share of conv work
    # in odd-row convs in brackets): SqueezeNet (100%) 1.52x faster, Inception v1 (92%) 1.19x, DenseNet-121
    # (55%) 1.13-1.15x, Inception v2 (76%) 0.97-0.98x, VGG (12%) 0.99x; MobileNetV3, the OCR detector and
    # recogniser, the ResNet, the inception-style model and the CNN (0-27%, some depthwise) 0.67x, 0.71x,
    # 0.97x, 0.61x, 0.87x and 0.85x. No share separates DenseNet from Inception v2: 90% keeps every model
    # at least as fast.

    @tvm.transform.module_pass(opt_level=0, name="ChannelsLast")
    def rewrite(mod: tvm.IRModule, _ctx=None) -> tvm.IRModule:
        if "main" not in [gv.name_hint for gv in mod.get_global_vars()] or _odd_row_share(mod["main"]) < min_share:
            return mod
        copy = tvm.IRModule(dict(mod.functions_items()), attrs=mod.attrs)
        for gv, func in mod.functions_items():
            if isinstance(func, relax.Function):
                copy[gv] = _NoDropout(copy).visit_expr(func)   # its tuple stops ConvertLayout
        # and so does the alias left where it was (a layout-unaware binding: a transpose there and back)
        copy = relax.transform.DeadCodeElimination()(relax.transform.CanonicalizeBindings()(copy))
        try:
            # TVM legalizes a transposed conv only in NCHW: it keeps that layout, between two transposes
            nhwc = relax.transform.ConvertLayout({"relax.nn.conv2d": ["NHWC", "OHWI"],
                                                  "relax.nn.conv2d_transpose": ["NCHW", "IOHW"]})(copy)
        except Exception:  # noqa: BLE001 - an operator without a layout rule (stack: IndexError; others InternalError)
            return mod
        nhwc = relax.transform.Normalize()(relax.transform.DeadCodeElimination()(nhwc))
        return _rewrite(_ChannelsLastToMatmul(nhwc), nhwc)

    return rewrite
