"""Which model the anonymizer paints with, and what it says about it: the crop rule comes from the
model however the generator reached the anonymizer, and the saved options name the model file."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from eval.anonymizer import (CHECKPOINT_ENV, SHIPPED_MODEL, Anonymizer, AnonymizerConfig, Faces,
                             load_generator_at)
from eval.cli import anonymize_main
from fdf_core.assets import assets_dir
from fdf_core.checkpoints import read_checkpoint
from fdf_core.errors import ConfigError, InputError

PHOTOS = assets_dir() / "corpus" / "photos"
PORTRAIT = "face_recognition__examples_obama-240p.jpg"  # 427x240, one face in the middle
FACE_BOX = [170.0, 40.0, 260.0, 150.0]
NO_FACE = "ternaus__tests_data_no_face.jpg"


def _painted(anonymizer: Anonymizer) -> np.ndarray:
    """The portrait with FACE_BOX painted (no pose: no keypoint model, no detector)."""
    image = cv2.cvtColor(cv2.imread(str(PHOTOS / PORTRAIT)), cv2.COLOR_BGR2RGB)
    return anonymizer.anonymize([image], [Faces(np.array([FACE_BOX]), np.ones(1), [None])])[0]


def test_a_generator_handed_in_ready_made_cuts_faces_by_its_models_crop_rule(monkeypatch):
    """As benchmarks/video.py does: `load_generator_at(shipped model)` given to the Anonymizer paints
    exactly what the Anonymizer that loads the model itself paints ("pad", the rule its export
    records); `--crop_rule` stays an explicit override."""
    monkeypatch.delenv(CHECKPOINT_ENV, raising=False)
    loaded = Anonymizer(AnonymizerConfig())
    handed = Anonymizer(AnonymizerConfig(), generator=load_generator_at(SHIPPED_MODEL))
    assert read_checkpoint(SHIPPED_MODEL)["crop_rule"] == loaded.crop_rule == handed.crop_rule == "pad"
    assert np.array_equal(_painted(handed), _painted(loaded))
    assert handed.model_name == loaded.model_name == read_checkpoint(SHIPPED_MODEL)["card"]["name"]
    overridden = Anonymizer(AnonymizerConfig(crop_rule="fdf"), generator=load_generator_at(SHIPPED_MODEL))
    assert overridden.crop_rule == "fdf"
    assert not np.array_equal(_painted(overridden), _painted(loaded))  # the rule changes what is painted


def test_saved_options_name_the_model_file_that_painted(monkeypatch, tmp_path):
    """Without --checkpoint the options record the model that was resolved (the shipped one, or
    $FDF_GENERATOR_CHECKPOINT), its card's name and the crop rule faces were cut by; not null."""
    monkeypatch.delenv(CHECKPOINT_ENV, raising=False)
    card = read_checkpoint(SHIPPED_MODEL)["card"]
    anonymize_main([str(PHOTOS / NO_FACE), str(tmp_path / "a.jpg"), "--progress", "false"])
    options = json.loads((tmp_path / "a.jpg.options.json").read_text())
    assert options["checkpoint"] == str(SHIPPED_MODEL)
    assert options["model_name"] == card["name"] and options["crop_rule"] == "pad"
    assert options["latent"] is None and (options["latent_photos"], options["latent_videos"]) == (1.0, 0.0)
    copy = shutil.copyfile(SHIPPED_MODEL, tmp_path / "model.pt")
    monkeypatch.setenv(CHECKPOINT_ENV, str(copy))
    anonymize_main([str(PHOTOS / NO_FACE), str(tmp_path / "b.jpg"), "--progress", "false"])
    options = json.loads((tmp_path / "b.jpg.options.json").read_text())
    assert Path(options["checkpoint"]).samefile(copy) and options["model_name"] == card["name"]
    anonymize_main([str(PHOTOS / NO_FACE), str(tmp_path / "c.jpg"), "--progress", "false", "--method", "blackout"])
    options = json.loads((tmp_path / "c.jpg.options.json").read_text())
    assert options["model_name"] is None  # a baseline paints with no model


def test_an_unknown_crop_rule_in_a_model_file_is_an_error_naming_it(tmp_path):
    import torch
    saved = torch.load(SHIPPED_MODEL, map_location="cpu", weights_only=True)
    bad = tmp_path / "bad.pt"
    torch.save({**saved, "crop_rule": "tight"}, bad)
    with pytest.raises(InputError, match=f"{bad}: crop_rule 'tight' is not one of fdf, pad"):
        load_generator_at(bad)


def test_the_generator_sees_only_the_band_of_photo_its_training_crops_showed(monkeypatch):
    """The shipped model records the band of photo around the box its UTKFace crops held; with
    `--context auto` (the default) nothing beyond that band reaches the generator: repainting the
    photo there leaves the painted face exactly as it was. `--context full` shows the whole crop,
    so the same change alters the face."""
    monkeypatch.delenv(CHECKPOINT_ENV, raising=False)
    margins = read_checkpoint(SHIPPED_MODEL)["context_margins"]
    assert len(margins) == 4 and margins[0] == margins[2] > 0.05 and margins[1] < 0.02  # thin, none above
    image = cv2.cvtColor(cv2.imread(str(PHOTOS / PORTRAIT)), cv2.COLOR_BGR2RGB)
    x0, y0, x1, y1 = FACE_BOX
    side = max(x1 - x0, y1 - y0)
    changed = image.copy()
    changed[:, :int(x0 - 0.2 * side)] = [0, 255, 0]  # beyond the left band, inside the 1.7x crop
    faces = [Faces(np.array([FACE_BOX]), np.ones(1), [None])]
    box = (slice(int(y0), int(y1)), slice(int(x0), int(x1)))
    for context, same in (("auto", True), ("full", False)):
        a = Anonymizer(AnonymizerConfig(context=context, blend="feather", feather=0.0))
        assert a.context_margins == (margins if context == "auto" else None)
        before, after = (a.anonymize([im], faces)[0][box] for im in (image, changed))
        assert np.array_equal(before, after) == same, context
    # the generator saw zeros beyond the band, but the feather band above the box blends the painted
    # crop with the photo, not with those zeros (rows past the generator's pixels that touch the box)
    a = Anonymizer(AnonymizerConfig(blend="feather", feather=0.1))
    touching = 1.7 * side / a.generator.resolution
    band = (slice(int(y0 - 0.1 * side), int(y0 - touching) - 1), slice(int(x0), int(x1)))
    out = a.anonymize([image], faces)[0]
    assert np.abs(out[band].astype(float) - image[band]).mean() < 6


def test_malformed_context_margins_in_a_model_file_are_an_error_naming_it(tmp_path):
    import torch
    saved = torch.load(SHIPPED_MODEL, map_location="cpu", weights_only=True)
    bad = tmp_path / "bad.pt"
    torch.save({**saved, "context_margins": [0.1, -0.1]}, bad)
    with pytest.raises(InputError, match=f"{bad}: context_margins .* must be four fractions"):
        load_generator_at(bad)


def test_faces_below_small_face_size_take_the_small_face_method_without_pose_or_generator():
    """A 16 px face is blurred exactly as the small-face method (soft_blur) blurs it, gets no keypoints and no
    generator call; the large face beside it is painted as before, and its painting does not change
    with the small face's pixels (none of them reach it: the small face is replaced first)."""
    from eval.baselines import anonymize_boxes

    class CountingKeypoints:
        calls: list[int] = []

        def keypoints_for_faces(self, image, boxes, scores):
            self.calls.append(len(boxes))
            return [None] * len(boxes)

    image = cv2.cvtColor(cv2.imread(str(PHOTOS / PORTRAIT)), cv2.COLOR_BGR2RGB)
    small_box = [40.0, 60.0, 56.0, 76.0]
    faces = lambda: Faces(np.array([FACE_BOX, small_box]), np.ones(2))
    keypoints = CountingKeypoints()
    a = Anonymizer(AnonymizerConfig(small_face_size=20), keypoint_model=keypoints)
    out = a.anonymize([image], [faces()])[0]
    assert keypoints.calls == [1] and dict(a.counts) == {"small_faces": 1, "generated_faces": 1}
    blurred = anonymize_boxes(image, np.array([small_box]), "soft_blur")
    assert np.array_equal(out[60:76, 40:56], blurred[60:76, 40:56])
    everything = Anonymizer(AnonymizerConfig(small_face_size=0, pose_min_size=0), keypoint_model=keypoints)
    painted = everything.anonymize([image], [faces()])[0]
    assert keypoints.calls == [1, 2] and everything.counts["small_faces"] == 0
    assert not np.array_equal(painted[60:76, 40:56], blurred[60:76, 40:56])
    # under pose_min_size (default 40 px): painted, without a keypoint call
    unposed = Anonymizer(AnonymizerConfig(small_face_size=0), keypoint_model=keypoints)
    assert np.array_equal(unposed.anonymize([image], [faces()])[0], painted)  # no pose either way here
    assert keypoints.calls == [1, 2, 1] and unposed.counts["generated_faces"] == 2
    # the video path decides per track (Faces.small): a 16 px face marked for the generator is painted,
    # and the large face marked small takes the small-face method
    chosen = Faces(np.array([FACE_BOX, small_box]), np.ones(2), small=[True, False])
    swapped = Anonymizer(AnonymizerConfig(small_face_size=20), keypoint_model=keypoints).anonymize([image], [chosen])[0]
    x0, y0, x1, y1 = np.asarray(FACE_BOX, int)
    assert np.array_equal(swapped[y0 + 2:y1 - 2, x0 + 2:x1 - 2],
                          anonymize_boxes(image, np.array([FACE_BOX]), "soft_blur")[y0 + 2:y1 - 2, x0 + 2:x1 - 2])
    assert not np.array_equal(swapped[60:76, 40:56], blurred[60:76, 40:56])
    with pytest.raises(ValueError, match="--small_face_method 'sparkles': choose from"):
        AnonymizerConfig(small_face_method="sparkles")


def test_a_face_cut_by_the_photo_edge_is_measured_by_its_part_in_view():
    """A video track carries a face cut by the frame edge at its whole size (eval.video). With 11 of
    its 30 px in view (an 11 x 30 sliver, the area of an 18-px face) it is a small face:
    soft-blurred, no generator call (the full crowd clip's right edge showed such slivers painted
    with a face's features); with 25 in view it is painted."""
    from eval.baselines import anonymize_boxes
    image = cv2.cvtColor(cv2.imread(str(PHOTOS / PORTRAIT)), cv2.COLOR_BGR2RGB)
    h, w = image.shape[:2]
    a = Anonymizer(AnonymizerConfig(small_face_size=20))
    sliver = np.array([[w - 11.0, 60.0, w + 19.0, 90.0]])
    assert a.small(sliver).tolist() == [False] and a.small(sliver, shape=image.shape).tolist() == [True]
    out = a.anonymize([image], [Faces(sliver, np.ones(1))])[0]
    assert dict(a.counts) == {"small_faces": 1}
    assert np.array_equal(out, anonymize_boxes(image, sliver, "soft_blur"))
    most = np.array([[w - 25.0, 60.0, w + 5.0, 90.0]])
    a.anonymize([image], [Faces(most, np.ones(1))])
    assert dict(a.counts) == {"small_faces": 1, "generated_faces": 1}


def test_a_grayscale_photo_stays_grayscale_to_the_last_bit():
    """LFW photos are grayscale stored as RGB. With the shipped 64x64 model, 13 of about 800 came
    back with one pixel's channels a level apart (float arithmetic per channel in the paste); the
    identity table counts such a photo as not kept gray (384 of 387)."""
    from eval.anonymizer import is_grayscale
    anonymizer = Anonymizer(AnonymizerConfig())
    for name in ("Tariq_Aziz_0001.jpg", "William_Donaldson_0002.jpg"):
        image = cv2.cvtColor(cv2.imread(str(assets_dir() / "faces" / "lfw_pairs" / name)), cv2.COLOR_BGR2RGB)
        out = anonymizer(image)
        assert is_grayscale(image) and is_grayscale(out), name
        assert np.abs(out.astype(int) - image).mean() > 10, name  # the face was painted


def test_a_grayscale_photo_stays_grayscale_under_a_baseline_too():
    """The heavy blur (OpenCV's box filter) left one pixel of an LFW photo, at the photo's edge,
    with its channels a level apart (27, 28, 28): a face box that reaches the edge is filtered by
    code that rounds its last pixels apart from the rest."""
    from eval.anonymizer import Faces, is_grayscale
    name = "Mel_Gibson_0002.jpg"
    image = cv2.cvtColor(cv2.imread(str(assets_dir() / "faces" / "lfw_pairs" / name)), cv2.COLOR_BGR2RGB)
    boxes = np.array([[0.62, 0.0, 265.12, 350.0], [276.17, 207.96, 350.0, 332.86]])  # the detector's, 2026-12-07
    out = Anonymizer(AnonymizerConfig(method="heavy_blur")).anonymize([image], [Faces(boxes, np.ones(2))])[0]
    assert is_grayscale(image) and is_grayscale(out)
    assert np.abs(out.astype(int) - image).mean() > 1  # the faces were blurred


def test_a_random_latent_paints_another_face_and_the_same_seed_the_same_one(monkeypatch):
    """`--latent 0` is z = 0; a latent drawn per face changes the painted face, the same seed and
    face repaint it exactly (a rerun gives the same photo), another seed does not, and a video track
    keeps its latent whichever face index it has in a frame. By default a photo is painted with
    PHOTO_LATENT (1) and a video's tracks with VIDEO_LATENT (z = 0)."""
    monkeypatch.delenv(CHECKPOINT_ENV, raising=False)
    generator = load_generator_at(SHIPPED_MODEL)
    default = Anonymizer(AnonymizerConfig(), generator=generator)
    zero = _painted(Anonymizer(AnonymizerConfig(latent=0.0), generator=generator))
    drawn = Anonymizer(AnonymizerConfig(latent=1.0), generator=generator)
    box = tuple(int(v) for v in FACE_BOX)
    inside = (slice(box[1] + 10, box[3] - 10), slice(box[0] + 10, box[2] - 10))
    assert np.array_equal(_painted(default), _painted(drawn))  # a photo: a face drawn per photo
    assert default._latents([0, 1], video=True) is None  # a video: z = 0 along every track
    assert torch.equal(default._latents([0, 1]), drawn._latents([0, 1]))
    assert torch.equal(drawn._latents([0, 1], video=True), drawn._latents([0, 1]))  # an explicit --latent: both
    assert np.abs(_painted(drawn)[inside].astype(int) - zero[inside]).mean() > 3
    assert np.array_equal(_painted(drawn), _painted(Anonymizer(AnonymizerConfig(latent=1.0), generator=generator)))
    assert not np.array_equal(_painted(drawn), _painted(Anonymizer(AnonymizerConfig(latent=1.0, latent_seed=1),
                                                                   generator=generator)))
    z = drawn._latents([7, 0, 7])
    assert z.shape[0] == 3 and torch.equal(z[0], z[2]) and not torch.equal(z[0], z[1])
    with pytest.raises(ConfigError, match="--latent"):
        AnonymizerConfig(latent=-1.0)


def test_soften_out_of_range_is_a_config_error_naming_the_flag():
    for bad in (-0.1, 2.5):
        with pytest.raises(ConfigError, match="--soften"):
            AnonymizerConfig(soften=bad)
    assert AnonymizerConfig(soften=0.0).soften == 0.0  # 0: the photo untouched outside the boxes


def test_a_model_that_paints_at_two_resolutions_paints_each_face_at_the_one_its_size_needs(tiny_run, tmp_path):
    """An export that carries a finished lower-resolution generator (`lower`, as a 128x128 model grown
    from a finished 64x64 run carries that run's): a photo face whose crop the lower resolution covers
    within MAX_UPSCALE is painted by it, a larger one at the top resolution; a video paints every face
    at the lowest; `--paint_resolution` pins one; what the file carries is checked."""
    from eval.anonymizer import MAX_UPSCALE, painters_of
    from training.export import export_generator
    final = tiny_run / "checkpoints" / "final.ckpt"
    low = export_generator(tiny_run / "checkpoints" / "img0000000048.ckpt", tmp_path / "low.pt", {"name": "low"},
                           crop_rule="pad", resolution=16)  # the run finished 16x16 before it faded 32 in
    model = export_generator(final, tmp_path / "two.pt", {"name": "tiny two"}, crop_rule="pad", lower=[low])
    generator = load_generator_at(model)
    painters = painters_of(generator)
    assert list(painters) == [16, 32] and list(painters_of(load_generator_at(final))) == [32]
    assert all(torch.equal(a, b) for a, b in zip(painters[16].generator.state_dict().values(),
                                                 load_generator_at(low).generator.state_dict().values()))
    image = cv2.cvtColor(cv2.imread(str(PHOTOS / PORTRAIT)), cv2.COLOR_BGR2RGB)
    small_box, large_box = [40.0, 60.0, 52.0, 72.0], FACE_BOX  # crops of about 20 and 187 px

    def painted_sizes(cfg: AnonymizerConfig, video: bool = False) -> list[int]:
        a = Anonymizer(cfg, generator=generator)
        crops = [a._crop(np.asarray(b), (0, 0, 1, 1), image.shape)[1] for b in (small_box, large_box)]
        assert crops[0].side <= 16 * MAX_UPSCALE < crops[1].side
        sizes, generate = [], a._generate
        a._generate = lambda samples, keys=None, **kw: sizes.extend(s[0].shape[-1] for s in samples) or generate(
            samples, keys, **kw)
        out = a.anonymize([image], [Faces(np.array([small_box, large_box]), np.ones(2), [None, None])])[0]
        assert out.shape == image.shape and not np.array_equal(out[60:72, 40:52], image[60:72, 40:52])
        return sizes if not video else [a.resolution_for(c, video=True) for c in crops]

    assert painted_sizes(AnonymizerConfig(small_face_size=0)) == [16, 32]
    assert painted_sizes(AnonymizerConfig(small_face_size=0), video=True) == [16, 16]
    assert painted_sizes(AnonymizerConfig(small_face_size=0, paint_resolution=32)) == [32, 32]
    with pytest.raises(ConfigError, match="--paint_resolution 8: .* paints at 16, 32"):
        Anonymizer(AnonymizerConfig(paint_resolution=8), generator=generator)
    saved = torch.load(model, map_location="cpu", weights_only=True)
    torch.save({**saved, "lower": saved["lower"] * 2}, tmp_path / "twice.pt")
    with pytest.raises(InputError, match="lower\\[1\\] paints at 16x16; each must be below 32x32 and at a resolution"):
        load_generator_at(tmp_path / "twice.pt")
    torch.save({**saved, "lower": [{"progress": {}}]}, tmp_path / "bad.pt")
    with pytest.raises(InputError, match="lower\\[0\\] is not a generator export"):
        load_generator_at(tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="must have finished a resolution below 32x32"):
        export_generator(final, tmp_path / "no.pt", {"name": "no"}, crop_rule="pad", lower=[final])
    with pytest.raises(ValueError, match="crop rule 'pad', this model's by 'fdf'"):
        export_generator(final, tmp_path / "no.pt", {"name": "no"}, crop_rule="fdf", lower=[low])
