"""The command line: run a training script watched, or show a saved report.

    python -m fxinplace run [--json PATH] [--fail-on error] [--tables] train.py [args...]
    python -m fxinplace show report.json [--width N]
    python -m fxinplace fix [--apply] train.py [args...]

`run` runs the script as `python train.py args...` would (`__name__ == "__main__"`, its
directory first on `sys.path`, `sys.argv` its own) inside a `Watch`: every `torch.compile` in
it audited with its own backend handing off, the training-loop guard on throughout. At exit
it prints a summary to stderr (the script's stdout stays its own), writes the JSON report
when asked, and exits with the script's own code, or 1 when the script raised or when a
hazard at or above `--fail-on` was found.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import shutil
import sys
import traceback
import types
from typing import Sequence

from . import render
from ._run_render import (applied, failed_on, json_written, no_model_ran, predicted_inplace_error, summary,
                          unexplained_inplace_error, watched_run_failed)
from ._script import exec_script, main_module, script_frames
from ._watch import Watch
from .backend import _is_autograd_inplace_error
from .errors import FxInplaceError
from .report import SEVERITIES, Report

__all__ = ["main"]

FAIL_ON = (*SEVERITIES, "never")
USAGE_ERROR = 2  # as argparse exits for a bad command line


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "run":
        return run(args.script, args.args, json_path=args.json, fail_on=args.fail_on, tables=args.tables)
    if args.command == "fix":
        return fix(args.script, args.args, apply=args.apply, json_path=args.json)
    return show(args.report, width=args.width)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fxinplace", description="Find in-place mutation hazards in PyTorch training.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="{run,show,fix}")
    run_ = commands.add_parser("run", help="run a training script with every torch.compile audited and the "
                               "training-loop guard on", description="Run SCRIPT as `python SCRIPT ARGS...`, "
                               "watched: every torch.compile in it audited (its own backend compiles after the "
                               "audit), the training-loop guard on for the whole run.")
    run_.add_argument("--json", metavar="PATH", help="write the audit's JSON report (docs/report.md) to PATH")
    run_.add_argument("--fail-on", choices=FAIL_ON, default="error",
                      help="exit 1 when a hazard at or above this severity was found (default: error; the "
                      "guard's findings count as errors); never: always the script's own exit code")
    run_.add_argument("--tables", action="store_true", help="print every graph's mutation table in the summary")
    run_.add_argument("script", help="the training script")
    run_.add_argument("args", nargs=argparse.REMAINDER, help="the script's own arguments")
    fix_ = commands.add_parser("fix", help="propose a checked source patch for each error-level hazard",
                               description="Run SCRIPT up to its first backward call, audit each model it ran, and "
                               "print a checked patch (a unified diff) for each error-level hazard (docs/fixes.md). "
                               "Exit 1 when some error has no checked fix.")
    fix_.add_argument("--apply", action="store_true", help="write the checked patches to the files (never without it)")
    fix_.add_argument("--json", metavar="PATH", help="write the fixes, with their hazards, as JSON to PATH")
    fix_.add_argument("script", help="the training script")
    fix_.add_argument("args", nargs=argparse.REMAINDER, help="the script's own arguments")
    show_ = commands.add_parser("show", help="render a saved JSON report",
                                description="Render a report saved by `fxinplace run --json` or Report.to_json().")
    show_.add_argument("report", help="the JSON report")
    show_.add_argument("--width", type=int, default=None,
                       help="columns the tables fit (default: the terminal's, 100 when not a terminal; 0: no wrapping)")
    return parser


# run -------------------------------------------------------------------------------------------

def run(script: str, args: Sequence[str] = (), *, json_path: str | None = None, fail_on: str = "error",
        tables: bool = False) -> int:
    loaded = _load_script(script, "run")
    if isinstance(loaded, int):
        return loaded
    path, code = loaded
    script = main_module(path)
    with Watch(namespace=script.__dict__) as watch:
        exit_code, error = exec_script(path, code, args, script)
    sys.stdout.flush()
    report = watch.report
    width = shutil.get_terminal_size((100, 24)).columns
    if error is not None:
        exit_code = 1
        traceback.print_exception(type(error), error, script_frames(error.__traceback__))
        explanation = _explain(error, report, width)
        if explanation:
            print(explanation, file=sys.stderr)
    print(summary(report, watch.stale, tables=tables, width=width), file=sys.stderr)
    if json_path:
        try:
            pathlib.Path(json_path).write_text(report.to_json() + "\n", encoding="utf-8")
        except OSError as e:
            print(f"fxinplace run: could not write the JSON report to --json {json_path!r}: {e}", file=sys.stderr)
            exit_code = exit_code or 1
        else:
            print(json_written(json_path), file=sys.stderr)
    if exit_code == 0 and _fails(report, watch, fail_on):
        print(failed_on(fail_on), file=sys.stderr)
        exit_code = 1
    sys.stderr.flush()
    return exit_code


def _load_script(script: str, command: str) -> tuple[pathlib.Path, types.CodeType] | int:
    path = pathlib.Path(script)
    if not path.is_file():
        found = "a directory" if path.is_dir() else "no such file"
        return _usage_error(f"fxinplace {command}: SCRIPT must be a Python file, got {script!r} ({found})")
    try:
        return path, compile(path.read_bytes(), str(path), "exec")
    except (OSError, SyntaxError, ValueError) as e:
        traceback.print_exception(type(e), e, None)
        return 1


# fix -------------------------------------------------------------------------------------------

def fix(script: str, args: Sequence[str] = (), *, apply: bool = False, json_path: str | None = None) -> int:
    """Run the script up to its first backward, propose a checked fix for each error-level
    hazard of each model it ran; run it again watched, for the guard's loop findings (a step
    between two backward calls); print the fixes, and write them with `apply`. Exit 1 when
    some error has no checked fix."""
    from .fixes import FixReport, propose_fixes
    from .fixes._capture import FirstCalls, StopScript
    from .fixes._loop import loop_fixes

    loaded = _load_script(script, "fix")
    if isinstance(loaded, int):
        return loaded
    path, code = loaded
    with FirstCalls() as first:
        try:
            _, error = exec_script(path, code, args, main_module(path))
        except StopScript:
            error = None
    sys.stdout.flush()
    if not first.calls:
        if error is not None:
            traceback.print_exception(type(error), error, script_frames(error.__traceback__))
        print(no_model_ran(), file=sys.stderr)
        return 1
    fixes = []
    for call in first.calls:
        fixes += propose_fixes(call.module, *call.args).fixes
    # The loop's own findings (a step between two backward calls): the script runs again, watched.
    model_errors = bool(fixes)
    loop, error = loop_fixes(path, args, model_errors=model_errors)
    fixes += loop
    report = FixReport(tuple(fixes))
    print(report.render())
    unexplained = error is not None and not fixes and _is_autograd_inplace_error(error)
    if unexplained:
        print(unexplained_inplace_error(), file=sys.stderr)
    elif error is not None and not model_errors:
        print(watched_run_failed(f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"),
              file=sys.stderr)
    if json_path:
        try:
            pathlib.Path(json_path).write_text(json.dumps(report.to_dict(), indent=2) + "\n", encoding="utf-8")
        except OSError as e:
            print(f"fxinplace fix: could not write --json {json_path!r}: {e}", file=sys.stderr)
            return 1
    if apply and report.checked:
        for written in report.apply():
            print(applied(written), file=sys.stderr)
    return 0 if len(report.checked) == len(report.fixes) and not unexplained else 1


def _fails(report: Report, watch: Watch, fail_on: str) -> bool:
    if fail_on == "never":
        return False
    return bool(report.hazards(fail_on) or watch.stale)


def _explain(error: BaseException, report: Report, width: int | None) -> str | None:
    if isinstance(error, FxInplaceError):  # the guard's and the backend's errors explain themselves
        return None
    if not _is_autograd_inplace_error(error):
        return None
    if report.hazards("error"):
        return predicted_inplace_error(report, width)
    return unexplained_inplace_error()


def _usage_error(text: str) -> int:
    print(text, file=sys.stderr)
    return USAGE_ERROR


# show ------------------------------------------------------------------------------------------

def show(report_path: str, width: int | None = None) -> int:
    path = pathlib.Path(report_path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        return _usage_error(f"fxinplace show: cannot read REPORT {report_path!r}: {e}")
    expected = "a report written by `fxinplace run --json PATH` or `Report.to_json()` (docs/report.md)"
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        return _usage_error(f"fxinplace show: {report_path!r} is not JSON ({e}); expected {expected}")
    try:
        report = Report.from_dict(data)
    except ValueError as e:
        return _usage_error(f"fxinplace show: {report_path!r} is not a report: {e}; expected {expected}")
    if width is None:
        width = shutil.get_terminal_size((100, 24)).columns
    if not report.graphs:
        print("fxinplace: no graphs in this report")
        return 0
    print("\n\n".join(render.render_graph(g, width=width or None, every_row=False) for g in report.graphs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
