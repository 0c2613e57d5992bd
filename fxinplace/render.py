"""Every word fxinplace prints about a graph: hazard messages, fixes, rewrites, tables, JSON.

The analyses produce records (`fxinplace.facts`); this module turns them into text and
dicts, and gives task positions their names. Nothing here decides a fact.
"""

from __future__ import annotations

import dataclasses
import textwrap
from typing import TYPE_CHECKING, Any, Sequence

from tabulate import tabulate

from ._sources import SourceLocation
from .facts import (Detail, EagerReason, Fix, FixKind, FixStatus, Hazard, HazardCode, KeptReason, Mutation,
                    NoFixReason, OutputKind, Patch, Rewrite, RewriteKind, Saved, Site, Target)

if TYPE_CHECKING:
    from .report import GraphReport

__all__ = ["message", "fix_text", "patch_text", "patch_dict", "semantics", "source_dict", "rewrite_text",
           "render_graph", "graph_dict", "hazard_dict", "hazard_lines", "SCHEMA_VERSION"]

SCHEMA_VERSION = 4  # of `Report.to_dict()`; docs/report.schema.json describes it

AUTOGRAD_ERROR = "one of the variables needed for gradient computation has been modified by an inplace operation"

_FIX_TEXT = {
    Fix.WRITE_OUT_OF_PLACE: "write the op out of place (`h = h + y` instead of `h += y`, `F.relu(h)` instead of "
    "`h.relu_()`, `inplace=False`), or clone the tensor before the write",
    Fix.NO_GRAD_UPDATE: "wrap it in `torch.no_grad()` if it is a deliberate update, or write `x = x * 2` instead "
    "of `x.mul_(2)`",
    Fix.CLONE_THE_VIEW: "clone the view first, or write the op out of place",
    Fix.ORDER_THE_TASKS: "decide which task should see the new value: write a copy (`h = h.clone()`) for the "
    "others, or write the op out of place",
    Fix.NONE: "",
}

_SEMANTICS = {
    FixKind.OUT_OF_PLACE: "same values, one extra tensor: the name now holds a new tensor, and whatever else "
                          "holds the old one (a view, a list, the caller) keeps the old values",
    FixKind.INPLACE_FALSE: "same values, one extra tensor per call: the input is no longer overwritten",
    FixKind.CLONE_FIRST: "same values, one extra copy: the write lands in the copy, the tensor autograd saved "
                         "keeps its values, and whatever else holds the old tensor (a view, a list, the caller) "
                         "no longer sees the write",
    FixKind.MOVE_STEP: "same gradients: the step runs after the backward that needed the old weights, and no "
                       "backward in between adds to its parameters' gradients",
}

_NO_FIX = {
    NoFixReason.NO_SOURCE: "no line of yours made this write (it is in torch's code, or the file is gone)",
    NoFixReason.UNKNOWN_STATEMENT: "the statement is not one fxinplace rewrites safely (only a plain local name "
                                   "or a view taken of it on the line is: `h.relu_()`, `h += b`, `h[i] = v`, "
                                   "`h.view(-1).mul_(2)`, `inplace=True`)",
    NoFixReason.NOT_A_METHOD: "the line is in no method of the model's modules (the check swaps the method)",
    NoFixReason.NO_CONSTRUCTOR: "no constructor call of yours builds the module with `inplace=True`",
    NoFixReason.HAZARD_REMAINS: "the patched model still has the hazard",
    NoFixReason.NEW_ERROR: "the patched model has a new error",
    NoFixReason.DIFFERENT_GRADIENTS: "the patched model does not train like the functionalized original",
    NoFixReason.NOT_A_STEP: "not every write to it is an optimizer step (fxinplace moves only `opt.step()` "
                            "statements)",
    NoFixReason.SEVERAL_STEPS: "several step statements wrote it: which one to move is yours to decide",
    NoFixReason.NOT_IN_SCRIPT: "the step or the backward is not in the script itself (the check runs the patched "
                               "script)",
    NoFixReason.NOT_ONE_BLOCK: "the step and the backward are not statements of one block, the step first",
    NoFixReason.MOVES_OVER: "between the step and the backward is more than backward calls and other optimizers' "
                            "`zero_grad()`: moving the step would reorder it too",
    NoFixReason.STEP_NOT_RUN: "the moved step never ran in the check",
    NoFixReason.NO_GRADIENT: "moved after that backward, the step would see no gradient",
    NoFixReason.LOSES_GRADIENTS: "moved after that backward, the step would lose gradients it takes now (a "
                                 "`zero_grad()` it would run after clears them)",
    NoFixReason.NEW_WARNING: "the patched script warns where the original did not",
}

# Hazards PyTorch itself refused while Dynamo traced (`fxinplace.audit` reports them).
_REFUSED = {
    HazardCode.LEAF_INPLACE: "in-place op on a leaf tensor that requires grad (a parameter or an input with "
    "requires_grad=True) while grad mode is on: autograd forbids it",
    HazardCode.VIEW_INPLACE: "in-place op on a view that autograd forbids modifying (a view created in no_grad "
    "mode, or one of several views returned by one op such as unbind/split/chunk)",
}

_UNSEEN = {
    Detail.CHECKPOINT_RECOMPUTE: "while the checkpoint region is to be recomputed: backward's recomputation reads "
    "(or replays) the write, and checkpoint checks no versions (compiled by AOTAutograd, as with aot_eager or "
    "inductor, the region is traced as plain code and backward fails instead)",
    Detail.FUNCTION_FORWARD: "inside the custom autograd.Function's forward, after forward used it: "
    "`ctx.save_for_backward` keeps the tensor, not its value, and versions are checked only from the end of forward",
    Detail.UNSEEN_PATH: "through a path autograd does not see",
}


def fix_text(hazard: Hazard) -> str:
    """The advice for `hazard` in one sentence ("" for a note)."""
    return _FIX_TEXT[hazard.fix]


def semantics(patch: Patch) -> str:
    """What a checked edit changes, in one sentence."""
    if patch.kind is FixKind.MOVE_STEP and patch.gradients_from:
        calls = " and ".join(f"`{s.code}` at {s}" if s.code else str(s) for s in patch.gradients_from)
        return (f"the step now also takes the gradients {calls} adds to its parameters; where they must not count "
                "(a GAN's discriminator step, which must not learn from the generator's loss), run the forward "
                "again after the step instead")
    return _SEMANTICS[patch.kind]


def patch_text(patch: Patch, advice: str) -> str:
    """One line: the checked fix and what it changes, or why there is none (then `advice`)."""
    where = f" at {SourceLocation(patch.file, patch.line or 0, '')}" if patch.file else ""
    if patch.status is FixStatus.CHECKED:
        return f"fix ({patch.kind.value}){where}: {semantics(patch)}"
    why = _NO_FIX[patch.reason] + (f" ({patch.detail})" if patch.detail else "")
    status = "no checked fix" if patch.status is FixStatus.CHECK_FAILED else "no safe edit"
    return f"{status}{where}: {why}" + (f"; advice: {advice}" if advice else "")


def patch_dict(patch: Patch, advice: str) -> dict[str, Any]:
    """A fix as the report's JSON writes it (docs/report.schema.json, `patch`)."""
    checked = patch.status is FixStatus.CHECKED
    return {
        "status": patch.status.value,
        "kind": patch.kind.value if patch.kind else None,
        "semantics": semantics(patch) if patch.kind and checked else None,
        "file": patch.file,
        "line": patch.line,
        "diff": patch.diff if checked else "",
        "reason": patch.reason.value if patch.reason else None,
        "detail": patch.detail,
        "gradients_from": [source_dict(s) for s in patch.gradients_from],
        "text": patch_text(patch, advice),
    }


def message(hazard: Hazard, names: Sequence[str] = ()) -> str:
    """The hazard in words; `names` are the task names by output position."""
    text = _message(hazard, names)
    return f"removed by functionalize: {text}" if hazard.removed_by_rewrite else text


def _message(h: Hazard, names: Sequence[str]) -> str:
    code, op = h.code, _op(h.mutated_by)
    if code in _REFUSED:
        where = f" at {h.source}" if h.source else ""
        return f"{_REFUSED[code]}. {fix_text(h)[0].upper()}{fix_text(h)[1:]}. PyTorch said: {h.pytorch_said}{where}"
    if h.detail is Detail.CROSSED_BREAK:
        if h.saved_by is None:
            saved_by = "an earlier graph"
        elif h.saved_by.graph is None:  # code Dynamo ran itself, between two graphs
            saved_by = f"{_op(h.saved_by)}, which Dynamo ran outside the graphs"
        else:
            saved_by = f"{_op(h.saved_by)} in graph {h.saved_by.graph}"
        start = f"{_saved_name(h.target)} was saved for backward by {saved_by}, crossed a graph break, and is"
        if code is HazardCode.SAVED_THEN_MUTATED:
            return f"{start} modified in place by {op}: backward will fail with \"{AUTOGRAD_ERROR}\""
        return (f"{start} overwritten by {op} through a path autograd does not see: gradients silently use "
                "the new values")
    if code in (HazardCode.SAVED_THEN_MUTATED, HazardCode.HIDDEN_WRITE_TO_SAVED):
        saved = _saved_words(h.saved)
        verb = "were" if len(saved) > 1 else "was"
        needed = task_names(h.saved_by.tasks if h.saved_by else (), names)
        start = f"{' and '.join(saved)} {verb} saved for backward by {_op(h.saved_by)}"
        if needed:
            start += f" (needed by the backward of {_tasks(h.saved_by.tasks, names)})"
        if h.stored_only:
            visible = code is HazardCode.SAVED_THEN_MUTATED
            outcome = f"fail with \"{AUTOGRAD_ERROR}\"" if visible else "silently use the new values"
            return (f"{start}, then {'modified in place' if visible else 'overwritten'} by {op}; only the backward of "
                    "what this forward keeps and does not return (an attribute under \"stored, not returned\", or a "
                    f"value kept past a graph break) needs it: a loss computed from that would {outcome}")
        if code is HazardCode.SAVED_THEN_MUTATED:
            return f"{start}, then modified in place by {op}: backward will fail with \"{AUTOGRAD_ERROR}\""
        return (f"{start}, then overwritten by {op} {_UNSEEN[h.detail or Detail.UNSEEN_PATH]}: backward raises "
                "nothing and silently computes gradients from the new values")
    name = h.target.name if h.target else "?"
    how = _how(h.mutated_by)
    if code is HazardCode.CROSS_TASK_WRITE:
        others = _tasks(h.other_tasks, names)
        when = []
        for label in ("before", "after"):
            at = sorted({_at(site) for when_, site in h.readers if when_ == label})
            if at:
                when.append(f"{label} the write at {', '.join(at)}")
        writers = _tasks(h.mutated_by.tasks if h.mutated_by else (), names)
        return (f"{writers} writes {h.target} with {op}, and {others} reads it too ({'; '.join(when)}): "
                f"what {others} sees depends on the order the tasks run in")
    if code is HazardCode.PARAMETER_WRITE:
        if h.detail is Detail.NO_GRAD_COPY:
            return (f"{op} updates parameter `{name}`{how}, which requires no grad: a deliberate update (a momentum "
                    "or EMA copy), no gradient or optimizer state involved")
        if h.detail is Detail.REBIND:
            return (f"{op} rebinds parameter `{name}` to a new tensor outside autograd: its gradient skips what "
                    "computed the new value, and the optimizer's state for it (momentum, Adam's moments) was built "
                    "for the old value")
        return f"{op} writes parameter `{name}` in place{how}: the optimizer, every task and the next step see the new value"
    if code is HazardCode.INPUT_WRITE:
        return f"{op} writes the caller's input `{name}` in place{how}: the caller sees the change"
    if code is HazardCode.BUFFER_UPDATE:
        return f"{op} updates buffer `{name}`{how}"
    return f"{op} writes {h.target}: no saved tensor or other task is affected"


def hazard_lines(hazards: Sequence[Hazard], names: Sequence[str] = ()) -> list[str]:
    """One line per hazard: `  ERROR [code] message`; one op that overwrites several tensors
    one saving op saved (batch norm's two running statistics) is one line. A hazard with a
    checked fix (or the reason there is none) is followed by `    fix ...`, once after the
    hazards of one write."""
    merged, lines = _merged(hazards), []
    for i, h in enumerate(merged):
        lines.append(f"  {h.severity.value.upper()} [{h.code.value}] {message(h, names)}")
        following = merged[i + 1].patch if i + 1 < len(merged) else None
        if h.patch is not None and h.patch != following:
            lines.append(f"    {patch_text(h.patch, fix_text(h))}")
    return lines


def _merged(hazards: Sequence[Hazard]) -> list[Hazard]:
    merged: dict[tuple, Hazard] = {}
    for h in hazards:
        if h.code not in (HazardCode.SAVED_THEN_MUTATED, HazardCode.HIDDEN_WRITE_TO_SAVED) or h.saved_by is None:
            merged[(id(h),)] = h
            continue
        key = (h.code, h.severity, h.mutated_by, h.saved_by, h.detail, h.removed_by_rewrite)
        if key in merged:
            first = merged[key]
            merged[key] = dataclasses.replace(first, saved=tuple(dict.fromkeys(first.saved + h.saved)))
        else:
            merged[key] = h
    return list(merged.values())


def rewrite_text(rewrite: Rewrite | None, target: Target | None = None, removed: Sequence[HazardCode] = ()) -> str:
    """What functionalize did with one mutation, in words ("-" when it did not run)."""
    if rewrite is None:
        return "-"
    kind = target.kind if target else "input"
    if rewrite.kind is RewriteKind.KEPT_IN_PLACE:
        return f"kept in place: {_KEPT[rewrite.reason](*rewrite.detail)}"
    if rewrite.kind is RewriteKind.NOT_APPLIED:
        return "not applied: the compiler failed"
    if rewrite.kind is RewriteKind.NOTHING_TO_WRITE_BACK:
        text = f"nothing to write back: no ATen op writes {kind} {target.name if target else '?'}"
    elif rewrite.kind is RewriteKind.WRITTEN_BACK and rewrite.saved_earlier:
        text = f"written back to {kind} (an earlier graph saved it)"
    else:
        text = f"written back to {kind}" if rewrite.kind is RewriteKind.WRITTEN_BACK else "rewritten"
        if removed:
            text += " (removes " + ", ".join(sorted({c.value for c in removed})) + ")"
    if rewrite.checkpoints_inlined:
        text += "; checkpoint regions inlined: their activations are kept, not recomputed"
    return text


_KEPT = {
    KeptReason.NO_ERROR_HAZARD: lambda: "no error-level hazard in this graph",
    KeptReason.OWN_BACKWARD: lambda name: f"`{name}` in this graph has a backward of its own, which the rewrite "
    "would lose",
    KeptReason.INSIDE_FUNCTION: lambda name: f"written by `{name}`'s own forward, which the rewrite keeps whole: "
    "the write lands in a copy of the argument, which what the Function saved still is",
    KeptReason.NO_ATEN_WRITE: lambda: "no write at ATen level",
    KeptReason.SHARED_INPUT: lambda a, b: f"written input `{a}` shares memory with input `{b}`",
    KeptReason.UNTESTED_TORCH: lambda version, tested: f"torch {version} is outside the tested range (torch "
    f"{tested}); options={{'untested_torch': True}} rewrites anyway",
    KeptReason.FAILED: lambda error: f"functionalize failed ({error})",
}


def render_graph(graph: GraphReport, compact: bool = False, width: int | None = None, every_row: bool = True) -> str:
    """The graph's table and its notable hazards.

    `compact` leaves out the view chain, code and module columns; `width` wraps cells and
    messages to fit that many columns (None: one line per row, however long); without
    `every_row`, safe writes that repeat (batch norm's running statistics in every block)
    are one row with a count.
    """
    names = graph.task_names
    head = f"fxinplace: graph {graph.compile_id} `{graph.function}` (graph ended: {graph.reason})"
    if graph.analysis_error:
        return _fill(f"{head}: analysis failed ({graph.analysis_error}); compiled without it", width)
    lines = [head]
    if graph.ran_eagerly is EagerReason.COMPILER_FAILED:
        lines.append(f"not compiled: the compiler failed ({graph.compile_error}); the graph runs op by op in "
                     "eager instead, as the table says it was rewritten")
    elif graph.ran_eagerly is EagerReason.REFUSED_WHEN_RUN:
        lines.append("not compiled: AOTAutograd refuses this graph when it runs (written inputs that share memory, "
                     "or one made as one of several views); the graph runs op by op in eager instead, as the table "
                     "says it was rewritten or kept")
    elif graph.ran_eagerly is EagerReason.SAVED_BETWEEN_GRAPHS:
        lines.append("not compiled: it writes what code Dynamo ran between two graphs saved for backward; op by op, "
                     "in eager, its backward reaches that code only where a loss does, as in eager (compiled, its one "
                     "backward node would)")
    elif graph.compile_error:
        lines.append(f"not compiled: the compiler failed ({graph.compile_error}); what runs instead is "
                     "Dynamo's fallback, with the in-place writes as written")
    lines += _task_lines(graph)
    if graph.shared_parameters:
        lines.append("shared parameters: " + _shared(graph.shared_parameters, grouped=not every_row))
    lines = [_fill(line, width) for line in lines]
    if not graph.mutations:
        lines.append("no in-place mutations")
    else:
        headers = ["#", "op", "writes", "via", "where", "code", "module", "tasks", "hazard"]
        if graph.functionalized:
            headers.append("rewrite")
        rows = [_row(i, m, names, graph.functionalized, graph.shared_parameters) for i, m in enumerate(graph.mutations)]
        if not every_row:
            rows = _group_repeats(rows, graph.mutations, names)
        if compact:
            keep = [i for i, h in enumerate(headers) if h not in ("via", "code", "module")]
            headers, rows = [headers[i] for i in keep], [[row[i] for i in keep] for row in rows]
        if width:
            headers, rows = _fit_columns(headers, rows, width)
            caps = _column_caps(headers, rows, width)
            rows = [[_wrap(cell, cap) for cell, cap in zip(row, caps)] for row in rows]
        lines.append(tabulate(rows, headers=headers, tablefmt="simple"))
        legend = _legend(graph.mutations, grouped=len(rows) < len(graph.mutations), via="via" in headers)
        if legend:
            lines.append(_fill(legend, width))
    lines += [_fill(line, width, indent=6) for line in
              hazard_lines([h for h in graph.all_hazards() if h.severity.value != "info"], names)]
    return "\n".join(lines)


# Columns that may wrap, in the order they give up room (the op and the row number never wrap).
_WRAPPABLE = ("code", "writes", "rewrite", "tasks", "via")
_NARROWEST = 12


def _legend(mutations: Sequence[Mutation], grouped: bool, via: bool) -> str:
    """What the table's marks mean, for the marks its mutations give it."""
    said = []
    if any(m.site.hidden for m in mutations):
        said.append("[hidden]: a write autograd's version counter does not see (`.data`, batch norm's running statistics)")
    if any(m.site.no_grad for m in mutations):
        said.append("[no_grad]: under torch.no_grad()")
    if grouped:
        said.append("xN: N writes alike, all safe (rows=\"all\" lists each)")
    if via and any(m.view_chain for m in mutations):
        said.append("via: the views from the target to the tensor written")
    return "  (" + "; ".join(said) + ")" if said else ""


# Columns a narrow table leaves out, in this order: empty ones, then the source line (the
# `where` column still says file and line; the `file` table and JSON keep everything).
_OPTIONAL = ("via", "code")


def _fit_columns(headers: list[str], rows: list[list], width: int) -> tuple[list[str], list[list]]:
    """The table for a terminal: one fact per line in a cell (the module under the line, each
    hazard code, "(shared)"), empty columns left out, and the source line when it does not fit."""
    def drop(name):
        i = headers.index(name)
        return headers[:i] + headers[i + 1:], [r[:i] + r[i + 1:] for r in rows]

    col = {h: i for i, h in enumerate(headers)}
    stacked = []
    for r in rows:
        r = list(r)
        if "module" in col and str(r[col["module"]]) not in ("-", ""):
            r[col["where"]] = f"{r[col['where']]}\n({r[col['module']]})"
        r[col["hazard"]] = str(r[col["hazard"]]).replace(", ", "\n")
        r[col["tasks"]] = str(r[col["tasks"]]).replace(" (shared)", "\n(shared)").replace(" (read by", "\n(read by")
        kind, _, rest = str(r[col["writes"]]).partition(" ")
        r[col["writes"]] = kind + "\n" + rest.replace(" (also ", "\n(also ") if rest else kind
        stacked.append(r)
    rows = stacked
    if "module" in headers:
        headers, rows = drop("module")
        headers[headers.index("where")] = "where (module)"
    for name in _OPTIONAL:  # a column with nothing in it says nothing
        if name in headers and all(str(r[headers.index(name)]) in ("-", "") for r in rows):
            headers, rows = drop(name)
    if "code" in headers and len(tabulate(rows, headers=headers, tablefmt="simple").splitlines()[0]) > width:
        headers, rows = drop("code")
    return headers, rows


def _column_caps(headers: list[str], rows: list[list], width: int) -> list[int | None]:
    """Per column, the widest it may be (None: as wide as it is) so the table fits `width`
    (tabulate pads a header by 2). The paths, ops and codes wrap only when the rest cannot
    make room."""
    natural = [max([len(str(h)) + 2] + [max((len(part) for part in str(r[i]).splitlines()), default=0) for r in rows])
               for i, h in enumerate(headers)]
    for wrappable_names in (_WRAPPABLE, tuple(h for h in headers if h != "#")):
        wrappable = [i for i, h in enumerate(headers) if h in wrappable_names]
        room = width - sum(w for i, w in enumerate(natural) if i not in wrappable) - 2 * (len(headers) - 1)
        if sum(natural[i] for i in wrappable) <= room:
            return [None] * len(headers)
        cap = max(natural[i] for i in wrappable)
        while cap > _NARROWEST and sum(min(natural[i], cap) for i in wrappable) > room:
            cap -= 1
        if sum(min(natural[i], cap) for i in wrappable) <= room:
            break
    return [cap if i in wrappable and natural[i] > cap else None for i in range(len(headers))]


def _wrap(cell: Any, cap: int | None) -> Any:
    # Each line of a cell wrapped at spaces, a word wider than the cap after its dots
    # (`trunk.bn.` / `running_mean`); hyphenated codes stay whole.
    if cap is None:
        return cell
    out = []
    for line in str(cell).splitlines() or [""]:
        words = []
        for word in line.split(" "):
            while len(word) > cap:
                cut = word.rindex(".", 0, cap) + 1 if "." in word[:cap] else cap
                words.append(word[:cut])
                word = word[cut:]
            words.append(word)
        current = ""
        for word in words:
            if current and len(current) + 1 + len(word) > cap:
                out.append(current)
                current = word
            else:
                current = f"{current} {word}" if current and not current.endswith(".") else current + word
        out.append(current)
    return "\n".join(out)


def _fill(line: str, width: int | None, indent: int = 4) -> str:
    if not width or len(line) <= width:
        return line
    lead = line[: len(line) - len(line.lstrip())]
    return textwrap.fill(line.strip(), width, initial_indent=lead, subsequent_indent=" " * indent,
                         break_on_hyphens=False, break_long_words=False)


# Repeats of the same safe write (all its hazards notes) become one row from this many.
_GROUP_FROM = 4


def _group_repeats(rows: list[list], mutations: Sequence[Mutation], names: Sequence[str]) -> list[list]:
    """Safe writes that repeat, one row each kind: `batch_norm [hidden]` writing `*.running_mean`
    in 20 modules is one row `x20`; rows with a warning or an error stay as they are."""
    def key(m: Mutation) -> tuple | None:
        if any(h.severity.value != "info" for h in m.hazards):
            return None
        return (m.op, m.site.hidden, m.site.no_grad, m.target.kind, _kind_of(m.target),
                frozenset(h.code for h in m.hazards), m.rewrite, m.removed)

    groups: dict[tuple, list[int]] = {}
    for i, m in enumerate(mutations):
        k = key(m)
        if k is not None:
            groups.setdefault(k, []).append(i)
    folded = {k: ids for k, ids in groups.items() if len(ids) >= _GROUP_FROM}
    first = {ids[0]: k for k, ids in folded.items()}
    hidden = {i for ids in folded.values() for i in ids[1:]}
    out = []
    for i, row in enumerate(rows):
        if i in hidden:
            continue
        if i in first:
            ids = folded[first[i]]
            ms = [mutations[j] for j in ids]
            target = ms[0].target
            writes = f"intermediate (output of {target.produced_by})" if target.kind == "intermediate" else \
                f"{target.kind} *.{_kind_of(target)}"
            modules = sorted({m.module for m in ms if m.module})
            tasks = task_names(frozenset().union(*(m.site.tasks for m in ms)), names)
            row = [f"x{len(ids)}", row[1], writes, row[3],
                   _places(ms), row[5], f"{len(modules)} modules" if modules else "-",
                   ", ".join(tasks) or "-", *row[8:]]
        out.append(row)
    return out


def _places(mutations: Sequence[Mutation]) -> str:
    lines = list(dict.fromkeys(str(m.source) if m.source else "?" for m in mutations))
    return lines[0] if len(lines) == 1 else f"{lines[0]} and {len(lines) - 1} more"


def _kind_of(target: Target) -> str:
    # What makes repeats alike: a state's last name (`running_mean`), an intermediate's op.
    return target.produced_by or "" if target.kind == "intermediate" else target.name.rsplit(".", 1)[-1]


def _task_lines(graph: GraphReport) -> list[str]:
    lines = []
    if graph.tasks:
        lines.append("tasks: " + ", ".join(graph.tasks))
    live = [r.path or "(a value on the stack)" for r in graph.outputs if r is not None and r.kind is OutputKind.LIVE]
    if live and not graph.tasks:
        lines.append("tasks: cannot be told in this graph: it ends at a graph break, and its outputs ("
                     + ", ".join(f"`{p}`" if p.isidentifier() else p for p in dict.fromkeys(live))
                     + ") are values the code after the break goes on with; the losses come later")
    stored = [r.path for r in graph.outputs if r is not None and r.kind is OutputKind.STORED]
    if stored:
        lines.append("stored, not returned (no task's loss comes from them here): "
                     + ", ".join(f"`.{p}`" for p in dict.fromkeys(stored)))
    return lines


def _shared(shared: dict[str, tuple[str, ...]], grouped: bool) -> str:
    """`p (tasks); ...`; grouped, the parameters under one top-level module that the same tasks
    read are one entry: `body.* (60 parameters: cls, dense)`."""
    if not grouped:
        return "; ".join(f"{p} ({', '.join(t)})" for p, t in shared.items())
    by_prefix: dict[tuple[str, tuple[str, ...]], list[str]] = {}
    for p, t in shared.items():
        by_prefix.setdefault((p.split(".", 1)[0] if "." in p else p, t), []).append(p)
    entries = []
    for (prefix, tasks), params in by_prefix.items():
        if len(params) >= _GROUP_FROM:
            entries.append(f"{prefix}.* ({len(params)} parameters: {', '.join(tasks)})")
        else:
            entries += [f"{p} ({', '.join(tasks)})" for p in params]
    return "; ".join(entries)


def _row(i: int, m: Mutation, names: Sequence[str], functionalized: bool,
         shared_parameters: dict[str, tuple[str, ...]] | None = None) -> list:
    flags = (["hidden"] if m.site.hidden else []) + (["no_grad"] if m.site.no_grad else [])
    also = f" (also {', '.join(m.target.aliases)})" if m.target.aliases else ""
    tasks = task_names(m.site.tasks, names)
    row = [
        i,
        m.op + (f" [{', '.join(flags)}]" if flags else ""),
        _target_cell(m.target) + also,
        " > ".join(m.view_chain) or "-",
        _where(m.site),
        m.source.code if m.source else "",
        m.module or "-",
        _tasks_cell(tasks, m, shared_parameters or {}, names),
        ", ".join(sorted({h.code.value for h in m.hazards})) or "-",
    ]
    if functionalized:
        row.append(rewrite_text(m.rewrite, m.target, _removed_codes(m)))
    return row


def _removed_codes(m: Mutation) -> list[HazardCode]:
    return [h.code for h in m.hazards if h.removed_by_rewrite]


def _tasks_cell(tasks: tuple[str, ...], m: Mutation, shared_parameters: dict[str, tuple[str, ...]],
                names: Sequence[str | None]) -> str:
    # One task writing what others read (a parameter, a buffer): say who else reads it, not a bare "(shared)".
    if not tasks:
        return "-"
    readers = (*shared_parameters.get(m.target.name, ()), *task_names(m.read_by, names))
    others = [t for t in dict.fromkeys(readers) if t not in tasks]
    if m.shared and len(tasks) == 1 and others:
        return f"{tasks[0]} (read by {', '.join(others)} too)"
    return ", ".join(tasks) + (" (shared)" if m.shared else "")


def _target_cell(target: Target) -> str:
    # An intermediate torch's code named (`input_1`) is shown by the op that made it.
    if target.kind == "intermediate" and not target.user_named:
        return f"intermediate (output of {target.produced_by})"
    return f"{target.kind} {target.name}"


def task_names(positions, names: Sequence[str | None]) -> tuple[str, ...]:
    """The names of the tasks at `positions`, sorted, each once (positions that are no task left out)."""
    found = {names[i] if i < len(names) else f"output[{i}]" for i in positions}
    return tuple(sorted(found - {None}))


def compiler_inplace_error(checkpoint_writes: Sequence[Site] = (), found: bool = True) -> str:
    """The head of the `HazardError` that replaces the compiler's in-place autograd error;
    `found`: the audit found an error-level hazard in the graph."""
    failed = f"fxinplace: the compiler failed with PyTorch's in-place autograd error (\"{AUTOGRAD_ERROR}\")"
    text = f"{failed}. This is why:"
    if not found and not checkpoint_writes:
        return (f"{failed}, and the audit found no hazard in this graph: the write "
                "happened outside it (in code Dynamo ran eagerly, after a graph break, in an optimizer step, "
                "in the training loop). `fxinplace.guard` watches the loop at run time, and "
                "`python -m fxinplace run train.py` runs a whole script with it and this audit (docs/guard.md).")
    if checkpoint_writes:
        lines = ", ".join(sorted({f"`{s.op}` at {s.source or '?'}" for s in checkpoint_writes}))
        text += (f" {lines} writes the output of a checkpoint region after the region. Eager PyTorch recomputes "
                 "what the region saved, so it trains this and the audit predicts no hazard; compiled by "
                 "AOTAutograd (aot_eager, inductor) the region is plain code, and the write breaks what it saved. "
                 "Write that line out of place.")
    return text


# --- dicts (JSON) ------------------------------------------------------------------------

def graph_dict(graph: GraphReport) -> dict[str, Any]:
    names = graph.task_names
    return {
        "compile_id": graph.compile_id,
        "function": graph.function,
        "reason": graph.reason,
        "tasks": list(graph.tasks),
        "outputs": [{"kind": r.kind.value, "path": r.path} if r is not None else None for r in graph.outputs],
        "shared_parameters": {k: list(v) for k, v in graph.shared_parameters.items()},
        "mutations": [_mutation_dict(m, names) for m in graph.mutations],
        "hazards": [_hazard_dict(h, names) for h in graph.hazards],
        "analysis_error": graph.analysis_error,
        "functionalized": graph.functionalized,
        "compile_error": graph.compile_error,
        "ran_eagerly": graph.ran_eagerly is not None,
        "ran_eagerly_because": graph.ran_eagerly.value if graph.ran_eagerly else None,
    }


def _mutation_dict(m: Mutation, names: Sequence[str]) -> dict[str, Any]:
    return {
        "node": m.node,
        "op": m.op,
        "target": _target_dict(m.target),
        "view_chain": list(m.view_chain),
        "source": source_dict(m.source),
        "module": m.module,
        "module_type": m.site.module_type,
        "tasks": list(task_names(m.site.tasks, names)),
        "read_by": list(task_names(m.read_by, names)),
        "shared": m.shared,
        "autograd_visible": m.autograd_visible,
        "under_no_grad": m.under_no_grad,
        "hazards": [_hazard_dict(h, names) for h in m.hazards],
        "rewrite": None if m.rewrite is None else {
            "kind": m.rewrite.kind.value,
            "reason": m.rewrite.reason.value if m.rewrite.reason else None,
            "text": rewrite_text(m.rewrite, m.target, _removed_codes(m)),
            "detail": list(m.rewrite.detail),
            "saved_earlier": m.rewrite.saved_earlier,
            "checkpoints_inlined": m.rewrite.checkpoints_inlined,
        },
    }


def hazard_dict(h: Hazard, names: Sequence[str | None] = ()) -> dict[str, Any]:
    """One hazard as the report's JSON writes it (docs/report.schema.json, `hazard`)."""
    return _hazard_dict(h, names)


def _hazard_dict(h: Hazard, names: Sequence[str]) -> dict[str, Any]:
    return {
        "code": h.code.value,
        "severity": h.severity.value,
        "target": _target_dict(h.target),
        "saved_by": _site_dict(h.saved_by, names),
        "mutated_by": _site_dict(h.mutated_by, names),
        "detail": h.detail.value if h.detail else None,
        "stored_only": h.stored_only,
        "message": message(h, names),
        "fix": fix_text(h) or None,
        "removed_by_rewrite": h.removed_by_rewrite,
        # The facts the message is made of, so that a saved report renders as it was printed.
        "saved": [{"target": _target_dict(s.target), "made_at": _site_dict(s.made_at, names)} for s in h.saved],
        "readers": [{"when": when, "site": _site_dict(site, names)} for when, site in h.readers],
        "other_tasks": list(task_names(h.other_tasks, names)),
        "pytorch_said": h.pytorch_said,
        "patch": patch_dict(h.patch, fix_text(h)) if h.patch is not None else None,
    }


def _target_dict(target: Target | None) -> dict[str, Any] | None:
    if target is None:
        return None
    found: dict[str, Any] = {"kind": target.kind, "name": target.name}
    if target.produced_by:
        found["produced_by"] = target.produced_by
    if target.aliases:
        found["aliases"] = list(target.aliases)
    if not target.user_named:
        found["user_named"] = False
    return found


def _site_dict(site: Site | None, names: Sequence[str]) -> dict[str, Any] | None:
    if site is None:
        return None
    source = site.source
    return {
        "op": site.op,
        "file": source.file if source else None,
        "line": source.line if source else None,
        "module": site.module,
        "module_type": site.module_type,
        "tasks": list(task_names(site.tasks, names)),
        "graph": site.graph,
        "hidden": site.hidden,
        "no_grad": site.no_grad,
    }


def source_dict(source: SourceLocation | None) -> dict[str, Any] | None:
    """A source location as the report's JSON writes it."""
    if source is None:
        return None
    return {"file": source.file, "line": source.line, "code": source.code}


# --- phrases -------------------------------------------------------------------------------

def _op(site: Site | None) -> str:
    return f"`{site.op}` at {_at(site)}" if site else "an unknown op"


def _at(site: Site) -> str:
    where = _where(site) if site.source or site.module_type else "an unknown line"
    return f"{where} ({site.module})" if site.module else where


def _where(site: Site) -> str:
    # No line of the user's made the call: a torch module's own forward did (`nn.ReLU(inplace=True)`).
    if site.source:
        return str(site.source)
    return f"{site.module_type}.forward" if site.module_type else "?"


def _how(site: Site | None) -> str:
    if site is None:
        return ""
    return (" (hidden from autograd)" if site.hidden else "") + (" under no_grad" if site.no_grad else "")


def _tasks(positions, names: Sequence[str]) -> str:
    found = task_names(positions, names)
    if not found:
        return "no task"
    return ("task " if len(found) == 1 else "tasks ") + ", ".join(f"'{t}'" for t in found)


def _saved_name(target: Target | None) -> str:
    if target is None:
        return "a tensor"
    if target.kind == "intermediate":
        # A name torch's code gave (`input_2`) means nothing to the user: the op that made it does.
        return f"`{target.name}` (output of {target.produced_by})" if target.user_named else f"the output of {target.produced_by}"
    return str(target)


def _saved_words(saved: Sequence[Saved]) -> list[str]:
    words = []
    for s in saved:
        if s.target is None:
            words.append("a tensor")
        elif s.made_at is None:
            words.append(f"{s.target.kind} `{s.target.name}`")
        elif s.target.kind == "intermediate" and not s.target.user_named:
            words.append(f"the output of {_op(s.made_at)}")
        else:
            words.append(f"`{s.target.name}` (output of {_op(s.made_at)})")
    return list(dict.fromkeys(words))
