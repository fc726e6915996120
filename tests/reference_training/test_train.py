"""train.py as a user meets it: run folders kept safe, --resume checked, a diverging run
stopped, failures told in one line, an honest banner and --help, the environment recorded."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("sklearn")
pytest.importorskip("torchvision")
pytest.importorskip("matplotlib")

from reference_training import engine  # noqa: E402
from reference_training import train as train_cli  # noqa: E402


def _flags(tmp_path: Path, data: Path, out: Path | None = None, *extra: str) -> list[str]:
    """A seconds-long CLI run (tiny_cnn, 16 px, one epoch) of the tiny HAM10000 ``data``."""
    settings = tmp_path / "tiny.json"
    settings.write_text(json.dumps({"num_positives": 3, "num_negatives": 16,
                                    "cache_dir": str(tmp_path / "cache"),
                                    "eval_batch_size": 16}))
    flags = ["--dataset", "ham10000", "--data-dir", str(data), "--model", "tiny_cnn",
             "--no-pretrained", "--image-size", "16", "--epochs", "1", "--batch-size", "8",
             "--lr", "1e-3", "--num-workers", "0", "--no-progress", "--config", str(settings)]
    return flags + (["--out", str(out)] if out else []) + list(extra)


def _fails(argv: list[str]) -> str:
    """The message of a run that must stop with a user error (exit 1, no traceback)."""
    with pytest.raises(SystemExit) as stop:
        train_cli.main(argv)
    assert isinstance(stop.value.code, str) and stop.value.code.startswith("error: ")
    return stop.value.code


# 1. A run folder is never overwritten

def test_out_folder_holding_a_run_is_refused_and_overwrite_replaces_it(
        tmp_path: Path, ham: Path) -> None:
    out = tmp_path / "a"
    train_cli.main(_flags(tmp_path, ham, out, "--method", "baseline"))
    before = (out / "metrics.csv").read_text()
    message = _fails(_flags(tmp_path, ham, out, "--method", "mt"))
    assert f"--out {out} already holds a run" in message and f"--resume {out}" in message
    assert "--overwrite" in message
    assert json.loads((out / "config.json").read_text())["method"] == "baseline"
    assert (out / "metrics.csv").read_text() == before
    train_cli.main(_flags(tmp_path, ham, out, "--method", "mt", "--overwrite"))
    assert json.loads((out / "config.json").read_text())["method"] == "mt"
    assert len(json.loads((out / "environment.json").read_text())["sessions"]) == 1


def test_default_run_folders_of_one_second_do_not_collide(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(train_cli.time, "strftime", lambda _: "20260101-000000")
    config = {"dataset": "sample", "method": "mt", "recipe": "paper", "model": "tiny_cnn",
              "seed": 1}
    first, second = train_cli._shared_out(config), train_cli._shared_out(config)
    assert first != second and second == first + "-2"
    assert Path(first).is_dir() and Path(second).is_dir()


# 2. --resume compares the command line with the saved config

def test_resume_refuses_a_changed_setting_naming_the_flag_and_both_values(
        tmp_path: Path, ham: Path) -> None:
    out = tmp_path / "a"
    train_cli.main(_flags(tmp_path, ham, out, "--method", "baseline"))
    message = _fails(["--resume", str(out), "--method", "mt", "--lr", "0.01"])
    assert "--method: method is 'baseline' in the run, 'mt' given" in message
    assert "--lr: lr is 0.001 in the run, 0.01 given" in message
    message = _fails(["--resume", str(out), "--epochs", "4"])
    assert "--epochs: epochs is 1 in the run, 4 given" in message and "OneCycle" in message
    assert "--out" in _fails(["--resume", str(out), "--out", str(tmp_path / "b")])


def test_resume_of_a_moved_run_reads_its_data_from_the_new_path(
        tmp_path: Path, ham: Path) -> None:
    """As reproduce.py --pack/--unpack does: the run folder and the data on another machine;
    the flags it passes (data, method, seed, --config, --no-progress) are accepted."""
    straight = tmp_path / "straight"
    train_cli.main(_flags(tmp_path, ham, straight, "--epochs", "2", "--method", "baseline"))
    first = tmp_path / "first"
    with pytest.raises(engine.TrainingInterrupted):
        train_cli.main(_flags(tmp_path, ham, first, "--epochs", "2", "--method", "baseline",
                              "--stop-after-steps", "6"))
    moved, data = tmp_path / "elsewhere" / "run", tmp_path / "elsewhere" / "HAM10000"
    shutil.copytree(first, moved)
    shutil.copytree(ham, data)
    train_cli.main(["--resume", str(moved), "--dataset", "ham10000", "--data-dir", str(data),
                    "--method", "baseline", "--seed", "2020", "--no-progress",
                    "--device", "cpu", "--num-workers", "0"])
    assert (moved / "metrics.csv").read_text() == (straight / "metrics.csv").read_text()
    # other data at the new path (one image relabelled) is refused
    table = data / "HAM10000_metadata.csv"
    table.write_text(table.read_text().replace(",akiec,", ",bcc,", 1))
    shutil.rmtree(moved)
    shutil.copytree(first, moved)
    message = _fails(["--resume", str(moved), "--data-dir", str(data)])
    assert f"data read from {table} is not the data the run in {moved} trained on" in message
    assert "of its rows are not in the data read now" in message and "split.csv" in message


# 3. A non-finite loss stops the run

@pytest.mark.parametrize("checks", ["auto", "mask"])
def test_non_finite_loss_stops_the_run_naming_epoch_step_and_checkpoint(
        tmp_path: Path, ham: Path, checks: str) -> None:
    import crckd_losses

    out = tmp_path / "a"
    crckd_losses.set_value_checks(checks)  # "mask": the library reads no value, as on a GPU
    try:
        message = _fails(_flags(tmp_path, ham, out, "--method", "crckd", "--lr", "1e36",
                                "--checkpoint-every-steps", "1"))
    finally:
        crckd_losses.set_value_checks("auto")
    assert "training stopped at epoch 1/1, step " in message
    assert "non-finite values (NaN or Inf) in" in message
    assert f"{out / 'last.pt'}" in message or "No checkpoint had been written yet" in message
    assert "--lr; this run: 1e+36" in message and "--no-amp" in message
    if (out / "last.pt").is_file():
        state = torch.load(out / "last.pt", weights_only=True)
        assert all(torch.isfinite(t).all() for t in state["student"].values())


# 4. Failures the user can fix: one message, no traceback

def test_a_missing_data_folder_is_one_line_without_traceback(tmp_path: Path) -> None:
    script = Path(train_cli.__file__)
    done = subprocess.run([sys.executable, str(script), "--dataset", "ham10000", "--data-dir",
                           str(tmp_path / "missing"), "--out", str(tmp_path / "a")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert done.stderr == f"error: data folder not found: {tmp_path / 'missing'}\n"


def test_bad_arguments_and_data_are_one_message(tmp_path: Path, ham: Path) -> None:
    assert "epochs must be a positive integer" in _fails(
        _flags(tmp_path, ham, tmp_path / "a", "--epochs", "0"))
    assert "unknown model 'no_such_net'" in _fails(
        _flags(tmp_path, ham, tmp_path / "b", "--model", "no_such_net"))
    one_class = tmp_path / "one_class" / "nevus"
    one_class.mkdir(parents=True)
    assert "at least two" in _fails(["--dataset", "folder", "--data-dir", str(one_class.parent),
                                     "--out", str(tmp_path / "c")])


def test_ctrl_c_exits_130_keeps_the_checkpoint_and_prints_the_resume_command(
        tmp_path: Path, ham: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    steps = []
    real_step = engine.train_step

    def step(*args, **kwargs):  # type: ignore[no-untyped-def]
        steps.append(1)
        if len(steps) == 4:
            raise KeyboardInterrupt
        return real_step(*args, **kwargs)

    monkeypatch.setattr(engine, "train_step", step)
    out = tmp_path / "a"
    with pytest.raises(SystemExit) as stop:
        train_cli.main(_flags(tmp_path, ham, out, "--checkpoint-every-steps", "2"))
    assert stop.value.code == 130
    err = capsys.readouterr().err
    assert f"{out / 'last.pt'} is kept (epoch 1, after step 2)" in err
    assert f"python reference_training/train.py --resume {out}" in err
    assert "Traceback" not in err
    sessions = json.loads((out / "environment.json").read_text())["sessions"]
    assert sessions[-1]["outcome"] == "interrupted"


def test_ctrl_c_in_a_cross_validation_and_resume_of_its_folder(
        tmp_path: Path, make_aptos, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    data, out = make_aptos(tmp_path / "aptos", per_class=8), tmp_path / "cv"
    flags = ["--dataset", "aptos", "--data-dir", str(data), "--model", "tiny_cnn", "--method",
             "baseline", "--image-size", "16", "--epochs", "1", "--batch-size", "8", "--fold",
             "all", "--num-workers", "0", "--no-progress", "--out", str(out)]
    steps = []
    real_step = engine.train_step

    def step(*args, **kwargs):  # type: ignore[no-untyped-def]
        steps.append(1)
        if len(steps) == 7:  # fold 2 of 5 (4 steps each)
            raise KeyboardInterrupt
        return real_step(*args, **kwargs)

    monkeypatch.setattr(engine, "train_step", step)
    with pytest.raises(SystemExit) as stop:
        train_cli.main(flags)
    assert stop.value.code == 130
    assert f"continue every fold of the cross-validation with\n  python reference_training/" \
        f"train.py --resume {out}" in capsys.readouterr().err
    monkeypatch.setattr(engine, "train_step", real_step)
    fold1 = (out / "fold1" / "metrics.csv").read_text()
    assert f"Continue that run with --resume {out}," in _fails(flags)
    summaries = train_cli.main(["--resume", str(out), "--no-progress"])
    assert len(summaries) == 5 and (out / "fold1" / "metrics.csv").read_text() == fold1
    assert "aptos / baseline / paper / tiny_cnn (n=5)" in (out / "cv_summary.md").read_text()


def test_a_full_disk_while_checkpointing_says_so_and_keeps_the_last_checkpoint(
        tmp_path: Path, ham: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from reference_training import checkpoint

    saves = []
    real_save = torch.save

    def save(obj, path):  # type: ignore[no-untyped-def]
        saves.append("last.pt" in str(path))
        if sum(saves) > 1:  # what torch's zip writer raises on a full disk
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos "
                               "123 vs 456")
        real_save(obj, path)

    monkeypatch.setattr(checkpoint.torch, "save", save)
    out = tmp_path / "a"
    message = _fails(_flags(tmp_path, ham, out, "--checkpoint-every-steps", "2"))
    assert f"the disk is full (or read-only): writing {out / 'last.pt'} failed" in message
    assert "the previous last.pt is intact" in message and f"--resume {out}" in message
    assert torch.load(out / "last.pt", weights_only=True)["step"] == 2


def test_enospc_names_the_file_and_an_unexpected_error_keeps_its_traceback(
        tmp_path: Path, ham: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import errno

    from reference_training import errors, runfiles

    def full(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        raise OSError(errno.ENOSPC, "No space left on device", str(self))

    with monkeypatch.context() as patch:
        patch.setattr(Path, "write_text", full)
        with pytest.raises(errors.UserError, match=r"the disk is full .*there was no earlier "
                                                   r"summary.json\. Free some space"):
            runfiles.write_json({}, tmp_path / "summary.json")

    def bug(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise RuntimeError("a bug")

    monkeypatch.setattr(engine, "train_step", bug)
    with pytest.raises(RuntimeError, match="a bug"):  # not turned into a one-line message
        train_cli.main(_flags(tmp_path, ham, tmp_path / "a"))


# 5. The banner says what was loaded

def test_banner_says_what_the_weights_were_loaded_from(
        tmp_path: Path, ham: Path, capsys: pytest.CaptureFixture[str]) -> None:
    train_cli.main(_flags(tmp_path, ham, tmp_path / "a", "--pretrained"))
    out = capsys.readouterr().out
    assert "model tiny_cnn (randomly initialised: tiny_cnn has no ImageNet weights)" in out
    assert "ImageNet-pretrained" not in out
    weights = tmp_path / "tiny.pt"
    student = torch.load(tmp_path / "a" / "best.pt", weights_only=True)["student"]
    torch.save({k.removeprefix("backbone."): v for k, v in student.items()}, weights)
    train_cli.main(_flags(tmp_path, ham, tmp_path / "b", "--weights", str(weights)))
    assert f"model tiny_cnn (weights from {weights})" in capsys.readouterr().out


# 6. --help shows every default

def test_help_shows_every_default_and_which_depend_on_the_dataset_or_recipe() -> None:
    import argparse

    parser = train_cli.build_parser()
    documented = [a for a in parser._actions
                  if a.help not in (None, argparse.SUPPRESS) and a.dest != "help"]
    assert len(documented) > 30
    for action in documented:
        assert "default" in action.help, action.option_strings
    text = parser.format_help()
    assert "see README" not in text
    assert "default: 80; sample 6" in " ".join(text.split())  # --epochs, by dataset
    assert "default: the recipe's, paper on, released-code off" in " ".join(text.split())


# 8. Every run folder records what ran it

def test_every_run_folder_records_its_environment_per_session(
        tmp_path: Path, ham: Path) -> None:
    import crckd_losses

    out = tmp_path / "a"
    with pytest.raises(engine.TrainingInterrupted):
        train_cli.main(_flags(tmp_path, ham, out, "--stop-after-steps", "3",
                              "--checkpoint-every-steps", "2"))
    train_cli.main(["--resume", str(out), "--no-progress"])
    sessions = json.loads((out / "environment.json").read_text())["sessions"]
    assert len(sessions) == 2 and sessions[-1]["outcome"] == "finished"
    assert sessions[0]["outcome"].startswith("stopped: TrainingInterrupted")
    first = sessions[0]
    assert first["crckd_losses"] == crckd_losses.__version__
    assert first["torch"] == torch.__version__ and first["device"].startswith("cpu")
    assert first["python"].count(".") == 2 and "--stop-after-steps 3" in first["command"]
    assert first["started"] <= first["ended"]
    assert "crckd_losses_git" in first  # the commit, "(dirty)" with changes, or null
