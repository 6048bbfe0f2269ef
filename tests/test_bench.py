"""The benchmarks run end to end on demand (--runslow); their figures are read by people, not asserted."""

import importlib.util
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"


def load(name):
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.slow
def test_compile_vs_ort_prints_a_ratio_table(capsys):
    assert load("compile_vs_ort").main(["--models", "cnn,mlp,light_squeezenet", "--rounds", "1", "--repeat", "3"]) == 0
    out = capsys.readouterr().out
    assert "edgetvm/ort" in out
    for name in ("cnn", "mlp", "light_squeezenet"):
        row = next(l for l in out.splitlines() if l.startswith(name))
        assert float(row.split()[3].rstrip("x")) > 0
    assert "where edgetvm's time goes" in out and "fused_" in out.split("where edgetvm's time goes")[1]


@pytest.mark.slow
def test_decode_under_memory_budgets_prints_rates_against_the_unbudgeted_run(capsys):
    load("decode").main(["--memory-budgets", "0.5,0.01", "--weights", "q4", "--contexts", "16", "--steps", "2",
                         "--repeats", "1", "--threads", "1"])
    out = capsys.readouterr().out
    assert "cannot hold even the smallest plan" in out  # 1% of the weights
    row = next(l for l in out.splitlines() if l.startswith("0.5 x weights"))
    assert "streamed" in row and float(row.split()[-1].rstrip("x")) > 0
