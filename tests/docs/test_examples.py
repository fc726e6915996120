"""The docs' framework examples (``docs/howto/examples``, shown by the Lightning and MONAI
how-to pages) run, and a run resumed from their checkpoint after one epoch ends exactly like
an unbroken run: the same losses step by step, the same student, teacher, banks and ``Z``."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import pytest
import torch

from tests import ROOT

EXAMPLES = ROOT / "docs" / "howto" / "examples"


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread: these small networks lose more to threads waiting for a core on a
    busy (shared) machine than they gain."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"docs_example_{name}", EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _assert_same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    # what an exact resume needs is in the state: the teacher's step count, banks and Z
    for key in ("teacher.num_updates", "crckd.student_bank.memory", "crckd.ccd.log_normalizer"):
        assert any(k.endswith(key) for k in a), key


def test_lightning_example_resumes_exactly(tmp_path: Path) -> None:
    L = pytest.importorskip("lightning", reason="the lightning extra runs this example")
    pytest.importorskip("torchvision")
    example = _load("crckd_lightning")

    class Losses(L.Callback):
        def __init__(self) -> None:
            self.values: list[float] = []

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
            self.values.append(float(outputs["loss"]))

    straight, first, resumed = Losses(), Losses(), Losses()
    a = example.fit(tmp_path / "a", epochs=2, callbacks=[straight])
    example.fit(tmp_path / "b", epochs=1, callbacks=[first])
    b = example.fit(tmp_path / "b", epochs=2, resume=True, callbacks=[resumed])
    assert len(first.values) == 6 and len(straight.values) == 12
    assert first.values + resumed.values == straight.values
    _assert_same_state(a.state_dict(), b.state_dict())
    assert int(b.teacher.num_updates) == 12


def test_monai_example_resumes_exactly(tmp_path: Path) -> None:
    pytest.importorskip("monai", reason="the monai extra runs this example")
    example = _load("crckd_monai")
    straight, straight_losses = example.train(tmp_path / "a", epochs=2)
    _, first = example.train(tmp_path / "b", epochs=1)
    resumed, resumed_losses = example.train(tmp_path / "b", epochs=2)  # from b/last.pt
    assert len(first) == len(resumed_losses) == 3
    assert first + resumed_losses == straight_losses
    _assert_same_state(straight.state_dict(), resumed.state_dict())
    assert int(resumed.teacher.num_updates) == 6
