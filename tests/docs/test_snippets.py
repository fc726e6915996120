"""The training loops a new user copies run as pasted.

- README.md: the first Python block under "Add CRCKD to your training loop", given only the
  user's own objects (a student, a loader, the training labels, an epoch count);
- docs/getting_started.rst: its ``quickstart`` blocks in order (the page defines its own
  stand-ins), without Sphinx.
"""

from __future__ import annotations

import re
import textwrap

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from crckd_losses import IndexedDataset
from tests import ROOT


def readme_snippet() -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    after = text.split("\n## Add CRCKD to your training loop\n", 1)[1]
    return re.search(r"```python\n(.*?)```", after, re.S).group(1)


def rst_blocks(text: str, directive: str) -> list[str]:
    """The bodies of every ``.. <directive>`` block of a reST page, dedented."""
    blocks = []
    pattern = rf"^\.\. {re.escape(directive)}\n(?:   :.*\n)*\n((?:   .*\n|\n)+)"
    for match in re.finditer(pattern, text, re.M):
        blocks.append(textwrap.dedent(match.group(1)))
    return blocks


class Student(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.feature = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 128))
        self.classifier = nn.Linear(128, 3)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.feature(x)
        return f, self.classifier(f)


def test_readme_snippet_runs_as_pasted() -> None:
    torch.manual_seed(0)
    train_labels = torch.arange(300) % 3
    images = torch.randn(300, 3, 8, 8)
    views = TensorDataset(images, images + 0.1 * torch.randn_like(images), train_labels)
    loader = DataLoader(IndexedDataset(views), batch_size=32, shuffle=True, drop_last=True)
    user = {"student": Student(), "loader": loader, "train_labels": train_labels.tolist(),
            "epochs": 2}
    exec(compile(readme_snippet(), "README.md", "exec"), user)
    assert torch.isfinite(user["loss"])
    assert int(user["teacher"].num_updates) == 2 * len(loader)


def test_getting_started_runs_as_pasted() -> None:
    text = (ROOT / "docs" / "getting_started.rst").read_text(encoding="utf-8")
    blocks = rst_blocks(text, "testcode:: quickstart")
    assert len(blocks) >= 3, "the getting-started page lost its quickstart blocks"
    page: dict[str, object] = {}
    for block in blocks:  # the last, hidden, block checks the run
        exec(compile(block, "getting_started.rst", "exec"), page)
