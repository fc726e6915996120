"""The documentation builds without warnings, and every example in it runs.

- the Sphinx HTML build with ``-W`` (warnings are errors), as CI runs it;
- every built page works offline (no external script or stylesheet) and keeps its code lines
  within ``CODE_COLUMN`` characters;
- the guides' ``testcode`` blocks (getting started, how-to pages) through ``sphinx.ext.doctest``;
- the ``Examples:`` of every public docstring, in its module's namespace;
- the benchmark-results hook of ``docs/conf.py`` and the overview figure's script.
"""

from __future__ import annotations

import doctest
import html as html_lib
import importlib
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests import ROOT

DOCS = ROOT / "docs"

# Pages whose code blocks must run; each must report tests in the doctest build.
GUIDES = [
    "getting_started",
    "howto/without_crckdloss",
    "howto/indices",
    "howto/large_datasets",
    "howto/amp_compile",
    "howto/gpu",
    "howto/resuming",
    "howto/choosing_hyperparameters",
    "howto/own_data",
]

# Pages that show an example file of docs/howto/examples (run by tests/docs/test_examples.py).
EXAMPLE_PAGES = ["howto/lightning", "howto/monai"]

PUBLIC_MODULES = [
    "crckd_losses.functional",
    "crckd_losses.memory",
    "crckd_losses.sampling",
    "crckd_losses.contrastive",
    "crckd_losses.relation",
    "crckd_losses.teacher",
    "crckd_losses.heads",
    "crckd_losses.crckd",
    "crckd_losses.data",
    "crckd_losses.distributed",
    "crckd_losses._checks",
]


# The widest code line a page may show: furo's content column holds it at laptop width.
CODE_COLUMN = 90
# A URL with a scheme (https:, data:, ...) or protocol-relative: the browser fetches it.
EXTERNAL = re.compile(r"^(?:[a-z][a-z0-9+.-]*:|//)", re.I)


def _require_sphinx() -> None:
    modules = ("sphinx", "myst_parser", "furo", "sphinx-mathjax-offline")
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(
            f"{', '.join(missing)} not installed; the docs need: pip install -e '.[docs]'"
        )


def _sphinx(builder: str, out: Path, doctrees: Path) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    # One thread: the examples are small, and the machine may be shared.
    env.setdefault("OMP_NUM_THREADS", "1")
    env.pop("CRCKD_DOCS_BENCHMARK_RESULTS", None)
    command = [sys.executable, "-m", "sphinx", "-b", builder, "-d", str(doctrees), "-q"]
    if builder == "html":
        command += ["-W", "--keep-going"]
    command += [str(DOCS), str(out)]
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def build_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An HTML build with -W; its doctrees are reused by the doctest build."""
    _require_sphinx()
    out = tmp_path_factory.mktemp("docs")
    result = _sphinx("html", out / "html", out / "doctrees")
    if result.returncode != 0:
        pytest.fail(
            "sphinx-build -W -b html failed:\n" + result.stdout[-4000:] + result.stderr[-8000:]
        )
    return out


def test_html_builds_without_warnings(build_dir: Path) -> None:
    html = build_dir / "html"
    pages = ["index", "method", "api", "reproduction", "reproduction_notebook", "benchmarks"]
    for page in [*pages, "changelog", *GUIDES, *EXAMPLE_PAGES]:
        assert (html / f"{page}.html").is_file(), f"{page}.html was not built"
    assert (html / "_images" / "overview.png").is_file()
    api = (html / "api.html").read_text(encoding="utf-8")
    import crckd_losses

    for name in crckd_losses.__all__:
        if name not in {"backends", "functional", "sampling", "__version__"}:
            assert f'id="crckd_losses.{name}"' in api, f"{name} is missing from the API page"
    import crckd_losses.functional as functional

    for name in ["ClassLayout", "class_guided_indices", "class_anchor_indices",
                 "instance_indices"]:
        assert f'id="crckd_losses.sampling.{name}"' in api, f"sampling.{name} is missing"
    for name in functional.__all__:
        assert f'id="crckd_losses.functional.{name}"' in api, f"functional.{name} is missing"
    for name in crckd_losses.backends.__all__:
        if name != "Backend":  # a type alias
            assert f'id="crckd_losses.backends.{name}"' in api, f"backends.{name} is missing"
    for name in ["world_size", "all_gather_varlen", "gather_for_update", "global_log_mean_exp"]:
        assert f'id="crckd_losses.distributed.{name}"' in api, f"distributed.{name} is missing"


def _built_pages(html: Path) -> list[Path]:
    """The site's pages; not the highlighted module sources of ``_modules/`` (their lines are
    the code's own, up to ruff's 100 columns)."""
    skip = {"_modules", "_static", "_sources", "_images", "_downloads"}
    pages = [p for p in html.rglob("*.html") if p.relative_to(html).parts[0] not in skip]
    assert html / "index.html" in pages, "the build wrote no index page"
    return pages


def test_pages_need_no_network(build_dir: Path) -> None:
    html = build_dir / "html"
    assert (html / "_static" / "mathjax" / "tex-chtml.js").is_file(), "MathJax is not bundled"
    for page in _built_pages(html):
        text = page.read_text(encoding="utf-8")
        for tag in re.findall(r"<(?:script|link)\b[^>]*>", text):
            url = re.search(r'\b(?:src|href)="([^"]*)"', tag)
            assert url is None or not EXTERNAL.match(url.group(1)), (
                f"{page.relative_to(html)} loads {url.group(1)} from the network"
            )
    for sheet in (html / "_static").rglob("*.css"):
        imports = re.findall(r"(?:@import|url\()\s*[\"']?([^\"')\s]+)", sheet.read_text("utf-8"))
        assert not [u for u in imports if EXTERNAL.match(u) and not u.startswith("data:")], sheet


def test_code_lines_fit_the_column(build_dir: Path) -> None:
    html = build_dir / "html"
    too_wide = []
    for page in _built_pages(html):
        for block in re.findall(r"<pre\b[^>]*>(.*?)</pre>", page.read_text("utf-8"), re.S):
            text = html_lib.unescape(re.sub(r"<[^>]+>", "", block))
            too_wide += [f"{page.relative_to(html)}: {line}" for line in text.splitlines()
                         if len(line) > CODE_COLUMN]
    assert not too_wide, f"code lines over {CODE_COLUMN} columns:\n" + "\n".join(too_wide)


def test_guide_examples_run(build_dir: Path) -> None:
    out = build_dir / "doctest"
    result = _sphinx("doctest", out, build_dir / "doctrees")
    output = out / "output.txt"
    report = output.read_text(encoding="utf-8") if output.is_file() else ""
    assert result.returncode == 0, (
        "guide examples failed:\n" + report[-8000:] + result.stderr[-4000:]
    )
    for page in GUIDES:
        match = re.search(rf"Document: {re.escape(page)}\n-+\n(.*?)(?:\n\n|\Z)", report, re.S)
        assert match and "passed" in match.group(1), f"no examples ran on {page}:\n{report}"


@pytest.mark.parametrize("module_name", PUBLIC_MODULES)
def test_docstring_examples(module_name: str) -> None:
    module = importlib.import_module(module_name)
    torch.manual_seed(0)
    finder = doctest.DocTestFinder(exclude_empty=True)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    tests = finder.find(module, module_name, globs=dict(vars(module)))
    for test in tests:
        runner.run(test)
    result = runner.summarize(verbose=False)
    assert result.failed == 0, f"{result.failed} docstring example(s) failed in {module_name}"


def _load_conf():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("crckd_docs_conf", DOCS / "conf.py")
    assert spec is not None and spec.loader is not None
    conf = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(conf)
    return conf


def test_benchmark_results_hook(tmp_path: Path) -> None:
    _require_sphinx()
    conf = _load_conf()
    target = tmp_path / "generated"

    conf.write_benchmark_results(tmp_path / "missing", target)
    assert "found no results" in (target / "_all.md").read_text(encoding="utf-8")

    results = tmp_path / "results"
    results.mkdir()
    (results / "speed.md").write_text(
        "# Speed\n\n![plot](speed.png)\n\n[raw](results.json), see [memory](memory.md)\n",
        encoding="utf-8",
    )
    (results / "memory.md").write_text("# Memory\n", encoding="utf-8")
    (results / "speed.png").write_bytes(b"png")
    (results / "extra.png").write_bytes(b"png")
    (results / "results.json").write_text("{}", encoding="utf-8")
    conf.write_benchmark_results(results, target)
    text = (target / "_all.md").read_text(encoding="utf-8")
    assert "found no results" not in text
    assert "# Speed" in text and "# Memory" in text
    assert "![plot](speed.png)" in text  # shown by its page, not again
    assert text.count("speed.png") == 1
    assert "![extra](extra.png)" in text  # shown by no page: appended
    assert "{download}`raw <" in text and "/generated/results.json>`" in text
    assert "see memory" in text
    assert sorted(p.name for p in target.iterdir()) == sorted(
        ["_all.md", "speed.md", "memory.md", "speed.png", "extra.png", "results.json"]
    )

    (results / "extra.png").unlink()
    conf.write_benchmark_results(results, target)
    assert not (target / "extra.png").exists(), "a removed result must leave the docs"


def test_overview_figure_script(tmp_path: Path) -> None:
    if importlib.util.find_spec("matplotlib") is None:
        pytest.skip("matplotlib not installed; it draws docs/_static/overview.png")
    out = tmp_path / "overview.png"
    subprocess.run(
        [sys.executable, str(DOCS / "_scripts" / "draw_overview.py"), str(out)],
        check=True, timeout=120,
    )
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (DOCS / "_static" / "overview.png").is_file(), "commit docs/_static/overview.png"


def test_no_machine_paths_in_docs() -> None:
    # The folder holding this checkout, whatever it is called, plus the usual home and
    # temporary prefixes, and Windows drive letters.
    here = re.escape(str(ROOT.parent) + "/")
    pattern = re.compile(rf"({here}|/home/|/root/|/tmp/|[A-Z]:\\\\)")
    for path in DOCS.rglob("*"):
        if not path.is_file() or "_build" in path.parts or "_generated" in path.parts:
            continue
        if path.suffix not in {".rst", ".md", ".py", ".txt", ".json"}:
            continue
        found = pattern.search(path.read_text(encoding="utf-8"))
        assert found is None, f"{path.relative_to(ROOT)} contains a machine path: {found.group(0)}"



def test_one_version() -> None:
    """``crckd_losses.__version__`` is the one source: the changelog's newest section names it,
    pyproject.toml and the docs read it."""
    import crckd_losses

    changelog = (DOCS / "changelog.rst").read_text(encoding="utf-8")
    newest = re.search(r"^(\d+\.\d+\.\d+)\b.*\n-+$", changelog, re.M)
    assert newest and newest.group(1) == crckd_losses.__version__
    pyproject = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    assert 'dynamic = ["version"]' in pyproject
    assert 'version = { attr = "crckd_losses.__version__" }' in pyproject
    assert "release = crckd_losses.__version__" in (DOCS / "conf.py").read_text(encoding="utf-8")
