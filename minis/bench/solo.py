"""``python -m minis bench solo``: Matrix NMS against greedy mask NMS, as SOLOv2's candidates grow.

SOLOv2's claim for Matrix NMS is speed without a loss of AP: greedy NMS must decide which masks
are kept before it knows what they suppress, a sequential dependency; Matrix NMS decays every
score from one IoU matrix in a single pass. Both here are plain tensor code on the same IoU
matrix (:func:`minis.ops.batched_mask_nms` settles the greedy order by iterating to its fixed
point), so the table shows what the one pass saves and what it keeps:

>>> print(format_table(bench_matrix_nms(counts=(100, 500)), MATRIX_NMS_COLUMNS))
"""

from __future__ import annotations

import argparse
from typing import Any, Sequence

import torch

from minis.bench.common import add_json_option, finish, format_table, interleaved_median_ms

MATRIX_NMS_COLUMNS = [("method", ""), ("masks", "d"), ("ms", ".2f"), ("kept", "d"), ("vs_greedy", ".2f")]


def clustered_masks(count: int, classes: int, size: int, generator: torch.Generator
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``count`` binary masks as SOLO leaves them before NMS: a few objects per class (discs), each
    found by several neighbouring cells as jittered copies; random scores. ``[N,size,size]`` bool,
    labels ``[N]``, scores ``[N]``."""
    objects = max(1, count // 10)
    centres = torch.rand(objects, 2, generator=generator) * size
    radii = torch.empty(objects).uniform_(size / 20, size / 5, generator=generator)
    pick = torch.randint(0, objects, (count,), generator=generator)
    centre = centres[pick] + torch.randn(count, 2, generator=generator) * radii[pick, None] * 0.2
    radius = radii[pick] * torch.exp(torch.randn(count, generator=generator) * 0.1)
    ys, xs = torch.meshgrid(torch.arange(size) + 0.5, torch.arange(size) + 0.5, indexing="ij")
    masks = (xs - centre[:, 0, None, None]) ** 2 + (ys - centre[:, 1, None, None]) ** 2 <= radius[:, None, None] ** 2
    labels = pick % classes  # an object has one class; its copies share it
    return masks, labels, torch.rand(count, generator=generator)


@torch.no_grad()
def bench_matrix_nms(counts: Sequence[int] = (100, 500), size: int = 200, classes: int = 10, iou: float = 0.5,
                     update_thresh: float = 0.05, runs: int = 10, seed: int = 0) -> list[dict[str, Any]]:
    """Matrix NMS (:func:`minis.ops.matrix_nms`, gaussian, sigma 2, then scores ``>= update_thresh``)
    against greedy mask NMS (:func:`minis.ops.batched_mask_nms`, IoU ``> iou``) on ``counts`` clustered
    masks of ``size x size`` pixels (200: SOLOv2's stride-4 masks of an 800-pixel image). Rows:
    median ``ms``, masks ``kept``, time divided by greedy NMS's on the same masks."""
    from minis import ops

    rows = []
    for count in counts:
        masks, labels, scores = clustered_masks(count, classes, size, torch.Generator().manual_seed(seed + count))
        calls = {
            "Matrix NMS (minis.ops.matrix_nms)":
                lambda: (ops.matrix_nms(masks, labels, scores) >= update_thresh).nonzero()[:, 0],
            "greedy mask NMS (minis.ops.batched_mask_nms)":
                lambda: ops.batched_mask_nms(masks, scores, labels, iou),
        }
        times = interleaved_median_ms(list(calls.values()), runs, warmup=1)
        for (method, call), ms in zip(calls.items(), times):
            rows.append({"method": method, "masks": count, "ms": ms, "kept": len(call()), "vs_greedy": ms / times[-1]})
    return rows


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def add_parser(suites: argparse._SubParsersAction) -> None:
    """``bench solo`` and its options."""
    parser = suites.add_parser("solo", help="Matrix NMS against greedy mask NMS")
    parser.add_argument("--masks", type=int, nargs="+", default=[100, 500], help="candidate counts (default 100 500)")
    parser.add_argument("--runs", type=int, default=10, help="timed rounds (median; default 10)")
    add_json_option(parser)
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    rows = {"matrix_nms": bench_matrix_nms(counts=args.masks, runs=args.runs)}
    print("\nMatrix NMS against greedy mask NMS (both plain PyTorch, one IoU matrix), 200 x 200 masks:")
    print(format_table(rows["matrix_nms"], MATRIX_NMS_COLUMNS))
    return finish(rows, args.json)
