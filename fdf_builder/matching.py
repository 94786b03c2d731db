"""FDF's rule for pairing face boxes with detected persons (docs/reference.md, "Matching").

Face boxes are visited from the most to the least confident; each takes the first person, in the
order the keypoint model listed them, that no earlier box took and whose nose and both eyes lie in
the box (borders included). Persons whose score is below the threshold are never candidates
(DeepPrivacy filtered Keypoint R-CNN persons at 0.2). Boxes left without a person are dropped from
the data set by the caller.
"""
from __future__ import annotations

import numpy as np

SCORE_THRESHOLD = 0.2
FACE_KEYPOINTS = (0, 1, 2)  # nose, left eye, right eye


def face_in_box(box: np.ndarray, keypoints: np.ndarray) -> bool:
    """Whether nose and both eyes of a person (K x >=2 array, x, y first) lie in x0, y0, x1, y1."""
    pts = np.asarray(keypoints, dtype=np.float64)[list(FACE_KEYPOINTS), :2]
    x0, y0, x1, y1 = (float(v) for v in box)
    inside = (pts[:, 0] >= x0) & (pts[:, 0] <= x1) & (pts[:, 1] >= y0) & (pts[:, 1] <= y1)
    return bool(inside.all())


def match_faces(boxes: np.ndarray, box_scores: np.ndarray, keypoints: np.ndarray,
                person_scores: np.ndarray, threshold: float = SCORE_THRESHOLD) -> list[int | None]:
    """For each box (in the order given) the index of its person in `keypoints`, or None.

    boxes: (N, 4) x0, y0, x1, y1; box_scores: (N,); keypoints: (P, K>=3, >=2) with x, y first;
    person_scores: (P,), the confidence that each person is real.
    """
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    box_scores = np.asarray(box_scores, dtype=np.float64).reshape(-1)
    person_scores = np.asarray(person_scores, dtype=np.float64).reshape(-1)
    if len(box_scores) != len(boxes) or len(person_scores) != len(keypoints):
        raise ValueError(f"{len(boxes)} boxes with {len(box_scores)} scores, {len(keypoints)} "
                         f"persons with {len(person_scores)} scores: counts must agree")
    free = [p for p in range(len(keypoints)) if person_scores[p] >= threshold]
    matches: list[int | None] = [None] * len(boxes)
    for i in np.argsort(-box_scores, kind="stable"):
        for p in free:
            if face_in_box(boxes[i], keypoints[p]):
                matches[i] = p
                free.remove(p)
                break
    return matches
