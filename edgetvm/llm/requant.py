"""Requantize a GGUF file to another type, for testing the formats on a real model.

    python -m edgetvm.llm.requant smollm2-135m Q8_0 -o ~/.cache/edgetvm/llm/smollm2-135m.Q8_0.gguf
    python -m edgetvm.llm.requant smollm2-135m Q4_K_M -o ... --llama-python ~/.cache/edgetvm/llamacpp-venv/bin/python

Q8_0, Q4_0, Q4_1 and Q5_0 are written with the `gguf` package (`gguf.quants.quantize`, the same
rounding as llama.cpp's reference quantizers) from the dequantized weights: every 2-D weight in
the target type, the token embedding kept as stored (llama.cpp keeps Q8_0 there too when a row
of 576 does not split into 256-blocks), norms F32. K-quant mixtures (Q4_K_M, Q6_K, ...) need
llama.cpp's own quantizer: `llama_model_quantize` of llama-cpp-python, run with the python of a
separate venv that has it (bench/llamacpp_peer.py says how to build it); requantizing from a
quantized file needs its allow_requantize flag. Outputs belong under ~/.cache/edgetvm, never in
the repository.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from edgetvm.errors import UserError

GGUF_TYPES = ("Q8_0", "Q4_0", "Q4_1", "Q5_0")
LLAMA_FTYPES = {"Q4_0": 2, "Q4_1": 3, "Q8_0": 7, "Q5_0": 8, "Q4_K_S": 14, "Q4_K_M": 15, "Q5_K_M": 17, "Q6_K": 18}


def with_gguf(src: Path, qtype: str, out: Path) -> Path:
    import numpy as np
    import gguf
    from gguf.quants import dequantize, quantize

    r = gguf.GGUFReader(str(src))
    arch = str(r.fields["general.architecture"].contents())
    tmp = out.with_suffix(".tmp")
    w = gguf.GGUFWriter(str(tmp), arch)
    for f in r.fields.values():
        if f.name.startswith("GGUF.") or f.name in ("general.architecture", "general.file_type"):
            continue
        w.add_key_value(f.name, f.contents(), f.types[0], f.types[-1] if len(f.types) > 1 else None)
    q = getattr(gguf.GGMLQuantizationType, qtype)
    for t in r.tensors:
        shape = tuple(int(s) for s in reversed(t.shape.tolist()))
        if len(shape) == 2 and t.name != "token_embd.weight" and shape[1] % 32 == 0:
            a = dequantize(t.data, t.tensor_type).reshape(shape).astype(np.float32)
            w.add_tensor(t.name, quantize(a, q), raw_dtype=q)
        elif t.tensor_type.name in ("F32", "F16"):
            w.add_tensor(t.name, np.asarray(t.data).reshape(shape))
        else:
            w.add_tensor(t.name, np.asarray(t.data), raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    tmp.replace(out)
    return out


LLAMA_QUANTIZE = """
import sys, ctypes, llama_cpp
src, dst, ftype = sys.argv[1], sys.argv[2], int(sys.argv[3])
p = llama_cpp.llama_model_quantize_default_params()
p.ftype = ftype
p.allow_requantize = True
p.nthread = 1
rc = llama_cpp.llama_model_quantize(src.encode(), dst.encode(), ctypes.byref(p))
sys.exit(rc)
"""


def with_llama_cpp(src: Path, qtype: str, out: Path, python: str) -> Path:
    tmp = out.with_suffix(".tmp")
    r = subprocess.run([python, "-c", LLAMA_QUANTIZE, str(src), str(tmp), str(LLAMA_FTYPES[qtype])],
                       capture_output=True, text=True)
    if r.returncode != 0 or not tmp.exists():
        raise UserError(f"llama.cpp's quantizer failed ({r.returncode}): {(r.stderr or r.stdout).strip()[-300:]}")
    tmp.replace(out)
    return out


def main(argv=None) -> int:
    from edgetvm.llm.gguf_model import model_path

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", help="a GGUF file or a model name (smollm2-135m)")
    ap.add_argument("type", help=f"{', '.join(GGUF_TYPES)} (gguf package) or {', '.join(LLAMA_FTYPES)} (llama.cpp)")
    ap.add_argument("-o", "--output", required=True)
    ap.add_argument("--llama-python", help="python of a venv with llama-cpp-python (for K-quants; also used for the "
                                           "others when given)")
    a = ap.parse_args(argv)
    try:
        src, out = model_path(a.model), Path(a.output).expanduser()
        out.parent.mkdir(parents=True, exist_ok=True)
        if a.llama_python and a.type in LLAMA_FTYPES:
            with_llama_cpp(src, a.type, out, a.llama_python)
        elif a.type in GGUF_TYPES:
            with_gguf(src, a.type, out)
        else:
            raise UserError(f"type {a.type} needs llama.cpp's quantizer: give --llama-python")
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
