"""The training engine: one run of one method on one split, with checkpoints, resume and DDP.

In the shape of timm's ``train.py``: :func:`build_run` sets everything up, :func:`train_step`
is one optimiser step, :func:`train_one_epoch` loops over the batches, :func:`evaluate` scores
the student and the teacher, :mod:`reference_training.checkpoint` saves and restores, and
:func:`train` strings them together and writes the run folder
(:mod:`reference_training.runfiles`).

Each step (method §2-§6): the student sees view 1, the teacher view 2 (perturbed); the loss is
weighted CE + λ_KL(e)·KL(p_T ‖ p_S) + λ_CCD·L_CCD + λ_CRP·L_CRP, where L_CCD and L_CRP come
from :class:`crckd_losses.CRCKDLoss` on the features ``f``; Adam, OneCycleLR stepped every
iteration, then the EMA teacher update.

Under ``torchrun`` every rank draws the same global batches (its own slice), the same CCD
row samples (for the whole global batch) and, through the library, the same banks and ``Z``;
the student and ``CRCKDLoss`` are each wrapped in DDP as ``docs/howto/distributed.rst``
describes, and the weighted CE is normalised by the global batch's weight sum. So N processes
give the result of one process with the same global batch, up to BatchNorm (SyncBatchNorm is
used when ``sync_bn`` is on) and float summation order.
"""

from __future__ import annotations

import csv
import math
import os
import shlex
import sys
import time
from contextlib import nullcontext, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from crckd_losses import CRCKDLoss, EMATeacher, IndexedDataset, unwrap_model
from crckd_losses.distributed import all_gather_varlen, world_size
from crckd_losses.functional import categorical_relation_loss, consistency_kl
from crckd_losses.sampling import class_anchor_indices, instance_indices

from . import checkpoint, environment, errors, runfiles, tensorboard_log
from . import data as datamod
from . import recipe as recipemod
from .checkpoint import Progress
from .metrics import METRICS, compute_metrics, confusion, format_table
from .models import build_network

# kept importable under its old name: the teacher's keyword arguments come from the recipe
teacher_setting = recipemod.teacher_setting


class TrainingInterrupted(RuntimeError):
    """Raised by the hidden ``stop_after_steps`` option, to simulate a killed run in tests."""


class NonFiniteLoss(errors.UserError):
    """The loss (or the weights) stopped being finite: the run stops, saying where."""


class RunStopped(KeyboardInterrupt):
    """Ctrl-C during a run; its message says what is kept and how to resume."""


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def init_distributed(device: str) -> bool:
    """Joins a ``torchrun`` job when ``WORLD_SIZE > 1`` (gloo on CPU, NCCL on CUDA)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return False
    dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return True


def _barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def autocast(device: torch.device, config: dict[str, Any]):  # type: ignore[no-untyped-def]
    """The run's autocast context: float16 or bfloat16 on CUDA when ``amp`` is on."""
    if config["amp"] and device.type == "cuda":
        return torch.autocast("cuda", dtype=getattr(torch, config["amp_dtype"]))
    return nullcontext()


@torch.no_grad()
def predict(model: nn.Module, images: torch.Tensor, batch_size: int, device: torch.device,
            config: dict[str, Any] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Probabilities ``[N, C]`` and features ``[N, d]`` of ``images`` (uint8), in eval mode,
    all ranks' shards gathered, in order. ``config`` sets autocast (none when omitted)."""
    rank, world = _rank(), world_size()
    part = datamod.shard(images.shape[0], rank, world)
    was_training = model.training
    model.eval()
    channels_last = bool(config and config.get("channels_last")) and device.type == "cuda"
    probs, feats = [], []
    for start in range(part.start, part.stop, batch_size):
        x = images[start:min(start + batch_size, part.stop)].to(device, non_blocking=True)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(device, config) if config else nullcontext():
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


@dataclass
class Run:
    """Everything one run's loop touches, built once by :func:`build_run`."""

    config: dict[str, Any]
    device: torch.device
    rank: int
    world: int
    out_dir: Path
    records: datamod.Records
    split: dict[str, np.ndarray]
    eval_sets: dict[str, tuple[torch.Tensor, np.ndarray]]
    class_weight: torch.Tensor
    student: nn.Module
    model: nn.Module  # the student, DDP-wrapped under torchrun
    teacher: EMATeacher | None
    crckd: CRCKDLoss | None
    crckd_step: nn.Module | None  # CRCKDLoss, DDP-wrapped under torchrun
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.OneCycleLR
    scaler: torch.amp.GradScaler
    generator: torch.Generator
    dataset: datamod.TwoViewDataset
    batch_sampler: datamod.GlobalBatchSampler
    num_negatives: int
    weights_note: str = ""  # what the student's weights were loaded from, for the banner
    saved_at: tuple[int, int] | None = None  # (epoch, step) of the last.pt on disk
    progress: Progress = field(default_factory=Progress)

    @property
    def classes(self) -> tuple[str, ...]:
        return self.records.classes

    @property
    def has_val(self) -> bool:
        return "val" in self.eval_sets


def _device(config: dict[str, Any], world: int) -> torch.device:
    name = config["device"] or ("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and world > 1:
        name = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    device = torch.device(name)
    if device.type == "cuda":
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(device)
    return device


def num_negatives_of(config: dict[str, Any], train_size: int) -> int:
    """``K``, capped to ``negatives_max_fraction`` of the training set when that is set."""
    k = int(config["num_negatives"])
    if config["negatives_max_fraction"]:
        k = max(1, min(k, int(config["negatives_max_fraction"] * train_size)))
    return k


def build_run(config: dict[str, Any], resume: Path | None, log: bool) -> Run:
    """Reads the data and split, builds the networks, the CRCKD parts and the optimiser, and
    restores ``resume``'s checkpoint. The backbone is built before any image is decoded, so
    missing ImageNet weights stop the run at once. A ``ValueError`` here is about the run's
    inputs, and becomes an :class:`~reference_training.errors.InputError`."""
    with errors.about_inputs():
        return _build_run(config, resume, log)


def _weights_note(config: dict[str, Any], student: nn.Module, resume: Path | None) -> str:
    """What the banner says of the student's weights: what was loaded, from where."""
    if resume:
        return f"weights restored from {resume / runfiles.LAST_CHECKPOINT}"
    source = getattr(student, "weights_source", None)
    if source:
        return f"{'' if config['weights'] else 'ImageNet '}weights from {source}"
    if config["pretrained"]:
        return f"randomly initialised: {config['model']} has no ImageNet weights"
    return "randomly initialised"


def _read_data(config: dict[str, Any]) -> tuple[datamod.Records, dict[str, np.ndarray]]:
    records = datamod.read_config_dataset(config)
    if config["max_images"]:
        records = datamod.limit_records(records, int(config["max_images"]), config["split_seed"])
    return records, datamod.make_split(records, config)


def _write_and_load(config: dict[str, Any], out_dir: Path, resume: Path | None, rank: int,
                    records: datamod.Records, split: dict[str, np.ndarray],
                    log: bool) -> torch.Tensor:
    """Rank 0 writes ``config.json`` (a fresh run) and ``split.csv``, after checking that a
    folder's earlier split is this data's (a resumed run, maybe moved elsewhere); every rank
    gets the decoded images."""
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        if not resume:
            runfiles.write_json(config, out_dir / runfiles.CONFIG)
        if (out_dir / runfiles.SPLIT).is_file():
            datamod.check_same_data(out_dir / runfiles.SPLIT, records, split)
        datamod.write_split(out_dir / runfiles.SPLIT, records, split)
        images = datamod.load_images(records, config["image_size"], config["cache_dir"],
                                     config["num_workers"], log, config.get("dicom_window"))
    _barrier()
    if rank != 0:
        images = datamod.load_images(records, config["image_size"], config["cache_dir"], 0, False,
                                     config.get("dicom_window"))
    return images


def _contrast_loss(config: dict[str, Any], train_labels: torch.Tensor, num_negatives: int,
                   num_classes: int, device: torch.device) -> CRCKDLoss | None:
    if not recipemod.uses_contrast(config):
        return None
    sampler = {} if config["sampler"] is None else {"sampler": config["sampler"]}
    return CRCKDLoss(
        train_labels.to(device), config["feat_dim"], config["feat_dim"],
        embed_dim=config["embed_dim"], num_positives=config["num_positives"],
        num_negatives=num_negatives, temperature=config["temperature"],
        momentum=config["bank_momentum"], ccd_weight=config["ccd_weight"],
        crp_weight=config["crp_weight"], normalizer=config["normalizer"],
        centroid_relu=config["centroid_relu"], num_classes=num_classes, **sampler,
    ).to(device)


def _build_run(config: dict[str, Any], resume: Path | None, log: bool) -> Run:
    rank, world = _rank(), world_size()
    device = _device(config, world)
    say = print if log else (lambda *a, **k: None)
    seed = int(config["seed"])
    records, split = _read_data(config)
    num_classes = len(records.classes)
    # Seeded here, so reading or decoding data changes nothing.
    torch.manual_seed(seed)
    # A resumed run takes its weights from last.pt: no ImageNet file is needed on a new machine.
    student = build_network(config["model"], num_classes, config["feat_dim"],
                            config["pretrained"] and not resume,
                            None if resume else config["weights"])
    weights_note = _weights_note(config, student, resume)
    out_dir = Path(resume) if resume else Path(config["out"])
    images = _write_and_load(config, out_dir, resume, rank, records, split, log)
    train_idx = torch.as_tensor(split["train"])
    train_labels = torch.as_tensor(records.labels[split["train"]])
    eval_sets = {part: (images[torch.as_tensor(split[part])], records.labels[split[part]])
                 for part in ("val", "test") if part in split}
    weights_from = records.labels if config["recipe"] == "released-code" else train_labels.numpy()
    class_weight = datamod.class_weights(np.asarray(weights_from), num_classes).to(device)
    say(f"{records.name}: {len(records)} images, {num_classes} classes; "
        + ", ".join(f"{k} {len(v)}" for k, v in split.items()) + f"; out: {out_dir}")

    if world > 1 and config["sync_bn"]:
        student = nn.SyncBatchNorm.convert_sync_batchnorm(student)
    student.to(device)
    if config["channels_last"] and device.type == "cuda":
        student.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    teacher = None
    if recipemod.uses_teacher(config):
        teacher = EMATeacher(student, decay=config["ema_decay"],
                             **recipemod.teacher_setting(config))
    num_negatives = num_negatives_of(config, len(train_idx))
    crckd = _contrast_loss(config, train_labels, num_negatives, num_classes, device)
    params = list(student.parameters()) + (list(crckd.parameters()) if crckd else [])
    optimizer = torch.optim.Adam(params, lr=config["lr"], betas=(0.9, 0.999),
                                 weight_decay=config["weight_decay"])
    batch_sampler = datamod.GlobalBatchSampler(len(train_idx), config["batch_size"], seed,
                                               rank, world, drop_last=config["drop_last"])
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=config["lr"],
        total_steps=config["epochs"] * batch_sampler.steps_per_epoch)
    use_scaler = bool(config["amp"]) and device.type == "cuda" and config["amp_dtype"] == "float16"
    scaler = torch.amp.GradScaler("cuda", enabled=use_scaler)
    model, crckd_step = _distributed(student, crckd, device, world)
    generator = torch.Generator(device=device).manual_seed(seed + 1)
    run = Run(config=config, device=device, rank=rank, world=world, out_dir=out_dir,
              records=records, split=split, eval_sets=eval_sets, class_weight=class_weight,
              student=student, model=model, teacher=teacher, crckd=crckd,
              crckd_step=crckd_step, optimizer=optimizer, scheduler=scheduler, scaler=scaler,
              generator=generator,
              dataset=datamod.TwoViewDataset(images[train_idx], train_labels, seed),
              batch_sampler=batch_sampler, num_negatives=num_negatives,
              weights_note=weights_note)
    if resume:
        run.progress = checkpoint.load_last(
            out_dir, student=student, teacher=teacher, crckd=crckd, optimizer=optimizer,
            scheduler=scheduler, scaler=scaler, generator=generator)
        run.saved_at = (run.progress.epoch, run.progress.step)
        if run.progress.epoch >= config["epochs"]:
            say(f"{out_dir}: the run is finished ({config['epochs']} epochs); its summary and "
                "plots are written again")
        else:
            say(f"resumed {out_dir} at epoch {run.progress.epoch + 1}, step {run.progress.step}")
    return run


def _distributed(student: nn.Module, crckd: CRCKDLoss | None, device: torch.device,
                 world: int) -> tuple[nn.Module, nn.Module | None]:
    """The student and ``CRCKDLoss`` as a step calls them: DDP-wrapped under torchrun."""
    if world == 1:
        return student, crckd
    ids = [device.index] if device.type == "cuda" else None
    model = nn.parallel.DistributedDataParallel(student, device_ids=ids)
    if crckd is None:
        return model, None
    # The library keeps the banks identical on every rank; DDP averages the heads'
    # gradients (docs/howto/distributed.rst). Every rank built the same banks from the
    # same seed, so no first broadcast is needed.
    # A head whose loss term is off (CCD in the crp method) gets no gradient.
    return model, nn.parallel.DistributedDataParallel(
        crckd, device_ids=ids, broadcast_buffers=False, find_unused_parameters=True)


def save_last(run: Run) -> None:
    """``last.pt`` of the run as it stands (rank 0 only)."""
    if run.rank == 0:
        checkpoint.save_last(run.out_dir, run.config, run.progress, student=run.student,
                             teacher=run.teacher, crckd=run.crckd, optimizer=run.optimizer,
                             scheduler=run.scheduler, scaler=run.scaler,
                             generator=run.generator)
    run.saved_at = (run.progress.epoch, run.progress.step)


def _position(epoch: int, step: int) -> str:
    """A checkpoint's place: ``epoch`` epochs and ``step`` steps of the next one done."""
    return f"end of epoch {epoch}" if step == 0 else f"epoch {epoch + 1}, after step {step}"


def non_finite(run: Run, epoch: int, step: int, what: str) -> NonFiniteLoss:
    """The error that stops a run with NaN or Inf in ``what`` at ``epoch``, ``step``
    (0-based): where, the last good checkpoint, and what to try."""
    config, last = run.config, run.out_dir / runfiles.LAST_CHECKPOINT
    where = (f"epoch {epoch + 1}/{config['epochs']}, step {step + 1}/"
             f"{run.batch_sampler.steps_per_epoch}")
    kept = (f"The last checkpoint, with finite weights, is {last} ({_position(*run.saved_at)})"
            "; nothing after it was saved." if run.saved_at
            else "No checkpoint had been written yet.")
    amp = config["amp"] and run.device.type == "cuda"
    return NonFiniteLoss(
        f"training stopped at {where}: non-finite values (NaN or Inf) in {what}. {kept} Try a "
        f"lower learning rate (--lr; this run: {config['lr']:g})"
        + (f" or --no-amp (this run used {config['amp_dtype']} autocast)" if amp else "")
        + " in a new run (--out NEW_FOLDER): --resume would repeat the same steps."
        + ("" if amp else " (--no-amp does not apply: this run computed in float32.)"))


def check_weights(run: Run, epoch: int, step: int) -> None:
    """Stops the run if the student's weights or buffers are no longer finite after ``step``
    of ``epoch``. Called before each checkpoint and each epoch's evaluation, where the run
    syncs anyway: one more read there, none per step."""
    tensors = [t for t in run.student.state_dict().values() if t.is_floating_point()]
    if tensors and not bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all()):
        raise non_finite(run, epoch, step, "the student's weights after the update")


def logged_step(run: Run, batch: tuple[torch.Tensor, ...], epoch: int, step: int,
                weights: dict[str, float]) -> dict[str, float]:
    """:func:`train_step`, and its loss terms read on the host (averaged over ranks), which
    the meters need anyway: a non-finite one stops the run here, at no extra sync. So does
    the library's own input check (``ValueError: ... contains NaN or Inf``, in its CPU or
    ``"raise"`` value-check mode)."""
    try:
        logged = train_step(run, batch, step, weights)
    except ValueError as error:
        if "contains NaN or Inf" not in str(error):
            raise
        what = str(error).split(" contains NaN")[0] + " (the library's input check)"
        raise non_finite(run, epoch, step, what) from error
    values = torch.stack([v.float() for v in logged.values()])
    if run.world > 1:  # log the global batch's losses, the same on every rank
        dist.all_reduce(values)
        values /= run.world
    read = dict(zip(logged, values.tolist(), strict=True))
    bad = [f"{k} {v}" for k, v in read.items() if not math.isfinite(v)]
    if bad:
        raise non_finite(run, epoch, step, "the loss (" + ", ".join(bad) + ")")
    return read


def sample_rows(run: Run, step: int) -> torch.Tensor:
    """Bank rows for the whole global batch (every rank draws the same), ``[B_global, P+K]``."""
    assert run.crckd is not None
    global_indices = run.batch_sampler.global_batch(step).to(run.device)
    bank = run.crckd.student_bank
    if run.config["contrast"] == "instance":
        return instance_indices(global_indices, bank.size, run.crckd.ccd.num_negatives,
                                run.generator)
    return bank.sample(global_indices, run.crckd.ccd.num_positives, run.crckd.ccd.num_negatives,
                       run.generator, run.crckd.ccd.sampler)


def crp_to_rows(run: Run, feat_s: torch.Tensor, feat_t: torch.Tensor) -> torch.Tensor:
    """The CRP ablation (method §5): relations to ``crp_anchor_rows`` random rows of each class
    of the (just updated) banks instead of the class centroids, the same rows for the student
    and the teacher; L2-normalised when ``crp_anchor_norm`` is on (the released code)."""
    assert run.crckd is not None
    config, crckd = run.config, run.crckd
    rows = class_anchor_indices(crckd.student_bank.layout, int(config["crp_anchor_rows"]),
                                run.generator, pad=not config["crp_anchor_norm"])
    anchors = [bank.memory[rows] for bank in (crckd.student_bank, crckd.teacher_bank)]
    if config["crp_anchor_norm"]:
        anchors = [F.normalize(a, dim=1) for a in anchors]
    g_s = crckd.student_head(feat_s)
    g_t = crckd.teacher_head(feat_t.detach()).detach()
    return categorical_relation_loss(g_s, g_t, anchors[0], anchors[1], crckd.crp.temperature)


def train_step(run: Run, batch: tuple[torch.Tensor, ...], step: int,
               weights: dict[str, float]) -> dict[str, torch.Tensor]:
    """One optimiser step on one batch; returns the loss and its terms (detached, this rank's
    values; the caller averages them over ranks)."""
    config, device = run.config, run.device
    batch_images, view_params, labels, indices = (t.to(device, non_blocking=True) for t in batch)
    view_s = datamod.apply_views(batch_images, view_params[:, 0])
    view_t = (datamod.apply_views(batch_images, view_params[:, 1])
              if run.teacher is not None else None)
    if config["channels_last"] and device.type == "cuda":
        view_s = view_s.contiguous(memory_format=torch.channels_last)
        if view_t is not None:
            view_t = view_t.contiguous(memory_format=torch.channels_last)
    global_size = run.batch_sampler.global_size(step)
    terms: dict[str, torch.Tensor] = {}
    with autocast(device, config):
        logits_s, feat_s = run.model(view_s)
        nll = F.cross_entropy(logits_s.float(), labels, reduction="none")
        w = run.class_weight[labels]
        weight_sum = w.sum().detach()
        if run.world > 1:
            dist.all_reduce(weight_sum)
        terms["ce"] = (w * nll).sum() / weight_sum * run.world
        if run.teacher is not None:
            with torch.no_grad():
                logits_t, feat_t = run.teacher(view_t)
            terms["kl"] = consistency_kl(logits_s, logits_t)
            if global_size < config["batch_size"]:
                # The released code divides the KL sum by the nominal batch size, also for
                # the last partial batch (method §7.10).
                terms["kl"] = terms["kl"] * (global_size / config["batch_size"])
        if run.crckd_step is not None:
            rows = sample_rows(run, step)[run.batch_sampler.local_slice(global_size)]
            out = run.crckd_step(feat_s.float(), feat_t.float(), indices, sample_indices=rows)
            terms["ccd"], terms["crp"] = out.ccd, out.crp
            if config["crp_anchors"] == "rows":
                terms["crp"] = crp_to_rows(run, feat_s.float(), feat_t.float())
    loss = terms["ce"] + sum(weights[k] * v for k, v in terms.items() if k != "ce")
    run.optimizer.zero_grad(set_to_none=True)
    run.scaler.scale(loss).backward()
    run.scaler.step(run.optimizer)
    run.scaler.update()
    run.scheduler.step()
    if run.teacher is not None:
        run.teacher.update(run.student)
    return {"loss": loss.detach(), **{k: v.detach() for k, v in terms.items()}}


def _progress_bar(loader: DataLoader, config: dict[str, Any], log: bool, epoch: int,
                  first: int, total: int):  # type: ignore[no-untyped-def]
    if not (log and config["progress"] and sys.stderr.isatty()):
        return loader
    from tqdm import tqdm

    return tqdm(loader, desc=f"epoch {epoch + 1}/{config['epochs']}", initial=first, total=total,
                leave=False, dynamic_ncols=True)


def train_one_epoch(run: Run, epoch: int, weights: dict[str, float], log: bool,
                    stop_after_steps: int | None = None) -> None:
    """The epoch's steps from ``run.progress.step`` on; the running means go to
    ``run.progress.meters``, and ``checkpoint_every_steps`` writes mid-epoch checkpoints."""
    config, progress, sampler = run.config, run.progress, run.batch_sampler
    first = progress.step
    if first == 0:
        progress.meters = {}
    sampler.set_epoch(epoch, first)
    run.dataset.set_epoch(epoch)
    loader = DataLoader(
        IndexedDataset(run.dataset), batch_sampler=sampler,
        num_workers=config["num_workers"], pin_memory=run.device.type == "cuda",
        # A private generator: creating the iterator must not consume the global RNG,
        # or a resumed run would drift from an uninterrupted one.
        generator=torch.Generator().manual_seed(int(config["seed"])),
    )
    run.student.train()
    if run.teacher is not None:
        run.teacher.train()
    bar = _progress_bar(loader, config, log, epoch, first, sampler.steps_per_epoch)
    every = int(config["checkpoint_every_steps"] or 0)
    global_step = epoch * sampler.steps_per_epoch + first
    for step, batch in enumerate(bar, start=first):
        meters = progress.meters
        for k, v in logged_step(run, batch, epoch, step, weights).items():
            meters[k] = meters.get(k, 0.0) + v
        meters["n"] = meters.get("n", 0.0) + 1
        if hasattr(bar, "set_postfix"):
            bar.set_postfix({k: f"{v / meters['n']:.3f}" for k, v in meters.items() if k != "n"})
        progress.step = step + 1
        global_step += 1
        if every and progress.step % every == 0 and progress.step < sampler.steps_per_epoch:
            check_weights(run, epoch, step)
            save_last(run)
        if stop_after_steps is not None and global_step >= stop_after_steps:
            raise TrainingInterrupted(f"stopped after {global_step} steps")
    if hasattr(bar, "close"):
        bar.close()


def evaluate(run: Run, module: nn.Module) -> dict[str, tuple[dict[str, float], torch.Tensor,
                                                              torch.Tensor]]:
    """``module``'s metrics, probabilities and features on each evaluation part."""
    config = run.config
    out = {}
    for part, (part_images, part_labels) in run.eval_sets.items():
        probs, feats = predict(module, part_images, config["eval_batch_size"], run.device, config)
        metrics = compute_metrics(part_labels, probs.numpy(), len(run.classes),
                                  config["metric_labels"])
        out[part] = (metrics, probs, feats)
    return out


def epoch_row(run: Run, epoch: int, weights: dict[str, float]
              ) -> tuple[dict[str, float], dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """The epoch's ``metrics.csv`` row (training means, lr, weights, the student's metrics
    and then the teacher's) and the student's test outputs."""
    meters = run.progress.meters
    row: dict[str, float] = {"epoch": float(epoch + 1)}
    n = max(meters.get("n", 1.0), 1.0)
    for k in ("loss", "ce", "kl", "ccd", "crp"):
        if k in meters:
            row[f"train_{k}"] = meters[k] / n
    row["lr"] = float(run.scheduler.get_last_lr()[0])
    row["kl_weight"], row["ccd_weight"], row["crp_weight"] = (
        weights["kl"], weights["ccd"], weights["crp"])
    outputs = {}
    num_classes = len(run.classes)
    for part, (metrics, probs, feats) in evaluate(run, run.student).items():
        outputs[part] = (probs, feats)
        row.update({f"{part}_{m}": v for m, v in metrics.items()})
        if part == "test":
            matrix = confusion(run.eval_sets[part][1], probs.numpy(), num_classes)
            run.progress.test_recalls[epoch + 1] = [
                float(matrix[c, c] / max(matrix[c].sum(), 1)) for c in range(num_classes)]
    if run.teacher is not None:
        # The teacher's own metrics, after the student's columns so those keep their
        # places. predict() runs it in eval mode: BatchNorm on the teacher's running
        # statistics (for buffers="leave", the ones it kept itself), and dropout off.
        for part, (metrics, _, _) in evaluate(run, run.teacher.module).items():
            row.update({f"teacher_{part}_{m}": v for m, v in metrics.items()})
    return row, outputs


def _write_metrics(history: list[dict[str, float]], path: Path) -> None:
    # Every row's columns, in order of first appearance: a run resumed from a checkpoint of an
    # older version may have rows without the teacher's columns.
    fieldnames = list(dict.fromkeys(k for row in history for k in row))

    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=fieldnames)
            writer.writeheader()
            writer.writerows(history)

    runfiles.atomic_write(path, write)


def end_epoch(run: Run, epoch: int, row: dict[str, float], log: bool) -> None:
    """Logs the row, keeps the best student, applies the recipe's lr reset and checkpoints."""
    progress, config = run.progress, run.config
    progress.history.append(row)
    score = row.get(f"val_{config['select_metric']}", -math.inf)
    if run.rank == 0:
        _write_metrics(progress.history, run.out_dir / runfiles.METRICS)
        if run.has_val and math.isfinite(score) and score > progress.best_score:
            progress.best_score = score
            checkpoint.save_best(run.out_dir, config, run.student, epoch + 1)
    if log:
        print(f"epoch {epoch + 1}/{config['epochs']}: "
              + ", ".join(f"{k} {row[k]:.4f}" for k in row if k.startswith("train_"))
              + "; " + ", ".join(f"{p} auc {row[f'{p}_auc']:.4f} acc {row[f'{p}_accuracy']:.4f}"
                                 for p in run.eval_sets))
    if config["epoch_lr_reset"] is not False:
        # The released code (train_CRCKD.py, after each epoch's test) sets every group's lr
        # to its base_lr on top of OneCycleLR: the next epoch's first step runs at it
        # (method §7.9). The checkpoint below keeps it, so a resumed run does the same.
        for group in run.optimizer.param_groups:
            group["lr"] = float(config["epoch_lr_reset"])
    progress.meters, progress.epoch, progress.step = {}, epoch + 1, 0
    save_last(run)


def train(config: dict[str, Any], resume: str | Path | None = None,
          stop_after_steps: int | None = None, log: bool = True,
          command: list[str] | None = None) -> dict[str, Any]:
    """Trains and evaluates one run; returns its summary (also written to the run folder).

    Args:
        config: a resolved config (:func:`reference_training.config.resolve`).
        resume: a run folder with ``last.pt`` to continue.
        stop_after_steps: raise :class:`TrainingInterrupted` after this many optimiser steps,
            without saving (what a kill does); for tests.
        log: print progress.
        command: the command line, for ``environment.json`` (default: ``sys.argv``).
    """
    device_name = config["device"] or ("cuda" if torch.cuda.is_available() else "cpu")
    started_dist = init_distributed(device_name)
    try:
        return _train(config, Path(resume) if resume else None, stop_after_steps,
                      log and _rank() == 0, command)
    finally:
        if started_dist:
            dist.destroy_process_group()


def _train(config: dict[str, Any], resume: Path | None, stop_after_steps: int | None,
           log: bool, command: list[str] | None) -> dict[str, Any]:
    """:func:`train` on one process; the session goes into ``environment.json``, and Ctrl-C
    becomes :class:`RunStopped`, saying what is kept and how to resume."""
    out_dir = Path(resume) if resume else Path(config["out"])
    run = None
    try:
        run = build_run(config, resume, log)
        if run.rank == 0:
            environment.begin(out_dir, run.device, command)
        summary = _train_run(run, stop_after_steps, log)
    except KeyboardInterrupt:
        _end_session(run, "interrupted")
        raise RunStopped(_stop_note(out_dir, run)) from None
    except BaseException as error:
        _end_session(run, f"stopped: {type(error).__name__}: {str(error)[:300]}")
        raise
    _end_session(run, "finished")
    return summary


def _end_session(run: Run | None, outcome: str) -> None:
    if run is not None and run.rank == 0:
        with suppress(OSError, errors.UserError):  # a full disk must not hide the real error
            environment.end(run.out_dir, outcome)


def _stop_note(out_dir: Path, run: Run | None) -> str:
    """What Ctrl-C leaves: the checkpoint kept, and the command that continues the run."""
    command = f"python reference_training/train.py --resume {shlex.quote(str(out_dir))}"
    last = out_dir / runfiles.LAST_CHECKPOINT
    if last.is_file():
        at = f" ({_position(*run.saved_at)})" if run is not None and run.saved_at else ""
        return f"interrupted: {last} is kept{at}; continue the run with\n  {command}"
    if (out_dir / runfiles.CONFIG).is_file():
        return ("interrupted before the run's first checkpoint; this starts it afresh from its "
                f"config.json:\n  {command}")
    return "interrupted before the run wrote anything; run the same command again"


def _train_run(run: Run, stop_after_steps: int | None, log: bool) -> dict[str, Any]:
    config, progress, sampler = run.config, run.progress, run.batch_sampler
    if log:
        print(f"method {config['method']} ({config['recipe']} recipe), model {config['model']} "
              f"({run.weights_note}), {config['image_size']}px, {config['epochs']} epochs x "
              f"{sampler.steps_per_epoch} steps, batch {config['batch_size']}"
              + (f", K={run.num_negatives}" if run.crckd else "")
              + (f", {run.world} processes" if run.world > 1 else ""))
    last_outputs: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    board = tensorboard_log.open_writer(config, run.out_dir, progress.epoch, log) if (
        run.rank == 0) else None
    t0 = time.time()
    for epoch in range(progress.epoch, config["epochs"]):
        epoch_start, whole_epoch = time.time(), progress.step == 0
        weights = recipemod.loss_weights(config, epoch)
        train_one_epoch(run, epoch, weights, log, stop_after_steps)
        if whole_epoch:
            progress.epoch_seconds.append(time.time() - epoch_start)
        check_weights(run, epoch, sampler.steps_per_epoch - 1)
        row, last_outputs = epoch_row(run, epoch, weights)
        tensorboard_log.write_row(board, row)  # before the checkpoint: see tensorboard_log
        end_epoch(run, epoch, row, log)
    if board is not None:
        board.close()

    if "test" not in last_outputs:  # resumed a finished run
        last_outputs["test"] = predict(run.student, run.eval_sets["test"][0],
                                       config["eval_batch_size"], run.device, config)
    summary = summarise_run(run, time.time() - t0)
    if run.rank == 0:
        runfiles.write_json(summary, run.out_dir / runfiles.SUMMARY)
        _final_plots(run, last_outputs)
        if log:
            print("\n" + summary_table(summary))
    _barrier()
    return summary


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


def summarise_run(run: Run, seconds: float) -> dict[str, Any]:
    """``summary.json``: the student's protocols, the teacher's beside them, and the run."""
    config, history, classes = run.config, run.progress.history, run.classes
    summary = _summarise(history, config, run.has_val)
    if run.teacher is not None and f"teacher_test_{METRICS[0]}" in history[0]:
        summary["teacher"] = {
            "buffers": run.teacher.buffers_mode, "train_mode": run.teacher.train_mode,
            "evaluated": "eval mode (BatchNorm on the teacher's running statistics, "
                         "dropout off)",
            **_summarise(history, config, run.has_val, prefix="teacher_"),
        }
    seconds_per_epoch = run.progress.epoch_seconds
    summary.update({
        "dataset": config["dataset"], "method": config["method"], "recipe": config["recipe"],
        "model": config["model"], "seed": int(config["seed"]), "fold": config["fold"],
        "tag": config["tag"], "epochs": config["epochs"], "num_negatives": run.num_negatives,
        "train_seconds_this_session": seconds, "world_size": run.world,
        "classes": list(classes),
        "train_seconds_per_epoch": (float(np.mean(seconds_per_epoch)) if seconds_per_epoch
                                    else None),
        # training throughput: images through the student per second of its epochs (views,
        # teacher, losses and update included; evaluation left out)
        "train_images": len(run.dataset),
        "train_images_per_second": (len(run.dataset) / float(np.mean(seconds_per_epoch))
                                    if seconds_per_epoch else None),
        "test_recall_per_class": _recall_summary(run.progress.test_recalls, summary, classes),
        "notes": _notes(run.eval_sets, classes),
    })
    return summary


def summary_table(summary: dict[str, Any]) -> str:
    """The metric table printed at the end of a run (test metrics, in %)."""
    k = len(summary["last_epochs"]["epochs"])
    rows = {f"test, mean of last {k} epochs (paper)": summary["last_epochs"]["test"]}
    if summary.get("best_on_val"):
        best = summary["best_on_val"]
        rows[f"test at best val epoch ({best['epoch']})"] = best["test"]
        rows[f"val at best val epoch ({best['epoch']})"] = best["val"]
    teacher = summary.get("teacher")
    if teacher:
        rows[f"teacher: test, mean of last {k} epochs"] = teacher["last_epochs"]["test"]
    return format_table(rows)


def _notes(eval_sets: dict[str, Any], classes: tuple[str, ...]) -> list[str]:
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


def _final_plots(run: Run, last: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
    from . import plots

    classes, out_dir = run.classes, run.out_dir
    config = run.config
    fold = f", fold {config['fold']}" if config["fold"] is not None else ""
    plots.plot_curves(run.progress.history, out_dir, f"{config['method']} ({config['recipe']}), "
                      f"{config['dataset']}{fold}, seed {config['seed']}")
    probs, feats = last["test"]
    labels = run.eval_sets["test"][1]
    plots.plot_confusion(confusion(labels, probs.numpy(), len(classes)), classes,
                         out_dir / runfiles.CONFUSION_PLOT)
    plots.plot_embedding(feats.numpy(), labels, classes, out_dir / runfiles.EMBEDDING_PLOT,
                         run.config["embedding_plot"], run.config["seed"])
