"""One EMA update of the teacher: the library against a per-parameter loop, timm's
``ModelEmaV3`` and torch's ``AveragedModel``, after checking that they compute the same.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from crckd_losses import EMATeacher

from .. import references
from .common import Bar, Bench, Section, Target, bar, fmt, ratio, rel_diff, table, target


def _state(model: nn.Module) -> list[torch.Tensor]:
    return [t.detach().clone() for t in model.state_dict().values()]


def _ema_contenders(student: nn.Module, decay: float) -> dict[str, tuple[Any, Callable[[], None]]]:
    """name -> (teacher module, one update); every teacher starts as a copy of ``student``."""
    out: dict[str, tuple[Any, Callable[[], None]]] = {}
    lib_copy = EMATeacher(student, decay=decay, warmup=False, buffers="copy")
    out["library (buffers copied)"] = (lib_copy.module, lambda: lib_copy.update(student))
    lib_avg = EMATeacher(student, decay=decay, warmup=False, buffers="average")
    out["library (buffers averaged)"] = (lib_avg.module, lambda: lib_avg.update(student))
    loop_copy = copy.deepcopy(student)
    out["loop (buffers copied)"] = (
        loop_copy, lambda: references.loop_ema(loop_copy, student, decay, average_buffers=False)
    )
    loop_avg = copy.deepcopy(student)
    out["loop (buffers averaged)"] = (
        loop_avg, lambda: references.loop_ema(loop_avg, student, decay, average_buffers=True)
    )
    try:
        from timm.utils.model_ema import ModelEmaV3

        timm_ema = ModelEmaV3(student, decay=decay)
        timm_ema.module.train(student.training)
        out["timm ModelEmaV3"] = (timm_ema.module, lambda: timm_ema.update(student))
    except ImportError:
        pass
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    averaged = AveragedModel(student, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=False)
    averaged.update_parameters(student)  # the first call copies; later calls average
    out["torch AveragedModel"] = (averaged.module, lambda: averaged.update_parameters(student))
    return out


#: Contenders that compute the same thing, for the value check: parameters averaged, and
#: buffers either copied or averaged.
EMA_GROUPS = {
    "copy": ("library (buffers copied)", "loop (buffers copied)", "torch AveragedModel"),
    "average": ("library (buffers averaged)", "loop (buffers averaged)", "timm ModelEmaV3"),
}


def check_ema(student: nn.Module, decay: float = 0.99, steps: int = 3) -> dict[str, float]:
    """Asserts that every EMA contender matches its group's library result after ``steps``."""
    student = copy.deepcopy(student)
    contenders = _ema_contenders(student, decay)
    g = torch.Generator().manual_seed(4)
    for _ in range(steps):
        with torch.no_grad():
            for t in student.state_dict().values():
                if t.is_floating_point():
                    t.add_(torch.randn(t.shape, generator=g).to(t) * 0.1)
                else:
                    t.add_(1)
        for _, update in contenders.values():
            update()
    diffs = {}
    for members in EMA_GROUPS.values():
        want = _state(contenders[members[0]][0])
        for name in members[1:]:
            if name not in contenders:
                continue
            got = _state(contenders[name][0])
            diffs[name] = max(rel_diff(a, b) for a, b in zip(got, want))
            if diffs[name] > 1e-5:
                raise AssertionError(f"EMA {name} differs from the library by {diffs[name]:.3g}")
    return diffs


def run_ema(bench: Bench) -> dict[str, Any]:
    """EMA update of DenseNet-121 and ResNet-50: library against loops, timm, torch."""
    import torchvision

    names = ("resnet18",) if bench.quick else ("densenet121", "resnet50")
    points = []
    for name in names:
        torch.manual_seed(0)
        student = getattr(torchvision.models, name)(weights=None).to(bench.device)
        checks = check_ema(student)
        contenders = _ema_contenders(student, decay=0.99)
        fns = {k: v[1] for k, v in contenders.items()}
        rows = bench.compare(fns, samples=None)
        points.append({
            "model": name,
            "parameters": sum(p.numel() for p in student.parameters()),
            "parameter_tensors": len(list(student.parameters())),
            "buffer_tensors": len(list(student.buffers())),
            "rows": rows,
            "max_rel_diff": checks,
        })
        del contenders, fns, student
    return {"points": points}


EMA_LOOP = "EMA: per-parameter loop / library >= 2.5 (each model)"
EMA_TIMM = "EMA: timm ModelEmaV3 / library >= 1 (each model, same buffer handling)"
EMA_COPY = ("EMA: library with buffers copied / with buffers averaged <= 1 (each model; "
            "copying the buffers costs no more than averaging them)")
#: The library's two buffer modes, timed together in each model's comparison.
LIB_COPY, LIB_AVERAGE = "library (buffers copied)", "library (buffers averaged)"


class EMA(Section):
    """The EMA update."""

    name = "ema"

    def run(self, bench: Bench) -> dict[str, Any]:
        return run_ema(bench)

    def targets(self, result: dict[str, Any], meta: dict[str, Any]) -> list[Target]:
        points = result["points"]
        loops = [(p["model"], ratio(p["rows"], "loop (buffers copied)",
                                    "library (buffers copied)")) for p in points]
        timms = [(p["model"], ratio(p["rows"], "timm ModelEmaV3", "library (buffers averaged)"))
                 for p in points]
        out = []
        for key, text, pairs, bound in (("ema_loop", EMA_LOOP, loops, 2.5),
                                        ("ema_timm", EMA_TIMM, timms, 1.0)):
            values = [v for _, v in pairs if v is not None]
            worst = min(values) if values else None
            out.append(target(key, text, worst, bound,
                              detail=", ".join(f"{m}: {fmt(v)}x" for m, v in pairs)))
        copies = [(p["model"], ratio(p["rows"], LIB_COPY, LIB_AVERAGE)) for p in points]
        values = [v for _, v in copies if v is not None]
        worst = max(values) if values else None
        out.append(target("ema_copy", EMA_COPY, worst, 1.0, higher_is_better=False,
                          detail=", ".join(f"{m}: {fmt(v)}x" for m, v in copies)))
        return out

    def markdown(self, result: dict[str, Any], meta: dict[str, Any], stem: str) -> list[str]:
        md = ["## EMA update", "",
              "One update of the teacher, decay 0.99. `buffers copied` = parameters averaged, "
              "buffers copied (torch AveragedModel with use_buffers=False); `buffers "
              "averaged` = floating buffers averaged too (timm ModelEmaV3; the library's "
              "default since 0.2).", ""]
        for p in result["points"]:
            md += [f"{p['model']} ({p['parameters']:,} parameters in {p['parameter_tensors']} "
                   f"tensors, {p['buffer_tensors']} buffers):", ""]
            md += table(p["rows"], LIB_COPY, "updates/s") + [""]
            t, m = (ratio(p["rows"], LIB_COPY, LIB_AVERAGE, k) for k in ("median_s", "peak_bytes"))
            md += [f"Library, buffers copied against buffers averaged: {fmt(t)}"
                   f"{'x' if t is not None else ''} the time, {fmt(m)}"
                   f"{'x' if m is not None else ''} the peak extra memory.", ""]
        return md

    def bars(self, result: dict[str, Any], meta: dict[str, Any]) -> list[Bar]:
        out: list[Bar] = []
        for p in result["points"]:
            out += bar(f"EMA {p['model']} vs loop",
                       ratio(p["rows"], "loop (buffers copied)", "library (buffers copied)"), 2.5)
            out += bar(f"EMA {p['model']} vs timm ModelEmaV3",
                       ratio(p["rows"], "timm ModelEmaV3", "library (buffers averaged)"), 1.0)
            out += bar(f"EMA {p['model']} vs torch AveragedModel",
                       ratio(p["rows"], "torch AveragedModel", "library (buffers copied)"), None)
        return out


SECTION = EMA()
