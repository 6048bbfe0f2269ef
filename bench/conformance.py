"""Conformance of `edgetvm compile` + `edgetvm run` on the models the onnx wheel ships with reference data.

    python bench/conformance.py [--suite light --suite simple ...] [--limit N] [--timeout 600]

Prints, per suite, how many cases match the reference, end in one clear error line, or fail; the clear
errors grouped by the operator or feature they name; and every failure with its last stderr line.
Exits 1 if any case failed.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edgetvm import conformance  # noqa: E402


def print_table(rows: list[conformance.Row]) -> None:
    suites = [s for s in conformance.SUITES if any(r.suite == s for r in rows)]
    print(f"\n{'suite':<20} {'cases':>5} {'match':>6} {'clear':>6} {'failed':>6}")
    for suite in suites + ["all"]:
        mine = [r for r in rows if suite in ("all", r.suite)]
        n = Counter(r.outcome if not r.failed else "failed" for r in mine)
        print(f"{suite:<20} {len(mine):>5} {n['match']:>6} {n['clear error']:>6} {n['failed']:>6}")

    by_feature = defaultdict(list)
    for r in rows:
        if r.outcome == "clear error":
            by_feature[conformance.feature(r.error)].append(r.model)
    if by_feature:
        print("\nclear errors by operator or feature:")
        for what, models in sorted(by_feature.items(), key=lambda kv: (-len(kv[1]), kv[0])):
            print(f"  {what:<40} {len(models):>3}  {', '.join(models)}")

    failed = [r for r in rows if r.failed]
    print(f"\nfailures: {len(failed)}")
    for r in failed:
        print(f"  {r.suite}/{r.model} [{r.outcome}] ops {','.join(r.ops)}: {r.error}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--suite", action="append", choices=conformance.SUITES,
                   help="run only this suite; repeat for several (default: all)")
    p.add_argument("--limit", type=int, help="at most N cases per suite")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per command before it counts as a hang")
    args = p.parse_args(argv)

    cases = []
    for suite in args.suite or conformance.SUITES:
        cases += conformance.discover([suite])[:args.limit]
    t0 = time.perf_counter()

    def progress(r):
        print(f"{r.suite}/{r.model}: {r.outcome} ({r.seconds:.1f} s){' ' + r.error if r.error else ''}",
              flush=True)

    rows = conformance.run_all(cases, timeout=args.timeout, progress=progress)
    print_table(rows)
    print(f"\n{len(rows)} cases in {time.perf_counter() - t0:.0f} s")
    return 1 if any(r.failed for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
