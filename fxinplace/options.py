"""The backend's options: what `torch.compile(..., options={...})` may pass, validated."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Callable

from .report import SEVERITIES

__all__ = ["AuditOptions", "parse_options", "OPTION_HELP"]

FUNCTIONALIZE_CHOICES = (False, True, "all", "hazards")
TABLE_CHOICES = ("full", "compact")
ROWS_CHOICES = ("grouped", "all")

OPTION_HELP = {
    "compiler": 'compiler to hand the graph to after the audit: "inductor" (default), "eager", '
    '"aot_eager", any registered backend name, or a backend callable',
    "print": "print one mutation table per graph to stdout (default True)",
    "file": "also append the tables to this file path; `{rank}` in it is replaced by the distributed rank (default None)",
    "strict": "raise instead of warning when the analysis itself fails (default False)",
    "tasks": "name tasks yourself: {task name: module prefix, e.g. 'heads.seg', or the output dict key, e.g. 'seg'}",
    "raise_on": 'raise HazardError at compile time for any hazard at or above this severity: '
    '"error", "warning" or "info" (default None: never)',
    "functionalize": 'rewrite mutations out of place before compiling: False (default), True or "all" '
    '(every mutation), "hazards" (only graphs with an error-level hazard are rewritten; other graphs keep '
    'their in-place ops)',
    "explain": "replace the compiler's in-place autograd error with fxinplace's explanation (default True)",
    "untested_torch": "let `functionalize` rewrite graphs on a torch release outside the tested range "
    "(default False: there it compiles them unchanged, since a changed torch internal shows as wrong gradients)",
    "table": '"full" (default) or "compact": the compact table leaves out the code, module and view-chain columns',
    "rows": '"grouped" (default): safe writes that repeat (batch norm in every block) print as one row with a count, '
    'and shared parameters by top-level module; "all": one row each (the `file` table always has every row)',
    "fixes": "with `fxinplace.audit` only: propose a checked fix for each error-level hazard (an edit of your "
    "file, checked on a copy of the model; docs/fixes.md), shown under the hazard and in its JSON (`patch`) "
    "(default False)",
    "width": "columns the printed table fits, wrapping long cells (default None: the terminal's width, 100 when "
    "stdout is not a terminal); 0: no wrapping",
}


@dataclass(frozen=True)
class AuditOptions:
    compiler: str | Callable = "inductor"
    print: bool = True
    file: str | None = None
    strict: bool = False
    tasks: dict[str, str] = field(default_factory=dict)
    raise_on: str | None = None
    functionalize: bool | str = False
    explain: bool = True
    table: str = "full"
    rows: str = "grouped"
    width: int | None = None
    untested_torch: bool = False
    fixes: bool = False

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def functionalize_mode(self) -> str | None:
        """None (off), "all" or "hazards"."""
        if self.functionalize is False:
            return None
        return "all" if self.functionalize is True else str(self.functionalize)


def parse_options(options: dict[str, Any] | None) -> AuditOptions:
    """Validate `options` and return them as `AuditOptions`; errors say what is allowed."""
    if options is None:
        return AuditOptions()
    if isinstance(options, AuditOptions):
        return options
    if not isinstance(options, dict):
        raise TypeError(f"inplace_audit: `options` must be a dict, got {type(options).__name__}")
    unknown = sorted(set(options) - set(OPTION_HELP))
    if unknown:
        allowed = "\n".join(f"  {k}: {v}" for k, v in OPTION_HELP.items())
        raise ValueError(
            f"inplace_audit: unknown option(s) {', '.join(f'`{k}`' for k in unknown)}. Allowed options:\n{allowed}"
        )
    for key, value in options.items():
        _check(key, value)
    return AuditOptions(**{k: (dict(v or {}) if k == "tasks" else v) for k, v in options.items()})


def _check(key: str, value: Any) -> None:
    def bad(expected: str) -> ValueError:
        return ValueError(f"inplace_audit: option `{key}` must be {expected}, got {value!r}. ({OPTION_HELP[key]})")

    if key in ("print", "strict", "explain", "untested_torch", "fixes"):
        if not isinstance(value, bool):
            raise bad("True or False")
    elif key == "table":
        if value not in TABLE_CHOICES:
            raise bad('"full" or "compact"')
    elif key == "rows":
        if value not in ROWS_CHOICES:
            raise bad('"grouped" or "all"')
    elif key == "width":
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            raise bad("None, 0 or a number of columns")
    elif key == "file":
        if value is not None and not isinstance(value, str):
            raise bad("a file path (str) or None")
    elif key == "tasks":
        if value is None:
            return
        if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
            raise bad("a dict mapping task names to module prefixes or output keys, e.g. {'seg': 'heads.seg'}")
    elif key == "raise_on":
        if value is not None and value not in SEVERITIES:
            raise bad(f"None or one of {', '.join(map(repr, SEVERITIES))}")
    elif key == "functionalize":
        if not any(value is c or (isinstance(c, str) and value == c) for c in FUNCTIONALIZE_CHOICES):
            raise bad('False, True, "all" or "hazards"')
    elif key == "compiler":
        if callable(value):
            return
        if not isinstance(value, str):
            raise bad("a backend name (str) or a backend callable")
        if value == "inplace_audit":
            raise bad("another backend than inplace_audit itself")
        from ._compat import list_backends, lookup_backend

        try:
            lookup_backend(value)
        except Exception as e:
            names = ", ".join(sorted(set(list_backends()) - {"inplace_audit"}))
            raise ValueError(
                f"inplace_audit: option `compiler` names no registered backend: {value!r}. Known backends: {names}"
            ) from e
