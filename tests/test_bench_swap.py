"""bench/swap.py end to end on small models (--runslow); its figures are read by people, not asserted."""

import importlib.util
import re
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"


def load(name):
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.slow
def test_swap_bench_prints_a_ratio_per_row(capsys):
    bench = load("swap")
    assert bench.main(["--quick"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert any(l.startswith("model") and "warm ms (x)" in l for l in lines), out
    for name in bench.QUICK:
        rows = [l for l in lines if l.startswith(name + " ")]
        assert len(rows) == 3, f"{name}: one row per oversubscription 2, 4, 6 expected:\n{out}"
        for row in rows:
            ratios = [float(r) for r in re.findall(r"\(\s*([0-9.]+)x\)", row)]
            # warm, cold and naive, each against in-memory
            assert len(ratios) == 3 and all(r > 0 for r in ratios), row
            rss = re.search(r"(-?[0-9.]+)/([0-9.]+)", row)  # peak RSS above baseline / budget, MiB
            assert rss and float(rss.group(2)) > 0, row
