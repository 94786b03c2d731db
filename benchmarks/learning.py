"""Does the generator learn? Build, train and evaluate on real faces, then print one JSON object.

    python benchmarks/learning.py                      # everything, resumable (about 3 h on 2 cores)
    python benchmarks/learning.py --stages '[evaluate]' --workdir runs/utkface   # an existing run
    python benchmarks/learning.py --stages '[baselines]'  # while `train` runs: what needs no model

Stages (each resumable: a rerun skips what is done):
1. ingest: the UTKFace crops (`$FDF_ASSETS/faces/utkface`, non-commercial research license) → raw
   shards with `fdf-ingest`, as a user with a folder of photos would;
2. build: FDF shards with the project's RetinaFace + MoveNet builder, 13% of the photos held out;
   baselines: what the evaluation needs that does not depend on the model, at the config's resolution
   (baseline and sampling-floor FIDs, dlib embeddings of the training faces, identity of the LFW
   originals and of every baseline): cached in the workdir, so it can run beside `train`;
3. train: `--config` (default `training/configs/utkface_cpu64.yaml`, 8x8 → 64x64, bf16 on the CPU;
   `utkface_cpu32.yaml` is the earlier 32x32 run), Inception FID of held-out faces logged to MLflow
   during training; the run folder is `<workdir>/train<resolution>_w<base width>`;
4. export: the EMA generator with its model card (`training.export`); a run grown from a finished
   lower-resolution one (`fdf-train --grow_from`) carries that run's generator (`lower`: `anonymize`
   paints smaller faces and videos with it), whose FID evaluate reports beside;
5. evaluate: the FID curve from MLflow, and on the same 1,000 held-out faces at the model's
   resolution the FID of the generator (bf16 and fp32 at z = 0, bf16 with a drawn latent), of every
   baseline of `eval.baselines` and of 1,000 training faces (the sampling floor); identity removal of
   every method on all 900 LFW pairs (`fdf-identity`, with the photo default latent: TPR at FAR 1e-3,
   de-identification rate, whether dlib's detector still finds a face); whether painted faces match a
   training face more often than real held-out faces do (`eval.memorization`, with the photo default
   latent and at z = 0); training speed per resolution; wall time. Also writes the FID-curve PNG and
   a condition / generated / real grid (`--figures`).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from fdf_core.assets import assets_dir  # noqa: E402
from fdf_core.checkpoints import FINAL, checkpoints_dir, default_tracking_uri, read_mlflow_run_id  # noqa: E402
from fdf_core.tario import atomic_write_json  # noqa: E402

STAGES = ("ingest", "build", "baselines", "train", "export", "evaluate")
CONFIG = REPO / "training" / "configs" / "utkface_cpu64.yaml"
# The model card's data and license of every model trained on these shards (CPU or GPU runs)
CARD_DATA = ("UTKFace crop_part1 (Zhang, Song, Qi, CVPR 2017): 7,491 training faces built into FDF shards by "
             "fdf-ingest + fdf-build (RetinaFace MobileNet-0.25, MoveNet); 1,172 held out")
CARD_LICENSE = ("Research artefact: UTKFace is available for non-commercial research purposes only, and its "
                "images keep their owners' copyright; use this model under the same terms.")


class Run:
    """What one config's run is called and where it lives: the build is shared, the rest is per resolution."""

    def __init__(self, work: Path, config: Path):
        import yaml
        cfg = yaml.safe_load(config.read_text())
        self.work, self.config = work, config
        self.resolution = int(cfg["model"]["schedule"]["max_resolution"])
        self.width = int(cfg["model"]["network"]["base_width"])
        self.total_kimg = float(cfg["model"]["schedule"]["total_kimg"])
        self.precision = str(cfg.get("trainer", {}).get("precision", "32-true"))
        self.name = f"utkface{self.resolution}_w{self.width}"  # runs of one build differ in resolution and width
        self.run_dir = work / f"train{self.resolution}_w{self.width}"
        self.model = work / f"model{self.resolution}_w{self.width}.pt"

    @property
    def checkpoint(self) -> Path:
        """final.ckpt, or last.ckpt of a run stopped before its end (the model is what it had learnt)."""
        final = checkpoints_dir(self.run_dir) / FINAL
        return final if final.is_file() else checkpoints_dir(self.run_dir) / "last.ckpt"

    def card(self) -> dict:
        from fdf_core.checkpoints import read_progress
        progress = read_progress(self.checkpoint) or {}
        kimg = progress.get("images_shown", 0) / 1000
        client, run = mlflow_run(self.run_dir, self.checkpoint)
        wall_h = training_seconds(client, run) / 3600
        grown = self.grown_from()
        if grown:
            wall_h += grown["wall_seconds"] / 3600
        return {
            "name": f"fdf-{self.name} (DeepPrivacy U-Net, base width {self.width}, "
                    f"{self.resolution}x{self.resolution}, CPU-trained)",
            "data": CARD_DATA,
            "license": CARD_LICENSE,
            "precision": self.precision,
            "kimg": round(kimg, 1),
            "wall_time_hours": round(wall_h, 2),
            "notes": f"Trained {kimg:g} kimg (of the config's {self.total_kimg:g}) in {wall_h:.1f} h of wall time "
                     f"(the stops between sessions left out) on 2 CPU cores shared with other jobs, with "
                     f"{self.config.relative_to(REPO) if self.config.is_relative_to(REPO) else self.config} "
                     f"(benchmarks/learning.py). Paints {self.resolution}x{self.resolution} faces; the paper's "
                     "model paints 128x128 from 1.47M FDF faces." + (
                         f" Grown (training.grow) from the finished {grown['max_resolution']}x{grown['max_resolution']} run "
                         f"({grown['checkpoint']}) at {grown['images_shown'] / 1000:g} kimg ({grown['wall_time_hours']:.1f} h "
                         "of it in the wall time above)." if grown else ""),
            **({"grown_from": grown} if grown else {}),
        }

    def grown_from(self) -> dict | None:
        """Where a grown run started (training.grow) and what that lower run cost, from its own MLflow
        store beside its checkpoint (the committed carry of its config); None for a run from scratch."""
        from fdf_core.checkpoints import read_checkpoint, run_dir_of
        grown = read_checkpoint(self.checkpoint).get("grown_from")
        if not grown:
            return None
        source = Path(grown["checkpoint"])
        client, run = mlflow_run(run_dir_of(source), source)
        return {"checkpoint": str(source.relative_to(REPO)) if source.is_relative_to(REPO) else str(source),
                "max_resolution": grown["max_resolution"], "images_shown": grown["images_shown"],
                "wall_seconds": round(seconds := training_seconds(client, run), 1),
                "wall_time_hours": round(seconds / 3600, 2)}


def ingest(work: Path, faces: Path) -> dict:
    from data_prep.folder import IngestConfig, run
    return run(IngestConfig(image_dir=str(faces), output_dir=str(work / "raw"), shard_size=1000, progress=False,
                            license_name="UTKFace: non-commercial research only",
                            license_url="https://susanqq.github.io/UTKFace/",
                            author="UTKFace (Zhang, Song, Qi, CVPR 2017); images keep their owners' copyright"))


def build(work: Path) -> dict:
    from fdf_builder.build import BuildConfig, run
    return run(BuildConfig(input_dir=str(work / "raw"), output_dir=str(work / "fdf"), val_fraction=0.13,
                           crop_rule="pad", processes=2, progress=False))  # tight crops: keep FDF's context


CARRY = REPO / "training" / "carry"  # a CPU run's state committed between sessions: <config stem>/


def seed_from_carry(run: Run) -> Path | None:
    """Start `run` from the state a previous session committed (`training/carry/<config stem>/`:
    checkpoints/last.ckpt, mlflow.db, config.yaml) when its run folder has no checkpoint yet. A
    session's machine keeps nothing but the repository, so a CPU run longer than a session resumes
    exactly from there (the build is deterministic: the same shards, the same data position)."""
    import shutil
    carried = CARRY / run.config.stem
    if not (carried / "checkpoints" / "last.ckpt").is_file() or (checkpoints_dir(run.run_dir) / "last.ckpt").exists():
        return None
    checkpoints_dir(run.run_dir).mkdir(parents=True, exist_ok=True)
    for name in ("checkpoints/last.ckpt", "mlflow.db", "config.yaml"):
        if (carried / name).is_file():
            shutil.copy2(carried / name, run.run_dir / name)
    return carried


def train(run: Run) -> dict:
    from training.train import run as fdf_train
    carried = seed_from_carry(run)
    if carried:
        print(f"learning.py: resuming from the committed state in {carried.relative_to(REPO)}", file=sys.stderr)
    fdf_train(["--config", str(run.config), "--data.root", str(run.work / "fdf"), "--run_dir", str(run.run_dir),
               "--trainer.enable_progress_bar", "false"])
    return {"run_dir": str(run.run_dir)}


def export(run: Run) -> dict:
    from training.export import export_generator, measure_context
    margins = measure_context(run.work / "fdf")  # tight crops: the anonymizer shows the model this band only
    grown = run.grown_from()  # a grown run carries the generator of the run it grew from (evaluate measures it)
    lower = [str(REPO / grown["checkpoint"])] if grown else None
    out = export_generator(run.checkpoint, run.model, run.card(), context_margins=margins,  # the crop rule it records
                           lower=lower)
    return {"model": str(out), "bytes": out.stat().st_size, "context_margins": margins, "lower": lower}


def mlflow_run(run_dir: Path, checkpoint: Path | None = None):
    from mlflow.tracking import MlflowClient
    client = MlflowClient(tracking_uri=default_tracking_uri(run_dir))
    return client, client.get_run(read_mlflow_run_id(checkpoint or checkpoints_dir(run_dir) / FINAL))


def fid_curve(client, run) -> list[dict]:
    """Training's FID points: step, kimg, resolution, phase index, FID, seconds it took."""
    rid = run.info.run_id
    series = {k: {m.step: m.value for m in client.get_metric_history(rid, k)}
              for k in ("fid", "fid/kimg", "fid/resolution", "fid/phase", "fid/seconds")}
    return [{"step": step, "kimg": round(series["fid/kimg"][step], 3), "resolution": int(series["fid/resolution"][step]),
             "phase": int(series["fid/phase"][step]), "fid": round(value, 2),
             "seconds": round(series["fid/seconds"][step], 1)} for step, value in sorted(series["fid"].items())]


STOP_SECONDS = 600  # a gap this long between two logged steps is a stop (between sessions), not training


def training_seconds(client, run) -> float:
    """The run's training wall time: the time between consecutive logged steps, stops of more than
    STOP_SECONDS left out. A run carried over several sessions spans days; its start-to-end time is
    no measure of what it cost (FID evaluations during training are counted: they are part of it)."""
    times = sorted(m.timestamp for m in client.get_metric_history(run.info.run_id, "progress/kimg"))
    return sum(g for g in (b - a for a, b in zip(times, times[1:])) if g < STOP_SECONDS * 1000) / 1000


def training_speed(client, run) -> dict:
    """Median img/s per resolution and the run's wall time."""
    rid = run.info.run_id
    res = {m.step: int(m.value) for m in client.get_metric_history(rid, "progress/resolution")}
    speeds: dict[int, list[float]] = {}
    for m in client.get_metric_history(rid, "speed/img_per_s"):
        if m.step in res:
            speeds.setdefault(res[m.step], []).append(m.value)
    return {"img_per_s": {str(r): round(statistics.median(v), 1) for r, v in sorted(speeds.items())},
            "train_wall_seconds": round(training_seconds(client, run), 1)}


def _data(work: Path):
    from training.datamodule import FDFDataModule
    data = FDFDataModule(str(work / "fdf"))
    data.setup("validate")
    return data


def baseline_rows(r: Run, num_images: int, compute: bool = True) -> dict:
    """FID rows that do not depend on the model, at the run's resolution, kept in
    `<workdir>/fid_rows_<resolution>.json` (each costs minutes of Inception): the sampling floor (as
    many training faces against the held-out ones), then every baseline of `eval.baselines`.
    `compute=False` only reads the rows already there."""
    from eval.baselines import BASELINES
    from eval.evaluate import baseline_fid
    from fdf_core.fid import compute_fid
    from training.conditioning import prepare
    rows_file = r.work / f"fid_rows_{r.resolution}.json"
    rows = json.loads(rows_file.read_text()) if rows_file.is_file() else {}
    rows = rows if rows.get("num_images") == num_images else {"num_images": num_images}
    if not compute:
        return rows
    data, cache, res = _data(r.work), r.work / "fid_cache", r.resolution
    if "real_train_faces" not in rows:
        fakes = (prepare(b["images"], b["bbox"], b["keypoints"], res).real for b in data.iter_split("train", 50, num_images))
        reals = ({"img": prepare(b["images"], b["bbox"], b["keypoints"], res).real, "fake": f}
                 for b, f in zip(data.iter_val(50, num_images), fakes))
        rows["real_train_faces"] = round(compute_fid(lambda b: b["fake"], reals, "inception", cache, data.val_shards,
                                                     num_images=num_images), 2)
        atomic_write_json(rows_file, rows)
    for method in BASELINES:
        if method not in rows:
            rows[method] = round(baseline_fid(method, data, res, num_images, cache_dir=cache), 2)
            atomic_write_json(rows_file, rows)
    return rows


def fid_table(r: Run, num_images: int, baselines: bool = True) -> dict:
    """FID at the generator's resolution on the same held-out faces: the generator in bf16 (what
    `anonymize` runs on a CPU with bf16 units) and in fp32 (z = 0), in bf16 with z ~ N(0, 1)
    (`--latent 1`), every baseline, real training faces."""
    from eval.anonymizer import load_generator_at, painters_of
    from training.fid import generator_fid
    data, cache = _data(r.work), r.work / "fid_cache"
    g = load_generator_at(r.model)
    table = {}
    for precision in ("bf16", "fp32"):
        g.precision = precision
        table[f"generator_{precision}"] = round(generator_fid(g, data, num_images, cache_dir=cache), 2)
    g.precision = "bf16"  # a drawn latent per face (`anonymize --latent 1`) instead of z = 0
    table["generator_bf16_latent1"] = round(generator_fid(g, data, num_images, cache_dir=cache, latent=1.0), 2)
    for low in painters_of(g):  # the lower generators the export carries (`lower`), as anonymize paints with them
        if low != g.resolution:
            table[f"generator_bf16_at{low}"] = round(generator_fid(painters_of(g)[low], data, num_images,
                                                                   cache_dir=cache), 2)
    rows = baseline_rows(r, num_images, compute=baselines)
    table.update({k: v for k, v in rows.items() if k != "num_images"})
    return {"resolution": g.resolution, "num_images": num_images, "fid": table}


def identity(r: Run, args, methods: list[str]) -> dict:
    """`fdf-identity` on the LFW pairs (originals and baselines are cached beside the output)."""
    from eval.identity import IdentityConfig, run as fdf_identity
    ident = fdf_identity(IdentityConfig(pairs_dir=str(args.lfw), methods=methods, checkpoint=str(r.model),
                                        num_pairs=args.num_pairs or None,
                                        output=str(r.work / f"identity_{r.resolution}.json"), progress=False))
    return {k: ident[k] for k in ("pairs", "pairs_skipped_no_face", "threshold_at_far", "original", "methods")}


def baselines(r: Run, args) -> dict:
    """What the evaluation needs that does not depend on the model: run it while the model trains
    (or beside `evaluate --baselines false`)."""
    from eval.baselines import BASELINES
    from eval.identity import DlibFaces
    from eval.memorization import training_embeddings
    out = {}
    if args.memorization:
        out["training_faces_embedded"] = len(training_embeddings(DlibFaces(), _data(r.work), r.work / "fid_cache"))
    out["fid_rows"] = baseline_rows(r, args.num_images)
    if args.num_pairs != 0:
        out["identity"] = identity(r, args, list(BASELINES))
    return out


def grid(work: Path, model: Path, output: Path, count: int = 10, size: int = 96) -> Path:
    """Rows: condition, generated (z = 0), real, for the first `count` held-out faces."""
    import torch.nn.functional as F
    from torchvision.utils import save_image
    from eval.anonymizer import load_generator_at
    from training.conditioning import prepare
    g = load_generator_at(model)
    b = next(_data(work).iter_val(count, count))
    p = prepare(b["images"], b["bbox"], b["keypoints"], g.resolution)
    with torch.inference_mode():
        rows = torch.cat([p.condition, g(p.condition, p.mask, p.keypoints), p.real])
    rows = F.interpolate(rows, size=(size, size), mode="bilinear", align_corners=False, antialias=False)
    output.parent.mkdir(parents=True, exist_ok=True)
    save_image(rows.add(1).div(2).clamp(0, 1), output, nrow=count, padding=2, pad_value=1.0)
    return output


BEFORE_AFTER = ("face_recognition__examples_knn_examples_test_obama_and_biden.jpg", (690, 220, 1420, 700),
                "ageitgey/face_recognition, examples/knn_examples/test/obama_and_biden.jpg (MIT repository; the "
                "photo keeps its own copyright)")


def before_after(model: Path, output: Path, width: int = 1400) -> Path:
    """A corpus photo with two faces of about 170 px, before and after `anonymize` with `model` (the
    defaults: bf16 where the CPU has it, Poisson paste), the faces' region side by side."""
    import cv2
    import numpy as np
    from eval.anonymizer import Anonymizer, AnonymizerConfig
    name, (x0, y0, x1, y1), _ = BEFORE_AFTER
    photo = cv2.cvtColor(cv2.imread(str(assets_dir() / "corpus" / "photos" / name)), cv2.COLOR_BGR2RGB)
    after = Anonymizer(AnonymizerConfig(checkpoint=str(model)))(photo)
    pair = np.concatenate([photo[y0:y1, x0:x1], np.full((y1 - y0, 12, 3), 255, np.uint8), after[y0:y1, x0:x1]], 1)
    pair = cv2.resize(pair, (width, round(pair.shape[0] * width / pair.shape[1])), interpolation=cv2.INTER_AREA)
    output.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(output), cv2.cvtColor(pair, cv2.COLOR_RGB2BGR))
    return output


def evaluate(r: Run, args) -> dict:
    from eval.anonymizer import METHODS, PHOTO_LATENT, load_generator_at
    from eval.memorization import memorization
    work, run_dir, model = r.work, r.run_dir, r.model
    client, run = mlflow_run(run_dir, r.checkpoint)
    out = {"fid_curve": fid_curve(client, run), **training_speed(client, run)}
    out["fid_table"] = fid_table(r, args.num_images, args.baselines)
    if args.num_pairs != 0:
        out["identity"] = identity(r, args, list(METHODS) if args.baselines else ["generator"])
    if args.figures:
        from eval.plots import PlotConfig, run as plot
        figures = Path(args.figures)
        curve, samples = figures / f"{r.name}_fid_curve.png", figures / f"{r.name}_grid.png"
        plot(PlotConfig(run_dir=str(run_dir), output=str(curve)))
        out["figures"] = [str(curve), str(grid(work, model, samples)),
                          str(before_after(model, figures / f"{r.name}_before_after.png"))]
    if args.memorization:  # as photos are painted (PHOTO_LATENT), and at z = 0 (the video default)
        g = load_generator_at(model)
        g.precision = "auto"
        for key, latent in (("memorization", PHOTO_LATENT), ("memorization_z0", 0.0)):
            out[key] = memorization(g, _data(work), args.num_images, cache_dir=work / "fid_cache", latent=latent)
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", default=str(REPO / "runs" / "utkface"))
    p.add_argument("--stages", default=str(list(STAGES)), help="subset of " + ", ".join(STAGES))
    p.add_argument("--config", default=str(CONFIG), help="the training config (its max_resolution names the run)")
    p.add_argument("--faces", default=str(assets_dir() / "faces" / "utkface"))
    p.add_argument("--lfw", default=str(assets_dir() / "faces" / "lfw_pairs"))
    p.add_argument("--num_images", type=int, default=1000, help="held-out faces for the FID table")
    p.add_argument("--num_pairs", type=int, default=900, help="LFW pairs for identity (900: all; 0 = skip)")
    p.add_argument("--baselines", type=lambda v: v.lower() in ("1", "true", "yes"), default=True,
                   help="evaluate: also compute the baselines' FID and identity (false: use the rows the "
                        "baselines stage has cached, e.g. while it runs beside)")
    p.add_argument("--memorization", type=lambda v: v.lower() in ("1", "true", "yes"), default=True,
                   help="embed the training faces (baselines) and measure whether painted faces are training "
                        "people (evaluate); dlib on every training face, the slowest part on a CPU")
    p.add_argument("--figures", default=None, help="folder for the FID-curve PNG and the sample grid")
    args = p.parse_args(argv)
    stages = [s.strip(" '\"") for s in args.stages.strip("[]").split(",") if s.strip()]
    unknown = set(stages) - set(STAGES)
    if unknown:
        p.error(f"--stages: unknown {sorted(unknown)}; choose from {', '.join(STAGES)}")
    work = Path(args.workdir)
    run = Run(work, Path(args.config))
    start = time.perf_counter()
    results = work / f"learning_{run.name}.json"  # every stage's latest result: running one stage keeps the others'
    summary: dict = {**(json.loads(results.read_text()) if results.is_file() else {}), "workdir": str(work)}
    steps = {"ingest": lambda: ingest(work, Path(args.faces)), "build": lambda: build(work),
             "baselines": lambda: baselines(run, args), "train": lambda: train(run), "export": lambda: export(run), "evaluate": lambda: evaluate(run, args)}
    for name in STAGES:
        if name in stages:
            t0 = time.perf_counter()
            result = steps[name]()
            seconds = round(time.perf_counter() - t0, 1)
            summary[name] = {**result, "seconds": seconds} if name in ("baselines", "evaluate") else {"seconds": seconds}
    summary["wall_seconds"] = round(time.perf_counter() - start, 1)
    atomic_write_json(results, json.loads(json.dumps(summary, default=str)))
    print(json.dumps(summary, default=str))
    return summary


if __name__ == "__main__":
    main()
