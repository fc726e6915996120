"""reference_training/errors.py: which failures are the user's to fix, and their message."""

from __future__ import annotations

import errno

import pytest

from reference_training import errors


def test_files_permissions_full_disks_and_packages_are_the_users_to_fix() -> None:
    denied = PermissionError(errno.EACCES, "Permission denied", "runs/a")
    assert errors.is_user_error(denied)
    assert errors.message(denied) == "Permission denied: runs/a"
    full = OSError(errno.ENOSPC, "No space left on device", "runs/a/last.pt")
    assert errors.is_user_error(full) and "free some space" in errors.message(full)
    assert errors.disk_full(RuntimeError("[enforce fail at inline_container.cc:672] . "
                                         "unexpected pos 64 vs 0"))
    assert errors.is_user_error(ModuleNotFoundError("No module named 'timm'"))
    # a bug keeps its traceback
    assert not errors.is_user_error(RuntimeError("shape mismatch"))
    assert not errors.is_user_error(ValueError("too many values to unpack"))


def test_a_value_error_while_reading_inputs_is_an_input_error() -> None:
    with pytest.raises(errors.InputError, match="epochs must be") as caught:
        with errors.about_inputs():
            raise ValueError("epochs must be a positive integer, got 0")
    assert isinstance(caught.value, ValueError) and errors.is_user_error(caught.value)
