"""Pasting painted faces into photos: the Poisson blend keeps every box replaced, leaves no step where
the painted face meets the photo and no fringe around it, where a feathered paste leaves both."""
from __future__ import annotations

import functools

import cv2
import numpy as np
import pytest

from eval.anonymizer import Anonymizer, AnonymizerConfig, load_generator_at, resolve_checkpoint
from eval import paste
from eval.paste import (Composite, SeamMemory, feather_width, harmonic_fill, pixel_extent, poisson_blend,
                        seam_figures)
from fdf_builder import crop as fdfcrop
from fdf_core.assets import assets_dir

PHOTO = assets_dir() / "corpus" / "photos" / "deep_privacy2__media_regjeringen.jpg"  # 19 faces on a blue wall


def test_harmonic_fill_solves_laplace_with_the_frame_fixed():
    yy, xx = np.mgrid[0:30, 0:41].astype(np.float64)
    for f in (2 * yy + 3 * xx, yy * yy - xx * xx, yy * xx):  # harmonic (also for the 5-point stencil)
        frame = f.copy()
        frame[1:-1, 1:-1] = 0
        assert np.abs(harmonic_fill(frame[..., None])[..., 0] - f).max() < 1e-8
    frame = np.zeros((21, 21, 1))
    frame[0] = 100  # one hot side: the heat spreads in, smoothly, falling with distance
    column = harmonic_fill(frame)[:, 10, 0]
    assert column[0] == 100 and (np.diff(column[:-1]) < 0).all() and 20 < column[5] < 80


@pytest.mark.parametrize("side", [40, 150])  # solved at full size, and on a coarser frame
def test_poisson_blend_keeps_gradients_and_takes_the_border_from_the_target(side):
    rng = np.random.default_rng(0)
    target = cv2.GaussianBlur(rng.integers(0, 256, (side, side + 7, 3), dtype=np.uint8), (9, 9), 3)
    assert np.abs(poisson_blend(target.copy(), target).astype(int) - target).max() <= 2  # nothing to fix
    shifted = np.clip(target.astype(int) + [40, -30, 25], 0, 255).astype(np.uint8)  # a colour cast
    solved = poisson_blend(shifted, target).astype(int)
    assert np.abs(solved - target).mean() < 3  # the cast is gone, the picture kept
    assert np.abs(shifted.astype(int) - target).mean() > 25


@pytest.fixture(scope="module")
def painted():
    """The regjeringen photo's faces, pasted by both blends with the shipped generator."""
    image = cv2.cvtColor(cv2.imread(str(PHOTO)), cv2.COLOR_BGR2RGB)
    image = np.ascontiguousarray(image[:700, :1400])  # the front rows: 8 faces of about 80-100 px
    anonymizer = Anonymizer(AnonymizerConfig(blend="feather"),
                            generator=load_generator_at(resolve_checkpoint(None)))
    (faces,) = anonymizer.find_faces([image])
    assert len(faces) >= 5
    out = {}
    for name, blend, soften in (("feather", "feather", 0.0), ("poisson", "poisson", paste.SOFT_SIGMA),
                                ("poisson_unsoftened", "poisson", 0.0)):
        anonymizer.cfg.blend, anonymizer.cfg.soften = blend, soften
        out[name] = anonymizer.anonymize([image], [faces])[0]
    return image, faces, out


def test_poisson_paste_replaces_every_box_without_a_seam_or_a_halo(painted):
    image, faces, out = painted
    figures = {}
    for blend, result in out.items():
        rows = []
        for box in faces.boxes:
            x0, y0, x1, y1 = pixel_extent(box, *image.shape[:2])
            assert (result[y0:y1, x0:x1] != image[y0:y1, x0:x1]).any(axis=2).mean() > 0.9, blend
            rows.append(seam_figures(image, result, (x0, y0, x1, y1), feather_width(box, 0.1)))
        figures[blend] = {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}
    feather, poisson, unsoftened = figures["feather"], figures["poisson"], figures["poisson_unsoftened"]
    # no steeper step at the box edge than the photo's own edges there (hair line, jaw, background)
    assert poisson["seam_step"] < poisson["photo_step"] + 2, figures
    assert unsoftened["seam_step"] < poisson["photo_step"] + 2, figures
    # and no colour fringe around it; unsoftened, the photo is kept outside the boxes (but where another box lies)
    assert poisson["fringe"] < 0.2 * feather["fringe"], figures
    assert unsoftened["outside_change"] < 0.1 * feather["outside_change"], figures
    # the soft painted face meets the sharp photo in a slope: just outside its edge the detail is
    # closer to just inside than the untouched photo's (a step that reads as a rectangle side)
    assert unsoftened["detail_ratio"] > 1.5 * unsoftened["photo_detail_ratio"], figures
    assert abs(np.log(poisson["detail_ratio"] / poisson["photo_detail_ratio"])) < \
        0.5 * abs(np.log(unsoftened["detail_ratio"] / unsoftened["photo_detail_ratio"])), figures


def _centroid_x(image: np.ndarray) -> float:
    weight = image[..., 0].astype(np.float64)
    return float((weight.sum(axis=0) * np.arange(image.shape[1])).sum() / weight.sum())


def test_a_face_moving_a_fraction_of_a_pixel_moves_smoothly_not_in_whole_pixel_jumps():
    """Video pastes each painting at its exact square (fdf_builder.crop.exact_square): a face
    drifting 0.25 px per frame must move 0.25 px per frame; the rounded crop moved 0, 0, 0, 1."""
    face = np.zeros((32, 32, 3), np.uint8)
    cv2.circle(face, (16, 16), 6, (255, 255, 255), -1)
    steps = []
    for k in range(8):
        box = np.array([100.25 + 0.25 * k, 80.0, 140.25 + 0.25 * k, 120.0])
        extent = pixel_extent(box, 240, 320)
        crop = fdfcrop.crop_box(np.asarray(extent, np.float64), (240, 320), rule="pad")
        composite = Composite(np.zeros((240, 320, 3), np.uint8), "feather")
        composite.add(face, extent, crop, 0, fdfcrop.exact_square(box))
        steps.append(_centroid_x(composite.result()))
    moves = np.diff(steps)
    assert np.allclose(moves, 0.25, atol=0.05), moves


def test_a_moving_face_is_blurred_alike_at_every_fraction_of_a_pixel():
    """A carried video painting lands at a new sub-pixel place every frame. Warped straight onto the
    frame's pixels its detail rose and fell with the place's fraction (Laplacian energy 33-39: a
    shimmer as the face moves); through the finer grid it stays within 5 %."""
    rng = np.random.default_rng(0)
    face = cv2.resize(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8), (64, 64), interpolation=cv2.INTER_LINEAR)
    energy = []
    for k in range(5):
        box = np.array([100.0 + 0.25 * k, 80.0, 136.0 + 0.25 * k, 116.0])
        extent = pixel_extent(box, 240, 320)
        crop = fdfcrop.crop_box(np.asarray(extent, np.float64), (240, 320), rule="pad")
        composite = Composite(np.full((240, 320, 3), 128, np.uint8), "feather", SeamMemory(0.9))  # a video
        composite.add(face, extent, crop, 0, fdfcrop.exact_square(box))
        inside = composite.result()[85:111, 105:131].astype(np.float32)
        energy.append(float(np.abs(cv2.Laplacian(inside, cv2.CV_32F)).mean()))
    assert max(energy) / min(energy) < 1.05, energy


def test_seam_memory_steadies_a_correction_that_flickers_and_forgets_ended_tracks():
    """A box edge whose surroundings alternate bright/dark every frame: solved per frame the whole
    face follows (the flicker of a carried face); with the track's seam kept at 0.8 it barely moves."""
    source = np.full((40, 40, 3), 100, np.uint8)
    centre = {}
    for keep in (0.0, 0.8):
        seams, values = SeamMemory(keep), []
        for frame in range(12):
            target = np.full((40, 40, 3), 120 if frame % 2 else 80, np.uint8)
            values.append(float(poisson_blend(source, target, seam=functools.partial(seams, 7))[20, 20, 0]))
        centre[keep] = np.ptp(values[6:])
        seams.forget({3})
        assert not seams.sides
    assert centre[0.0] > 15 and centre[0.8] < 0.3 * centre[0.0], centre


def test_a_lagging_seam_never_shows_as_a_step_at_the_box_edge(monkeypatch):
    """The painting brightens by 40 levels at once (a new one) against steady surroundings: with the
    track's seam kept at 0.95 the face's centre follows slowly (steady), but towards the box edge
    this frame's exact fit takes over, so the face meets its surroundings through a ramp of a few
    levels per pixel instead of showing its box as a step of about 40 levels for the next second."""
    target = np.full((60, 60, 3), 120, np.uint8)
    step, centre = {}, {}
    for edge in (0.0, paste.SEAM_EDGE):
        monkeypatch.setattr(paste, "SEAM_EDGE", edge)
        seams = SeamMemory(0.95)
        for frame in range(6):
            source = np.full((60, 60, 3), 100 if frame < 3 else 140, np.uint8)
            solved = poisson_blend(source, target, seam=functools.partial(seams, 7)).astype(int)
        # the largest step between neighbouring pixels from the surroundings (120) inwards
        rows = np.concatenate([np.full((1, 58), 120), solved[1:30, 1:-1, 0]])
        step[edge], centre[edge] = np.abs(np.diff(rows, axis=0)).max(), solved[30, 30, 0]
    assert step[0.0] >= 30 and step[paste.SEAM_EDGE] <= 10, step
    assert centre[0.0] == centre[paste.SEAM_EDGE] > 135, centre  # inside, the kept seam: it moves on slowly


def _cut_by_the_edge(image: np.ndarray, face: np.ndarray, box: tuple[int, int, int, int],
                     seams: SeamMemory | None = None) -> np.ndarray:
    """`face` pasted (Poisson) into the box, which may reach past the photo's edge (pad crop)."""
    crop = fdfcrop.crop_box(np.asarray(box, np.float64), image.shape[:2], rule="pad")
    composite = Composite(image, "poisson", seams)
    composite.add(face, pixel_extent(np.asarray(box, np.float64), *image.shape[:2]), crop, 0,
                  track=None if seams is None else 7, whole=box)
    return composite.result().astype(int)


def test_a_box_past_the_photo_edge_takes_the_fit_of_the_sides_the_photo_shows():
    """A face 60 px wide of which 40 are inside: the photo's edge is not a seam, so the colour fit
    of its seen sides carries on to it. Fixed to the painting's own colour there (the fit of the
    part inside the photo alone), the face stayed 50 levels off its surroundings at the photo edge."""
    image = np.full((80, 100, 3), 150, np.uint8)
    face = np.full((32, 32, 3), 100, np.uint8)
    pasted = _cut_by_the_edge(image, face, (60, 20, 120, 70))[20:70, 60:100]
    assert np.abs(pasted - 150).max() <= 1, np.abs(pasted - 150).max()


def test_a_face_coming_into_view_keeps_its_colour_fit_once_wholly_inside():
    """Video: a face slides in over the right edge (20, then 35 of its 50 px in view) and is wholly
    inside from the third frame. Its seam lives in the whole box's coordinates, so it fits from the
    first frame and does not drift once inside. The fit of the part in view alone (the photo edge
    pinned to the painting) lagged 12 levels at the face's centre after it came in, fading
    over a second at `seam_keep` 0.95: the pan clip's entering faces drifted 20 levels over their
    first 40 frames in view."""
    image = np.full((80, 100, 3), 150, np.uint8)
    face = np.full((32, 32, 3), 100, np.uint8)
    seams = SeamMemory(0.95)
    for x0 in (80, 65, 50, 45):
        pasted = _cut_by_the_edge(image, face, (x0, 15, x0 + 50, 65), seams)[15:65, x0:x0 + 50]
        assert np.abs(pasted - 150).max() <= 1, (x0, np.abs(pasted - 150).max())


def test_seam_memory_trusts_the_frames_that_show_the_face():
    """A track seen whole from its first frame blends its seam exactly as keep·previous +
    (1 - keep)·this frame's. A track whose first fit came from a box mostly outside the frame
    (trust 0.1: a sliver of the face, the box a guess) is 40 levels off what the frames showing it
    say; it takes their fit within a few frames instead of carrying the first one for a second
    (plain blending: still 28 levels off after ten frames)."""
    sides = lambda v: [np.full((9, 3), v, np.float32) for _ in range(4)]  # noqa: E731
    whole = SeamMemory(0.95)
    whole(1, sides(-40.0))
    assert np.allclose(whole(1, sides(-10.0))[0], 0.95 * -40 + 0.05 * -10)
    entering = SeamMemory(0.95)
    entering(2, sides(-40.0), [np.full(9, 0.1, np.float32)] * 4)
    for _ in range(10):
        kept = entering(2, sides(-10.0), [np.ones(9, np.float32)] * 4)
    assert np.abs(kept[0] + 10.0).max() < 5.0, kept[0][0]


def test_soften_around_changes_only_the_band_beside_each_box_never_a_box():
    """Two overlapping boxes, one past the photo's edge: every box pixel and every pixel beyond the
    bands is the input's; the band moves towards the photo's blur, fully next to a box."""
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (120, 160, 3), dtype=np.uint8)
    owner = np.full(image.shape[:2], -1, np.int32)
    extents = [(40, 30, 90, 90), (80, 50, 160, 110)]  # the second reaches the right edge
    for k, (x0, y0, x1, y1) in enumerate(extents):
        owner[y0:y1, x0:x1] = k
    out = paste.soften_around(image, owner, extents, [4.0, 4.0], band=0.12, sigma=0.5)
    boxes = owner >= 0
    assert np.array_equal(out[boxes], image[boxes])
    grown = np.zeros_like(boxes)
    for x0, y0, x1, y1 in extents:
        g = round(0.12 * max(x1 - x0, y1 - y0))
        grown[max(y0 - g, 0):y1 + g, max(x0 - g, 0):x1 + g] = True
    assert np.array_equal(out[~grown], image[~grown])
    beside = out[29, 45:85].astype(float), image[29, 45:85].astype(float)  # the row just above box 0
    smooth = lambda row: np.abs(np.diff(row, axis=0)).mean()  # noqa: E731
    assert smooth(beside[0]) < 0.5 * smooth(beside[1])  # noise there is mostly blurred away
    assert np.array_equal(paste.soften_around(image, owner, extents, [1.0, 1.0], sigma=0.3), image)  # sigma 0.3 px: nothing to fade
