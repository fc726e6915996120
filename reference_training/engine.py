"""The training engine: one run of one method on one split, with checkpoints, resume and DDP.

Each step (method §2-§6): the student sees view 1, the teacher view 2 (perturbed); the loss is
weighted CE + λ_KL(e)·KL(p_T ‖ p_S) + λ_CCD·L_CCD + λ_CRP·L_CRP, where L_CCD and L_CRP come
from :class:`crckd_losses.CRCKDLoss` on the features ``f``; Adam, OneCycleLR stepped every
iteration, then the EMA teacher update.

Under ``torchrun`` every rank draws the same global batches (its own slice), the same CCD
row samples (for the whole global batch) and, through the library, the same banks and ``Z``;
the weighted CE is normalised by the global batch's weight sum. So N processes give the
result of one process with the same global batch, up to BatchNorm (SyncBatchNorm is used
when ``sync_bn`` is on) and float summation order.
"""

from __future__ import annotations

import csv
import json
import math
import os
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from crckd_losses import CRCKDLoss, EMATeacher, IndexedDataset, unwrap_model
from crckd_losses.distributed import all_gather_varlen
from crckd_losses.functional import consistency_kl

from . import config as cfgmod
from . import data as datamod
from .metrics import METRICS, compute_metrics, confusion, format_table
from .models import build_network

CHECKPOINT_FORMAT = 1


class TrainingInterrupted(RuntimeError):
    """Raised by the hidden ``stop_after_steps`` option, to simulate a killed run in tests."""


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_distributed(device: str) -> bool:
    """Joins a ``torchrun`` job when ``WORLD_SIZE > 1`` (gloo on CPU, NCCL on CUDA)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return False
    dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return True


def _barrier() -> None:
    if _world()[1] > 1:
        dist.barrier()


def atomic_save(obj: Any, path: Path) -> None:
    """``torch.save`` to a temporary file in the same folder, then ``os.replace``."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _rng_state(generator: torch.Generator | None) -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    if generator is not None:
        state["sampler"] = generator.get_state()
    return state


def _set_rng_state(state: dict[str, Any], generator: torch.Generator | None) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if generator is not None and "sampler" in state:
        generator.set_state(state["sampler"])


def instance_sample_indices(indices: torch.Tensor, bank_size: int, num_negatives: int,
                            generator: torch.Generator | None) -> torch.Tensor:
    """CRD's rows (instance level): column 0 the anchor, then ``K`` rows of any class but the
    anchor itself, uniform with replacement. ``[B, 1 + K]``."""
    draw = torch.randint(bank_size - 1, (indices.shape[0], num_negatives),
                         device=indices.device, generator=generator)
    negatives = draw + (draw >= indices[:, None]).long()
    return torch.cat([indices[:, None], negatives], dim=1)


@torch.no_grad()
def predict(model: nn.Module, images: torch.Tensor, batch_size: int,
            device: torch.device, amp: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Probabilities ``[N, C]`` and features ``[N, d]`` of ``images`` (uint8), all ranks'
    shards gathered, in order."""
    rank, world = _world()
    part = datamod.shard(images.shape[0], rank, world)
    was_training = model.training
    model.eval()
    probs, feats = [], []
    for start in range(part.start, part.stop, batch_size):
        x = images[start:min(start + batch_size, part.stop)].to(device, non_blocking=True)
        with _autocast(device, amp):
            logits, f = model(x)
        probs.append(logits.float().softmax(1))
        feats.append(f.float())
    model.train(was_training)
    num_classes = unwrap_model(model).classifier.out_features
    dim = unwrap_model(model).feature.out_features
    prob = torch.cat(probs) if probs else torch.empty(0, num_classes, device=device)
    feat = torch.cat(feats) if feats else torch.empty(0, dim, device=device)
    if world > 1:
        prob, feat = all_gather_varlen(prob), all_gather_varlen(feat)
    return prob.cpu(), feat.cpu()


def _autocast(device: torch.device, amp: bool):  # type: ignore[no-untyped-def]
    if amp and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.float16)
    return nullcontext()


def _summarise(history: list[dict[str, float]], config: dict[str, Any],
               has_val: bool, prefix: str = "") -> dict[str, Any]:
    """The protocols over ``history``'s ``<prefix><part>_<metric>`` columns (``prefix``
    ``"teacher_"`` for the mean teacher's own)."""
    last = history[-min(config["last_epochs"], len(history)):]
    protocol: dict[str, Any] = {"epochs": [int(r["epoch"]) for r in last]}
    for part in ("val", "test") if has_val else ("test",):
        key = f"{prefix}{part}"
        protocol[part] = {m: float(np.nanmean([r[f"{key}_{m}"] for r in last]))
                          if any(math.isfinite(r[f"{key}_{m}"]) for r in last) else math.nan
                          for m in METRICS}
    best = None
    if has_val:
        key = f"{prefix}val_{config['select_metric']}"
        scores = [r[key] if math.isfinite(r[key]) else -math.inf for r in history]
        row = history[int(np.argmax(scores))]
        best = {"epoch": int(row["epoch"]),
                "val": {m: row[f"{prefix}val_{m}"] for m in METRICS},
                "test": {m: row[f"{prefix}test_{m}"] for m in METRICS}}
    return {"last_epochs": protocol, "best_on_val": best,
            "final_test": {m: history[-1][f"{prefix}test_{m}"] for m in METRICS}}


def teacher_setting(config: dict[str, Any]) -> dict[str, Any]:
    """The keyword arguments of :class:`crckd_losses.EMATeacher` besides ``decay``.

    ``teacher_buffers`` and ``teacher_train_mode`` null mean the recipe's: the released code
    keeps the teacher's own BatchNorm statistics and train mode (method §2); the paper recipe
    passes nothing, so it follows the library's defaults.
    """
    released = config["recipe"] == "released-code"
    setting: dict[str, Any] = {"buffers": "leave", "train_mode": True} if released else {}
    if config.get("teacher_buffers") is not None:
        setting["buffers"] = config["teacher_buffers"]
    if config.get("teacher_train_mode") is not None:
        setting["train_mode"] = bool(config["teacher_train_mode"])
    return setting


def summary_table(summary: dict[str, Any]) -> str:
    """The metric table printed at the end of a run (test metrics, in %)."""
    k = len(summary["last_epochs"]["epochs"])
    rows = {f"test, mean of last {k} epochs (paper)": summary["last_epochs"]["test"]}
    if summary.get("best_on_val"):
        best = summary["best_on_val"]
        rows[f"test at best val epoch ({best['epoch']})"] = best["test"]
        rows[f"val at best val epoch ({best['epoch']})"] = best["val"]
    return format_table(rows)


def _write_metrics(history: list[dict[str, float]], path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    # Every row's columns, in order of first appearance: a run resumed from a checkpoint of an
    # older version may have rows without the teacher's columns.
    fieldnames = list(dict.fromkeys(k for row in history for k in row))
    with open(tmp, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=fieldnames)
        writer.writeheader()
        writer.writerows(history)
    os.replace(tmp, path)


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def write_json(obj: Any, path: Path) -> None:
    """JSON with NaN written as ``null``, atomically."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(_json_safe(obj), indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def train(config: dict[str, Any], resume: str | Path | None = None,
          stop_after_steps: int | None = None, log: bool = True) -> dict[str, Any]:
    """Trains and evaluates one run; returns its summary (also written to the run folder).

    Args:
        config: a resolved config (:func:`reference_training.config.resolve`).
        resume: a run folder with ``last.pt`` to continue.
        stop_after_steps: raise :class:`TrainingInterrupted` after this many optimiser steps,
            without saving (what a kill does); for tests.
        log: print progress.
    """
    device_name = config["device"] or ("cuda" if torch.cuda.is_available() else "cpu")
    started_dist = init_distributed(device_name)
    try:
        return _train(config, device_name, resume, stop_after_steps, log)
    finally:
        if started_dist:
            dist.destroy_process_group()


def _train(config: dict[str, Any], device_name: str, resume: str | Path | None,
           stop_after_steps: int | None, log: bool) -> dict[str, Any]:
    rank, world = _world()
    log = log and rank == 0
    if device_name == "cuda" and world > 1:
        device_name = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    device = torch.device(device_name)
    if device.type == "cuda":
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(device)
    say = print if log else (lambda *a, **k: None)
    seed = int(config["seed"])

    # Data
    records = datamod.read_config_dataset(config)
    if config["max_images"]:
        records = datamod.limit_records(records, int(config["max_images"]), config["split_seed"])
    split = datamod.make_split(records, config)
    out_dir = Path(resume) if resume else Path(config["out"])
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        if not resume:
            write_json(config, out_dir / "config.json")
        datamod.write_split(out_dir / "split.csv", records, split)
    if rank == 0:
        images = datamod.load_images(records, config["image_size"], config["cache_dir"],
                                     config["num_workers"], log)
    _barrier()
    if rank != 0:
        images = datamod.load_images(records, config["image_size"], config["cache_dir"], 0, False)
    classes = records.classes
    num_classes = len(classes)
    train_idx = torch.as_tensor(split["train"])
    train_labels = torch.as_tensor(records.labels[split["train"]])
    eval_sets = {part: (images[torch.as_tensor(split[part])],
                        records.labels[split[part]]) for part in ("val", "test") if part in split}
    has_val = "val" in eval_sets
    weights_from = records.labels if config["recipe"] == "released-code" else train_labels.numpy()
    class_weight = datamod.class_weights(np.asarray(weights_from), num_classes).to(device)
    say(f"{records.name}: {len(records)} images, {num_classes} classes; "
        + ", ".join(f"{k} {len(v)}" for k, v in split.items()) + f"; out: {out_dir}")

    # Model, teacher, CRCKD parts; seeded here, so reading or decoding data changes nothing.
    torch.manual_seed(seed)
    student = build_network(config["model"], num_classes, config["feat_dim"],
                            config["pretrained"], config["weights"])
    if world > 1 and config["sync_bn"]:
        student = nn.SyncBatchNorm.convert_sync_batchnorm(student)
    student.to(device)
    teacher = None
    if cfgmod.uses_teacher(config):
        teacher = EMATeacher(student, decay=config["ema_decay"], **teacher_setting(config))
    crckd = None
    num_negatives = int(config["num_negatives"])
    if config["negatives_max_fraction"]:
        num_negatives = max(1, min(num_negatives,
                                   int(config["negatives_max_fraction"] * len(train_idx))))
    if cfgmod.uses_contrast(config):
        crckd = CRCKDLoss(
            train_labels.to(device), config["feat_dim"], config["feat_dim"],
            embed_dim=config["embed_dim"], num_positives=config["num_positives"],
            num_negatives=num_negatives, temperature=config["temperature"],
            momentum=config["bank_momentum"], ccd_weight=config["ccd_weight"],
            crp_weight=config["crp_weight"], normalizer=config["normalizer"],
            centroid_relu=config["centroid_relu"], sampler=config["sampler"],
            num_classes=num_classes,
        ).to(device)
    params = list(student.parameters()) + (list(crckd.parameters()) if crckd else [])
    optimizer = torch.optim.Adam(params, lr=config["lr"], betas=(0.9, 0.999),
                                 weight_decay=config["weight_decay"])
    batch_sampler = datamod.GlobalBatchSampler(len(train_idx), config["batch_size"], seed,
                                               rank, world)
    steps_per_epoch = batch_sampler.steps_per_epoch
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=config["lr"], total_steps=config["epochs"] * steps_per_epoch)
    use_amp = bool(config["amp"]) and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    model: nn.Module = student
    if world > 1:
        model = nn.parallel.DistributedDataParallel(
            student, device_ids=[device.index] if device.type == "cuda" else None)
    generator = torch.Generator(device=device).manual_seed(seed + 1)
    dataset = datamod.TwoViewDataset(images[train_idx], train_labels, seed)

    history: list[dict[str, float]] = []
    # Kept out of metrics.csv, which must not depend on timing or on where a run resumed, but
    # in the checkpoint, so that a resumed run's summary still covers every epoch.
    epoch_seconds: list[float] = []
    test_recalls: dict[int, list[float]] = {}
    start_epoch, start_step, meters = 0, 0, {}
    best_score = -math.inf
    if resume:
        state = torch.load(out_dir / "last.pt", map_location="cpu", weights_only=True)
        student.load_state_dict(state["student"])
        if teacher is not None:
            teacher.load_state_dict(state["teacher"])
        if crckd is not None:
            crckd.load_state_dict(state["crckd"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        _set_rng_state(state["rng"], generator)
        history, meters = list(state["history"]), dict(state["meters"])
        # Older checkpoints lack these two; the summary then covers this session's epochs.
        test_recalls = {int(e): list(r) for e, r in state.get("test_recalls", {}).items()}
        epoch_seconds = list(state.get("epoch_seconds", []))
        start_epoch, start_step = int(state["epoch"]), int(state["step"])
        best_score = float(state["best_score"])
        say(f"resumed {out_dir} at epoch {start_epoch + 1}, step {start_step}")

    def save(epoch: int, step: int) -> None:
        if rank != 0:
            return
        atomic_save({
            "format": CHECKPOINT_FORMAT, "epoch": epoch, "step": step, "config": config,
            "student": student.state_dict(),
            "teacher": teacher.state_dict() if teacher is not None else None,
            "crckd": crckd.state_dict() if crckd is not None else None,
            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict(), "rng": _rng_state(generator),
            "history": history, "meters": meters, "best_score": best_score,
            "test_recalls": test_recalls, "epoch_seconds": epoch_seconds,
        }, out_dir / "last.pt")

    say(f"method {config['method']} ({config['recipe']} recipe), model {config['model']} "
        f"({'ImageNet-pretrained' if config['pretrained'] or config['weights'] else 'from scratch'}"
        f"), {config['image_size']}px, {config['epochs']} epochs x {steps_per_epoch} steps, "
        f"batch {config['batch_size']}" + (f", K={num_negatives}" if crckd else "")
        + (f", {world} processes" if world > 1 else ""))
    local = batch_sampler.batch_size // world
    last_probs: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    t0 = time.time()
    global_step = start_epoch * steps_per_epoch + start_step
    for epoch in range(start_epoch, config["epochs"]):
        epoch_start = time.time()
        weights = cfgmod.loss_weights(config, epoch)
        first = start_step if epoch == start_epoch else 0
        if first == 0:
            meters = {}
        batch_sampler.set_epoch(epoch, first)
        dataset.set_epoch(epoch)
        loader = DataLoader(
            IndexedDataset(dataset), batch_sampler=batch_sampler,
            num_workers=config["num_workers"], pin_memory=device.type == "cuda",
            # A private generator: creating the iterator must not consume the global RNG,
            # or a resumed run would drift from an uninterrupted one.
            generator=torch.Generator().manual_seed(seed),
        )
        student.train()
        if teacher is not None:
            teacher.train()
        bar = _progress(loader, config, log, epoch, first, steps_per_epoch)
        for step, (batch_images, view_params, labels, indices) in enumerate(bar, start=first):
            batch_images = batch_images.to(device, non_blocking=True)
            view_params = view_params.to(device, non_blocking=True)
            view_s = datamod.apply_views(batch_images, view_params[:, 0])
            view_t = (datamod.apply_views(batch_images, view_params[:, 1])
                      if teacher is not None else None)
            labels = labels.to(device, non_blocking=True)
            indices = indices.to(device, non_blocking=True)
            terms: dict[str, torch.Tensor] = {}
            with _autocast(device, use_amp):
                logits_s, feat_s = model(view_s)
                nll = F.cross_entropy(logits_s.float(), labels, reduction="none")
                w = class_weight[labels]
                weight_sum = w.sum().detach()
                if world > 1:
                    dist.all_reduce(weight_sum)
                terms["ce"] = (w * nll).sum() / weight_sum * world
                if teacher is not None:
                    with torch.no_grad():
                        logits_t, feat_t = teacher(view_t)
                    terms["kl"] = consistency_kl(logits_s, logits_t)
                if crckd is not None:
                    rows = _sample_rows(crckd, config, batch_sampler, step, generator, device)
                    rows = rows[rank * local:(rank + 1) * local]
                    out = crckd(feat_s.float(), feat_t.float(), indices, sample_indices=rows)
                    terms["ccd"], terms["crp"] = out.ccd, out.crp
            loss = terms["ce"] + sum(weights[k] * v for k, v in terms.items() if k != "ce")
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if crckd is not None and world > 1:
                # The heads are outside DDP: average their gradients like DDP does.
                for p in crckd.parameters():
                    if p.grad is not None:
                        dist.all_reduce(p.grad)
                        p.grad.div_(world)
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            if teacher is not None:
                teacher.update(student)
            global_step += 1
            logged = {"loss": loss, **terms}
            values = torch.stack([v.detach().float() for v in logged.values()])
            if world > 1:  # log the global batch's losses, the same on every rank
                dist.all_reduce(values)
                values /= world
            for k, v in zip(logged, values.tolist(), strict=True):
                meters[k] = meters.get(k, 0.0) + v
            meters["n"] = meters.get("n", 0.0) + 1
            if log and hasattr(bar, "set_postfix"):
                bar.set_postfix({k: f"{v / meters['n']:.3f}" for k, v in meters.items()
                                 if k != "n"})
            every = int(config["checkpoint_every_steps"] or 0)
            if every and (step + 1) % every == 0 and step + 1 < steps_per_epoch:
                save(epoch, step + 1)
            if stop_after_steps is not None and global_step >= stop_after_steps:
                raise TrainingInterrupted(f"stopped after {global_step} steps")
        if hasattr(bar, "close"):
            bar.close()
        if first == 0:
            epoch_seconds.append(time.time() - epoch_start)

        row: dict[str, float] = {"epoch": float(epoch + 1)}
        n = max(meters.get("n", 1.0), 1.0)
        for k in ("loss", "ce", "kl", "ccd", "crp"):
            if k in meters:
                row[f"train_{k}"] = meters[k] / n
        row["lr"] = float(scheduler.get_last_lr()[0])
        row["kl_weight"], row["ccd_weight"], row["crp_weight"] = (
            weights["kl"], weights["ccd"], weights["crp"])
        for part, (part_images, part_labels) in eval_sets.items():
            probs, feats = predict(student, part_images, config["eval_batch_size"], device,
                                   use_amp)
            last_probs[part] = (probs, feats)
            for m, v in compute_metrics(part_labels, probs.numpy(), num_classes).items():
                row[f"{part}_{m}"] = v
            if part == "test":
                matrix = confusion(part_labels, probs.numpy(), num_classes)
                test_recalls[epoch + 1] = [float(matrix[c, c] / max(matrix[c].sum(), 1))
                                           for c in range(num_classes)]
        if teacher is not None:
            # The teacher's own metrics, after the student's columns so those keep their
            # places. predict() runs it in eval mode: BatchNorm on the teacher's running
            # statistics (for buffers="leave", the ones it kept itself), and dropout off.
            for part, (part_images, part_labels) in eval_sets.items():
                probs, _ = predict(teacher.module, part_images, config["eval_batch_size"],
                                   device, use_amp)
                for m, v in compute_metrics(part_labels, probs.numpy(), num_classes).items():
                    row[f"teacher_{part}_{m}"] = v
        history.append(row)
        score = row.get(f"val_{config['select_metric']}", -math.inf)
        if rank == 0:
            _write_metrics(history, out_dir / "metrics.csv")
            if has_val and math.isfinite(score) and score > best_score:
                best_score = score
                atomic_save({"student": student.state_dict(), "epoch": epoch + 1,
                             "config": config}, out_dir / "best.pt")
        say(f"epoch {epoch + 1}/{config['epochs']}: "
            + ", ".join(f"{k} {row[k]:.4f}" for k in row if k.startswith("train_"))
            + "; " + ", ".join(f"{p} auc {row[f'{p}_auc']:.4f} acc {row[f'{p}_accuracy']:.4f}"
                               for p in eval_sets))
        meters = {}
        save(epoch + 1, 0)

    if "test" not in last_probs:  # resumed a finished run
        last_probs["test"] = predict(student, eval_sets["test"][0], config["eval_batch_size"],
                                     device, use_amp)
    summary = _summarise(history, config, has_val)
    if teacher is not None and f"teacher_test_{METRICS[0]}" in history[0]:
        summary["teacher"] = {
            "buffers": teacher.buffers_mode, "train_mode": teacher.train_mode,
            "evaluated": "eval mode (BatchNorm on the teacher's running statistics, "
                         "dropout off)",
            **_summarise(history, config, has_val, prefix="teacher_"),
        }
    summary.update({
        "dataset": config["dataset"], "method": config["method"], "recipe": config["recipe"],
        "model": config["model"], "seed": seed, "fold": config["fold"], "tag": config["tag"],
        "epochs": config["epochs"], "num_negatives": num_negatives,
        "train_seconds_this_session": time.time() - t0, "world_size": world,
        "classes": list(classes),
        "train_seconds_per_epoch": (float(np.mean(epoch_seconds)) if epoch_seconds
                                    else None),
        "test_recall_per_class": _recall_summary(test_recalls, summary, classes),
        "notes": _notes(history, eval_sets, classes),
    })
    if rank == 0:
        write_json(summary, out_dir / "summary.json")
        _final_plots(history, last_probs, eval_sets, classes, out_dir, config)
        say("\n" + summary_table(summary))
    _barrier()
    return summary


def _sample_rows(crckd: CRCKDLoss, config: dict[str, Any],
                 batch_sampler: datamod.GlobalBatchSampler, step: int,
                 generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """Bank rows for the whole global batch (every rank draws the same), ``[B_global, P+K]``."""
    global_indices = batch_sampler.global_batch(step).to(device)
    if config["contrast"] == "instance":
        return instance_sample_indices(global_indices, crckd.student_bank.size,
                                       crckd.ccd.num_negatives, generator)
    return crckd.student_bank.sample(global_indices, crckd.ccd.num_positives,
                                     crckd.ccd.num_negatives, generator, config["sampler"])


def _progress(loader: DataLoader, config: dict[str, Any], log: bool, epoch: int, first: int,
              total: int):  # type: ignore[no-untyped-def]
    if not (log and config["progress"] and sys.stderr.isatty()):
        return loader
    from tqdm import tqdm

    return tqdm(loader, desc=f"epoch {epoch + 1}/{config['epochs']}", initial=first, total=total,
                leave=False, dynamic_ncols=True)


def _notes(history: list[dict[str, float]], eval_sets: dict[str, Any],
           classes: tuple[str, ...]) -> list[str]:
    notes = []
    for part, (_, labels) in eval_sets.items():
        absent = [classes[c] for c in range(len(classes)) if not (labels == c).any()]
        if absent:
            notes.append(f"{part}: classes {absent} have no image; AUC is the mean over the "
                         "classes present")
    if "val" not in eval_sets:
        notes.append("no validation split: only the last-epochs protocol is reported")
    return notes


def _recall_summary(recalls: dict[int, list[float]], summary: dict[str, Any],
                    classes: tuple[str, ...]) -> dict[str, Any]:
    """Per-class test recall: mean over the protocol's last epochs (those the checkpoint kept)
    and at the best validation epoch, for the imbalance claims of the results page."""
    out: dict[str, Any] = {}
    last = [recalls[e] for e in summary["last_epochs"]["epochs"] if e in recalls]
    if last:
        out["last_epochs"] = dict(zip(classes, np.mean(last, axis=0).tolist(), strict=True))
    best = summary.get("best_on_val")
    if best and best["epoch"] in recalls:
        out["best_on_val"] = dict(zip(classes, recalls[best["epoch"]], strict=True))
    return out


def _final_plots(history: list[dict[str, float]],
                 last: dict[str, tuple[torch.Tensor, torch.Tensor]],
                 eval_sets: dict[str, Any], classes: tuple[str, ...], out_dir: Path,
                 config: dict[str, Any]) -> None:
    from . import plots

    plots.plot_curves(history, out_dir)
    probs, feats = last["test"]
    labels = eval_sets["test"][1]
    plots.plot_confusion(confusion(labels, probs.numpy(), len(classes)), classes,
                         out_dir / "confusion_test.png")
    plots.plot_embedding(feats.numpy(), labels, classes, out_dir / "embedding_test.png",
                         config["embedding_plot"], config["seed"])
