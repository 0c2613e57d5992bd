"""Source edits at the user's line, on the concrete syntax tree (libcst keeps comments and layout).

Each edit takes the file's text and the line of the write, and returns the new text, or None
when the statement there is not one it knows how to rewrite safely. Only plain local names
are rewritten (`h.relu_()`, `torch.relu_(h)`, `h += b`, `h[:, 0] = 0`, `h = F.relu(h, inplace=True)`): an
attribute (`self.buf.add_(1)`) would rebind the module's state, and an expression nobody
names (`f(x).add_(1)`) has no name to bind the new value to.
"""

from __future__ import annotations

import difflib
import os
from dataclasses import dataclass
from typing import Sequence

import libcst as cst
from libcst.metadata import MetadataWrapper, PositionProvider

import torch

from ..facts import FixKind, NoFixReason

__all__ = ["edit_statement", "flip_inplace_calls", "move_step", "MovedStep", "unified_diff"]

_AUG_OPS = {
    cst.AddAssign: cst.Add, cst.SubtractAssign: cst.Subtract, cst.MultiplyAssign: cst.Multiply,
    cst.DivideAssign: cst.Divide, cst.FloorDivideAssign: cst.FloorDivide, cst.ModuloAssign: cst.Modulo,
    cst.PowerAssign: cst.Power, cst.BitAndAssign: cst.BitAnd, cst.BitOrAssign: cst.BitOr,
    cst.BitXorAssign: cst.BitXor, cst.LeftShiftAssign: cst.LeftShift, cst.RightShiftAssign: cst.RightShift,
    cst.MatrixMultiplyAssign: cst.MatrixMultiply,
}


def edit_statement(source: str, line: int) -> tuple[str, FixKind] | None:
    """The file with the in-place statement at `line` written out of place, and how; None if
    no safe edit is known for it."""
    wrapper = MetadataWrapper(cst.parse_module(source))
    positions = wrapper.resolve(PositionProvider)
    finder = _StatementAt(line, positions)
    wrapper.visit(finder)
    if finder.found is None:
        return None
    parent, index, statement = finder.found
    edited = _out_of_place(statement, _imported_modules(wrapper.module))
    if edited is None:
        return None
    new_statements, kind = edited
    body = list(parent.body)
    body[index:index + 1] = new_statements
    module = wrapper.module.deep_replace(parent, parent.with_changes(body=body))
    return module.code, kind


def flip_inplace_calls(source: str, first: int, last: int, callee: str) -> tuple[str, int] | None:
    """`callee(..., inplace=True)` -> `inplace=False` for every such call between lines
    `first` and `last` (a constructor's body); the new text and the first line changed."""
    wrapper = MetadataWrapper(cst.parse_module(source))
    positions = wrapper.resolve(PositionProvider)
    flipper = _FlipInplace(first, last, callee, positions)
    module = wrapper.visit(flipper)
    return (module.code, min(flipper.lines)) if flipper.lines else None


@dataclass(frozen=True)
class MovedStep:
    text: str  # the file, the step moved
    line: int  # the step's new line
    # Lines first..last of the new text were lines first+by..last+by of the old one.
    first: int
    last: int
    by: int

    def original_line(self, line: int) -> int:
        """A line of the new text as the old text numbers it."""
        return line + self.by if self.first <= line <= self.last else line


def move_step(source: str, step_line: int, backward_line: int) -> MovedStep | NoFixReason:
    """The file with the statement `opt.step()` at `step_line` moved to just after the statement
    at `backward_line`, or why not: the two must be statements of one block, the step first, and
    only backward calls and other objects' `zero_grad()` may lie between (anything else, a
    scheduler's step, a forward, an EMA update, would run in another order)."""
    wrapper = MetadataWrapper(cst.parse_module(source))
    positions = wrapper.resolve(PositionProvider)
    steps, backwards = _StatementAt(step_line, positions), _StatementAt(backward_line, positions)
    wrapper.visit(steps)
    wrapper.visit(backwards)
    if steps.found is None or backwards.found is None:
        return NoFixReason.NOT_ONE_BLOCK
    (parent, i, step), (other, j, backward) = steps.found, backwards.found
    if parent is not other or j <= i:
        return NoFixReason.NOT_ONE_BLOCK
    stepped = _stepped_object(step)
    if stepped is None:
        return NoFixReason.NOT_A_STEP
    if not all(_may_move_over(s, stepped) for s in parent.body[i + 1:j + 1]):
        return NoFixReason.MOVES_OVER
    body = list(parent.body)
    body.insert(j, body.pop(i))  # right after the backward, which moved up to j - 1
    module = wrapper.module.deep_replace(parent, parent.with_changes(body=body))
    # The step's lines (its comments and blank lines above it go with it) leave from above the
    # backward's end, and come back below it.
    span = len(step.leading_lines) + positions[step].end.line - positions[step].start.line + 1
    first, last = positions[step].start.line - len(step.leading_lines), positions[backward].end.line - span
    return MovedStep(module.code, last + len(step.leading_lines) + 1, first, last, span)


def _stepped_object(line: cst.SimpleStatementLine) -> str | None:
    # `opt.step()`, `self.opt_d.step()`: the object stepped, as written; nothing else on the line.
    call = _only_call(line)
    if call is None or not isinstance(call.func, cst.Attribute) or call.func.attr.value != "step":
        return None
    return _code(call.func.value)


def _may_move_over(statement: cst.BaseStatement, stepped: str) -> bool:
    # A backward call, or `zero_grad()` of another object: the step's order against them is
    # what the move changes, and the check measures what that does to its gradients.
    call = _only_call(statement) if isinstance(statement, cst.SimpleStatementLine) else None
    if call is None or not isinstance(call.func, cst.Attribute):
        return False
    method = call.func.attr.value
    return method == "backward" or (method == "zero_grad" and _code(call.func.value) != stepped)


def _only_call(line: cst.SimpleStatementLine) -> cst.Call | None:
    if len(line.body) != 1 or not isinstance(line.body[0], cst.Expr) or not isinstance(line.body[0].value, cst.Call):
        return None
    return line.body[0].value


def _code(node: cst.CSTNode) -> str:
    return cst.Module(body=[]).code_for_node(node)


def unified_diff(file: str, original: str, patched: str) -> str:
    """`original` -> `patched` as a unified diff, with `git apply` paths (a/..., b/...) for a
    file under the working directory."""
    relative = os.path.relpath(file)
    old, new = (f"a/{relative}", f"b/{relative}") if not relative.startswith("..") else (file, file)
    return "".join(difflib.unified_diff(original.splitlines(True), patched.splitlines(True), fromfile=old, tofile=new))


class _StatementAt(cst.CSTVisitor):
    """The simple statement line starting at `line`, with its parent block and index there."""

    def __init__(self, line: int, positions) -> None:
        self.line, self.positions = line, positions
        self.found: tuple[cst.CSTNode, int, cst.SimpleStatementLine] | None = None

    def _look(self, block: cst.CSTNode) -> None:
        for i, statement in enumerate(block.body):
            if isinstance(statement, cst.SimpleStatementLine) and self.positions[statement].start.line == self.line:
                self.found = (block, i, statement)

    def visit_IndentedBlock(self, node: cst.IndentedBlock) -> None:
        self._look(node)

    def visit_Module(self, node: cst.Module) -> None:
        self._look(node)


def _out_of_place(line: cst.SimpleStatementLine,
                  imports: dict[str, str]) -> tuple[Sequence[cst.SimpleStatementLine], FixKind] | None:
    if len(line.body) != 1:
        return None  # `a.add_(1); b.mul_(2)`: leave a line with several statements alone
    (small,) = line.body

    def replaced(*statements: cst.BaseSmallStatement) -> list[cst.SimpleStatementLine]:
        first = line.with_changes(body=[statements[0]])
        rest = [cst.SimpleStatementLine(body=[s]) for s in statements[1:]]
        return [first, *rest]

    # `h.relu_()` -> `h = h.relu()`
    if isinstance(small, cst.Expr) and isinstance(small.value, cst.Call):
        call = small.value
        func = call.func
        # `torch.relu_(h)` -> `h = torch.relu(h)`: `torch` is a module, not a tensor to rebind
        module = _module_of(func.value, imports) if isinstance(func, cst.Attribute) else None
        if module is not None:
            if (call.args and call.args[0].keyword is None and not call.args[0].star
                    and isinstance(call.args[0].value, cst.Name) and _has_free_twin(module, func.attr.value)):
                new = call.with_changes(func=func.with_changes(attr=cst.Name(func.attr.value[:-1])))
                return replaced(cst.Assign([cst.AssignTarget(call.args[0].value)], new)), FixKind.OUT_OF_PLACE
        elif (isinstance(func, cst.Attribute) and isinstance(func.value, cst.Name)
              and _has_out_of_place(func.attr.value)):
            name = func.value
            new = call.with_changes(func=func.with_changes(attr=cst.Name(func.attr.value[:-1])))
            return replaced(cst.Assign([cst.AssignTarget(name)], new)), FixKind.OUT_OF_PLACE
        # `F.relu(h, inplace=True)` -> `h = F.relu(h, inplace=False)`
        if call.args and isinstance(call.args[0].value, cst.Name) and _inplace_keyword(call) is not None:
            name = call.args[0].value
            return replaced(cst.Assign([cst.AssignTarget(name)], _without_inplace(call))), FixKind.INPLACE_FALSE
    # `y = F.relu(h, inplace=True)` -> `inplace=False`
    if isinstance(small, cst.Assign) and isinstance(small.value, cst.Call) and _inplace_keyword(small.value) is not None:
        if not all(isinstance(t.target, cst.Name) for t in small.targets):
            return None
        return replaced(small.with_changes(value=_without_inplace(small.value))), FixKind.INPLACE_FALSE
    # `h += b` -> `h = h + b`
    if isinstance(small, cst.AugAssign) and isinstance(small.target, cst.Name) and type(small.operator) in _AUG_OPS:
        op = _AUG_OPS[type(small.operator)]()
        value = small.value
        if isinstance(value, (cst.BinaryOperation, cst.BooleanOperation, cst.Comparison, cst.IfExp, cst.Lambda)):
            value = value.with_changes(lpar=[cst.LeftParen()], rpar=[cst.RightParen()])
        return replaced(cst.Assign([cst.AssignTarget(small.target)],
                                   cst.BinaryOperation(small.target, op, value))), FixKind.OUT_OF_PLACE
    # `h[:, 0] = v`, `h[1:][:, 3:] = v`, `h.view(-1).mul_(2)`, `h.zero_()` -> `h = h.clone()` first
    name = _written_local(small, imports)
    if name is not None:
        clone = cst.Assign([cst.AssignTarget(name)], cst.Call(cst.Attribute(name, cst.Name("clone"))))
        # The clone takes the line's place (and its comments above); the line keeps its own comment.
        return [cst.SimpleStatementLine(body=[clone], leading_lines=line.leading_lines),
                line.with_changes(leading_lines=[])], FixKind.CLONE_FIRST
    return None


def _written_local(small: cst.BaseSmallStatement, imports: dict[str, str]) -> cst.Name | None:
    """The local name whose tensor (or a view of it, taken on the line) the statement writes in
    place, where writing a clone of it first is the whole edit; None otherwise."""
    if isinstance(small, (cst.Assign, cst.AugAssign)):
        targets = [t.target for t in small.targets] if isinstance(small, cst.Assign) else [small.target]
        if len(targets) != 1 or not isinstance(targets[0], cst.Subscript):
            return None
        root = _view_root(targets[0])
    elif isinstance(small, cst.Expr) and isinstance(small.value, cst.Call) and isinstance(small.value.func, cst.Attribute):
        method = small.value.func.attr.value
        if not method.endswith("_") or method.startswith("_") or method == "requires_grad_":
            return None
        root = _view_root(small.value.func.value)
    else:
        return None
    # Not `self` (module state: a clone would rebind it) nor a module (`torch.ones(3).add_(1)`).
    return root if root is not None and root.value != "self" and root.value not in imports else None


def _view_root(node: cst.BaseExpression) -> cst.Name | None:
    # `h`, `h[1:]`, `h.view(-1)`, `h.t()[0]`: the name a chain of indexing and method calls starts
    # from. An attribute (`h.data`, `self.w`) is not followed: `.data` hides the write on purpose.
    while not isinstance(node, cst.Name):
        if isinstance(node, cst.Subscript):
            node = node.value
        elif isinstance(node, cst.Call) and isinstance(node.func, cst.Attribute):
            node = node.func.value
        else:
            return None
    return node


# The modules whose `op_(t, ...)` functions have an out-of-place twin `op(t, ...)` of the same
# arguments. Not `torch.nn.init`: its `kaiming_uniform_` and the like fill the tensor with
# new values, and its twins without `_` are deprecated aliases that write in place too.
_FREE_FUNCTION_MODULES = ("torch", "torch.nn.functional")


def _imported_modules(module: cst.Module) -> dict[str, str]:
    """The names the file's top-level imports bind to a module: `import torch.nn.functional as F`
    -> {"F": "torch.nn.functional"}, `from torch import nn` -> {"nn": "torch.nn"}."""
    names: dict[str, str] = {}
    for statement in module.body:
        if not isinstance(statement, cst.SimpleStatementLine):
            continue
        for small in statement.body:
            if isinstance(small, cst.Import):
                for alias in small.names:
                    dotted = _dotted(alias.name)
                    if alias.asname is not None and isinstance(alias.asname.name, cst.Name):
                        names[alias.asname.name.value] = dotted
                    else:
                        names[dotted.split(".")[0]] = dotted.split(".")[0]
            elif (isinstance(small, cst.ImportFrom) and small.module is not None and not small.relative
                  and not isinstance(small.names, cst.ImportStar)):
                for alias in small.names:
                    bound = alias.asname.name.value if alias.asname is not None else _dotted(alias.name)
                    names[bound] = f"{_dotted(small.module)}.{_dotted(alias.name)}"
    return names


def _dotted(node: cst.BaseExpression) -> str:
    if isinstance(node, cst.Name):
        return node.value
    if isinstance(node, cst.Attribute):
        return f"{_dotted(node.value)}.{node.attr.value}"
    return ""


def _module_of(node: cst.BaseExpression, imports: dict[str, str]) -> str | None:
    # `torch`, `F`, `torch.nn.functional`: the dotted module an expression names, if an import bound it.
    dotted = _dotted(node)
    head, _, rest = dotted.partition(".")
    if head not in imports:
        return None
    return imports[head] + (f".{rest}" if rest else "")


def _has_free_twin(module: str, function: str) -> bool:
    if module not in _FREE_FUNCTION_MODULES or not function.endswith("_") or function.startswith("_"):
        return False
    twin = function[:-1]
    namespace = torch if module == "torch" else torch.nn.functional
    return twin not in ("copy", "zero", "fill") and callable(getattr(namespace, twin, None)) \
        and callable(getattr(namespace, function, None))


def _has_out_of_place(method: str) -> bool:
    # `relu_` -> `relu`; not dunders, not `requires_grad_` (no twin), not `copy_`/`zero_`/`fill_`
    # whose twin is no function of the tensor's value.
    twin = method[:-1]
    return (method.endswith("_") and not method.startswith("_") and twin not in ("copy", "zero", "fill", "requires_grad")
            and callable(getattr(torch.Tensor, twin, None)))


def _inplace_keyword(call: cst.Call) -> cst.Arg | None:
    for arg in call.args:
        if (arg.keyword is not None and arg.keyword.value == "inplace" and isinstance(arg.value, cst.Name)
                and arg.value.value == "True"):
            return arg
    return None


def _without_inplace(call: cst.Call) -> cst.Call:
    return call.with_changes(args=[a.with_changes(value=cst.Name("False")) if a is _inplace_keyword(call) else a
                                   for a in call.args])


class _FlipInplace(cst.CSTTransformer):
    def __init__(self, first: int, last: int, callee: str, positions) -> None:
        super().__init__()
        self.first, self.last, self.callee, self.positions = first, last, callee, positions
        self.lines: list[int] = []

    def leave_Call(self, original: cst.Call, updated: cst.Call) -> cst.Call:
        line = self.positions[original].start.line
        name = _callee_name(original.func)
        if self.first <= line <= self.last and name == self.callee and _inplace_keyword(updated) is not None:
            self.lines.append(line)
            return _without_inplace(updated)
        return updated


def _callee_name(func: cst.BaseExpression) -> str | None:
    if isinstance(func, cst.Name):
        return func.value
    if isinstance(func, cst.Attribute):
        return func.attr.value
    return None

