"""The pytest plugin (entry point `pytest11`): `pytest --fxinplace` runs each test watched.

With `--fxinplace`, each test's call runs inside a `Watch` (what `fxinplace run` uses): every
`torch.compile` in it audited with its own backend handing off, the training-loop guard on.
A test that passes but whose compiled graphs have a hazard at or above `--fxinplace-fail-on`
(default `error`), or in which the guard found a stale saved tensor (a test that caught the
error itself), fails with the hazards in words. A test that raises keeps its own error (the
guard's names the tensor, the op and the line).

Without the flag the plugin does nothing: no patching, no hooks. The fixture `fxinplace_watch`
watches one test explicitly, flag or not, and yields the `Watch` (`.report`, `.stale`).
"""

from __future__ import annotations

from typing import Any, Iterator

import pytest

__all__ = ["fxinplace_watch"]

_FAIL_ON = ("error", "warning", "info")
_WATCH = pytest.StashKey[Any]()  # the fixture's watch, on the test item


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("fxinplace", "in-place mutation hazards (fxinplace)")
    group.addoption("--fxinplace", action="store_true", default=False,
                    help="run each test with every torch.compile audited and the training-loop guard on; "
                    "fail a test with an in-place hazard")
    group.addoption("--fxinplace-fail-on", choices=_FAIL_ON, default="error",
                    help="with --fxinplace: the least severity that fails a test (default: error)")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Iterator[None]:
    if not item.config.getoption("fxinplace"):
        return (yield)
    watch = item.stash.get(_WATCH, None)
    if watch is not None:  # the test asked for the fixture: that watch is already on
        result = yield
    else:
        from ._watch import Watch

        with Watch(namespace=_namespace(item)) as watch:
            result = yield
    _check(watch, item.config.getoption("fxinplace_fail_on"))
    return result


def _check(watch: Any, fail_on: str) -> None:
    report, stale = watch.report, watch.stale
    if report.hazards(fail_on) or stale:
        from ._run_render import failure

        pytest.fail(failure(report, stale, fail_on), pytrace=False)


def _namespace(item: pytest.Item) -> dict[str, Any]:
    module = getattr(item, "module", None)
    return vars(module) if module is not None else {}


@pytest.fixture
def fxinplace_watch(request: pytest.FixtureRequest) -> Iterator[Any]:
    """This test, watched: every torch.compile audited, the guard on; yields the `Watch`."""
    from ._watch import Watch

    with Watch(namespace=_namespace(request.node)) as watch:
        request.node.stash[_WATCH] = watch
        try:
            yield watch
        finally:
            del request.node.stash[_WATCH]
