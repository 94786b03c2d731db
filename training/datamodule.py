"""FDF webdataset shards (FORMAT.md §2) as a resumable, rank- and worker-split stream of batches.

The order of the data is a pure function of (seed, step): epoch e visits the shards in a
permutation drawn from (seed, e); "slot" (rank, worker) reads every `slots`-th shard of it (or,
with fewer shards than slots, every `slots`-th sample) through a shuffle buffer seeded by
(seed, e, slot). Every DataLoader worker serves a fixed residue class of steps, and every rank
draws the per-rank batch of the schedule for each step, so all ranks always see equal batches and
the stream never runs dry. Resuming at step k skips exactly the samples each slot consumed before
k (whole epochs from `sizes.json`, the rest without decoding), so the run continues on the same
samples as an uninterrupted one. That needs the same world size and number of workers; other
values still train but on a different order (a warning says so). `--data.format ffcv` reads the
split's `.beton` with FFCV instead (training.ffcv_stream, same batches per step, its own order).
"""
from __future__ import annotations

import itertools
import json
import logging
import random
from pathlib import Path
from typing import Any, Iterator, Literal

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from fdf_core.tario import iter_samples
from fdf_core.errors import InputError, MissingInputError, NothingToDoError
from training.samples import decode_sample  # noqa: F401 (FORMAT.md §2, also for importers of this module)
from training.schedule import Schedule

log = logging.getLogger(__name__)

RawSample = tuple[str, str, dict[str, bytes]]  # (shard, key, members)


def list_shards(root: str | Path, split: str) -> tuple[list[str], list[int]]:
    """Sorted `<root>/<split>/*.tar` and their sample counts (from `<root>/sizes.json`, else counted)."""
    root = Path(root)
    shards = sorted((root / split).glob("*.tar"))
    sizes_file = root / "sizes.json"
    known = json.loads(sizes_file.read_text()) if sizes_file.is_file() else {}
    sizes = []
    for shard in shards:
        rel = f"{split}/{shard.name}"
        if rel not in known:
            log.warning("%s: %s not listed, counting its samples", sizes_file, rel)
            known[rel] = sum(1 for _ in iter_samples(shard))
        sizes.append(int(known[rel]))
    return [str(s) for s in shards], sizes


def collate(decoded: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], where: str) -> dict[str, torch.Tensor]:
    sizes = {img.shape[-1] for img, _, _ in decoded}
    if len(sizes) != 1:
        raise ValueError(f"{where}: crops of different sizes {sorted(sizes)} in one batch")
    return {"images": torch.stack([d[0] for d in decoded]),
            "bbox": torch.stack([d[1] for d in decoded]),
            "keypoints": torch.stack([d[2] for d in decoded])}


class ShardStream(IterableDataset):
    """The batches of steps `start_step` … end of `schedule` for one rank; see the module docstring."""

    def __init__(self, shards: list[str], sizes: list[int], schedule: Schedule, start_step: int,
                 rank: int, world_size: int, seed: int, shuffle_buffer: int, keypoint_threshold: float):
        super().__init__()
        if not shards or sum(sizes) == 0:
            raise NothingToDoError(f"no training samples in {len(shards)} shard(s): {shards[:3]}")
        self.shards, self.sizes, self.schedule = shards, sizes, schedule
        self.start_step, self.rank, self.world_size = start_step, rank, world_size
        self.seed, self.shuffle_buffer, self.keypoint_threshold = seed, shuffle_buffer, keypoint_threshold

    def _epoch_plan(self, epoch: int, slot: int, slots: int) -> tuple[list[int], bool, int]:
        """(shard indices to read, whether to stride samples, samples this slot gets this epoch)."""
        order = list(range(len(self.shards)))
        random.Random(f"shards-{self.seed}-{epoch}").shuffle(order)
        if len(order) >= slots:
            mine = order[slot::slots]
            return mine, False, sum(self.sizes[i] for i in mine)
        total = sum(self.sizes)
        return order, True, (total - slot + slots - 1) // slots

    def _raw_epoch(self, shard_ids: list[int], stride: bool, slot: int, slots: int) -> Iterator[RawSample]:
        i = 0
        for sid in shard_ids:
            for key, members in iter_samples(self.shards[sid]):
                if not stride or i % slots == slot:
                    yield self.shards[sid], key, members
                i += 1

    def samples(self, slot: int, slots: int, skip: int) -> Iterator[RawSample]:
        """This slot's endless, shuffled sample stream, starting after `skip` samples."""
        epoch = 0
        while True:
            shard_ids, stride, count = self._epoch_plan(epoch, slot, slots)
            if stride and count == 0:
                raise ValueError(f"{sum(self.sizes)} training samples cannot feed {slots} data readers "
                                 "(ranks x loader workers): use fewer workers")
            if skip >= count:  # the whole epoch was consumed before the resume point (or is empty)
                skip -= count
                epoch += 1
                continue
            rng = random.Random(f"buffer-{self.seed}-{epoch}-{slot}")
            buffer: list[RawSample] = []
            seen = 0
            for sample in self._raw_epoch(shard_ids, stride, slot, slots):
                seen += 1
                if len(buffer) < self.shuffle_buffer:
                    buffer.append(sample)
                    continue
                j = rng.randrange(len(buffer))
                buffer[j], sample = sample, buffer[j]
                if skip:
                    skip -= 1
                else:
                    yield sample
            rng.shuffle(buffer)
            for sample in buffer:
                if skip:
                    skip -= 1
                else:
                    yield sample
            if seen != count:
                raise ValueError(f"sizes.json lists {count} samples for data slot {slot} in epoch {epoch}, "
                                 f"the shards hold {seen}: rebuild sizes.json")
            epoch += 1

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info else (1, 0)
        residue = (self.start_step + worker) % workers  # this worker serves steps ≡ residue (mod workers)
        slot, slots = self.rank * workers + residue, self.world_size * workers
        skip = self.schedule.images_in_steps(self.start_step, residue, workers) // self.world_size
        stream = self.samples(slot, slots, skip)
        for step in range(self.start_step + worker, self.schedule.total_steps, workers):
            n = self.schedule.at_step(step).batch_size // self.world_size
            raw = [next(stream) for _ in range(n)]
            batch = collate([decode_sample(s, k, m, self.keypoint_threshold) for s, k, m in raw],
                            f"{raw[0][0]} (step {step})")
            batch["step"] = step
            batch["keys"] = [k for _, k, _ in raw]
            yield batch


class FDFDataModule(pl.LightningDataModule):
    """FDF shards under `root` (`train/*.tar`, `val/*.tar`, `sizes.json`) as built by fdf-build.

    The schedule (batch size per step) and the step to start from come from the LightningModule,
    so a restored checkpoint puts the stream where the interrupted run left it.
    """

    def __init__(self, root: str = "runs/demo/fdf", format: Literal["tar", "ffcv"] = "tar", num_workers: int = 2,
                 shuffle_buffer: int = 1000, seed: int = 0, keypoint_threshold: float = 0.0,
                 num_fixed_samples: int = 16, pin_memory: bool | None = None):
        """
        Args:
            root: the fdf-build output folder.
            format: what training reads: "tar", the webdataset shards through a DataLoader of
                `num_workers` processes (this module's ShardStream); "ffcv", `<root>/train.beton`
                (fdf-build --ffcv true) through FFCV's Loader with `num_workers` threads
                (training.ffcv_stream). Validation samples, sample grids and FID read the tars.
            num_workers: loader processes (tar) or threads (ffcv).
            shuffle_buffer: samples in each tar reader's shuffle buffer (the ffcv order is a
                permutation of the whole split per epoch).
            seed: the data order (linked to seed_everything).
            keypoint_threshold: keypoints scored below it are passed as missing (-1, -1).
            num_fixed_samples: validation samples of every sample grid.
            pin_memory: pinned host memory for the tar DataLoader (default: when CUDA is there).
        """
        super().__init__()
        self.root, self.format, self.num_workers, self.shuffle_buffer = root, format, num_workers, shuffle_buffer
        self.seed, self.keypoint_threshold, self.num_fixed_samples = seed, keypoint_threshold, num_fixed_samples
        self.pin_memory = pin_memory
        self._restored: dict[str, int | str] | None = None
        self._crop_record: dict[str, Any] | None = None

    def setup(self, stage: str) -> None:
        self.train_shards, self.train_sizes = list_shards(self.root, "train")
        self.val_shards, self.val_sizes = list_shards(self.root, "val")
        if self.format == "ffcv":
            self.beton = self._open_beton()
        elif not self.train_shards:
            raise MissingInputError(f"no training shards at {Path(self.root) / 'train'}/*.tar "
                                    "(build them with fdf-build, or set --data.root)")

    def crop_record(self) -> dict[str, Any]:
        """How this build cut its faces, as every checkpoint of a run on it records it (the keys an
        export records, FORMAT.md §3): the build's `crop_rule` (its options.json; "fdf" where it
        has none) and, for any other rule, `context_margins` (the band of photo around the box,
        `training.export.measure_context`). Computed once. Why: a training checkpoint handed to the
        anonymizer (`--checkpoint RUN/checkpoints/final.ckpt`) was cut the FDF way although its
        faces were "pad" crops, and painted smears (pan clip flicker 5.3, 21 leaks)."""
        if self._crop_record is None:
            options = Path(self.root) / "options.json"
            try:
                rule = json.loads(options.read_text()).get("crop_rule", "fdf") if options.is_file() else "fdf"
            except (json.JSONDecodeError, AttributeError) as e:
                raise InputError(f"{options}: not a build's options ({e})") from None
            record: dict[str, Any] = {"crop_rule": rule}
            if rule != "fdf":
                from training.export import measure_context
                record["context_margins"] = measure_context(self.root)
            self._crop_record = record
        return dict(self._crop_record)

    def _open_beton(self):
        """`<root>/train.beton`, checked, and refused when it holds other samples than the shards."""
        from training.ffcv_stream import open_beton
        beton = open_beton(Path(self.root) / "train.beton")
        if self.train_shards and sum(self.train_sizes) != beton.num_samples:
            raise InputError(f"{beton.path} holds {beton.num_samples} samples, the train shards "
                             f"{sum(self.train_sizes)}: it is stale; rebuild it with fdf-build --ffcv true")
        return beton

    def _position(self) -> dict[str, int | str]:
        trainer = self.trainer
        return {"seed": self.seed, "world_size": trainer.world_size, "num_workers": self.num_workers,
                "format": self.format, "step": trainer.lightning_module.step}

    def state_dict(self) -> dict[str, int | str]:
        return self._position()

    def load_state_dict(self, state_dict: dict[str, int | str]) -> None:
        self._restored = dict(state_dict)

    def train_dataloader(self) -> DataLoader | Any:
        module, trainer = self.trainer.lightning_module, self.trainer
        if self._restored is not None:
            now = self._position()
            # the ffcv order does not depend on the number of loader threads
            keys = ("seed", "world_size", "format") + (("num_workers",) if self.format == "tar" else ())
            changed = {k: (self._restored.get(k, "tar" if k == "format" else None), now[k]) for k in keys
                       if self._restored.get(k, "tar" if k == "format" else None) != now[k]}
            if changed:
                log.warning("resuming with changed %s: the data order differs from the interrupted run",
                            ", ".join(f"{k} {a} -> {b}" for k, (a, b) in changed.items()))
        if self.format == "ffcv":
            from training.ffcv_stream import FFCVStream
            return FFCVStream(self.beton, module.schedule, module.step, trainer.global_rank, trainer.world_size,
                              self.seed, self.num_workers, self.keypoint_threshold)
        stream = ShardStream(self.train_shards, self.train_sizes, module.schedule, module.step,
                             trainer.global_rank, trainer.world_size, self.seed, self.shuffle_buffer,
                             self.keypoint_threshold)
        pin = torch.cuda.is_available() if self.pin_memory is None else self.pin_memory
        return DataLoader(stream, batch_size=None, num_workers=self.num_workers, pin_memory=pin,
                          prefetch_factor=4 if self.num_workers else None)

    def iter_val(self, batch_size: int, limit: int | None = None) -> Iterator[dict[str, torch.Tensor]]:
        """The validation split in file order (falls back to train when there is none), batched.

        For evaluation hooks (FID, sample grids): same samples, same order, every time.
        """
        return self.iter_split("val" if sum(self.val_sizes) else "train", batch_size, limit)

    def iter_split(self, split: str, batch_size: int, limit: int | None = None) -> Iterator[dict[str, torch.Tensor]]:
        """The first `limit` samples of a split in file order, batched (no shuffling, no augmentation)."""
        shards = {"val": self.val_shards, "train": self.train_shards}[split]
        samples = ((shard, key, members) for shard in shards for key, members in iter_samples(shard))
        samples = itertools.islice(samples, limit)
        while chunk := list(itertools.islice(samples, batch_size)):
            yield collate([decode_sample(*s, self.keypoint_threshold) for s in chunk], chunk[0][0])

    def fixed_batch(self) -> dict[str, torch.Tensor]:
        """The first `num_fixed_samples` validation samples: the conditions of every sample grid."""
        return next(self.iter_val(self.num_fixed_samples, limit=self.num_fixed_samples))
