"""Random multi-task programs for differential testing against eager PyTorch.

`generate(seed)` writes the source of a small `nn.Module`: a trunk and two or three heads
built from view ops, in-place ops of every spelling the audit knows, ops that save their
inputs or outputs for backward, and writes to parameters, buffers, caller inputs and
intermediates; rarely, a graph break, a custom `autograd.Function`, a checkpointed function
or a submodule applied twice. The program is grown one statement at a time, and each candidate statement
is first run eagerly on the real tensors the finished program will see (same seeds), so
PyTorch itself says what a statement does:

- a candidate PyTorch rejects for a reason the audit does not model (a shape mismatch,
  `out=` with arguments that require grad, a write to an expanded view) is dropped;
- a candidate PyTorch rejects as an in-place op on a leaf that requires grad, or on a view
  autograd forbids modifying, is kept now and then as the program's last statement: the
  audit must turn those into `leaf-inplace` / `view-inplace` entries.

The source goes to a real file, so Dynamo's stack traces point at real lines.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import linecache
import operator
import pathlib
import random
import textwrap
from dataclasses import dataclass, field

import torch

__all__ = ["Program", "generate", "FORWARD_ERRORS"]

# Eager forward errors the audit must report (substring of PyTorch's message -> hazard code).
FORWARD_ERRORS = {
    "a leaf Variable that requires grad is being used in an in-place operation": "leaf-inplace",
    "is a view and is being modified inplace": "view-inplace",
    "A view was created in no_grad mode and is being modified inplace": "view-inplace",
}

_HEADS = ("a", "b", "c")
_RARE = 0.06  # chance that a statement is one of the rare constructs (a graph break, ...)
_BREAK = "torch._dynamo.graph_break()"
_KEEP_FORWARD_ERROR = 0.08  # chance that a candidate eager rejects (leaf/view) is kept, ending the program

_IMPORTS = """\
import torch
import torch.nn.functional as F
{checkpoint}from torch import nn
"""

# Definitions a program's header carries only when a statement uses them (`_header`), so a
# program without them reads as before. Each draws its values from a generator of its own:
# whether one is present changes no other value.
_FUNCTIONS = '''

class Scale(torch.autograd.Function):
    """x * w with a backward of its own, saving both."""

    @staticmethod
    def forward(ctx, x, w):
        ctx.save_for_backward(x, w)
        return x * w

    @staticmethod
    def backward(ctx, grad):
        x, w = ctx.saved_tensors
        return (grad * w).sum_to_size(x.shape), (grad * x).sum_to_size(w.shape)


class ScaleFused(Scale):
    """The same as a fused kernel that also writes its input, after saving it, outside autograd."""

    @staticmethod
    def forward(ctx, x, w):
        ctx.save_for_backward(x, w)
        out = x * w
        x.data.mul_(2.0)
        return out
'''

_SEEDED = '''

def seeded(module, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    return module
'''

_CLASS = '''

class Program(nn.Module):
    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed({seed})
        self.w0 = nn.Parameter(torch.randn(4, 4, generator=g))
        self.w1 = nn.Parameter(torch.randn(4, generator=g))
        self.register_buffer("b0", torch.randn(4, 4, generator=g))
        self.register_buffer("b1", torch.randn(4, generator=g))
        self.sub = nn.Module()
        self.sub.w = nn.Parameter(torch.randn(4, 4, generator=g))
        self.sub.register_buffer("b", torch.randn(3, 4, generator=g))
{modules}
    def forward(self, x0, x1, x2):
'''

# Submodules a forward may apply more than once, to different inputs, as multi-task code does
# (an encoder shared by tasks or by the two views of a Siamese model): name -> constructor.
_MODULES = {
    "self.enc": "nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))",
    "self.act": "nn.Sequential(nn.ReLU(inplace=True), nn.Linear(4, 4))",
}


def _header(seed: int, statements: tuple[str, ...] | None = None) -> str:
    """The program's source up to `forward`'s body; with `statements=None`, every definition."""
    def uses(word: str) -> bool:
        return statements is None or any(word in s for s in statements)

    modules = [f"        {name} = seeded({ctor}, {seed} + {i})\n"
               for i, (name, ctor) in enumerate(_MODULES.items(), 2) if uses(name + "(")]
    return (_IMPORTS.format(checkpoint="import torch.utils.checkpoint\n" if uses("checkpoint(") else "")
            + (_FUNCTIONS if uses("Scale") else "")
            + (_SEEDED if modules else "")
            + _CLASS.format(seed=seed, modules="".join(modules)))


_FOOTER = '''

def make_inputs():
    """(x0, x1, x2) and the leaves whose gradients count: x0 is a leaf that requires grad,
    x1 needs no grad, x2 is a non-leaf that requires grad (the caller computed it)."""
    g = torch.Generator().manual_seed({seed} + 1)
    x0 = torch.randn(3, 4, generator=g, requires_grad=True)
    x1 = torch.randn(3, 4, generator=g)
    l2 = torch.randn(3, 4, generator=g, requires_grad=True)
    return (x0, x1, l2 * 1.5), {{"x0": x0, "x2": l2}}
'''

# The state a program may read and write, besides its intermediates.
_STATE = ("self.w0", "self.w1", "self.b0", "self.b1", "self.sub.w", "self.sub.b", "x0", "x1", "x2")


@dataclass(frozen=True)
class Program:
    """A generated module: `statements` are lines (or `with` blocks) of `forward`."""

    seed: int
    statements: tuple[str, ...]
    outputs: tuple[tuple[str, str], ...]  # (task, variable)

    @property
    def source(self) -> str:
        body = "".join(textwrap.indent(s, " " * 8) + "\n" for s in self.statements)
        ret = ", ".join(f'"{task}": {var}' for task, var in self.outputs)
        return (
            _header(self.seed, self.statements)
            + body
            + f"        return {{{ret}}}\n"
            + _FOOTER.format(seed=self.seed)
        )

    def load(self, directory: pathlib.Path):
        """Write the source to `directory` and import it: (Program class, make_inputs)."""
        # The source's hash in the name: programs of one seed (the minimizer's candidates)
        # must not share a file, or a cached bytecode of one would run for another.
        digest = hashlib.sha1(self.source.encode()).hexdigest()[:12]
        path = pathlib.Path(directory) / f"program_{self.seed}_{digest}.py"
        path.write_text(self.source)
        linecache.checkcache(str(path))
        spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module.Program, module.make_inputs


def forward_error_code(e: BaseException) -> str | None:
    text = str(e)
    return next((code for needle, code in FORWARD_ERRORS.items() if needle in text), None)


@dataclass
class _Live:
    """The program so far, run eagerly: the namespace `forward` would have."""

    seed: int
    statements: list[str] = field(default_factory=list)
    names: dict[str, list[str]] = field(default_factory=dict)  # scope -> variables made there
    ns: dict = field(default_factory=dict)

    def reset(self) -> None:
        glb: dict = {}
        exec(_compiled(_header(self.seed) + "        pass\n" + _FOOTER.format(seed=self.seed)), glb)
        args, _ = glb["make_inputs"]()
        self.ns = {**glb, "self": glb["Program"](), "x0": args[0], "x1": args[1], "x2": args[2]}
        for statement in self.statements:
            exec(_compiled(statement), self.ns)

    def value(self, expr: str) -> torch.Tensor:
        if expr in self.ns:
            return self.ns[expr]
        if expr in _STATE:
            return operator.attrgetter(expr[5:])(self.ns["self"])
        return eval(expr, self.ns)

    def try_run(self, statement: str) -> BaseException | None:
        try:
            exec(_compiled(statement), self.ns)
        except Exception as e:  # noqa: BLE001 - PyTorch decides; the caller sorts it out
            self.reset()  # a failed statement may have left names half-bound
            return e
        return None


@functools.lru_cache(maxsize=4096)
def _compiled(code: str):
    return compile(code, "<gen>", "exec")


def _refuses_use(t: torch.Tensor) -> bool:
    try:
        torch.mul(t, 1.0)  # a no_grad view whose base changed since refuses any use
    except RuntimeError:
        return True
    return False


def _broadcasts_to(shape, target) -> bool:
    if len(shape) > len(target):
        return False
    return all(a in (1, b) for a, b in zip(reversed(shape), reversed(target)))


class _Generator:
    def __init__(self, seed: int, rare: bool = True):
        self.rng = random.Random(seed)
        self.rare = rare
        self.live = _Live(seed)
        self.live.reset()
        self.counter = 0
        self.ended_by_error = False
        self.outputs: list[tuple[str, str]] = []  # (task, variable) of the heads done so far
        self.targets: list[tuple[str, bool]] = []  # what the candidate writes, and whether through `.data`
        self.hidden: set[str] = set()  # variables that are `.data` aliases (or views of one)
        self.made_hidden: set[str] = set()  # those the candidate statement makes

    # -- what is in scope -------------------------------------------------------------
    def scope_vars(self, scope: str) -> list[str]:
        own = self.live.names.get(scope, [])
        trunk = self.live.names.get("trunk", []) if scope != "trunk" else []
        return list(_STATE) + trunk + own

    def tensors(self, scope: str, pred=lambda t: True) -> list[str]:
        found = []
        for name in self.scope_vars(scope):
            try:
                t = self.live.value(name)
            except RuntimeError:
                # A view made under no_grad whose base was then written with grad on: PyTorch
                # refuses any use of it from then on, so nothing may read it.
                continue
            if isinstance(t, torch.Tensor) and t.dim() >= 1 and pred(t):
                found.append(name)
        return found

    def pick(self, names: list[str]) -> str | None:
        if not names:
            return None
        # Recent intermediates make richer chains than the fixed state; still pick state often.
        if self.rng.random() < 0.6:
            fresh = [n for n in names if n not in _STATE]
            if fresh:
                return self.rng.choice(fresh[-4:])
        return self.rng.choice(names)

    def new_name(self, scope: str) -> str:
        self.counter += 1
        return f"{'t' if scope == 'trunk' else scope}{self.counter}"

    # -- expressions ------------------------------------------------------------------
    def view_suffix(self, t: torch.Tensor) -> str:
        """A view op spelled as a suffix (`[1]`, `.t()`, `.data`, ...) valid for `t`'s shape."""
        r = self.rng
        options = [".detach()", ".data"]
        if t.dim() == 2:
            rows, cols = t.shape
            i = r.randrange(rows)
            a = r.randrange(cols - 1) if cols > 1 else 0
            options += [f"[{i}]", f"[:, {a}:{a + r.randint(1, cols - a)}]", f"[{min(i, rows - 1)}:]",
                        ".t()", ".transpose(0, 1)", ".view(-1)", f"[:, {r.randrange(cols)}]"]
        elif t.dim() == 1:
            n = t.shape[0]
            a = r.randrange(max(n - 1, 1))
            options += [f"[{a}:{a + r.randint(1, n - a)}]", ".unsqueeze(0)", f".view(1, {n})"]
        return r.choice(options)

    def operand(self, scope: str, shape: torch.Size, allow_scalar: bool = True) -> str:
        """A tensor that broadcasts to `shape`, or a scalar."""
        names = self.tensors(scope, lambda t: _broadcasts_to(t.shape, shape))
        if allow_scalar and (not names or self.rng.random() < 0.3):
            return self.rng.choice(["0.5", "-1.5", "2.0", "1.0"])
        if not names:
            return "1.0"
        name = self.pick(names)
        if self.rng.random() < 0.25:
            return name + (".detach()" if self.rng.random() < 0.5 else ".t().t()")
        return name

    # -- statements -------------------------------------------------------------------
    def producer(self, scope: str) -> str | None:
        r = self.rng
        a = self.pick(self.tensors(scope))
        if a is None:
            return None
        t = self.live.value(a)
        out = self.new_name(scope)
        kind = r.choice(["unary", "unary", "binary", "binary", "matmul", "linear", "softmax", "cheap", "reduce"])
        if kind == "unary":
            fn = r.choice(["torch.exp", "torch.sigmoid", "torch.tanh", "torch.relu"])
            expr = f"{fn}({a})"
        elif kind == "softmax":
            expr = f"torch.softmax({a}, -1)"
        elif kind == "binary":
            b = self.operand(scope, t.shape, allow_scalar=False)
            expr = f"{a} {r.choice(['*', '*', '+'])} {b}"
        elif kind == "matmul":
            bs = self.tensors(scope, lambda u: u.dim() == 2 and u.shape[0] == t.shape[-1])
            if not bs:
                return None
            expr = f"{a} @ {self.pick(bs)}" if r.random() < 0.7 else f"torch.matmul({a}, {self.pick(bs)})"
        elif kind == "linear":
            ws = self.tensors(scope, lambda u: u.dim() == 2 and u.shape[1] == t.shape[-1])
            if not ws:
                return None
            w = self.pick(ws)
            bias = r.choice(["self.w1", "self.b1", "None"]) if self.live.value(w).shape[0] == 4 else "None"
            expr = f"F.linear({a}, {w}, {bias})"
        elif kind == "reduce":
            expr = f"{a}.sum(0)" if t.dim() == 2 else f"{a}.sum(0, keepdim=True)"
        else:
            expr = r.choice([f"{a} * 0.5", f"{a} + 1.0", f"{a}.clone()", f"-{a}"])
        return f"{out} = {expr}"

    def view(self, scope: str) -> tuple[str, list[str]] | None:
        r = self.rng
        a = self.pick(self.tensors(scope))
        if a is None:
            return None
        t = self.live.value(a)
        if t.dim() == 2 and r.random() < 0.3:
            if r.random() < 0.5 and t.shape[1] % 2 == 0:
                outs = [self.new_name(scope), self.new_name(scope)]
                statement = f"{outs[0]}, {outs[1]} = {a}.chunk(2, 1)"
            else:
                outs = [self.new_name(scope) for _ in range(t.shape[0])]
                statement = f"{', '.join(outs)} = {a}.unbind(0)"
        elif t.dim() == 1 and r.random() < 0.3:
            outs = [self.new_name(scope)]
            statement = f"{outs[0]} = {a}.expand(3, {t.shape[0]})"
        else:
            outs = [self.new_name(scope)]
            suffix = self.view_suffix(t)
            statement = f"{outs[0]} = {a}{suffix}"
            if suffix == ".data":
                self.made_hidden.update(outs)
        if a in self.hidden:
            self.made_hidden.update(outs)
        return statement, outs

    def target(self, scope: str) -> tuple[str, str] | None:
        """(variable, view suffix) to write: the variable itself or a view of it made inline."""
        # Not an expanded view: writing one element of it writes a whole row, which PyTorch
        # refuses for most ops and has deprecated for the rest (`index_put_`, `masked_fill_`).
        a = self.pick(self.tensors(scope, lambda t: 0 not in t.stride()))
        if a is None:
            return None
        if self.rng.random() < 0.3:
            return a, self.view_suffix(self.live.value(a))
        return a, ""

    def inplace(self, scope: str) -> str | None:
        r = self.rng
        chosen = self.target(scope)
        if chosen is None:
            return None
        t_expr = "".join(chosen)
        t = self.live.value(t_expr)
        # Does the write go through `.data`, around the version counter autograd checks?
        hidden = chosen[0] in self.hidden or ".data" in chosen[1]
        self.targets.append((t_expr, hidden))
        kind = r.choice(["method", "method", "method", "relu_", "aug", "setitem", "mask", "out", "F.relu", "saving_"])
        if kind == "method":
            m = r.choice(["add_", "mul_", "clamp_", "zero_", "copy_", "add_", "mul_"])
            if m == "clamp_":
                return f"{t_expr}.clamp_(-0.5, 0.5)"
            if m == "zero_":
                return f"{t_expr}.zero_()"
            return f"{t_expr}.{m}({self.operand(scope, t.shape, allow_scalar=m != 'copy_')})"
        if kind == "relu_":
            return f"torch.relu_({t_expr})"
        if kind == "saving_":  # in-place ops that save their own result for backward
            return f"{t_expr}.{r.choice(['sigmoid_', 'exp_', 'tanh_'])}()"
        if kind == "F.relu":
            if not chosen[1] and not t_expr.startswith("self.") and r.random() < 0.5:
                return f"{t_expr} = F.relu({t_expr}, inplace=True)"
            return f"F.relu({t_expr}, inplace=True)"
        if kind == "aug":
            op = r.choice(["+=", "*=", "-="])
            b = self.operand(scope, t.shape)
            # `v.t() += b` is no Python, and `v.data += b` assigns `.data` (no ATen op at all):
            # spell those as the method. So is `self.b0 += b`: it ends in a module
            # `__setattr__`, which costs Dynamo a second per program to trace.
            if (chosen[1] and not chosen[1].startswith("[")) or t_expr.startswith("self."):
                return f"{t_expr}.{ {'+=': 'add_', '*=': 'mul_', '-=': 'sub_'}[op]}({b})"
            return f"{t_expr} {op} {b}"
        if kind == "setitem":
            if t.dim() == 2:
                rows, cols = t.shape
                index = r.choice([f"{r.randrange(rows)}", f":, {r.randrange(cols)}", f"{r.randrange(rows)}:",
                                  f":, {r.randrange(cols)}:"])
            else:
                index = r.choice([f"{r.randrange(t.shape[0])}", f"{r.randrange(t.shape[0])}:"])
            region = eval(f"t[{index}]", {"t": t})
            value = self.operand(scope, region.shape) if region.dim() else r.choice(["1.0", "0.0", "-2.0"])
            self.targets[-1] = (f"{t_expr}[{index}]", hidden)  # the region written
            return f"{t_expr}[{index}] = {value}"
        if kind == "mask":
            if hidden:
                return None  # which elements it writes depends on values (see `changed`)
            other = self.pick(self.tensors(scope, lambda u: u.shape == t.shape))
            m = other if other is not None and r.random() < 0.5 else t_expr
            return f"{t_expr}[{m} > 0] = {r.choice(['0.0', '1.0', '-1.0'])}"
        # out=: PyTorch refuses it when an argument requires grad, so it mostly survives
        # under no_grad or on tensors that need no grad. Not into a non-contiguous tensor:
        # Dynamo breaks the graph there and runs the op itself, outside every graph, where
        # no backend can see it (docs/reliability.md).
        a = self.pick(self.tensors(scope, lambda u: u.shape == t.shape))
        if a is None or not t.is_contiguous():
            return None
        return f"torch.{r.choice(['add', 'mul'])}({a}, {self.operand(scope, t.shape)}, out={t_expr})"

    def no_grad_block(self, scope: str) -> tuple[str, list[str]] | None:
        lines, made = [], []
        if self.rng.random() < 0.3:
            v = self.view(scope)
            if v is not None:
                lines.append(v[0])
                made += v[1]
        for _ in range(self.rng.randint(1, 2)):
            s = self.inplace(scope)
            if s is not None:
                lines.append(s)
        if not lines:
            return None
        return "with torch.no_grad():\n" + "".join(f"    {line}\n" for line in lines).rstrip("\n"), made

    # -- rare constructs ---------------------------------------------------------------
    def graph_break(self, scope: str) -> tuple[str, list[str]] | None:
        """A graph break: what was saved, or computed, before it may be written after it."""
        if not self.live.statements or self.live.statements[-1] == _BREAK:
            return None
        # Dynamo hands the locals the rest of `forward` may read to the next graph as inputs,
        # and reads each one's `grad_fn`: a view PyTorch no longer lets anyone use (see
        # `tensors`) makes Dynamo itself raise, where eager never touches it again.
        bound = {n for names in self.live.names.values() for n in names}
        if any(_refuses_use(self.live.ns[n]) for n in bound if isinstance(self.live.ns.get(n), torch.Tensor)):
            return None
        return _BREAK, []

    def function(self, scope: str) -> tuple[str, list[str]] | None:
        """A custom `autograd.Function` (`Scale`), or its variant that writes its input after
        saving it, outside autograd (`ScaleFused`, a fused kernel's side effect)."""
        a = self.pick(self.tensors(scope, lambda t: 0 not in t.stride()))
        if a is None:
            return None
        w = self.operand(scope, self.live.value(a).shape, allow_scalar=False)
        if w == "1.0":
            return None
        fused = self.rng.random() < 0.5
        if fused:
            self.targets.append((a, True))  # through `.data`: no version counter moves
        out = self.new_name(scope)
        return f"{out} = {'ScaleFused' if fused else 'Scale'}.apply({a}, {w})", [out]

    def checkpointed(self, scope: str) -> tuple[str, list[str]] | None:
        """A small function of generated ops, maybe with an in-place op on its own
        intermediate, under non-reentrant `checkpoint`; later statements may write its output.

        The function reads nothing but its arguments: `checkpoint` saves those, and the
        recomputation in backward reads them, where the oracle's saved-tensor hooks see them;
        a tensor the function read from its closure would be read again, as it is then, by a
        recomputation nothing checks (docs/reliability.md).
        """
        r = self.rng
        a = self.pick(self.tensors(scope))
        if a is None:
            return None
        t = self.live.value(a)
        b = self.operand(scope, t.shape, allow_scalar=False)
        params, args = ("u", "v"), [a, b]
        if b == "1.0" or r.random() < 0.3:
            params, args = ("u",), [a]
        inner = "u" if len(params) == 1 else f"u {r.choice(['*', '+'])} v"
        lines = [f"h = {r.choice(['torch.exp', 'torch.sigmoid', 'torch.tanh', 'torch.relu'])}({inner})"]
        if r.random() < 0.6:
            other = "v" if len(params) == 2 and r.random() < 0.5 else "0.5"
            lines.append(r.choice([f"h.add_({other})", f"h.mul_({other})", "h.clamp_(-0.5, 0.5)", "torch.relu_(h)",
                                   "h.sigmoid_()", "h[0] = 1.0"]))
        lines.append(r.choice(["return h", "return h", f"return h * {params[-1]}", "return torch.tanh(h)"]))
        if not self.harmless_inside(params, lines, [self.live.value(x) for x in args]):
            return None
        self.counter += 1
        fn, out = f"block{self.counter}", self.new_name(scope)
        body = "".join(f"    {line}\n" for line in lines)
        return (f"def {fn}({', '.join(params)}):\n{body}"
                f"{out} = torch.utils.checkpoint.checkpoint({fn}, {', '.join(args)}, use_reentrant=False)"), [out]

    @staticmethod
    def harmless_inside(params: tuple[str, ...], lines: list[str], args: list[torch.Tensor]) -> bool:
        """Does the function, run plainly, leave every tensor it saves for backward as saved?

        Inside `checkpoint` its saves go to checkpoint's own hooks, not the oracle's (the
        innermost `saved_tensors_hooks` wins), and its recomputation hands eager and the
        oracle's reference the same values: an in-place op there that overwrote a saved
        tensor would go unjudged. So PyTorch checks it here, on copies, and such a function is
        left out.
        """
        glb: dict = {"torch": torch}
        exec(_compiled(f"def f({', '.join(params)}):\n" + "".join(f"    {line}\n" for line in lines)), glb)
        changed = []

        def pack(t):
            return t, t.detach().clone()

        def unpack(saved):
            changed.append(not torch.equal(saved[0].detach(), saved[1]))
            return saved[1]

        copies = [x.detach().clone().requires_grad_() for x in args]
        try:
            with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
                out = glb["f"](*copies)
            out.sum().backward()
        except RuntimeError:
            return False
        return not any(changed)

    def shared_module(self, scope: str) -> tuple[str, list[str]] | None:
        """A submodule applied to one input, or to two (`self.enc(a), self.enc(b)`); any module
        may be applied again by a later statement. `self.act` starts with `ReLU(inplace=True)`:
        it writes its input."""
        module = self.rng.choice(list(_MODULES))
        if module == "self.enc":  # batch norm: a batch of more than one row
            names = self.tensors(scope, lambda t: t.dim() == 2 and t.shape[0] > 1 and t.shape[1] == 4)
        else:
            names = self.tensors(scope, lambda t: t.shape[-1] == 4 and 0 not in t.stride())
        if not names:
            return None
        inputs = [self.pick(names)] + ([self.pick(names)] if self.rng.random() < 0.5 else [])
        if module == "self.act":
            self.targets += [(x, False) for x in inputs]
        outs = [self.new_name(scope) for _ in inputs]
        return f"{', '.join(outs)} = {', '.join(f'{module}({x})' for x in inputs)}", outs

    def step(self, scope: str) -> bool:
        """Add one statement to `scope`; False when none could be added."""
        for _ in range(20):
            self.targets, self.made_hidden = [], set()
            try:
                candidate = self.candidate(scope)
                before = [self.live.value(t).detach().clone() for t, _ in self.targets]
            except RuntimeError:  # a view PyTorch no longer lets anyone use (see `tensors`)
                continue
            if candidate is None:
                continue
            statement, made = candidate
            error = self.live.try_run(statement)
            if error is None and not all(self.usable(name) for _, name in self.outputs):
                self.live.reset()  # it made an earlier head's output unusable: drop it
                continue
            if error is None and not self.changed(before):
                # A write that leaves every value as it was (`relu_` on a softmax, `mul_(1.0)`)
                # cannot make backward read a changed value, whatever it overwrites; the
                # audit predicts from shapes and aliasing, never from values.
                self.live.reset()
                continue
            if error is None:
                self.live.statements.append(statement)
                self.live.names.setdefault(scope, []).extend(m for m in made if m not in _STATE)
                self.hidden |= self.made_hidden
                return True
            if forward_error_code(error) and self.rng.random() < _KEEP_FORWARD_ERROR:
                self.live.statements.append(statement)
                self.ended_by_error = True
                return True
        return False

    def candidate(self, scope: str) -> tuple[str, list[str]] | None:
        """(statement, names it binds)."""
        roll = self.rng.random()
        if self.rare:
            # Constructs that cost Dynamo a graph or a subgraph each: rare, so the common ones
            # below stay well covered and a run stays cheap.
            if roll < _RARE:
                return self.rng.choice([self.graph_break, self.function, self.checkpointed, self.shared_module])(scope)
            roll = (roll - _RARE) / (1 - _RARE)
        if roll < 0.32:
            statement = self.producer(scope)
            return (statement, [statement.split(" = ")[0]]) if statement is not None else None
        if roll < 0.52:
            return self.view(scope)
        if roll < 0.9:
            statement = self.inplace(scope)
            return (statement, []) if statement is not None else None
        return self.no_grad_block(scope)

    def changed(self, before: list[torch.Tensor]) -> bool:
        """Did each write change values: some, or for a write through `.data`, every one?

        The audit predicts from which memory is written, never from values. A write autograd
        sees is an error whatever it writes, but one through `.data` corrupts a saved tensor
        only where it changes a value, and `relu_` over elements an earlier `relu_` already
        cleared changes none of them: such writes are left out.
        """
        for (expr, hidden), old in zip(self.targets, before):
            try:
                now = self.live.value(expr)
            except RuntimeError:
                continue
            if now.shape != old.shape:
                continue
            if torch.equal(now, old) or (hidden and bool((now == old).any())):
                return False
        return True

    def usable(self, name: str) -> bool:
        t = self.live.ns.get(name)
        return isinstance(t, torch.Tensor) and t.dim() > 0 and not _refuses_use(t)

    def output_of(self, scope: str) -> str | None:
        """The head's last value that a loss can use and that owns its storage.

        Not an alias of a parameter, buffer or input: Dynamo returns those by deriving the
        alias from the input again after the graph ran, and an alias made by `.data` or
        `.detach()` that an in-place write gave a history (`b = x.data; b[:] = h`) comes back
        without it. The compiled program then differs from eager (docs/reliability.md).
        """
        state = {self.live.value(name).untyped_storage().data_ptr() for name in _STATE}
        for name in reversed(self.live.names.get(scope, [])):
            if self.usable(name) and self.live.ns[name].untyped_storage().data_ptr() not in state:
                return name
        return None


def generate(seed: int, rare: bool = True) -> Program:
    """A random multi-task program, reproducible from `seed`; `rare=False` leaves out the
    rare constructs (graph breaks, custom Functions, checkpoint, shared submodules)."""
    gen = _Generator(seed, rare)
    r = gen.rng
    heads = _HEADS[: r.choice([2, 3])]
    plan = [("trunk", r.randint(3, 7))] + [(h, r.randint(2, 4)) for h in heads]
    for scope, n in plan:
        for _ in range(n):
            if gen.ended_by_error:
                break
            gen.step(scope)
        if scope == "trunk":
            continue
        # Every head ends with a value of its own, computed from what it has.
        while not gen.ended_by_error and gen.output_of(scope) is None:
            statement = gen.producer(scope)
            if statement is not None and gen.live.try_run(statement) is None:
                gen.live.statements.append(statement)
                gen.live.names.setdefault(scope, []).append(statement.split(" = ")[0])
        gen.outputs.append((scope, gen.output_of(scope) or "x1"))
    return Program(seed, tuple(gen.live.statements), tuple(gen.outputs))
