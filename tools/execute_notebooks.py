"""Run book notebooks top to bottom and save them with the outputs of that run.

    .venv/bin/python tools/execute_notebooks.py book/foundations/tasks_data_metrics.ipynb [...]
    .venv/bin/python tools/execute_notebooks.py --tidy-only book/**/*.ipynb   # no re-run

Each notebook runs in a fresh kernel with its own folder as the working directory, as under
nbval in CI and as in Colab. Before saving, text progress bars are reduced to what a terminal
shows: tqdm redraws its bar with carriage returns, and a stored output keeps every redraw,
which the rendered book would print as hundreds of lines.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient


def terminal_view(text: str) -> str:
    """``text`` as a terminal leaves it: a carriage return moves back to the line's start, and what
    follows overwrites the characters already there (a bar that clears itself with spaces, as
    tqdm's ``leave=False`` does, leaves an empty line, which is dropped)."""
    lines = []
    for line in text.split("\n"):
        if "\r" not in line:
            lines.append(line)
            continue
        screen = ""
        for part in line.split("\r"):
            screen = part + screen[len(part):]
        if screen.strip():
            lines.append(screen.rstrip())
    return "\n".join(lines)


def tidy_streams(notebook: nbformat.NotebookNode) -> None:
    """Merge consecutive stream outputs of one kind per cell and apply :func:`terminal_view`."""
    for cell in notebook.cells:
        if cell.cell_type != "code":
            continue
        merged: list = []
        for output in cell.outputs:
            previous = merged[-1] if merged else None
            if output.output_type == "stream" and previous is not None and previous.output_type == "stream" and previous.name == output.name:
                previous.text += output.text
            else:
                merged.append(output)
        for output in merged:
            if output.output_type == "stream":
                output.text = terminal_view(output.text)
        cell.outputs = [o for o in merged if not (o.output_type == "stream" and not o.text.strip())]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("notebooks", nargs="+", type=Path)
    parser.add_argument("--tidy-only", action="store_true", help="only tidy the stored outputs, do not run")
    args = parser.parse_args()
    for path in args.notebooks:
        notebook = nbformat.read(path, as_version=4)
        started = time.perf_counter()
        if not args.tidy_only:
            client = NotebookClient(notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}})
            client.execute()
        tidy_streams(notebook)
        nbformat.write(notebook, path)
        print(f"{path}: {time.perf_counter() - started:.1f} s")


if __name__ == "__main__":
    main()
