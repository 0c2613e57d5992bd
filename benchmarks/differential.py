"""Differential testing at scale: random programs, eager PyTorch as the oracle, the audit checked.

    python benchmarks/differential.py --programs 20000           # seeds 0..19999, 2 processes
    python benchmarks/differential.py --programs 5000 --start 100000 --jobs 1
    python benchmarks/differential.py --programs 100000 --minutes 15  # as many as fit
    python benchmarks/differential.py --seeds 667 694 --minimize  # one program each, minimized
    python benchmarks/differential.py --programs 500 --functionalize  # functionalize=True vs eager

The same generator (`tests/program_gen.py`) and oracle (`tests/differential_oracle.py`) as
`tests/test_differential.py`, which runs seeds 0..999. Prints progress, then the programs
run, what eager PyTorch did with them, and every disagreement with its seed; `--minimize`
shrinks each disagreeing program (greedily dropping statements and heads) and prints it.
Exits 1 when anything disagrees. docs/reliability.md explains the generator and the oracle.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import pathlib
import platform
import sys
import tempfile
import time
import warnings

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "tests"))

from differential_oracle import check, check_functionalized, fast_dynamo, minimize, run_seeds  # noqa: E402
from program_gen import generate  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--programs", type=int, default=1000, help="how many programs (default 1000)")
    parser.add_argument("--start", type=int, default=0, help="first seed (default 0)")
    parser.add_argument("--seeds", type=int, nargs="*", help="check these seeds instead")
    parser.add_argument("--jobs", type=int, default=2, help="worker processes (default 2)")
    parser.add_argument("--minimize", action="store_true", help="shrink and print each disagreeing program")
    parser.add_argument("--functionalize", action="store_true",
                        help="check options={'functionalize': True} against eager instead of the audit's report")
    parser.add_argument("--every", type=int, default=500, help="print progress every N programs")
    parser.add_argument("--minutes", type=float, help="stop after this long, with the programs run so far")
    args = parser.parse_args()
    warnings.filterwarnings("ignore", category=UserWarning)

    seeds = args.seeds if args.seeds else range(args.start, args.start + args.programs)
    started = time.perf_counter()
    outcomes: collections.Counter[str] = collections.Counter()
    bad = {}
    results = run_seeds(seeds, jobs=args.jobs, functionalize=args.functionalize)
    known = {}  # disagreements of a documented limit (`known-limit:` findings)
    eager = {}  # agreements of a graph the compiler refused, run op by op (`ran-eagerly:`)
    for i, result in enumerate(results, 1):
        outcomes[result.outcome] += 1
        if result.findings and all(f.startswith("known-limit:") for f in result.findings):
            known[result.seed] = result.findings
        elif result.findings and all(f.startswith("ran-eagerly:") for f in result.findings):
            eager[result.seed] = result.findings
        elif result.findings:
            bad[result.seed] = result.findings
            print(f"seed {result.seed}: {'; '.join(result.findings)}", flush=True)
        if i % args.every == 0:
            print(f"... {i} programs, {len(bad)} disagreeing, {time.perf_counter() - started:.0f} s", flush=True)
        if args.minutes is not None and time.perf_counter() - started > args.minutes * 60:
            print(f"... stopping after {args.minutes:g} minutes", flush=True)
            break
    elapsed = time.perf_counter() - started
    results.close()  # after --minutes: let the workers finish what they hold, run nothing new

    total = sum(outcomes.values())
    print(f"\nprograms run: {total}")
    print(f"disagreements: {len(bad)}" + (f" (and {len(known)} of a documented limit, not counted: "
                                          f"seeds {sorted(known)})" if known else ""))
    if eager:
        print(f"graphs run op by op (the compiler refused them, or would when they run), agreeing with "
              f"eager: {len(eager)} (seeds {sorted(eager)})")
    print("eager PyTorch: " + ", ".join(f"{k} {v}" for k, v in sorted(outcomes.items())))
    print(f"time: {elapsed:.0f} s ({elapsed / max(total, 1) * 1000:.0f} ms per program, {args.jobs} process(es))")
    print(f"date: {datetime.date.today()}, torch {torch.__version__}, {platform.machine()}, "
          f"{platform.processor() or platform.system()}")
    for seed, findings in sorted(bad.items()):
        print(f"  seed {seed}: {'; '.join(findings)}")

    if args.minimize and bad:
        with fast_dynamo(), tempfile.TemporaryDirectory() as directory:
            here = pathlib.Path(directory)
            if args.functionalize:
                judge = lambda p: check_functionalized(p, here) or []  # noqa: E731
            else:
                judge = lambda p: check(p, here).findings  # noqa: E731
            for seed in sorted(bad):
                small = minimize(generate(seed), here, judge)
                print(f"\n# seed {seed}, minimized: {judge(small)}")
                print(f"Program({seed}, {small.statements!r}, {small.outputs!r})")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
