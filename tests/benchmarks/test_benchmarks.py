"""The benchmark suite runs, writes parseable results, and its references agree with the library.

No speed is asserted: timing depends on the machine and its load.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from benchmarks import references, sections
from benchmarks.sections import common, ema, ops, sampling
from crckd_losses import EMATeacher, functional
from tests import ROOT
from tests.crckd_losses.backends import graph_stand_in
from tests.crckd_losses.backends.helpers import ccd_pair

pytest.importorskip("matplotlib")


@pytest.mark.slow
def test_quick_run_writes_parseable_outputs(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "run.py"), "--quick", "--out", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    stems = [p.stem for p in tmp_path.glob("*.json")]
    assert len(stems) == 1 and stems[0].endswith("-quick")
    stem = stems[0]
    results = json.loads((tmp_path / f"{stem}.json").read_text())
    meta = results["meta"]
    for key in ("machine", "torch", "threads", "date", "memory_method"):
        assert meta[key], key
    assert set(results["sections"]) == set(sections.SECTIONS)
    assert results["targets"] and all("met" in t for t in results["targets"])
    ccd = results["sections"]["ccd"]["by_dtype"]["float32"]["rows"]
    for name in ("auto", "dense", "gather", "reference"):
        assert ccd[name]["median_s"] > 0
        assert ccd[name]["peak_bytes"] > 0
    md = (tmp_path / f"{stem}.md").read_text()
    assert md.startswith("# crckd-losses benchmarks") and "## Targets" in md
    assert str(tmp_path) not in md and str(ROOT) not in md
    pngs = sorted(p.name for p in tmp_path.glob("*.png"))
    assert pngs == sorted(f"{stem}-{k}.png" for k in ("sweeps", "crossover", "speedups"))
    for p in tmp_path.iterdir():
        assert p.stat().st_size < 500_000, p.name
    with open(tmp_path / pngs[0], "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_saved_results_rerender(tmp_path: Path) -> None:
    # The committed results of earlier runs still render with the current sections, and every
    # section of the registry that they hold contributes to the markdown.
    from benchmarks import report

    saved = sorted((ROOT / "benchmarks" / "results").glob("*.json"))
    if not saved:
        pytest.skip("no saved results")
    for path in saved:
        written = report.rerender(path, tmp_path)
        md = written[0].read_text()
        assert md.startswith("# crckd-losses benchmarks") and "## Targets" in md
        assert all(p.exists() and p.stat().st_size > 0 for p in written)
        results = json.loads(path.read_text())
        for name in results["sections"]:
            assert name in sections.SECTIONS, name
        targets = report.compute_targets(results)
        assert {t["name"] for t in targets} >= {"ccd_speed", "ema_loop"}


def _unit(*shape: int, requires_grad: bool = False) -> torch.Tensor:
    t = F.normalize(torch.randn(*shape, dtype=torch.float64), dim=-1)
    return t.requires_grad_(requires_grad)


def test_naive_ccd_matches_library() -> None:
    n, d, b, p, k = 60, 8, 5, 3, 20
    g_s, g_t = _unit(b, d, requires_grad=True), _unit(b, d, requires_grad=True)
    m_s, m_t = _unit(n, d), _unit(n, d)
    idx = torch.randint(0, n, (b, p + k))
    log_z = (1.3, -0.4)
    for backend in ("functional", "dense", "gather"):
        if backend == "functional":
            lib = functional.class_guided_contrastive_loss(g_s, g_t, m_s, m_t, idx, p, 0.07,
                                                           *log_z)
        else:
            lib = ccd_pair(backend, g_s, g_t, m_s, m_t, idx, p, 0.07, *log_z)
        ref = references.naive_ccd(g_s, g_t, m_s, m_t, idx, p, 0.07, *log_z)
        for a, r in zip(lib, ref):
            torch.testing.assert_close(a, r, rtol=1e-10, atol=1e-12)
        grads_lib = torch.autograd.grad(sum(lib), [g_s, g_t])
        grads_ref = torch.autograd.grad(sum(ref), [g_s, g_t])
        for a, r in zip(grads_lib, grads_ref):
            torch.testing.assert_close(a, r, rtol=1e-10, atol=1e-12)


def test_naive_ccd_eps_is_small() -> None:
    g = _unit(4, 8)
    m = _unit(50, 8)
    idx = torch.randint(0, 50, (4, 12))
    plain = references.naive_nce_direction(g, m, idx, 2, 0.07, 0.5)
    with_eps = references.naive_nce_direction(g, m, idx, 2, 0.07, 0.5, eps=1e-7)
    assert 0 < abs(float(plain - with_eps)) < 1e-4 * abs(float(plain))


def test_loop_centroids_and_naive_crp_match_library() -> None:
    labels = torch.tensor([0, 1, 2, 2, 1, 0, 2, 2, 1])
    m_s, m_t = torch.randn(9, 6, dtype=torch.float64), torch.randn(9, 6, dtype=torch.float64)
    for relu in (True, False):
        torch.testing.assert_close(
            references.loop_centroids(m_s, labels, 3, relu),
            functional.class_centroids(m_s, labels, 3, relu),
            rtol=1e-10,
            atol=1e-12,
        )
    c_s = functional.class_centroids(m_s, labels, 3)
    c_t = functional.class_centroids(m_t, labels, 3)
    g_s, g_t = _unit(5, 6, requires_grad=True), _unit(5, 6)
    lib = functional.categorical_relation_loss(g_s, g_t, c_s, c_t, 0.07)
    ref = references.naive_crp(g_s, g_t, c_s, c_t, 0.07)
    torch.testing.assert_close(lib, ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(
        torch.autograd.grad(lib, g_s)[0], torch.autograd.grad(ref, g_s)[0], rtol=1e-9, atol=1e-12
    )


def test_numpy_sampling_has_the_library_structure_and_distribution() -> None:
    # Same checks the benchmark runs at setup: method §4's structure, and uniform marginals
    # (chi-square per degree of freedom near 1) for both library samplers and both numpy RNGs.
    stats = sampling.check_sampling(torch.device("cpu"), draws=150)
    assert set(stats) == {
        "library shuffle", "library independent", "numpy reference", "numpy Generator.choice"
    }


def test_numpy_sampling_with_replacement_when_pool_is_small() -> None:
    labels = np.array([0, 0, 1, 1, 1, 1, 1, 1])
    same, other = references.class_index_lists(labels, 2)
    rows = references.numpy_sample(
        np.array([0, 1]), labels, same, other, 4, 5, np.random.RandomState(0)
    )
    assert rows.shape == (2, 9)
    assert (rows[:, 0] == [0, 1]).all()
    assert (labels[rows[:, 1:4]] == 0).all() and (labels[rows[:, 4:]] == 1).all()


def test_structure_check_rejects_a_wrong_sampler() -> None:
    labels = np.array([0, 0, 0, 1, 1, 1])
    bad = np.array([[0, 1, 2, 3, 0]])  # a negative of the anchor's class
    with pytest.raises(AssertionError):
        sampling.check_sampling_structure(bad, np.array([0]), labels, 3)


def test_loop_ema_matches_library_and_the_peers() -> None:
    student = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))
    diffs = ema.check_ema(student, decay=0.9, steps=3)
    assert diffs and max(diffs.values()) < 1e-6
    teacher = copy.deepcopy(student)
    lib = EMATeacher(student, decay=0.9, warmup=False, buffers="average")
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
    references.loop_ema(teacher, student, 0.9, average_buffers=True)
    lib.update(student)
    for a, b in zip(teacher.state_dict().values(), lib.module.state_dict().values()):
        torch.testing.assert_close(a, b)


def test_live_tensor_bytes_counts_new_storages_only() -> None:
    from benchmarks.measure import peak_extra_bytes

    x = torch.randn(1000, 250, requires_grad=True)  # 1 MB, an input: not counted

    def step() -> None:
        (x.detach()[:10] * 1).sum()  # a view of the input, then a 10 KB copy
        y = (x * 2).exp()  # 1 MB + 1 MB alive together
        y.sum().backward()  # grads: 1 MB more while y is alive
        x.grad = None

    peak = peak_extra_bytes(step, torch.device("cpu"))
    assert 2_000_000 <= peak <= 3_100_000


def test_op_counter_counts_non_view_ops() -> None:
    from benchmarks.measure import count_ops

    a, b, c = torch.randn(3, 4), torch.randn(4, 5), torch.randn(3, 5)
    assert dict(count_ops(lambda: torch.add(torch.mm(a, b), c)).counts) == {
        "aten.mm": 1, "aten.add": 1
    }
    x = torch.randn(4, 3, requires_grad=True)

    def step() -> None:
        y = (x.t().t() * 2).sum()  # views: not counted
        y.backward()
        float(y.detach())  # a host read
        x.grad = None

    counter = count_ops(step)
    assert counter.host_syncs == 1
    assert not any(name in counter.counts for name in ("aten.t", "aten.detach", "aten.expand"))
    assert counter.counts["aten.mul"] == 2  # forward, and the gradient of x
    assert counter.total == sum(counter.counts.values())


def test_ops_section_counts_a_small_crckd_step_and_an_ema_update() -> None:
    p = dict(common.PAPER, B=8, K=64, N=300)
    steps = {policy: ops.count_crckd(p, policy) for policy in ops.POLICIES}
    for policy, c in steps.items():
        if "skipped" in c:  # a library without value-check policies
            assert "set_value_checks" in c["skipped"]
            continue
        assert c["total"] > 20 and c["by_op"]["aten.mm"] >= 2
        assert c["total"] == sum(c["by_op"].values())
        if policy == "mask":
            assert c["host_syncs"] == 0
    e = ops.count_ema("copy")
    assert e["total"] > 0 and e["parameter_tensors"] == 10
    result = {"params": p, "warmup": ops.WARMUP, "crckd_step": steps, "ema_update": {"copy": e}}
    names = [t["name"] for t in ops.SECTION.targets(result, {})]
    assert names == ["crckd_step_ops", "crckd_step_host_syncs"]
    assert "## Operator counts" in "\n".join(ops.SECTION.markdown(result, {}, "x"))


def test_ops_step_can_be_graphed(monkeypatch) -> None:
    """The step the GPU kernel table replays for its ``auto, loss graphed`` row (there on a
    GPU; here through the host-side stand-in of the graphs): the first call runs eagerly,
    the second captures and replays, forward and backward."""
    graph_stand_in.graphs_on_cpu(monkeypatch)
    step = ops.crckd_step(dict(common.PAPER, B=8, K=64, N=300), graphed=True)
    step()
    assert graph_stand_in.HostGraphs.replays == 0
    step()
    assert graph_stand_in.HostGraphs.replays == 2


def test_gpu_kernel_table_names_where_the_time_goes() -> None:
    """The profiler's kernels of two steps, summarised per step: the count, the summed time,
    and the most expensive kernels by summed time (not by launches); the markdown lists them
    under their setting with namespaces dropped and a pipe escaped."""
    fill = ("void at::native::vectorized_elementwise_kernel<4, at::native::FillFunctor<float>, "
            "std::array<char*, 1ul> >(int, at::native::FillFunctor<float>, std::array<char*, "
            "1ul>)")
    events = [(fill, 1.0)] * 6 + [("triton_per_fused_a|b", 7.0)] * 2 + [("gemm", 4.0)] * 2
    s = ops.event_summary(events, calls=2, top=2)
    assert s["count"] == 5 and s["us"] == 14
    assert s["top"] == [["triton_per_fused_a|b", 1, 7.0], ["gemm", 1, 4.0]]
    assert [row[0] for row in ops.event_summary(events, 2)["top"]] == \
        ["triton_per_fused_a|b", "gemm", fill]
    host = [("cudaLaunchKernel", 2.0)] * 80 + [("aten::mm", 10.0)] * 4
    entry = ops.kernel_table_entry(events, host, calls=2)
    assert entry["kernels"] == 5 and entry["gpu_us"] == 14 and entry["host_us"] == 100
    assert entry["host_top"] == [["cudaLaunchKernel", 40, 80.0], ["aten::mm", 2, 20.0]]
    p = dict(common.PAPER, B=8, K=64, N=300)
    result = {"params": p, "warmup": ops.WARMUP, "crckd_step": {}, "ema_update": {},
              "gpu_kernels": {"auto": ops.kernel_table_entry(events, [], 2)}}
    md = "\n".join(ops.SECTION.markdown(result, {}, "x"))
    assert "| auto | 5 | 14 |" in md
    assert "| auto | `triton_per_fused_a\\|b` | 1 | 7.0 |" in md
    assert "| auto | `vectorized_elementwise_kernel<4, FillFunctor<float>, std::array<char*, " in md
    assert "at::native" not in md and "void " not in md
    assert "host us per step" not in md  # no host events recorded
    result["gpu_kernels"]["auto"] = entry
    md = "\n".join(ops.SECTION.markdown(result, {}, "x"))
    assert "| auto | 100 | `cudaLaunchKernel` | 40 | 80.0 |" in md


def test_default_step_stays_within_its_operator_budget() -> None:
    """The budget that keeps the kernel count from creeping back: one default CRCKDLoss step
    at the paper's sizes with the accelerators' policy, and an EMA update, read nothing on the
    host, and the step runs at most STEP_OP_BUDGET non-view operators."""
    step = ops.count_crckd(dict(common.PAPER), "mask")
    assert step["host_syncs"] == 0, step["by_op"]
    assert 50 < step["total"] <= ops.STEP_OP_BUDGET, step["by_op"]
    # The CPU's default step reads its checks (up to 20 more operators); its NCE log-sigmoid
    # is the one an accelerator runs.
    auto = ops.count_crckd(dict(common.PAPER), "auto")
    assert 0 < auto["host_syncs"] <= 4 and auto["total"] <= ops.STEP_OP_BUDGET + 20
    assert auto["by_op"]["aten.log_sigmoid_forward"] == 1
    assert step["by_op"]["aten.log_sigmoid_forward"] == 1
    for buffers in ("copy", "average"):
        assert ops.count_ema(buffers)["host_syncs"] == 0


def test_value_checks_policy_is_restored() -> None:
    import crckd_losses

    if not common.has_value_check_policies():
        pytest.skip("set_value_checks takes no policies in this version")
    before = crckd_losses.value_checks()
    with common.value_checks("mask"):
        assert crckd_losses.value_checks() == "mask"
    with common.value_checks_off():
        assert crckd_losses.value_checks() == "mask"
    assert crckd_losses.value_checks() == before



def test_sweep_table_has_triton_columns_only_where_timed() -> None:
    from benchmarks.sections import ccd, sweeps

    row = {"median_s": 1e-3, "min_s": 1e-3, "iqr_s": 1e-4, "rounds": 3,
           "samples_per_s": 1.0, "peak_bytes": 1e6}
    names = ("auto", "dense", "gather", "reference")

    def result(with_triton: bool) -> dict:
        rows = {n: dict(row) for n in names + ((ccd.TRITON,) if with_triton else ())}
        point = {"params": dict(common.PAPER), "auto_path": "dense", "rows": rows}
        return {"dtype": "float32", "sweeps": {"N": [point]}, "fits": {}}

    for with_triton in (False, True):
        md = sweeps.SECTION.markdown(result(with_triton), {}, "x")
        header = next(line for line in md if line.startswith("| N |"))
        body = next(line for line in md if line.startswith(f"| {common.PAPER['N']} |"))
        assert (f"{ccd.TRITON} ms" in header) == with_triton
        assert header.count("|") == body.count("|") == md[md.index(header) + 1].count("|")


def test_a_failing_triton_path_is_recorded_not_fatal(monkeypatch) -> None:
    """On a GPU the kernels may fail where no test ran them: the CCD check records why, drops
    their rows from the run (every section asks ``triton_row``), and checks the rest."""
    from benchmarks.sections import ccd

    monkeypatch.setattr(ccd, "TRITON_FAILURE", [])
    monkeypatch.setattr(ccd, "triton_row", lambda device: not ccd.TRITON_FAILURE)
    library = ccd.ccd_library

    def broken(x, backend):
        if backend == "triton":
            raise RuntimeError("no kernel image for this device")
        return library(x, backend)

    monkeypatch.setattr(ccd, "ccd_library", broken)
    bench = common.Bench(torch.device("cpu"), [torch.float32], quick=True)
    x = ccd.make_ccd_inputs(4, 8, 3, 20, 60, torch.device("cpu"), 3)
    diffs = ccd.check_ccd(x, torch.float32, torch.device("cpu"), bench)
    assert "gather/L_S" in diffs and not any(k.startswith("triton") for k in diffs)
    assert ccd.TRITON_FAILURE == ["RuntimeError: no kernel image for this device"]
    assert any("backend='triton' failed" in note for note in bench.skipped)
    assert not ccd.triton_row(torch.device("cuda"))


def test_train_section_reports_the_triton_step_in_a_cuda_graph() -> None:
    """The CUDA-only figures of the training step: the graph target from the default step's
    capture, and the Triton kernels' captured step reported beside it (not as the target)."""
    from benchmarks.sections import train

    def row(ms: float) -> dict:
        return {"median_s": ms / 1e3, "min_s": ms / 1e3, "iqr_s": 1e-5, "rounds": 5,
                "samples_per_s": 64e3 / ms, "peak_bytes": 0}

    times = {"MT": 10.0, "CRCKD": 12.0, train.TRITON_ROW: 11.0, "MT, CUDA graph": 4.0,
             "CRCKD, CUDA graph": 4.4, train.TRITON_GRAPH_ROW: 4.1}
    rows = {name: row(ms) for name, ms in times.items()}
    result = {"params": dict(common.PAPER, image=64), "rows": rows, "default_compiled": True,
              "crckd_over_mt": 0.2, "triton_over_mt": 0.1, "graph_over_mt": 0.1,
              "triton_graph_over_mt": 0.025,
              "graph_loss_rel_diff": {"MT": 0.0, "CRCKD": 0.0, train.TRITON_ROW: 1e-7}}
    found = {t["name"]: t for t in train.SECTION.targets(result, {"device": "cuda:0"})}
    assert found["train_overhead_graph"]["value"] == 0.1
    assert not found["train_overhead_graph"]["met"]
    md = "\n".join(train.SECTION.markdown(result, {}, "x"))
    assert f"{train.TRITON_GRAPH_ROW} over MT, CUDA graph: 2.5 %." in md
    assert f"{train.TRITON_ROW} 1.0e-07" in md
    assert f"| {train.TRITON_GRAPH_ROW} | 4.1 |" in md


def test_loss_graphed_row_checks_against_eager_and_reports(monkeypatch) -> None:
    """The CUDA-only row that graphs CRCKDLoss alone, run here through a host-side stand-in
    for the CUDA graphs: through ``graph_crckd_loss`` the module captures at its second step
    and replays from then on, the graphed step's loss is checked against the same step
    eagerly on a copy of the state, and the section reports the figure."""
    from benchmarks.sections import train

    graph_stand_in.graphs_on_cpu(monkeypatch)
    b = train.make_batch(torch.device("cpu"), quick=True)
    step, diff = train.graphed_loss(b)
    assert diff == 0.0
    assert bool(torch.isfinite(step()))
    # four replayed steps (two while warming up, the checked one, this one), a forward and a
    # backward each
    assert graph_stand_in.HostGraphs.replays == 8
    result = {"params": dict(common.PAPER, image=64), "default_compiled": True,
              "rows": {"MT": {"median_s": 0.01, "min_s": 0.01, "iqr_s": 0.0, "rounds": 3,
                              "samples_per_s": 1.0, "peak_bytes": 0}},
              "crckd_over_mt": 0.2, "loss_graphed_over_mt": 0.031,
              "loss_graphed_rel_diff": 0.0}
    md = "\n".join(train.SECTION.markdown(result, {}, "x"))
    assert f"{train.LOSS_GRAPHED_ROW} (the model" in md and "over MT: 3.1 %" in md
