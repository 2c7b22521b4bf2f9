"""The book: it builds offline with local MathJax, and every notebook follows the chapter template."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

BOOK = Path(__file__).resolve().parents[1] / "book"
NOTEBOOKS = sorted(p for p in BOOK.rglob("*.ipynb") if "_build" not in p.parts and ".ipynb_checkpoints" not in p.parts)


def repository_url() -> str:
    match = re.search(r"^repository:\s*\n\s+url:\s*(\S+)", (BOOK / "_config.yml").read_text(), re.MULTILINE)
    assert match, "book/_config.yml must give repository.url"
    return match.group(1)


def toc_files() -> list[str]:
    text = (BOOK / "_toc.yml").read_text()
    return re.findall(r"^\s*root:\s*(\S+)", text, re.MULTILINE) + re.findall(r"file:\s*(\S+)", text)


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: str(p.relative_to(BOOK)))
def test_first_cell_installs_minis_in_colab_and_picks_the_device(notebook: Path) -> None:
    cells = json.loads(notebook.read_text())["cells"]
    first_code = next(c for c in cells if c["cell_type"] == "code")
    source = "".join(first_code["source"])
    assert "google.colab" in source and "pip" in source, "first code cell must install minis in Colab"
    assert repository_url() in source, "install cell must use the repository URL of book/_config.yml"
    assert "torch.cuda.is_available()" in source, "first code cell must choose the GPU when there is one"


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: str(p.relative_to(BOOK)))
def test_notebook_is_saved_with_the_outputs_of_a_full_run(notebook: Path) -> None:
    cells = [c for c in json.loads(notebook.read_text())["cells"] if c["cell_type"] == "code" and "".join(c["source"]).strip()]
    counts = [c["execution_count"] for c in cells]
    assert None not in counts, f"cells without a saved run: {[i for i, n in enumerate(counts) if n is None]}"
    assert counts == sorted(counts), "cells were not run top to bottom in one session"
    errors = [o for c in cells for o in c["outputs"] if o["output_type"] == "error"]
    assert not errors, f"saved outputs contain errors: {[e['ename'] for e in errors]}"


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: str(p.relative_to(BOOK)))
def test_saved_progress_bars_show_their_final_state(notebook: Path) -> None:
    """tools/execute_notebooks.py keeps what a terminal shows, not every redraw of a bar."""
    streams = [o for c in json.loads(notebook.read_text())["cells"] if c["cell_type"] == "code"
               for o in c["outputs"] if o["output_type"] == "stream"]
    assert not [o for o in streams if "\r" in "".join(o["text"])], "run tools/execute_notebooks.py --tidy-only"


def test_every_toc_entry_exists() -> None:
    for name in toc_files():
        assert any((BOOK / f"{name}{suffix}").exists() for suffix in ("", ".md", ".ipynb")), name


@pytest.mark.slow
def test_book_builds_offline_with_local_mathjax(tmp_path: Path) -> None:
    mathjax = BOOK / "_vendor" / "mathjax" / "tex-chtml.js"
    if not mathjax.exists():
        pytest.fail("MathJax is missing: run `make mathjax` (the test command does) before building the book")
    jupyter_book = shutil.which("jupyter-book", path=str(Path(sys.executable).parent))
    assert jupyter_book, "jupyter-book is not installed in this environment (pip install -e '.[book]')"
    result = subprocess.run(
        [jupyter_book, "build", str(BOOK), "--path-output", str(tmp_path), "--warningiserror", "--keep-going"],
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    html = tmp_path / "_build" / "html"
    for name in toc_files():
        assert (html / f"{name}.html").exists(), f"{name}.html was not built"
    assert (html / "_static" / "mathjax" / "tex-chtml.js").exists()
    pages_with_math = [p for p in html.rglob("*.html") if "tex-chtml.js" in p.read_text(errors="ignore")]
    assert pages_with_math, "no page loads MathJax: the chapters' equations would not render"
    for page in pages_with_math:
        scripts = re.findall(r'<script[^>]*src="([^"]*mathjax[^"]*)"', page.read_text())
        assert scripts and all(s.startswith(("_static", "../")) for s in scripts), f"{page}: MathJax not served locally: {scripts}"


def test_stored_progress_bars_keep_what_a_terminal_shows() -> None:
    sys.path.insert(0, str(BOOK.parent / "tools"))
    try:
        from execute_notebooks import terminal_view
    finally:
        sys.path.pop(0)
    assert terminal_view("train:  50%|#    |\rtrain: 100%|#####|\nfit done") == "train: 100%|#####|\nfit done"
    # tqdm's leave=False bar overwrites itself with spaces when it closes: nothing remains
    assert terminal_view("eval: 10%\reval: 96% 192/200\r" + " " * 20 + "\r") == ""
    assert terminal_view("eval: 96% 192/200\r\nnext") == "eval: 96% 192/200\nnext"
    assert terminal_view("long line here\rshort") == "shortline here"  # overwritten, not replaced


def test_ci_prints_chapter_times_and_fails_a_chapter_over_the_limit() -> None:
    """The root conftest sums each chapter's nbval items; over the limit, pytest exits non-zero."""
    run = lambda limit: subprocess.run(  # noqa: E731
        [sys.executable, "-m", "pytest", "-q", "-p", "no:xdist", str(BOOK / "intro.ipynb")], cwd=BOOK.parent,
        capture_output=True, text=True, timeout=300, env={**os.environ, "MINIS_CHAPTER_LIMIT_S": limit})
    within = run("480")
    assert within.returncode == 0, within.stdout[-2000:]
    assert re.search(r"\d+\.\d s  book/intro\.ipynb\n", within.stdout)
    over = run("0.001")
    assert over.returncode == 1
    assert "book/intro.ipynb ran" in over.stdout and "broken, not slow" in over.stdout
