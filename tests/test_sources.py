"""Which frames are the user's: decided by where the torch and fxinplace packages really are."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import traceback

import pytest
import torch
import torch.nn.functional as F

import fxinplace
from fxinplace._sources import is_internal_file, user_frame

TORCH_DIR = os.path.dirname(torch.__file__)
PACKAGE_DIR = os.path.dirname(fxinplace.__file__)
REPO_DIR = os.path.dirname(PACKAGE_DIR)


@pytest.mark.parametrize(
    "file, internal",
    [
        (F.__file__, True),
        (fxinplace._sources.__file__, True),
        (os.path.join(PACKAGE_DIR, "passes", "find_hazards.py"), True),
        ("<eval_with_key>.12", True),
        (__file__, False),  # fxinplace's own tests are user code
        (os.path.join(REPO_DIR, "examples", "multitask.py"), False),
        (TORCH_DIR + "vision" + os.sep + "models" + os.sep + "resnet.py", False),  # torchvision is not torch
        (os.path.join(os.sep, "home", "me", "torch", "fxinplace", "train.py"), False),
        ("<string>", False),
    ],
    ids=["torch", "fxinplace", "a pass", "FX generated", "these tests", "examples", "torchvision",
         "a project under torch/fxinplace", "python -c"],
)
def test_is_internal_file(file, internal):
    assert is_internal_file(file) == internal


def test_user_frame_from_a_live_frame_and_from_a_traceback():
    # A forward hook runs inside torch's `Module._call_impl`: from there, the innermost user
    # frame is this test's, from the live frame and from the traceback alike.
    seen = {}

    def hook(module, args, output):
        seen["live"] = user_frame(sys._getframe(1))  # the caller: torch/nn/modules/module.py
        raise ValueError

    module = torch.nn.Identity()
    module.register_forward_hook(hook)
    with pytest.raises(ValueError) as info:
        module(torch.ones(1))
    frames = traceback.extract_tb(info.tb)
    here = sys._getframe(0).f_code
    assert seen["live"].f_code is here
    assert [f.name for f in frames][::len(frames) - 1] == [here.co_name, "hook"]
    torch_frames = frames[1:-1]
    assert torch_frames and all(f.filename.startswith(TORCH_DIR) for f in torch_frames)
    assert user_frame(reversed(frames)).name == "hook"
    found = user_frame(reversed(frames[:-1]))  # torch's frames skipped
    assert (found.name, found.filename) == (here.co_name, __file__)
    assert user_frame(torch_frames) is None
    assert user_frame(None) is None


USER_MODEL = '''
import json

import torch
import torch.nn.functional as F
from torch import nn

import fxinplace


class Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        h = self.fc(x) * 1.0
        h.add_(1.0)  # add
        F.threshold(h, 0.1, 0.0, inplace=True)  # threshold
        return h


class Leaf(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.ones(4))

    def forward(self, x):
        self.w.mul_(2)  # leaf
        return x * self.w


def where(source):
    return None if source is None else [source.file, source.line]


report = fxinplace.audit(Model(), torch.randn(2, 4), options={"print": False})
rows = {m.op: where(m.source) for m in report.mutations}
(error,) = fxinplace.audit(Leaf(), torch.randn(2, 4), options={"print": False}).hazards("error")
lin = nn.Linear(4, 4)
with fxinplace.guard(lin, on_stale="warn") as g:
    loss = lin(torch.randn(2, 4, requires_grad=True)).sum()  # saves the weight for the input's gradient
    with torch.no_grad():
        lin.weight.mul_(0.5)  # guard write
    loss.backward()
(stale,) = g.hazards
print(json.dumps({"add": rows["add_"], "threshold": rows["threshold_"], "leaf": where(error.source),
                  "guard write": where(stale.writes[0].source)}))
'''


def test_lines_of_a_project_in_folders_named_torch_and_fxinplace(tmp_path):
    # A plain clone of this repository under such folders lost every line once: frames were
    # judged by the substrings "/torch/" and "/fxinplace/" in their paths.
    project = tmp_path / "torch" / "fxinplace"
    project.mkdir(parents=True)
    model = project / "user_model.py"
    model.write_text(textwrap.dedent(USER_MODEL))
    env = {**os.environ, "PYTHONPATH": REPO_DIR}  # this fxinplace, from where it lies
    result = subprocess.run([sys.executable, str(model)], capture_output=True, text=True, cwd=project, env=env,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    found = json.loads(result.stdout.strip().splitlines()[-1])
    lines = model.read_text().splitlines()
    expected = {marker: [str(model), next(i for i, line in enumerate(lines, 1) if line.endswith(f"# {marker}"))]
                for marker in found}
    assert found == expected
