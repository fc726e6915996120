"""The Triton kernels of ``backend="triton"``: checked against the general operators in Triton's
interpreter (``tests/crckd_losses/backends/triton_interpreted.py``, in a process of its own),
and the
errors and fallbacks where they cannot run. ``tests/crckd_losses/test_cuda.py`` runs them
compiled on a GPU."""

import importlib.metadata
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tests import ROOT
from tests.crckd_losses.backends.helpers import ccd_pair

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                reason="needs Triton")

HERE = Path(__file__).resolve().parent


# A loop over a runtime bound, as the library's kernels have. Triton 3.6's interpreter turns
# the bound into an int through a one-element numpy array, which numpy 2.4 refuses.
INTERPRETER_PROBE = """
import torch, triton, triton.language as tl

@triton.jit
def count(out, n):
    total = 0.0
    for _ in range(0, n, 1):
        total += 1.0
    tl.store(out, total)

out = torch.zeros(1)
count[(1,)](out, 3)
assert float(out) == 3.0, float(out)
"""


def test_kernels_match_the_general_operators_in_triton_interpreter():
    # The interpreter is chosen when Triton is first imported, which another test of this
    # session may have done already: a fresh process, with the interpreter set from the start.
    env = dict(os.environ, TRITON_INTERPRET="1")
    probe = subprocess.run([sys.executable, "-c", INTERPRETER_PROBE], env=env,
                           capture_output=True, text=True, timeout=120)
    if probe.returncode != 0:
        last = (probe.stderr.strip().splitlines() or [""])[-1]
        pytest.skip(f"Triton {importlib.metadata.version('triton')}'s interpreter cannot run a "
                    f"loop over a runtime bound with numpy {importlib.metadata.version('numpy')}"
                    f" ({last}); tests/crckd_losses/test_cuda.py checks the compiled kernels")
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
         str(HERE / "triton_interpreted.py")],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-3000:]
    assert " passed" in run.stdout and "skipped" not in run.stdout, run.stdout[-2000:]


def test_kernels_compile_for_nvidia_gpus_without_spilling(tmp_path):
    # Ahead-of-time compilation needs no GPU: Triton's compiler and ptxas lower every
    # specialisation the library launches to machine code for each GPU generation that
    # torch's CUDA wheels build for (sm_86 shares sm_80's instruction set): T4 (Turing),
    # A100 (Ampere), H100/H200 (Hopper), B200 and RTX 50 (Blackwell).
    env = dict(os.environ, TRITON_CACHE_DIR=str(tmp_path))
    env.pop("TRITON_INTERPRET", None)
    targets = ["75", "80", "90", "100", "120"]
    run = subprocess.run([sys.executable, str(HERE / "triton_compile.py"), *targets],
                         env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
    report = json.loads(run.stdout.strip().splitlines()[-1])
    if "skip" in report:
        pytest.skip(report["skip"])
    assert len(report) == len(targets) * 13, sorted(report)
    for name, usage in report.items():
        if usage:  # cuobjdump shipped with Triton
            # A spilling tile takes kilobytes of stack (a 64 x 1024 tile: 5 KB). ptxas keeps
            # one variant on sm_100 (grad, one direction, d = 128) to 127 registers and puts
            # two in an 8-byte stack frame; a few bytes are allowed, no more.
            assert usage["LOCAL"] == 0 and usage["STACK"] <= 16, (name, usage)
            assert 0 < usage["REG"] <= 255, (name, usage)
    assert sum(usage.get("STACK", 0) > 0 for usage in report.values()) <= 2, report


def inputs(batch=6, dim=24, size=300, width=43, dtype=torch.float32):
    g_s = F.normalize(torch.randn(batch, dim), dim=1).to(dtype).requires_grad_()
    g_t = F.normalize(torch.randn(batch, dim), dim=1).to(dtype).requires_grad_()
    m_s, m_t = (F.normalize(torch.randn(size, dim), dim=1).to(dtype) for _ in range(2))
    return g_s, g_t, m_s, m_t, torch.randint(0, size, (batch, width))


def test_clear_errors_where_it_cannot_run(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    args = inputs()
    with pytest.raises(ValueError, match="CUDA tensors"):
        ccd_pair("triton", *args, num_positives=3)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(ValueError, match="float64"):
        ccd_pair("triton", *inputs(dtype=torch.float64), num_positives=3)


def test_inside_torch_compile_the_general_path_runs(monkeypatch):
    # Inside a compiled function the Triton kernels are not called (inductor generates its
    # own), so backend="triton" there takes "auto"'s path: no error on a CPU, the same values.
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    args = inputs()

    def both(path):
        return torch.stack(ccd_pair(path, *args, num_positives=3))

    compiled = torch.compile(both, backend="eager", fullgraph=True)
    torch.testing.assert_close(compiled("triton"), both("auto"), rtol=2e-6, atol=0)
