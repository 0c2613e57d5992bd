"""Run a training script as `python SCRIPT ARGS...` would: the command line's `run` and `fix`
run it once or several times (`fix` checks a patched loop by running the patched text)."""

from __future__ import annotations

import builtins
import pathlib
import sys
import types
from typing import Any, Sequence

__all__ = ["main_module", "exec_script", "script_frames"]


def main_module(path: pathlib.Path) -> types.ModuleType:
    """A fresh `__main__` for the script at `path`."""
    module = types.ModuleType("__main__")
    module.__dict__.update(__file__=str(path), __builtins__=builtins, __cached__=None)
    return module


def exec_script(path: pathlib.Path, code: types.CodeType, args: Sequence[str],
                module: types.ModuleType) -> tuple[int, Exception | None]:
    """Run the script as `python SCRIPT ARGS...` would; (its exit code, the exception it raised)."""
    saved_argv, saved_path, saved_main = sys.argv, list(sys.path), sys.modules.get("__main__")
    sys.argv = [str(path), *args]
    sys.path[0] = str(path.resolve().parent)  # as `python SCRIPT` puts it (`-m` put the working directory)
    sys.modules["__main__"] = module
    try:
        exec(code, module.__dict__)
    except SystemExit as e:
        return exit_code(e.code), None
    except Exception as e:
        return 1, e
    finally:
        sys.argv = saved_argv
        sys.path[:] = saved_path
        if saved_main is not None:
            sys.modules["__main__"] = saved_main
    return 0, None


def exit_code(code: Any) -> int:
    # As Python exits on `SystemExit(code)`: None is 0, an int itself, anything else printed, 1.
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)
    return 1


def script_frames(tb: types.TracebackType | None) -> types.TracebackType | None:
    """The traceback from the script's own frames: Python's own for a script starts there."""
    while tb is not None and tb.tb_frame.f_code.co_filename == __file__:
        tb = tb.tb_next
    return tb
