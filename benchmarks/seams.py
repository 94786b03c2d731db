"""How visible the painted boxes are on the corpus photos, for `--soften` settings of `anonymize`.

Every photo of `../shared/assets/corpus/photos` is painted with the shipped model once per setting
(the same detections for all), and each face at least `--min_face` px wide (the sizes a person
looks at) is scored by `eval.paste.seam_figures`: the colour step across the box edge, the colour
fringe around it, and the detail just outside the edge over the detail just inside it (a soft
painted face meeting a sharp photo along a straight line: far above 1; the photo's own: about 1).
Prints one JSON object: per setting the medians over the faces and the seconds the paste took.

    python benchmarks/seams.py                      # --soften 0 (the photo untouched outside) and the default
    python benchmarks/seams.py --soften '[0, 0.3, 0.5]'
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(REPO))

from eval import paste  # noqa: E402
from eval.anonymizer import Anonymizer, AnonymizerConfig  # noqa: E402
from eval.images import IMAGE_EXTS, read_image  # noqa: E402
from fdf_core.assets import assets_dir  # noqa: E402

FIGURES = ("seam_step", "photo_step", "fringe", "outside_change", "detail_ratio", "photo_detail_ratio")


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--soften", default=f"[0, {paste.SOFT_SIGMA}]", help="JSON list of --soften values")
    ap.add_argument("--min_face", type=int, default=80, help="faces narrower than this are not scored")
    ap.add_argument("--photos", default=str(assets_dir() / "corpus" / "photos"))
    args = ap.parse_args(argv)
    settings = [float(s) for s in json.loads(args.soften)]
    anonymizer = Anonymizer(AnonymizerConfig())
    rows: dict[float, list[dict]] = {s: [] for s in settings}
    seconds = dict.fromkeys(settings, 0.0)
    photos = sorted(p for p in Path(args.photos).iterdir() if p.suffix.lower() in IMAGE_EXTS)
    for path in photos:
        image, _ = read_image(path)
        (faces,) = anonymizer.find_faces([image])
        if not len(faces):
            continue
        for soften in settings:
            anonymizer.cfg.soften = soften
            before = anonymizer.timings["crop_paste"]
            result = anonymizer.anonymize([image], [faces])[0]
            seconds[soften] += anonymizer.timings["crop_paste"] - before
            for box in faces.boxes:
                extent = paste.pixel_extent(box, *image.shape[:2])
                if extent is None or extent[2] - extent[0] < args.min_face:
                    continue
                rows[soften].append(paste.seam_figures(image, result, extent, paste.feather_width(box, 0.1)))
    out = {"photos": len(photos), "min_face": args.min_face, "faces": len(rows[settings[0]]),
           "settings": {str(s): {**{f"median_{k}": round(float(np.median([r[k] for r in rows[s]])), 3) for k in FIGURES},
                                 "crop_paste_s": round(seconds[s], 2)} for s in settings if rows[s]}}
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    t0 = time.perf_counter()
    main()
    print(f"{time.perf_counter() - t0:.0f} s", file=sys.stderr)
