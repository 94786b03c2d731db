"""How well dlib's face recognizer tells people apart at the face widths of a video, on LFW pairs.

The video leak test (eval.video_metrics) counts a face-frame as leaked when dlib's recognizer still
matches the output to the source face. Whether a distance means "same person" depends on the face
width: small faces embed close together. This measures, for each width, the distances of LFW
same-person pairs (first and second photo of a person) and different-person pairs (first photo of
one, second of another) with *both* faces shrunk to that width, as in a video where the source and
the output are equally small, and prints one JSON object: per width the false-match rate at dlib's
usual 0.6, the threshold that accepts 1e-3 and 1e-2 of different-person pairs, and the share of
same-person pairs under each. `IDENTITY_THRESHOLDS` in eval.video_metrics is the 1e-3 row.

    python benchmarks/recognizer_by_width.py --num_pairs 300     # about 10 minutes on 2 cores

The LFW photos here are grayscale: the thresholds are those of grayscale faces.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import cv2
import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(REPO))

from eval.identity import DlibFaces, impostor_distances, photo_pairs, read_image, threshold_at_far  # noqa: E402
from fdf_core.assets import assets_dir  # noqa: E402

def embed_at(faces: DlibFaces, image: np.ndarray, box: np.ndarray, width: int) -> np.ndarray:
    """The face's embedding with the photo shrunk (area averaging) so the box is `width` px wide."""
    if width:
        f = width / (box[2] - box[0])
        image = cv2.resize(image, None, fx=f, fy=f, interpolation=cv2.INTER_AREA)
        box = box * f
    return faces.embed(image, box)


def by_width(first: np.ndarray, second: np.ndarray) -> dict:
    """Rates and thresholds of one width from (N, 128) embeddings of the two photos of N people."""
    genuine = np.linalg.norm(first - second, axis=1)
    impostor = impostor_distances(first, second)
    out = {"people": len(first), "different_pairs": len(impostor),
           "false_match_at_0_6": round(float((impostor < 0.6).mean()), 4),
           "true_match_at_0_6": round(float((genuine < 0.6).mean()), 3)}
    for far in (1e-3, 1e-2):
        t = threshold_at_far(impostor, far)
        out[f"threshold_at_far_{far:g}"] = round(t, 3)
        out[f"true_match_at_far_{far:g}"] = round(float((genuine < t).mean()), 3)
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pairs_dir", default=str(assets_dir() / "faces" / "lfw_pairs"))
    p.add_argument("--num_pairs", type=int, default=300)
    p.add_argument("--widths", default="32,40,48,64,96,0", help="face widths in px (0: full size)")
    args = p.parse_args(argv)
    widths = [int(w) for w in args.widths.split(",")]
    faces = DlibFaces()
    start = time.perf_counter()
    embeddings: dict[int, tuple[list, list]] = {w: ([], []) for w in widths}
    skipped = 0
    for a, b in photo_pairs(Path(args.pairs_dir), args.num_pairs):
        ia, ib = read_image(a)[0], read_image(b)[0]
        ba, bb = faces.detect(ia), faces.detect(ib)
        if not len(ba) or not len(bb):
            skipped += 1
            continue
        for w in widths:
            embeddings[w][0].append(embed_at(faces, ia, ba[0], w))
            embeddings[w][1].append(embed_at(faces, ib, bb[0], w))
    result = {"pairs_dir": args.pairs_dir, "skipped_no_face": skipped,
              "widths": {str(w or "full"): by_width(np.array(e[0]), np.array(e[1])) for w, e in embeddings.items()},
              "seconds": round(time.perf_counter() - start, 1)}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
