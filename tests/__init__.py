"""The test suite. It mirrors the repository: ``tests/crckd_losses`` tests the library,
``tests/reference_training`` the training tool, ``tests/benchmarks`` the benchmarks and
``tests/docs`` the documentation. pytest puts the repository root on the import path
(``pythonpath`` in ``pyproject.toml``), so helpers import as ``tests.…``."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
"""The repository root."""
