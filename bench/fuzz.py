"""Fuzzing campaign: seeded mutations of ONNX files, artifacts and .npy inputs through `edgetvm compile` / `run`.

    python bench/fuzz.py [--cases 1000] [--seed 0] [--only I --keep DIR] [--quiet]

Prints the counts by mutation kind x outcome and every bad case (traceback, stray stderr, crash, hang,
half-written output) with its command line; exits 1 if there is one. See edgetvm/fuzz.py.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edgetvm import fuzz  # noqa: E402

if __name__ == "__main__":
    sys.exit(fuzz.main())
