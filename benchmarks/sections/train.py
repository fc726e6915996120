"""One optimiser step of baseline (WCE), mean teacher (MT) and CRCKD on a ResNet-18."""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from crckd_losses import CRCKDLoss, EMATeacher, GraphedCRCKDLoss, functional, graph_crckd_loss
from crckd_losses.backends import choose_score_path, compiles

from .ccd import triton_failed, triton_row
from .common import PAPER, Bench, Section, Target, params, table, target


class _Net(nn.Module):
    """ResNet-18 backbone, a 128-d feature layer and a linear classifier (method §1's shape)."""

    def __init__(self, num_classes: int, feat_dim: int = 128) -> None:
        super().__init__()
        import torchvision

        self.backbone = torchvision.models.resnet18(weights=None)
        self.backbone.fc = nn.Identity()
        self.feature = nn.Linear(512, feat_dim)
        self.classifier = nn.Linear(feat_dim, num_classes)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.feature(self.backbone(x))
        return f, self.classifier(f)


@dataclass
class Batch:
    """The fixed batch every timed step trains on, and the training set's labels."""

    p: dict[str, Any]
    labels: torch.Tensor
    weight: torch.Tensor
    index: torch.Tensor
    y: torch.Tensor
    view1: torch.Tensor
    view2: torch.Tensor


def make_batch(device: torch.device, quick: bool = False) -> Batch:
    """Random images and labels at the paper's sizes (64 px; a tiny grid with ``quick``)."""
    p = dict(PAPER, image=64)
    if quick:
        p.update(B=4, image=32, K=256, N=1000)
    g = torch.Generator().manual_seed(5)
    labels = torch.cat([torch.arange(p["C"]),
                        torch.randint(0, p["C"], (p["N"] - p["C"],), generator=g)])
    counts = torch.bincount(labels, minlength=p["C"]).float()
    index = torch.randperm(p["N"], generator=g)[: p["B"]]
    views = [torch.randn(p["B"], 3, p["image"], p["image"], generator=g) for _ in range(2)]
    return Batch(p, labels.to(device), (counts.sum() / counts).to(device), index.to(device),
                 labels[index].to(device), views[0].to(device), views[1].to(device))


def make_step(b: Batch, kind: str, backend: str = "auto", graph: bool = False,
              graphed_loss: bool = False) -> tuple[Callable[[], torch.Tensor], tuple[Any, ...]]:
    """One training step of ``kind`` ("baseline", "MT" or "CRCKD") and the state it trains.

    ``backend`` is CRCKD's (``"triton"`` for its Triton kernels). With ``graph`` the step is
    written for CUDA-graph capture (the recipe of the GPU how-to): banks with
    ``copy_on_write="snapshot"``, a capturable Adam whose gradients are zeroed in place after
    the step, and a teacher whose decay does not change (``warmup=False``). ``graphed_loss``
    calls CRCKD through ``graph_crckd_loss`` in an otherwise eager step.

    Returns:
        ``(step, (student, teacher, crckd, optimizer))``; ``step()`` returns the loss;
        ``crckd`` is the ``GraphedCRCKDLoss`` with ``graphed_loss``.
    """
    p = b.p
    torch.manual_seed(0)
    student = _Net(p["C"]).to(b.view1.device)
    params = list(student.parameters())
    teacher = EMATeacher(student, decay=0.99, warmup=not graph) if kind != "baseline" else None
    crckd: CRCKDLoss | GraphedCRCKDLoss | None = None
    if kind == "CRCKD":
        module = CRCKDLoss(b.labels, 128, 128, embed_dim=p["d"], num_positives=p["P"],
                           num_negatives=p["K"], temperature=p["tau"],
                           backend=backend).to(b.view1.device)  # type: ignore[arg-type]
        params += list(module.parameters())
        if graph:  # the graphs hold the banks' addresses: written in place, read by snapshots
            for bank in (module.student_bank, module.teacher_bank):
                bank.copy_on_write = "snapshot"
        crckd = graph_crckd_loss(module, p["B"]) if graphed_loss else module
    opt = torch.optim.Adam(params, lr=3e-4, weight_decay=5e-4, capturable=graph)

    def step() -> torch.Tensor:
        loss = step_loss(b, student, teacher, crckd)
        if not graph:
            opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if graph:
            opt.zero_grad(set_to_none=False)
        if teacher is not None:
            teacher.update(student)
        return loss.detach()

    return step, (student, teacher, crckd, opt)


def step_loss(b: Batch, student: nn.Module, teacher: EMATeacher | None,
              crckd: CRCKDLoss | GraphedCRCKDLoss | None) -> torch.Tensor:
    """The loss of one step on ``b``: weighted cross-entropy, plus the consistency term with a
    teacher, plus CRCKD's with ``crckd``."""
    f_s, logits = student(b.view1)
    loss = F.cross_entropy(logits, b.y, weight=b.weight)
    if teacher is not None:
        with torch.no_grad():
            f_t, logits_t = teacher(b.view2)
        loss = loss + functional.consistency_kl(logits, logits_t)
        if crckd is not None:
            loss = loss + crckd(f_s, f_t, b.index).loss
    return loss


def matches_eager(got: torch.Tensor, want: torch.Tensor, what: str) -> float:
    """The relative difference of a graphed step's loss from the eager one; raises above
    1e-4 (a replay that read or wrote the wrong memory)."""
    diff = float((got - want).abs() / want.abs())
    if not diff <= 1e-4:
        raise AssertionError(f"{what} differs from eager by {diff:.2e}")
    return diff


def capture(b: Batch, kind: str, backend: str = "auto") -> tuple[Callable[[], None], float]:
    """The step of ``kind`` (CRCKD on ``backend``) captured in a CUDA graph, checked
    against eager execution.

    Three eager steps run first on a side stream (compilation, :math:`Z`, gradients). The
    state is then copied (models, banks and optimiser together), the step is captured and
    replayed once, and the copy takes the same step eagerly from the same random seed.

    Returns:
        ``(graph.replay, relative difference of the two losses)``.
    """
    dev = b.view1.device
    step, state = make_step(b, kind, backend, graph=True)
    side = torch.cuda.Stream(dev)
    side.wait_stream(torch.cuda.current_stream(dev))
    with torch.cuda.stream(side):
        for _ in range(3):
            step()
    torch.cuda.current_stream(dev).wait_stream(side)
    twin = copy.deepcopy(state)  # one deepcopy: the optimiser's state follows its parameters
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_loss = step()
    # A replay draws from the default generator where it stands, as eager code does: from the
    # same seed both take the same samples.
    torch.cuda.manual_seed(1234)
    graph.replay()
    torch.cuda.manual_seed(1234)
    want = step_loss(b, *twin[:3]).detach()  # the same step, eagerly, on the copy
    diff = matches_eager(static_loss, want, f"{kind}: the replayed step's loss")
    # The graph holds addresses, not references: the models, banks and optimiser it reads and
    # writes must outlive it, or their memory is reused under it.
    keep = (graph, state, static_loss)

    def replay() -> None:
        keep[0].replay()

    return replay, diff


def graphed_loss(b: Batch) -> tuple[Callable[[], torch.Tensor], float]:
    """A CRCKD step whose loss module alone runs as CUDA graphs, forward and backward
    (``graph_crckd_loss``, which captures at its second training call), while the model, the
    optimiser and the teacher run eagerly: what graphing only the library's part of an eager
    loop saves. Checked against the same step run eagerly on a copy of the state (a copy of
    the module leaves the graphs behind), through the copied module itself.

    Returns:
        ``(step, relative difference of the graphed and the eager loss)``.
    """
    step, state = make_step(b, "CRCKD", graphed_loss=True)
    wrapper = state[2]
    for _ in range(3):  # Z, then the capture (which compiles), then a replay
        step()
    if wrapper.replays != 2:
        raise AssertionError(f"graph_crckd_loss replayed {wrapper.replays} of the 2 training "
                             "calls after the first")
    twin = copy.deepcopy(state)
    torch.manual_seed(1234)
    got = step()
    torch.manual_seed(1234)
    want = step_loss(b, twin[0], twin[1], twin[2].crckd).detach()  # eagerly, on the copy
    diff = matches_eager(got, want, "the graphed loss")
    if wrapper.replays != 3:
        raise AssertionError("the graphed step did not replay once")
    return step, diff


def run_train(bench: Bench) -> dict[str, Any]:
    """One optimiser step of baseline (WCE), mean teacher (MT) and CRCKD on ResNet-18."""
    dev = bench.device
    b = make_batch(dev, bench.quick)
    # The library's default compiles the step only where "auto" selects it; the other way is
    # timed beside it (not in the quick grid: compiling takes a minute).
    default_compiled = compiles("auto", dev, step=True)
    other = "CRCKD, eager" if default_compiled else "CRCKD, compiled"
    other_backend = choose_score_path(b.p["N"], b.p["P"] + b.p["K"]) if default_compiled \
        else "compiled"
    backend_of = {other: other_backend, TRITON_ROW: "triton"}
    kinds = ["baseline", "MT", "CRCKD"] + ([] if bench.quick else [other])
    if triton_row(dev) and not bench.quick:
        kinds.append(TRITON_ROW)
    fns: dict[str, Callable[[], Any]] = {}
    for kind in kinds:
        backend = backend_of.get(kind, "auto")
        try:
            fns[kind], state = make_step(b, kind.split(",")[0], backend)
            if state[2] is not None and compiles(state[2].backend, dev, step=True):
                for _ in range(2):  # both compilations (the first step's Z, then steady state)
                    fns[kind]()
        except Exception as exc:
            if kind != TRITON_ROW:
                raise
            # New kernels on a new GPU: their failure is recorded, not fatal to the run.
            fns.pop(kind, None)
            triton_failed(bench, f"train: {kind}", exc)
    graph_error, graph_check, loss_graphed_diff = None, {}, None
    if dev.type == "cuda" and not bench.quick and bench.cuda_graphs:
        try:
            for kind in ("MT", "CRCKD"):
                fns[f"{kind}, CUDA graph"], graph_check[kind] = capture(b, kind)
        except Exception as exc:  # noqa: BLE001 - recorded in the results, not hidden
            graph_error = f"{type(exc).__name__}: {exc}"
            bench.skipped.append(f"train: CUDA-graph capture failed ({graph_error})")
            fns.pop("MT, CUDA graph", None)
        if TRITON_ROW in fns and "CRCKD, CUDA graph" in fns:
            # The Triton kernels in a graph: the launches are gone, what is left is their own
            # GPU time against inductor's kernels. Their failure is recorded, not fatal.
            try:
                fns[TRITON_GRAPH_ROW], graph_check[TRITON_ROW] = capture(b, "CRCKD", "triton")
            except Exception as exc:  # noqa: BLE001 - recorded in the results, not hidden
                triton_failed(bench, f"train: {TRITON_GRAPH_ROW}", exc)
        try:
            fns[LOSS_GRAPHED_ROW], loss_graphed_diff = graphed_loss(b)
        except Exception as exc:  # noqa: BLE001 - recorded in the results, not hidden
            bench.skipped.append(f"train: {LOSS_GRAPHED_ROW} failed "
                                 f"({type(exc).__name__}: {exc})")
    elif dev.type == "cuda" and not bench.quick:
        bench.skipped.append("train: CUDA-graph rows not run (--no-cuda-graphs)")
    # A CPU's memory tracker is a dispatch mode, under which the compiled step runs eagerly.
    compiled_row = ("CRCKD" if default_compiled else other,) if dev.type == "cpu" else ()
    rows = bench.compare(fns, samples=b.p["B"], budget_s=3 * bench.budget_s,
                         no_memory=compiled_row)
    mt = rows["MT"]["median_s"]
    out: dict[str, Any] = {"params": b.p, "rows": rows, "default_compiled": default_compiled,
                           "crckd_over_mt": rows["CRCKD"]["median_s"] / mt - 1.0,
                           "host_ms": host_ms(fns, dev)}
    if other in rows:
        out["other_path"], out["other_backend"] = other, other_backend
        out["other_over_mt"] = rows[other]["median_s"] / mt - 1.0
    if TRITON_ROW in rows:
        out["triton_over_mt"] = rows[TRITON_ROW]["median_s"] / mt - 1.0
    if "CRCKD, CUDA graph" in rows:
        out["graph_over_mt"] = (rows["CRCKD, CUDA graph"]["median_s"]
                                / rows["MT, CUDA graph"]["median_s"] - 1.0)
        out["graph_loss_rel_diff"] = graph_check
    if TRITON_GRAPH_ROW in rows:
        out["triton_graph_over_mt"] = (rows[TRITON_GRAPH_ROW]["median_s"]
                                       / rows["MT, CUDA graph"]["median_s"] - 1.0)
    if graph_error:
        out["graph_error"] = graph_error
    if LOSS_GRAPHED_ROW in rows:
        out["loss_graphed_over_mt"] = rows[LOSS_GRAPHED_ROW]["median_s"] / mt - 1.0
        out["loss_graphed_rel_diff"] = loss_graphed_diff
    return out


def host_ms(fns: dict[str, Callable[[], Any]], dev: torch.device,
            calls: int = 20) -> dict[str, float] | None:
    """Median milliseconds until each step returns to Python, before the device finishes.

    On a GPU this is the host's share (Python, dispatch, kernel launches): where it is close
    to the whole step's time, the step is bound by launches rather than by GPU work.
    """
    if dev.type != "cuda":
        return None
    out = {}
    for name, fn in fns.items():
        times = []
        for _ in range(calls):
            torch.cuda.synchronize(dev)
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        torch.cuda.synchronize(dev)
        out[name] = 1e3 * statistics.median(times)
    return out


#: The row of CRCKD with ``backend="triton"`` (eager, its CCD in the Triton kernels).
TRITON_ROW = "CRCKD, Triton kernels"
#: The same step captured in a CUDA graph.
TRITON_GRAPH_ROW = f"{TRITON_ROW}, CUDA graph"
#: An eager step whose CRCKDLoss alone runs as CUDA graphs (:func:`graphed_loss`).
LOSS_GRAPHED_ROW = "CRCKD, loss graphed"

TRAIN_OVERHEAD = "Training step: CRCKD over MT <= 15 %"
TRAIN_OVERHEAD_GPU = "Training step on a GPU: CRCKD (default) over MT <= 5 %"
TRAIN_OVERHEAD_GRAPH = "Training step in a CUDA graph: CRCKD over MT, both captured <= 2 %"


class Train(Section):
    """The whole training step."""

    name = "train"

    def run(self, bench: Bench) -> dict[str, Any]:
        return run_train(bench)

    def targets(self, result: dict[str, Any], meta: dict[str, Any]) -> list[Target]:
        over = result["crckd_over_mt"]
        gpu = str(meta.get("device", "cpu")).startswith("cuda")
        text, bound = (TRAIN_OVERHEAD_GPU, 0.05) if gpu else (TRAIN_OVERHEAD, 0.15)
        out = [target("train_overhead", text, over, bound, higher_is_better=False,
                      detail=f"{100 * over:.1f} % (value is a fraction)")]
        if gpu:
            graph = result.get("graph_over_mt")
            out.append(target("train_overhead_graph", TRAIN_OVERHEAD_GRAPH, graph, 0.02,
                              higher_is_better=False,
                              detail=f"{100 * graph:.1f} % (value is a fraction)"
                              if graph is not None
                              else result.get("graph_error", "not measured in this run")))
        return out

    def markdown(self, result: dict[str, Any], meta: dict[str, Any], stem: str) -> list[str]:
        s = result
        md = ["## Whole training step", "",
              f"ResNet-18 + 128-d feature + classifier, Adam, random {s['params']['image']}px "
              f"images, `{params(s['params'])}`. CRCKD over MT: "
              f"{100 * s['crckd_over_mt']:.1f} % with the library's default backend ("
              f"{'compiled' if s.get('default_compiled', s.get('default_fused')) else 'eager'}"
              " on this device)."]
        if "other_path" in s:
            md[-1] += (f" {s['other_path']} over MT: {100 * s['other_over_mt']:.1f} %"
                       + (f" (`backend=\"{s['other_backend']}\"`)." if "other_backend" in s
                          else "."))
        if "triton_over_mt" in s:
            md[-1] += (f" {TRITON_ROW} over MT (`backend=\"triton\"`, eager): "
                       f"{100 * s['triton_over_mt']:.1f} %.")
        if "graph_over_mt" in s:
            md[-1] += (f" Both steps captured in a CUDA graph (`copy_on_write=\"snapshot\"`, "
                       f"capturable Adam, replayed): CRCKD over MT "
                       f"{100 * s['graph_over_mt']:.1f} %. Each captured step was checked "
                       f"against the same step run eagerly (relative loss difference: "
                       + ", ".join(f"{k} {v:.1e}" for k, v in s["graph_loss_rel_diff"].items())
                       + ").")
            if "triton_graph_over_mt" in s:
                md[-1] += (f" {TRITON_GRAPH_ROW} over MT, CUDA graph: "
                           f"{100 * s['triton_graph_over_mt']:.1f} %.")
        elif "graph_error" in s:
            md[-1] += f" CUDA-graph capture failed: `{s['graph_error']}`."
        if "loss_graphed_over_mt" in s:
            md[-1] += (f" {LOSS_GRAPHED_ROW} (the model, the optimiser and the teacher eager, "
                       f"`CRCKDLoss` alone replayed, `graph_crckd_loss`) over "
                       f"MT: {100 * s['loss_graphed_over_mt']:.1f} % (relative loss "
                       f"difference against eager {s['loss_graphed_rel_diff']:.1e}).")
        md.append("")
        md += table(s["rows"], "MT") + [""]
        if s.get("host_ms"):
            md += ["Host time per step (median ms until the step returns to Python, before "
                   "the GPU finishes; close to the step's time means launch-bound): "
                   + ", ".join(f"{k} {v:.2f}" for k, v in s["host_ms"].items()) + ".", ""]
        return md

    def overview_panel(self, result: dict[str, Any]) -> Callable[[Any], None] | None:
        def draw(ax: Any) -> None:
            rows = result["rows"]
            ax.bar(list(rows), [r["median_s"] * 1e3 for r in rows.values()],
                   color=["gray", "tab:blue", "tab:green", "tab:olive"][:len(rows)])
            ax.set_ylabel("ms per training step")
            ax.set_title(f"CRCKD over MT: {100 * result['crckd_over_mt']:.1f} %")

        return draw


SECTION = Train()
