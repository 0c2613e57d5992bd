"""What the `inplace_audit` backend costs, measured side by side in one run (issue 6).

    python benchmarks/run.py            # default: about 15 minutes on a 2-core CPU
    python benchmarks/run.py --quick    # a few minutes: small sizes, one sample each
    python benchmarks/run.py --full     # the sizes of the issue (hours on a small CPU)

Prints one table: each row's measured figures beside its target with PASS / MISS. Sections
(see docs/performance.md): 1 compile-time overhead, 2 steady-state step time, 3 scaling of
the audit itself, 4 run-time alternatives; every row says which device gave it (section 5:
CUDA rows are added when a GPU is present). Timings are reported, never asserted.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

import torch
import torch._inductor.config

from alternatives import alternative_rows, measure_alternatives
from audit_scaling import measure_scaling, scaling_rows
from compile_time import compile_rows, measure_compile_time, warm_up
from step_time import measure_step_time, step_rows
from table import Row, render

SECTIONS = ("compile", "step", "alternatives", "scaling")

MODES = {
    "quick": dict(compile_depths=[1], repeats=1, step_depth=1, rounds=40, alt_rounds=10, per_round=3,
                  scaling_depths=[10, 40, 120], scaling_repeats=1),
    "default": dict(compile_depths=[1, 4, 12], repeats=3, step_depth=6, rounds=150, alt_rounds=30, per_round=3,
                    scaling_depths=[20, 80, 300, 600], scaling_repeats=3),
    "full": dict(compile_depths=[1, 40, 150], repeats=3, step_depth=40, rounds=300, alt_rounds=60, per_round=3,
                 scaling_depths=[20, 80, 300, 760, 1500], scaling_repeats=3),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_const", const="quick", dest="mode", help="small sizes, one sample each")
    mode.add_argument("--full", action="store_const", const="full", dest="mode", help="up to ~2,000-node compiles and ~20,000-node audits")
    ints = lambda s: [int(v) for v in s.split(",")]  # noqa: E731
    parser.add_argument("--sections", type=lambda s: s.split(","), default=list(SECTIONS), help=f"comma-separated subset of {','.join(SECTIONS)}")
    parser.add_argument("--devices", type=lambda s: s.split(","), default=None, help="e.g. cpu,cuda (default: cpu, plus cuda when available)")
    parser.add_argument("--width", type=int, default=32, help="features per layer (default 32)")
    parser.add_argument("--compile-depths", type=ints, help="trunk depths for section 1, e.g. 1,4,12")
    parser.add_argument("--repeats", type=int, help="cold compiles per backend and size (section 1)")
    parser.add_argument("--step-depth", type=int, help="trunk depth for sections 2 and 4")
    parser.add_argument("--rounds", type=int, help="interleaved rounds of steps (section 2)")
    parser.add_argument("--alt-rounds", type=int, help="interleaved rounds of steps (section 4, eager: slower steps)")
    parser.add_argument("--per-round", type=int, help="steps per variant per round (sections 2 and 4)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (default 1: steadier on a shared machine; 0 keeps torch's default)")
    parser.add_argument("--scaling-depths", type=ints, help="trunk depths for section 3, e.g. 20,80,300,600")
    parser.add_argument("--scaling-repeats", type=int, help="audit runs per size (section 3)")
    parser.add_argument("--compile-threads", type=int, default=1,
                        help="Inductor compile_threads (default 1: the C++ compiler runs as a waited-for child, so the "
                        "CPU-time figures of section 1 are complete; >1 uses worker processes and section 1 is judged on wall time)")
    parser.add_argument("--format", default="simple_grid", help="tabulate format of the table, e.g. github for Markdown")
    parser.add_argument("--json", type=Path, help="also write the rows and the settings to this JSON file")
    args = parser.parse_args(argv)
    args.mode = args.mode or "default"
    for key, value in MODES[args.mode].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    unknown = sorted(set(args.sections) - set(SECTIONS))
    if unknown:
        parser.error(f"--sections: unknown {unknown}; expected a subset of {list(SECTIONS)}")
    if args.devices is None:
        args.devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    return args


def environment() -> dict[str, str]:
    def cpu_name() -> str:
        try:
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
        except OSError:
            pass
        return platform.processor() or "?"

    def git_commit() -> str:
        try:
            root = Path(__file__).resolve().parent.parent
            commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True, check=True).stdout.strip()
            dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root, capture_output=True, text=True).stdout.strip()
            return commit + (" (uncommitted changes)" if dirty else "")
        except (OSError, subprocess.CalledProcessError):
            return "?"

    import torch._inductor.config as inductor_config

    env = {
        "machine": f"{cpu_name()}, {os.cpu_count()} cores, {platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "fxinplace": f"{metadata.version('fxinplace')} @ {git_commit()}",
        "threads": f"torch {torch.get_num_threads()}, inductor compile_threads {inductor_config.compile_threads}",
    }
    if torch.cuda.is_available():
        env["cuda"] = f"{torch.cuda.get_device_name()} (CUDA {torch.version.cuda})"
    return env


def measure_device(device: torch.device, args: argparse.Namespace) -> list[Row]:
    rows = []
    if "compile" in args.sections:
        warm_up(device)
        for depth in args.compile_depths:
            times = measure_compile_time(depth, args.width, device, args.repeats)
            rows += compile_rows(times, device, clock="cpu" if args.compile_threads == 1 else "wall")
    compiled = {}
    if "step" in args.sections:
        compiled, failed = measure_step_time(args.step_depth, args.width, device, args.rounds, args.per_round)
        rows += step_rows(args.step_depth, compiled, failed, device)
    if "alternatives" in args.sections:
        times = measure_alternatives(args.step_depth, args.width, device, args.alt_rounds, args.per_round)
        rows += alternative_rows(args.step_depth, times, compiled, device)
    if "scaling" in args.sections:
        points = [measure_scaling(d, args.width, device, args.scaling_repeats) for d in args.scaling_depths]
        rows += scaling_rows(points, device)
    return rows


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    started, load_before = time.perf_counter(), os.getloadavg()
    settings = {k: getattr(args, k) for k in ("mode", "sections", "devices", "width", "compile_depths", "repeats", "step_depth",
                                               "rounds", "alt_rounds", "per_round", "threads", "compile_threads", "scaling_depths", "scaling_repeats")}
    print(f"[run] {args.mode} mode: {settings}", file=sys.stderr, flush=True)
    rows = []
    # Nothing here reads or fills the user's own Inductor cache.
    user_cache_dir = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    try:
        with tempfile.TemporaryDirectory(prefix="fxinplace-bench-") as cache_dir, \
                torch._inductor.config.patch(compile_threads=args.compile_threads):
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache_dir
            env = environment()
            for name in args.devices:
                rows += measure_device(torch.device(name), args)
    finally:
        if user_cache_dir is None:
            os.environ.pop("TORCHINDUCTOR_CACHE_DIR", None)
        else:
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = user_cache_dir
    env["load average"] = f"{load_before[0]:.2f} at start, {os.getloadavg()[0]:.2f} at end (1-minute)"
    env["run"] = f"{datetime.date.today()}, {args.mode} mode, {(time.perf_counter() - started) / 60:.1f} min"

    print("\n".join(f"{k}: {v}" for k, v in env.items()))
    clock = "CPU time" if args.compile_threads == 1 else "wall time"
    print(f"Times are medians, [min–max, n] where repeated. Section 1: wall and CPU time (process + waited-for children),\n"
          f"targets checked on {clock}; sections 2 and 4: wall time; section 3: process CPU time.\n"
          "Compile ratio = candidate/baseline time (lower is better, 1.03 = 3% slower). Step ratio = baseline/candidate\n"
          "time per interleaved round, median over rounds (higher is better, 0.99 = 1% slower).")
    print(render(rows, args.format))
    misses = [r for r in rows if r.status == "MISS"]
    print(f"{sum(r.status == 'PASS' for r in rows)} PASS, {len(misses)} MISS, {sum(r.status == 'n/a' for r in rows)} n/a")
    for r in misses:
        print(f"MISS: {r.section} / {r.measure} / {r.model} / {r.device}: {r.result} (target {r.target})")
    if args.json:
        args.json.write_text(json.dumps({"environment": env, "settings": settings, "rows": [r.as_dict() for r in rows]}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
