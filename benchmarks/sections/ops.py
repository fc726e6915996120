"""Operator counts: how many aten operators (views left out) one default ``CRCKDLoss`` step and
one ``EMATeacher.update`` execute, and how many of them read a tensor value on the host.

Counted on CPU with :class:`~benchmarks.measure.OpCounter`, whatever the run's device. What
differs between a CPU's eager step and an accelerator's is the value checks, which each policy
of ``crckd_losses.set_value_checks`` decides (``"auto"``, the default, reads values and
raises early on a CPU and reads none on an accelerator; ``"mask"`` reads none anywhere). The
``"auto"`` row is a CPU's default step as it runs; the ``"mask"`` row is the operator list an
accelerator runs eagerly. Each count is of the third call, after two warm-up calls.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from crckd_losses import CRCKDLoss, EMATeacher, graph_crckd_loss

from ..measure import HOST_SYNC_OP, count_ops
from .ccd import ccd_fns, make_ccd_inputs, triton_row
from .common import (
    PAPER,
    Bench,
    Section,
    Target,
    ValueChecksUnsupported,
    params,
    target,
    value_checks,
)

#: The GPU kernel count's key for the step with ``backend="triton"``.
TRITON_KERNELS = 'backend="triton"'
#: The row of the GPU kernel table whose step replays its graphs (``graph_crckd_loss``).
LOSS_GRAPHED = "auto, loss graphed"
#: The value-check policies counted; the targets hold under ``"mask"``.
POLICIES = ("auto", "mask")
#: Calls before the counted one.
WARMUP = 2
#: Operators listed per count.
TOP = 12

#: Operators one default CRCKDLoss step (fwd + bwd, paper sizes) may run on an accelerator:
#: half the 255 it ran before the count became a target, rounded down.
STEP_OP_BUDGET = 125
STEP_OPS = ("Non-view aten ops per default CRCKDLoss step (fwd + bwd), value checks \"mask\" "
            f"<= {STEP_OP_BUDGET}")
HOST_SYNCS = "Host syncs per default CRCKDLoss step (fwd + bwd), value checks \"mask\" = 0"


def _summary(counts: dict[str, int]) -> dict[str, Any]:
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    return {
        "total": sum(counts.values()),
        "host_syncs": counts.get(HOST_SYNC_OP, 0),
        "distinct": len(counts),
        "top": [[name, n] for name, n in ranked[:TOP]],
        "by_op": dict(ranked),
    }


def crckd_step(p: dict[str, Any], seed: int = 0, device: torch.device | None = None,
               backend: str = "auto", graphed: bool = False) -> Callable[[], None]:
    """One default ``CRCKDLoss`` step (forward and ``loss.backward()``) at sizes ``p`` on
    ``backend``; every call takes the next batch of a fixed random order. ``graphed``: the
    module called through ``graph_crckd_loss``, so that its second call captures its graphs
    and later calls replay them."""
    device = device or torch.device("cpu")
    g = torch.Generator().manual_seed(seed)
    labels = torch.cat([torch.arange(p["C"]),
                        torch.randint(0, p["C"], (p["N"] - p["C"],), generator=g)])
    loss_fn = CRCKDLoss(labels, p["d"], p["d"], embed_dim=p["d"], num_positives=p["P"],
                        num_negatives=p["K"], temperature=p["tau"],
                        backend=backend).to(device)  # type: ignore[arg-type]
    call = graph_crckd_loss(loss_fn, p["B"]) if graphed else loss_fn
    order = torch.randperm(p["N"], generator=g).to(device)
    student = torch.randn(p["B"], p["d"], generator=g).to(device).requires_grad_()
    teacher = torch.randn(p["B"], p["d"], generator=g).to(device)
    calls = [0]

    def step() -> None:
        start = (calls[0] * p["B"]) % (p["N"] - p["B"])
        calls[0] += 1
        out = call(student, teacher, order[start : start + p["B"]])
        out.loss.backward()

    def fresh_step() -> None:
        # As after ``optimizer.zero_grad(set_to_none=True)``: backward writes new gradients.
        student.grad = None
        for q in loss_fn.parameters():
            q.grad = None
        step()

    return fresh_step


class SmallCNN(nn.Module):
    """Two conv-BN-ReLU blocks, pooling and a linear head: a small teacher for the EMA count."""

    def __init__(self, num_classes: int = 7) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.head = nn.Linear(32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def _counted(fn: Callable[[], None]) -> dict[str, int]:
    for _ in range(WARMUP):
        fn()
    return dict(count_ops(fn).counts)


def count_crckd(p: dict[str, Any], policy: str) -> dict[str, Any]:
    """The operator count of a default ``CRCKDLoss`` step under a value-check policy: as a CPU
    runs it under ``"auto"``, as an accelerator runs it under ``"mask"``."""
    try:
        with value_checks(policy):
            counts = _counted(crckd_step(p))
    except ValueChecksUnsupported as e:
        return {"skipped": str(e)}
    return _summary(counts)


def count_ccd(p: dict[str, Any]) -> dict[str, Any]:
    """The operator count of one CCD call on the dense backend (both directions, ``L_S +
    L_T`` forward and backward) as an accelerator runs it eagerly: value checks ``"mask"``.
    ``backend="triton"`` replaces these operators with its kernels."""
    x = make_ccd_inputs(p["B"], p["d"], p["P"], p["K"], p["N"], torch.device("cpu"), p["C"])
    try:
        with value_checks("mask"):
            counts = _counted(ccd_fns(x, torch.float32, torch.device("cpu"), ("dense",))["dense"])
    except ValueChecksUnsupported as e:
        return {"skipped": str(e)}
    return _summary(counts)


def count_ema(buffers: str) -> dict[str, Any]:
    """The operator count of one ``EMATeacher.update`` of :class:`SmallCNN`."""
    torch.manual_seed(0)
    student = SmallCNN()
    teacher = EMATeacher(student, buffers=buffers)  # type: ignore[arg-type]
    model = sum(1 for _ in student.parameters()), sum(1 for _ in student.buffers())
    out = _summary(_counted(lambda: teacher.update(student)))
    out["parameter_tensors"], out["buffer_tensors"] = model
    return out


def run_ops(bench: Bench) -> dict[str, Any]:
    """Operator counts of a CRCKDLoss step under each value-check policy and of an EMA update."""
    p = dict(PAPER)
    out: dict[str, Any] = {"device": "cpu", "params": p, "warmup": WARMUP, "crckd_step": {},
                           "ema_update": {}}
    for policy in POLICIES:
        out["crckd_step"][policy] = count_crckd(p, policy)
        if "skipped" in out["crckd_step"][policy]:
            bench.skipped.append(f"ops: policy {policy!r}: "
                                 f"{out['crckd_step'][policy]['skipped']}")
    out["ccd_pair"] = count_ccd(p)
    for buffers in ("copy", "average"):
        out["ema_update"][buffers] = count_ema(buffers)
    if bench.device.type == "cuda":
        out["gpu_kernels"] = {}
        # (row, backend, whether the step replays its graphs: graph_crckd_loss)
        variants = [("dense", "dense", False), ("auto", "auto", False)]
        if triton_row(bench.device):
            variants.append((TRITON_KERNELS, "triton", False))
        variants.append((LOSS_GRAPHED, "auto", True))
        for key, backend, graphed in variants:
            try:
                out["gpu_kernels"][key] = count_kernels(p, bench.device, backend,
                                                        graphed=graphed)
            except Exception as exc:  # noqa: BLE001 - recorded in the results, not hidden
                bench.skipped.append(f"ops: GPU kernel count, {key}: {exc!r}")
    return out


def count_kernels(p: dict[str, Any], device: torch.device, backend: str, calls: int = 5,
                  graphed: bool = False) -> dict[str, float]:
    """GPU kernels (and copies and fills) one ``CRCKDLoss`` step on ``backend`` launches, and
    their summed GPU time, from ``torch.profiler`` over ``calls`` steps after three warm-up
    steps (which compile where the step is compiled); the profiler sees Triton's kernels too.
    ``graphed`` calls the module through ``graph_crckd_loss``, which captures at the second
    warm-up step:
    the kernels are then those the profiler reports inside the replayed graphs and around
    them, and the host's side shows what replaying costs."""
    from torch.profiler import ProfilerActivity, profile

    step = crckd_step(p, device=device, backend=backend, graphed=graphed)
    for _ in range(3):
        step()
    torch.cuda.synchronize(device)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            step()
        torch.cuda.synchronize(device)
    kinds = torch.autograd.DeviceType  # type: ignore[attr-defined]
    events = prof.events()
    # The host's side: operators, launches and runtime calls by their own (self) CPU time,
    # what makes a step launch-bound where the GPU time is small.
    return kernel_table_entry(
        [(e.name, e.device_time) for e in events if e.device_type == kinds.CUDA],
        [(e.name, e.self_cpu_time_total) for e in events if e.device_type == kinds.CPU],
        calls)


def kernel_table_entry(kernels: list[tuple[str, float]], host: list[tuple[str, float]],
                       calls: int) -> dict[str, Any]:
    """One row of the GPU kernel table from the profiler's ``(name, us)`` pairs of ``calls``
    steps: the kernels (GPU time) and the host's events (self CPU time), each per step."""
    gpu, cpu = event_summary(kernels, calls), event_summary(host, calls)
    return {"kernels": gpu["count"], "gpu_us": gpu["us"], "top": gpu["top"],
            "host_us": cpu["us"], "host_top": cpu["top"]}


#: Events listed by name in the GPU kernel table: the most expensive ones of a step.
TOP_KERNELS = 6


def event_summary(events: list[tuple[str, float]], calls: int,
                  top: int = TOP_KERNELS) -> dict[str, Any]:
    """Per step: how many events (kernels, or host operators), their summed time (us), and
    the ``top`` names by summed time with their count and time per step, from ``(name, us)``
    pairs of ``calls`` steps. The names tell the next change where a step's time goes."""
    by_name: dict[str, list[float]] = {}
    for name, us in events:
        entry = by_name.setdefault(name, [0.0, 0.0])
        entry[0] += 1
        entry[1] += us
    ranked = sorted(by_name.items(), key=lambda kv: (-kv[1][1], kv[0]))[:top]
    return {"count": len(events) / calls, "us": sum(us for _, us in events) / calls,
            "top": [[name, n / calls, us / calls] for name, (n, us) in ranked]}


def _short(name: str, width: int = 90) -> str:
    """A kernel's name for a table cell: namespaces ``at::native::`` and ``(anonymous
    namespace)::`` and a leading ``void`` dropped, at most ``width`` characters (the
    template arguments, which tell elementwise kernels apart, come first), pipes escaped."""
    for noise in ("(anonymous namespace)::", "at::native::"):
        name = name.replace(noise, "")
    name = name.removeprefix("void ").strip()
    name = name if len(name) <= width else name[:width - 3] + "..."
    return name.replace("|", "\\|").replace("`", "'")


class Ops(Section):
    """Operator and host-sync counts."""

    name = "ops"

    def run(self, bench: Bench) -> dict[str, Any]:
        return run_ops(bench)

    def targets(self, result: dict[str, Any], meta: dict[str, Any]) -> list[Target]:
        mask = result["crckd_step"].get("mask", {})
        detail = ", ".join(
            f"{policy}: {c['total']} ops, {c['host_syncs']} host syncs"
            if "total" in c else f"{policy}: skipped"
            for policy, c in result["crckd_step"].items()
        )
        return [target("crckd_step_ops", STEP_OPS, mask.get("total"), STEP_OP_BUDGET,
                       higher_is_better=False, detail=detail),
                target("crckd_step_host_syncs", HOST_SYNCS, mask.get("host_syncs"), 0,
                       higher_is_better=False, detail=detail)]

    def markdown(self, result: dict[str, Any], meta: dict[str, Any], stem: str) -> list[str]:
        md = ["## Operator counts", "",
              "aten operators executed by one call, counted with a `TorchDispatchMode` on CPU "
              f"after {result['warmup']} warm-up calls; views (`OpOverload.is_view`) and "
              "`detach` left out. Host syncs are `aten._local_scalar_dense` calls (a value "
              "read on the host). `auto` is a CPU's default step as it runs (its value checks "
              "read values); `mask` reads no values: its count is an accelerator's eager "
              "step.", "",
              f"Default `CRCKDLoss` step, forward + `loss.backward()`, "
              f"`{params(result['params'])}`:", "",
              "| value checks | non-view ops | host syncs | distinct ops | top ops |",
              "|---|---:|---:|---:|---|"]
        for policy, c in result["crckd_step"].items():
            if "total" not in c:
                md.append(f"| {policy} | skipped | | | {c.get('skipped', '')} |")
                continue
            md.append(f"| {policy} | {c['total']} | {c['host_syncs']} | {c['distinct']} | "
                      + ", ".join(f"{name.removeprefix('aten.')} {n}" for name, n in c["top"])
                      + " |")
        c = result.get("ccd_pair", {})
        if "total" in c:
            md += ["", "CCD alone: one call of the dense backend's CCD pair, both directions, "
                   "`L_S + L_T` forward and backward, value "
                   f"checks `mask`: {c['total']} ops, {c['host_syncs']} host syncs ("
                   + ", ".join(f"{name.removeprefix('aten.')} {n}" for name, n in c["top"])
                   + "). `backend=\"triton\"` computes the same in five kernel launches (on a "
                   "GPU the kernel table below counts a whole step with it)."]
        md += ["", "`EMATeacher.update` of a small CNN (two conv-BN-ReLU blocks and a linear "
               "head):", "",
               "| buffers | parameter tensors | buffer tensors | non-view ops | host syncs | "
               "top ops |", "|---|---:|---:|---:|---:|---|"]
        for buffers, c in result["ema_update"].items():
            md.append(f"| {buffers} | {c['parameter_tensors']} | {c['buffer_tensors']} | "
                      f"{c['total']} | {c['host_syncs']} | "
                      + ", ".join(f"{name.removeprefix('aten.')} {n}" for name, n in c["top"])
                      + " |")
        if result.get("gpu_kernels"):
            md += ["", "GPU kernels (with copies and fills) one default `CRCKDLoss` step "
                   "launches on this device, counted with `torch.profiler`, and their summed "
                   "GPU time (`backend=` the setting; `dense` and `triton` run the step "
                   "eagerly, `auto` compiles it; `auto, loss graphed` replays the step from the "
                   "graphs of `graph_crckd_loss`, its kernels counted as the profiler reports "
                   "them inside the graphs, its launches being fewer):", "",
                   "| backend | kernels per step | GPU time per step (us) |", "|---|---:|---:|"]
            for backend, k in result["gpu_kernels"].items():
                md.append(f"| {backend} | {k['kernels']:.0f} | {k['gpu_us']:.0f} |")
            tops = {f: k["top"] for f, k in result["gpu_kernels"].items() if k.get("top")}
            if tops:
                md += ["", "Where each step's GPU time goes: its most expensive kernels by "
                       "summed GPU time (launches and microseconds per step):", "",
                       "| backend | kernel | launches | GPU us |", "|---|---|---:|---:|"]
                for backend, rows in tops.items():
                    md += [f"| {backend} | `{_short(name)}` | {n:g} | {us:.1f} |"
                           for name, n, us in rows]
            hosts = {f: k for f, k in result["gpu_kernels"].items() if k.get("host_top")}
            if hosts:
                md += ["", "The host's side of the same steps under the profiler (which adds "
                       "its own overhead): self CPU time per step of all recorded events, and "
                       "the most expensive by name (calls and microseconds per step):", "",
                       "| backend | host us per step | event | calls | self CPU us |",
                       "|---|---:|---|---:|---:|"]
                for backend, k in hosts.items():
                    md += [f"| {backend} | {k['host_us']:.0f} | `{_short(name)}` | {n:g} | "
                           f"{us:.1f} |" for name, n, us in k["host_top"]]
        return md + [""]


SECTION = Ops()
