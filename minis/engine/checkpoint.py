"""Checkpoints that survive crashes and load safely, and the random state that makes resuming exact.

A checkpoint is one ``dict`` written with ``torch.save`` and read back with
``torch.load(..., weights_only=True)``. That safe loader refuses arbitrary Python objects (a
pickled checkpoint can otherwise run code on load), so a checkpoint holds only tensors, numbers,
strings, ``None`` and lists/tuples/dicts of them: state dicts, the config as a dict, and the
random number generators' states converted below.
"""

from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch


def save_checkpoint(state: dict[str, Any], path: str | os.PathLike) -> Path:
    """Write ``state`` to ``path`` atomically.

    The bytes go to a temporary file in the same folder, are flushed to disk, and the file is
    then renamed over ``path`` with ``os.replace`` (atomic on POSIX and Windows). A crash or
    Ctrl-C while saving leaves the previous checkpoint intact instead of a truncated file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as file:
            torch.save(state, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu", mmap: bool = False
                    ) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint` (safe loader: ``weights_only=True``).

    ``mmap=True`` maps the file instead of reading it: a tensor's bytes are only read when it is
    used. Evaluating or predicting from a training checkpoint then never reads the optimizer's
    state (one or two more copies of the weights, unused there) into memory.

    Raises:
        FileNotFoundError: ``path`` does not exist (the message names it).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)


def capture_rng_state(device: torch.device | str | None = None) -> dict[str, Any]:
    """The state of every random number generator a training step may draw from.

    Python's ``random`` and numpy's global generator (used by some data augmentations), torch's
    CPU generator (dropout on the CPU, torchvision transforms) and, when ``device`` is a GPU, that
    GPU's generator (only this process's GPU: touching the others would create a CUDA context
    on each of them). numpy's key array becomes an int64 tensor so the safe loader accepts it.
    """
    version, internal, gauss_next = random.getstate()
    name, keys, position, has_gauss, cached_gauss = np.random.get_state()
    state = {
        "python": [version, list(internal), gauss_next],
        "numpy": [name, torch.from_numpy(keys.astype(np.int64)), int(position), int(has_gauss), float(cached_gauss)],
        "torch": torch.get_rng_state(),
    }
    if device is not None and torch.device(device).type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def restore_rng_state(state: dict[str, Any], device: torch.device | str | None = None) -> None:
    """Put every generator back to a state returned by :func:`capture_rng_state` (same ``device``)."""
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    name, keys, position, has_gauss, cached_gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), position, has_gauss, cached_gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and device is not None and torch.device(device).type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)


def seed_everything(seed: int) -> None:
    """Seed Python's ``random``, numpy and torch (CPU and every GPU) with one number."""
    random.seed(seed)
    np.random.seed(seed % 2**32)  # numpy's legacy seeding takes 32 bits only
    torch.manual_seed(seed)
