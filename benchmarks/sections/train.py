"""One optimiser step of baseline (WCE), mean teacher (MT) and CRCKD on a ResNet-18."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from crckd_losses import CRCKDLoss, EMATeacher, functional
from crckd_losses._fused import use_fused

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


def run_train(bench: Bench) -> dict[str, Any]:
    """One optimiser step of baseline (WCE), mean teacher (MT) and CRCKD on ResNet-18."""
    p = dict(PAPER, image=64)
    if bench.quick:
        p.update(B=4, image=32, K=256, N=1000)
    dev = bench.device
    g = torch.Generator().manual_seed(5)
    labels = torch.cat([torch.arange(p["C"]),
                        torch.randint(0, p["C"], (p["N"] - p["C"],), generator=g)]).to(dev)
    counts = torch.bincount(labels, minlength=p["C"]).float()
    weight = counts.sum() / counts
    batch_idx = torch.randperm(p["N"], generator=g)[: p["B"]].to(dev)
    y = labels[batch_idx]
    view1 = torch.randn(p["B"], 3, p["image"], p["image"], generator=g).to(dev)
    view2 = torch.randn(p["B"], 3, p["image"], p["image"], generator=g).to(dev)

    # The library's default takes the fused (compiled) path only where "auto" selects it; the
    # other path is timed beside it (not in the quick grid: compiling takes a minute).
    default_fused = use_fused("auto", dev)
    other = "CRCKD, eager" if default_fused else "CRCKD, fused"
    kinds = ["baseline", "MT", "CRCKD"] + ([] if bench.quick else [other])

    def build(kind: str) -> Callable[[], None]:
        torch.manual_seed(0)
        student = _Net(p["C"]).to(dev)
        params = list(student.parameters())
        teacher = EMATeacher(student, decay=0.99) if kind != "baseline" else None
        crckd = None
        if kind.startswith("CRCKD"):
            fused: bool | str = "auto" if kind == "CRCKD" else not default_fused
            crckd = CRCKDLoss(labels, 128, 128, embed_dim=p["d"], num_positives=p["P"],
                              num_negatives=p["K"], temperature=p["tau"],
                              fused=fused).to(dev)  # type: ignore[arg-type]
            params += list(crckd.parameters())
        opt = torch.optim.Adam(params, lr=3e-4, weight_decay=5e-4)

        def step() -> None:
            f_s, logits = student(view1)
            loss = F.cross_entropy(logits, y, weight=weight)
            if teacher is not None:
                with torch.no_grad():
                    f_t, logits_t = teacher(view2)
                loss = loss + functional.consistency_kl(logits, logits_t)
                if crckd is not None:
                    loss = loss + crckd(f_s, f_t, batch_idx).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if teacher is not None:
                teacher.update(student)

        if crckd is not None and crckd.fused is not False:
            for _ in range(2):  # both compilations (the first step's Z, then steady state)
                step()
        return step

    fns = {kind: build(kind) for kind in kinds}
    # A CPU's memory tracker is a dispatch mode, under which the fused step runs eagerly.
    fused_row = ("CRCKD" if default_fused else other,) if bench.device.type == "cpu" else ()
    rows = bench.compare(fns, samples=p["B"], budget_s=3 * bench.budget_s, no_memory=fused_row)
    mt = rows["MT"]["median_s"]
    out = {"params": p, "rows": rows, "default_fused": default_fused,
           "crckd_over_mt": rows["CRCKD"]["median_s"] / mt - 1.0}
    if other in rows:
        out["other_path"] = other
        out["other_over_mt"] = rows[other]["median_s"] / mt - 1.0
    return out


TRAIN_OVERHEAD = "Training step: CRCKD over MT <= 15 %"
TRAIN_OVERHEAD_GPU = "Training step on a GPU: CRCKD (default) over MT <= 5 %"


class Train(Section):
    """The whole training step."""

    name = "train"

    def run(self, bench: Bench) -> dict[str, Any]:
        return run_train(bench)

    def targets(self, result: dict[str, Any], meta: dict[str, Any]) -> list[Target]:
        over = result["crckd_over_mt"]
        gpu = str(meta.get("device", "cpu")).startswith("cuda")
        text, bound = (TRAIN_OVERHEAD_GPU, 0.05) if gpu else (TRAIN_OVERHEAD, 0.15)
        return [target("train_overhead", text, over, bound, higher_is_better=False,
                       detail=f"{100 * over:.1f} % (value is a fraction)")]

    def markdown(self, result: dict[str, Any], meta: dict[str, Any], stem: str) -> list[str]:
        s = result
        md = ["## Whole training step", "",
              f"ResNet-18 + 128-d feature + classifier, Adam, random {s['params']['image']}px "
              f"images, `{params(s['params'])}`. CRCKD over MT: "
              f"{100 * s['crckd_over_mt']:.1f} % with the library's default path ("
              f"{'fused' if s.get('default_fused') else 'eager'} on this device)."]
        if "other_path" in s:
            md[-1] += (f" {s['other_path']} over MT: {100 * s['other_over_mt']:.1f} % "
                       f"(`fused={not s['default_fused']}`).")
        md.append("")
        return md + table(s["rows"], "MT") + [""]

    def overview_panel(self, result: dict[str, Any]) -> Callable[[Any], None] | None:
        def draw(ax: Any) -> None:
            rows = result["rows"]
            ax.bar(list(rows), [r["median_s"] * 1e3 for r in rows.values()],
                   color=["gray", "tab:blue", "tab:green", "tab:olive"][:len(rows)])
            ax.set_ylabel("ms per training step")
            ax.set_title(f"CRCKD over MT: {100 * result['crckd_over_mt']:.1f} %")

        return draw


SECTION = Train()
