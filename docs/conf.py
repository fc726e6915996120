"""Sphinx configuration for crckd-losses.

Build: ``sphinx-build -W -b html docs docs/_build/html`` (warnings are errors).
Guide examples: ``sphinx-build -b doctest docs docs/_build/doctest``.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent
# Build from a checkout even when the package is not installed.
sys.path.insert(0, str(ROOT))

import crckd_losses  # noqa: E402

project = "crckd-losses"
author = "crckd-losses developers"
copyright = "crckd-losses developers"
release = crckd_losses.__version__
version = release

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.doctest",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
    "myst_parser",
    # MathJax 3 served from the built site's _static/mathjax: no page needs the network.
    "sphinx-mathjax-offline",
]

source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
root_doc = "index"
# _generated/ holds copied benchmark results: included by benchmarks.md, never pages of their own.
# Result tables (reproduction_runs*/, reproduction_checks/, teacher_runs/) are pulled into pages
# with include directives, not built alone.
exclude_patterns = ["_build", "_scripts", "_generated", "reproduction_runs*",
                    "reproduction_checks", "teacher_runs", "Thumbs.db", ".DS_Store"]
templates_path: list[str] = []
html_static_path = ["_static"]
# furo: readable from phone to laptop width, and it loads no font or script from the network.
html_theme = "furo"
html_title = f"crckd-losses {release}"
html_css_files = ["custom.css"]

# -- autodoc / napoleon -----------------------------------------------------------------------
autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_default_options = {"show-inheritance": True}
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
# "Shapes:" holds a bullet list of ``name: shape`` lines: render it as written, under a rubric.
napoleon_custom_sections = ["Shapes"]

# -- doctest: only the explicit testcode/doctest blocks of the guides ------------------------
# The docstrings' own examples run under pytest (tests/docs/test_docs.py and --doctest-modules),
# in their modules' namespaces.
doctest_test_doctest_blocks = ""
doctest_global_setup = """
import torch
torch.manual_seed(0)
"""

# -- MyST (reproduction and benchmark pages, generated benchmark results) --------------------
myst_enable_extensions = ["dollarmath"]
myst_heading_anchors = 3
# Result files are written by scripts; a skipped heading level there must not fail -W builds.
suppress_warnings = ["myst.header"]

# -- benchmark results --------------------------------------------------------------------------
# benchmarks/run.py writes benchmarks/results/*.md|*.png|*.json. At build time they are copied
# into docs/_generated/ (not committed) and included by benchmarks.md; a checkout without
# results builds too, and the page says so.
RESULT_SUFFIXES = {".md", ".png", ".svg", ".json", ".csv"}


COMBINED = "_all.md"


def write_benchmark_results(results: Path, target: Path) -> None:
    """Copy the files of ``results`` into ``target`` and write ``target/_all.md``.

    ``_all.md`` concatenates the result pages and shows every image none of them shows, so
    that benchmarks.md includes one file whatever the results are. The copies sit next to it:
    the pages' relative links and images stay valid.
    """
    target.mkdir(parents=True, exist_ok=True)
    files = sorted(p for p in results.iterdir() if p.is_file()) if results.is_dir() else []
    files = [p for p in files if p.suffix in RESULT_SUFFIXES and p.name != COMBINED]
    names = {p.name for p in files} | {COMBINED}
    for stale in target.iterdir():
        if stale.name not in names:
            stale.unlink()
    for path in files:
        copy = target / path.name
        if not copy.exists() or copy.read_bytes() != path.read_bytes():
            shutil.copy2(path, copy)
    pages = [p for p in files if p.suffix == ".md"]
    images = [p for p in files if p.suffix in {".png", ".svg"}]
    parts: list[str] = []
    if not pages and not images:
        parts.append(
            "```{note}\n"
            "This build found no results in `benchmarks/results/`. Run\n"
            "`python benchmarks/run.py`, then rebuild the documentation to show them here.\n"
            "```\n"
        )
    texts = [_link_downloads(p.read_text(encoding="utf-8"), files, target) for p in pages]
    parts += [t if t.endswith("\n") else t + "\n" for t in texts]
    parts += [f"![{p.stem}]({p.name})\n" for p in images if not any(p.name in t for t in texts)]
    text = "\n".join(parts)
    out = target / COMBINED
    # Rewrite only on change, so that an unchanged tree does not trigger a rebuild.
    if not out.exists() or out.read_text(encoding="utf-8") != text:
        out.write_text(text, encoding="utf-8")


def _link_downloads(text: str, files: list[Path], target: Path) -> str:
    """Point the pages' links to copied data files at downloads, and drop links between pages
    (they are all on one page here)."""
    for path in files:
        if path.suffix in {".png", ".svg"}:
            continue
        link = re.compile(r"\[([^\]]*)\]\((?:\./)?" + re.escape(path.name) + r"\)")
        if path.suffix == ".md":
            text = link.sub(lambda m: m.group(1), text)
        else:
            where = f"{target.parent.name}/{target.name}/{path.name}"
            text = link.sub(lambda m, w=where: f"{{download}}`{m.group(1)} <{w}>`", text)
    return text


def _on_config_inited(app, config) -> None:  # type: ignore[no-untyped-def]
    default = ROOT / "benchmarks" / "results"
    results = Path(os.environ.get("CRCKD_DOCS_BENCHMARK_RESULTS", default))
    write_benchmark_results(results, DOCS / "_generated" / "benchmarks")


def setup(app):  # type: ignore[no-untyped-def]
    app.connect("config-inited", _on_config_inited)
