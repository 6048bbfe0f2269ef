"""The models the demo, tests and benchmarks use.

Three are real pretrained networks shipped inside the `rapidocr-onnxruntime` wheel (found in
the installed package, never copied); the rest are generated here with `onnx.helper` from seeded
weights, so every build of a given name and arguments is byte-for-byte the same.

    load("cnn")                          -> onnx.ModelProto
    path("dense_stack", cache, n=4)      -> Path of a cached .onnx file
    default_input_shapes("ocr_cls")      -> {"x": (1, 3, 48, 192)}
"""

from __future__ import annotations

import importlib.util
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edgetvm.errors import UserError

OPSET = 17
IR_VERSION = 8  # the lowest IR version opset 17 allows, so older runtimes read the files too


@dataclass(frozen=True)
class ModelInfo:
    name: str
    description: str
    input_shapes: Callable[..., dict[str, tuple[int, ...]]]  # same keywords as build
    build: Callable[..., onnx.ModelProto] | None = None  # generated: keyword arguments only
    filename: str | None = None  # pretrained: the file in rapidocr_onnxruntime/models/

    @property
    def pretrained(self) -> bool:
        return self.filename is not None


# ---------------------------------------------------------------------------- real models

_RAPIDOCR_HINT = "pip install --no-deps rapidocr-onnxruntime"


def _rapidocr_file(filename: str) -> Path:
    # find_spec does not run the package's __init__, which imports cv2 (not needed here).
    spec = importlib.util.find_spec("rapidocr_onnxruntime")
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"model file {filename} comes with the rapidocr-onnxruntime package, "
                        f"which is not installed: {_RAPIDOCR_HINT}")
    p = Path(next(iter(spec.submodule_search_locations))) / "models" / filename
    if not p.is_file():
        raise UserError(f"{p} is missing from the installed rapidocr-onnxruntime package; "
                        f"reinstall it: {_RAPIDOCR_HINT}")
    return p


# ----------------------------------------------------------------------- graph building


class _Graph:
    """A tiny onnx.helper wrapper: seeded weights as initializers, one output per node."""

    def __init__(self, name: str, seed: int):
        self.name = name
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[tuple[str, np.ndarray]] = []
        self._n = 0

    def _fresh(self, stem: str) -> str:
        self._n += 1
        return f"{stem}_{self._n}"

    def init(self, stem: str, array: np.ndarray) -> str:
        name = self._fresh(stem)
        self.inits.append((name, array))
        return name

    def weight(self, stem: str, shape: tuple[int, ...], fan_in: int, gain: float = 2.0) -> str:
        # Kaiming uniform: variance gain / fan_in keeps activations O(1) through ReLUs
        # (gain 2 before a ReLU, 1 before none). Uniform draws are twice as fast as normal.
        bound = math.sqrt(3.0 * gain / fan_in)
        w = self.rng.random(shape, dtype=np.float32)
        w *= np.float32(2 * bound)
        w -= np.float32(bound)
        return self.init(stem, w)

    def bias(self, stem: str, n: int) -> str:
        return self.init(stem, self.rng.uniform(-0.05, 0.05, n).astype(np.float32))

    def const(self, value, dtype=np.int64) -> str:
        """A Constant node: shapes and scalars stay graph constants, not parameters."""
        name = self._fresh("const")
        t = numpy_helper.from_array(np.asarray(value, dtype=dtype), name)
        self.nodes.append(helper.make_node("Constant", [], [name], name=name, value=t))
        return name

    def op(self, op_type: str, inputs: list[str], **attrs) -> str:
        out = self._fresh(op_type.lower())
        self.nodes.append(helper.make_node(op_type, inputs, [out], name=f"{out}_node", **attrs))
        return out

    # layers
    def conv_bn_relu(self, x: str, cin: int, cout: int, k: int = 3, stride: int = 1,
                     relu: bool = True, bn_gain: float = 1.0) -> str:
        w = self.weight("conv_w", (cout, cin, k, k), cin * k * k)
        y = self.op("Conv", [x, w], kernel_shape=[k, k], strides=[stride, stride],
                    pads=[k // 2] * 4)
        y = self.batchnorm(y, cout, bn_gain)
        return self.op("Relu", [y]) if relu else y

    def batchnorm(self, x: str, c: int, gain: float = 1.0) -> str:
        r = self.rng
        scale = self.init("bn_scale", (gain * r.uniform(0.8, 1.2, c)).astype(np.float32))
        shift = self.init("bn_bias", r.uniform(-0.1, 0.1, c).astype(np.float32))
        mean = self.init("bn_mean", r.uniform(-0.1, 0.1, c).astype(np.float32))
        var = self.init("bn_var", r.uniform(0.8, 1.2, c).astype(np.float32))
        return self.op("BatchNormalization", [x, scale, shift, mean, var], epsilon=1e-5)

    def dense(self, x: str, k: int, n: int, relu: bool, trans_b: bool = False,
              gain: float = 2.0) -> str:
        w = self.weight("fc_w", (n, k) if trans_b else (k, n), k, gain)
        y = self.op("Gemm", [x, w, self.bias("fc_b", n)], transB=int(trans_b))
        return self.op("Relu", [y]) if relu else y

    def model(self, inputs: dict[str, tuple[int, ...]], output: str,
              out_shape: tuple[int, ...], doc: str) -> onnx.ModelProto:
        f32 = TensorProto.FLOAT
        graph = helper.make_graph(
            self.nodes, self.name,
            [helper.make_tensor_value_info(n, f32, list(s)) for n, s in inputs.items()],
            [helper.make_tensor_value_info(output, f32, list(out_shape))])
        m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="edgetvm.zoo", ir_version=IR_VERSION)
        for name, array in self.inits:  # added in place: make_graph would copy every weight
            t = m.graph.initializer.add()
            t.name, t.data_type = name, helper.np_dtype_to_tensor_dtype(array.dtype)
            t.dims.extend(array.shape)
            t.raw_data = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()
        m.doc_string = doc
        return m


# --------------------------------------------------------------------- generated models


def mlp(batch: int = 1, sizes: tuple[int, ...] = (784, 512, 256, 10)) -> onnx.ModelProto:
    g = _Graph("mlp", seed=0)
    x = "x"
    for i, (k, n) in enumerate(zip(sizes[:-1], sizes[1:])):
        last = i == len(sizes) - 2
        x = g.dense(x, k, n, relu=not last, trans_b=(i == 1), gain=1.0 if last else 2.0)
    return g.model({"x": (batch, sizes[0])}, x, (batch, sizes[-1]), "MLP: Gemm+Relu layers")


def cnn(batch: int = 1, image: int = 32, classes: int = 10) -> onnx.ModelProto:
    g = _Graph("cnn", seed=1)
    x, c = "x", 3
    for cout in (16, 32):
        x = g.conv_bn_relu(x, c, cout)
        x = g.op("MaxPool", [x], kernel_shape=[2, 2], strides=[2, 2])
        c = cout
    x = g.conv_bn_relu(x, c, 64)
    x = g.op("Flatten", [g.op("GlobalAveragePool", [x])])
    x = g.dense(x, 64, classes, relu=False, gain=1.0)
    return g.model({"x": (batch, 3, image, image)}, x, (batch, classes),
                   "CNN: Conv+BN+Relu, MaxPool, GlobalAveragePool, Gemm")


def resnet(batch: int = 1, image: int = 64, classes: int = 10,
           widths: tuple[int, ...] = (16, 32, 64)) -> onnx.ModelProto:
    g = _Graph("resnet", seed=2)

    def block(x: str, cin: int, cout: int, stride: int) -> str:
        y = g.conv_bn_relu(x, cin, cout, stride=stride)
        # a small last BN scale keeps the residual sum O(1) as blocks stack up
        y = g.conv_bn_relu(y, cout, cout, relu=False, bn_gain=0.3)
        if stride != 1 or cin != cout:  # strided 1x1 projection on the skip branch
            x = g.conv_bn_relu(x, cin, cout, k=1, stride=stride, relu=False)
        return g.op("Relu", [g.op("Add", [x, y])])

    x = g.conv_bn_relu("x", 3, widths[0])
    c = widths[0]
    for i, w in enumerate(widths):
        x = block(x, c, w, stride=1 if i == 0 else 2)
        x = block(x, w, w, stride=1)
        c = w
    x = g.op("Flatten", [g.op("GlobalAveragePool", [x])])
    x = g.dense(x, c, classes, relu=False, gain=1.0)
    return g.model({"x": (batch, 3, image, image)}, x, (batch, classes),
                   "ResNet: residual basic blocks, strided 1x1 projection shortcuts")


def inception(batch: int = 1, image: int = 64, classes: int = 10, modules: int = 9,
              width: int = 16) -> onnx.ModelProto:
    """GoogLeNet layout: modules of four branches (1x1; 1x1 -> 3x3; 1x1 -> 3x3 -> 3x3; max pool -> 1x1)
    joined by a Concat, max pools between stages: a DAG whose cuts cross several tensors."""
    g = _Graph("inception", seed=5)
    x = g.conv_bn_relu("x", 3, 2 * width, stride=2)
    c = 2 * width
    for m in range(modules):
        w = width * (1 + m // 3)
        b1 = g.conv_bn_relu(x, c, w, k=1)
        b2 = g.conv_bn_relu(g.conv_bn_relu(x, c, w // 2, k=1), w // 2, w)
        b3 = g.conv_bn_relu(g.conv_bn_relu(g.conv_bn_relu(x, c, w // 4, k=1), w // 4, w // 2), w // 2, w // 2)
        b4 = g.conv_bn_relu(g.op("MaxPool", [x], kernel_shape=[3, 3], strides=[1, 1], pads=[1, 1, 1, 1]), c, w // 2,
                            k=1)
        x = g.op("Concat", [b1, b2, b3, b4], axis=1)
        c = w + w + w // 2 + w // 2
        if m % 3 == 2 and m + 1 < modules:
            x = g.op("MaxPool", [x], kernel_shape=[2, 2], strides=[2, 2])
    x = g.op("Flatten", [g.op("GlobalAveragePool", [x])])
    x = g.dense(x, c, classes, relu=False, gain=1.0)
    return g.model({"x": (batch, 3, image, image)}, x, (batch, classes),
                   "Inception: four-branch modules joined by Concat")


def transformer(batch: int = 1, seq: int = 64, d_model: int = 256, heads: int = 4,
                ffn: int = 1024) -> onnx.ModelProto:
    g = _Graph("transformer", seed=3)
    dh = d_model // heads
    assert dh * heads == d_model, "d_model must be a multiple of heads"

    def layernorm(x: str) -> str:
        gamma = g.init("ln_gamma", g.rng.uniform(0.9, 1.1, d_model).astype(np.float32))
        beta = g.init("ln_beta", g.rng.uniform(-0.05, 0.05, d_model).astype(np.float32))
        return g.op("LayerNormalization", [x, gamma, beta], axis=-1, epsilon=1e-5)

    def linear(x: str, k: int, n: int, gain: float = 1.0) -> str:
        return g.op("Add", [g.op("MatMul", [x, g.weight("w", (k, n), k, gain)]),
                            g.bias("b", n)])

    heads_shape = g.const([batch, seq, heads, dh])

    def split_heads(x: str, perm: list[int]) -> str:
        return g.op("Transpose", [g.op("Reshape", [x, heads_shape])], perm=perm)

    h = layernorm("x")
    q = split_heads(linear(h, d_model, d_model), [0, 2, 1, 3])   # B,H,S,dh
    k = split_heads(linear(h, d_model, d_model), [0, 2, 3, 1])   # B,H,dh,S
    v = split_heads(linear(h, d_model, d_model), [0, 2, 1, 3])   # B,H,S,dh
    scores = g.op("Mul", [g.op("MatMul", [q, k]), g.const(1 / math.sqrt(dh), np.float32)])
    attn = g.op("MatMul", [g.op("Softmax", [scores], axis=-1), v])
    attn = g.op("Reshape", [g.op("Transpose", [attn], perm=[0, 2, 1, 3]),
                            g.const([batch, seq, d_model])])
    x = g.op("Add", ["x", linear(attn, d_model, d_model)])

    h = linear(layernorm(x), d_model, ffn, gain=2.0)
    # GELU(h) = 0.5 * h * (1 + erf(h / sqrt(2)))
    erf = g.op("Erf", [g.op("Div", [h, g.const(math.sqrt(2.0), np.float32)])])
    gelu = g.op("Mul", [g.op("Mul", [h, g.op("Add", [erf, g.const(1.0, np.float32)])]),
                        g.const(0.5, np.float32)])
    x = g.op("Add", [x, linear(gelu, ffn, d_model)])
    return g.model({"x": (batch, seq, d_model)}, x, (batch, seq, d_model),
                   "Transformer encoder block: LayerNorm, 4-head attention, GELU MLP")


def dense_stack(n: int = 8, d: int = 3072, batch: int = 1) -> onnx.ModelProto:
    """n Gemm layers of d x d (8 x 3072 = 288 MiB of fp32 weights): for memory experiments."""
    g = _Graph("dense_stack", seed=4)
    x = "x"
    for i in range(n):
        x = g.dense(x, d, d, relu=i < n - 1, gain=2.0 if i < n - 1 else 1.0)
    return g.model({"x": (batch, d)}, x, (batch, d),
                   f"Dense stack: {n} Gemm layers of {d}x{d}")


_VGG11 = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M")


def vgg(width: float = 0.25, batch: int = 1, image: int = 64,
        classes: int = 10) -> onnx.ModelProto:
    """VGG-11 layout, every channel count and the classifier's hidden size scaled by width."""
    g = _Graph("vgg", seed=5)
    x, c = "x", 3
    for v in _VGG11:
        if v == "M":
            x = g.op("MaxPool", [x], kernel_shape=[2, 2], strides=[2, 2])
        else:
            cout = max(1, round(v * width))
            w = g.weight("conv_w", (cout, c, 3, 3), c * 9)
            x = g.op("Relu", [g.op("Conv", [x, w, g.bias("conv_b", cout)],
                                   kernel_shape=[3, 3], pads=[1, 1, 1, 1])])
            c = cout
    spatial = image // 32
    hidden = max(1, round(4096 * width))
    x = g.op("Flatten", [x])
    x = g.dense(x, c * spatial * spatial, hidden, relu=True)
    x = g.dense(x, hidden, hidden, relu=True)
    x = g.dense(x, hidden, classes, relu=False, gain=1.0)
    return g.model({"x": (batch, 3, image, image)}, x, (batch, classes),
                   f"VGG-11 style CNN, width x{width}")


# ----------------------------------------------------------------------------- registry


MODELS: dict[str, ModelInfo] = {m.name: m for m in [
    ModelInfo("ocr_cls", "PP-OCR v2 text direction classifier (MobileNetV3, pretrained)",
              lambda: {"x": (1, 3, 48, 192)}, filename="ch_ppocr_mobile_v2.0_cls_infer.onnx"),
    ModelInfo("ocr_det", "PP-OCRv4 text detector (DB, pretrained); H and W multiples of 32",
              lambda: {"x": (1, 3, 320, 320)}, filename="ch_PP-OCRv4_det_infer.onnx"),
    ModelInfo("ocr_rec", "PP-OCRv4 text recognizer (SVTR-LCNet, 6625 classes, pretrained)",
              lambda: {"x": (1, 3, 48, 320)}, filename="ch_PP-OCRv4_rec_infer.onnx"),
    ModelInfo("mlp", "MLP 784-512-256-10, Gemm+Relu (one Gemm with transB=1)",
              lambda batch=1, sizes=(784, 512, 256, 10): {"x": (batch, sizes[0])}, mlp),
    ModelInfo("cnn", "small CNN: Conv+BN+Relu, MaxPool, GlobalAveragePool, Gemm",
              lambda batch=1, image=32, **_: {"x": (batch, 3, image, image)}, cnn),
    ModelInfo("resnet", "small ResNet (6 basic blocks, strided 1x1 shortcuts)",
              lambda batch=1, image=64, **_: {"x": (batch, 3, image, image)}, resnet),
    ModelInfo("inception", "GoogLeNet-style CNN: 9 four-branch modules joined by Concat (a DAG)",
              lambda batch=1, image=64, **_: {"x": (batch, 3, image, image)}, inception),
    ModelInfo("transformer", "one transformer encoder block (seq 64, d 256, 4 heads)",
              lambda batch=1, seq=64, d_model=256, **_: {"x": (batch, seq, d_model)},
              transformer),
    ModelInfo("dense_stack", "n dense d x d layers (default 8 x 3072, 288 MiB of weights)",
              lambda d=3072, batch=1, **_: {"x": (batch, d)}, dense_stack),
    ModelInfo("vgg", "VGG-11 style CNN with a width multiplier (default 0.25, 64x64 input)",
              lambda batch=1, image=64, **_: {"x": (batch, 3, image, image)}, vgg),
]}


def _info(name: str) -> ModelInfo:
    try:
        return MODELS[name]
    except KeyError:
        raise UserError(f"no zoo model named {name!r}; choose one of: "
                        f"{', '.join(MODELS)}") from None


def load(name: str, **kw) -> onnx.ModelProto:
    """The model as an in-memory ModelProto; keywords go to a generated model's builder."""
    info = _info(name)
    if info.pretrained:
        if kw:
            raise UserError(f"{name} is a pretrained model and takes no options "
                            f"(got {', '.join(sorted(kw))})")
        return onnx.load(str(_rapidocr_file(info.filename)))
    return info.build(**kw)


def available(name: str) -> bool:
    """False when a pretrained model's package is not installed."""
    info = _info(name)
    if not info.pretrained:
        return True
    try:
        _rapidocr_file(info.filename)
    except UserError:
        return False
    return True


def path(name: str, cache_dir: str | Path | None = None, **kw) -> Path:
    """A file holding the model: the installed file for a pretrained model; for a generated
    one, cache_dir/<name>[-k=v...].onnx, written on first use (default ~/.cache/edgetvm or $EDGETVM_CACHE)."""
    info = _info(name)
    if info.pretrained:
        if kw:
            raise UserError(f"{name} is a pretrained model and takes no options")
        return _rapidocr_file(info.filename)
    if cache_dir is None:
        from edgetvm.runtime.leftovers import cache_root

        cache_dir = cache_root()
    cache = Path(cache_dir)
    suffix = "".join(f"-{k}={v}" for k, v in sorted(kw.items())).replace(" ", "")
    p = cache / f"{name}{suffix}.onnx"
    if not p.exists():
        cache.mkdir(parents=True, exist_ok=True)
        tmp = p.with_name(f"{p.name}.{os.getpid()}.tmp")
        onnx.save(info.build(**kw), str(tmp))
        tmp.replace(p)  # atomic: a concurrent reader never sees a half-written file
    return p


def default_input_shapes(name: str, **kw) -> dict[str, tuple[int, ...]]:
    """Static shapes to feed: pretrained models have dynamic dims, these pin them."""
    return dict(_info(name).input_shapes(**kw))


def sample_inputs(name: str, seed: int = 0, shapes: dict[str, tuple[int, ...]] | None = None,
                  **kw) -> dict[str, np.ndarray]:
    """Deterministic inputs: synthetic text-line images, normalised as PaddleOCR does, for
    the OCR models (noise would leave the detector's output all zeros); N(0, 1) otherwise."""
    shapes = shapes or default_input_shapes(name, **kw)
    rng = np.random.default_rng(seed)
    if not _info(name).pretrained:
        return {k: rng.standard_normal(s, dtype=np.float32) for k, s in shapes.items()}
    out = {}
    for k, (n, c, h, w) in shapes.items():
        x = np.stack([_text_image(h, w, rng) for _ in range(n)])[:, None].repeat(c, axis=1)
        if name == "ocr_det":  # ImageNet mean/std
            mean = np.array([0.485, 0.456, 0.406][:c]).reshape(c, 1, 1)
            std = np.array([0.229, 0.224, 0.225][:c]).reshape(c, 1, 1)
            x = (x - mean) / std
        else:  # cls and rec: (x - 0.5) / 0.5
            x = (x - 0.5) / 0.5
        out[k] = x.astype(np.float32)
    return out


def _text_image(h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """Grey page in [0, 1] with lines of dark glyph-sized blocks."""
    img = np.full((h, w), 235.0)
    y = int(rng.integers(2, max(3, h // 8)))
    while y < h - 8:
        lh = min(int(rng.integers(8, 20)), h - y - 2)
        x, end = int(rng.integers(2, max(3, w // 8))), int(rng.integers(w // 2, w))
        while x < end - 4:
            gw = int(rng.integers(2, max(3, lh // 2) + 1))
            img[y:y + lh, x:x + gw] = rng.uniform(10, 60)
            x += gw + int(rng.integers(1, max(2, lh // 3)))
        y += lh + int(rng.integers(6, 24))
    return np.clip(img + rng.normal(0, 5, img.shape), 0, 255) / 255.0


def list_models() -> list[tuple[str, str]]:
    """(name, one-line description) for every model."""
    return [(m.name, m.description) for m in MODELS.values()]
