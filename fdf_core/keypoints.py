"""The 7 FDF keypoints: their names and order, and how a horizontal flip permutes them.

COCO person keypoints 0-6 in COCO order (docs/reference.md, "Keypoints"); "left" is the subject's
left. The builder writes them in this order (every sample's `keypoint_names`, FORMAT.md §2), the
loader refuses samples in any other, and training and the anonymizer feed them to the networks in
it, so there is one definition for all of them.
"""
from __future__ import annotations

from typing import Sequence

KEYPOINT_NAMES = ("nose", "left_eye", "right_eye", "left_ear", "right_ear", "left_shoulder", "right_shoulder")


def flip_permutation(names: Sequence[str] = KEYPOINT_NAMES) -> list[int]:
    """Channel order after a horizontal flip: every left_* keypoint trades places with its right_*."""
    index = {n: i for i, n in enumerate(names)}
    perm = []
    for n in names:
        side, _, part = n.partition("_")
        twin = {"left": "right", "right": "left"}.get(side)
        perm.append(index[f"{twin}_{part}"] if twin and f"{twin}_{part}" in index else index[n])
    return perm
