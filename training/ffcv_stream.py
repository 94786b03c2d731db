"""FDF's `<split>.beton` (fdf-build --ffcv true, FORMAT.md §2) as the training stream, read by FFCV.

The order is a pure function of (seed, step), like the tar stream's, but over the whole split:
epoch e is the permutation of all N samples drawn from (seed, e), the epochs laid end to end make
one endless sequence of positions, and step k takes the positions from `images_before(k)` on, its
global batch of them. Rank r of W takes the r-th of W equal slices of every step's batch. So a run
resumed at step k hands FFCV the positions not yet served and goes on with the very samples an
uninterrupted run reads next, whatever the number of loader threads (only the world size and the
seed enter the order). FFCV's Loader has one batch size and an index array held in memory, so one
Loader serves a run of steps with one batch size, at most `chunk_images` images long (the last
phase of the paper schedule is 30M images); under DDP it runs in FFCV's distributed mode, which
strides its indices over the ranks (DistributedSampler, shuffle off), and the indices are laid out
so that each rank's stride is its slices in step order.

Failure modes of ffcv 1.0.2 that this module closes (measured here): a corrupt JPEG decodes
silently to garbage (its decoder drops turbojpeg's error code), an exception in the loader's thread
leaves the consumer waiting forever, and a damaged header fails with an IndexError or ValueError
from numpy. `open_beton` checks the header and the image pointers, the decoder here checks every
JPEG, and `Loader` hands an error of its thread to the consumer: a bad file is an `InputError`
naming it, never a hang.
"""
from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from fdf_core.errors import InputError, MissingInputError
from training.schedule import Schedule

log = logging.getLogger(__name__)

CHUNK_IMAGES = 1 << 20  # images per Loader: a ~2 s start (code generation) per million images
REBUILD = "rebuild it with fdf-build --ffcv true"


class BetonInfo:
    """What training needs to know of a `.beton` before reading it: path, samples, crop size."""

    def __init__(self, path: Path, num_samples: int, resolution: int, num_keypoints: int):
        self.path, self.num_samples, self.resolution, self.num_keypoints = path, num_samples, resolution, num_keypoints


def _require_ffcv() -> None:
    try:
        import ffcv  # noqa: F401
    except ImportError as e:
        raise ImportError(f"--data.format ffcv needs the ffcv package (pip install 'fdf[ffcv]'; install.sh "
                          f"installs it): {e}") from e


def open_beton(path: str | Path) -> BetonInfo:
    """Check a `.beton` written by fdf-build: readable header, the fields of FORMAT.md §2, square
    crops of one size, every image pointer inside the file. Raises InputError naming the file."""
    _require_ffcv()
    from ffcv.fields import NDArrayField, RGBImageField
    from ffcv.reader import Reader
    path = Path(path)
    if not path.is_file():
        raise MissingInputError(f"no FFCV file at {path} ({REBUILD}, or train with --data.format tar)")
    try:
        reader = Reader(str(path))
    except Exception as e:  # numpy's IndexError/ValueError, ffcv's AssertionError on a damaged header
        raise InputError(f"{path}: not a readable FFCV file ({type(e).__name__}: {e}); {REBUILD}") from None
    fields = reader.handlers
    shapes = {n: getattr(fields.get(n), "shape", None) for n in ("bbox", "keypoints")}
    if (not isinstance(fields.get("image"), RGBImageField) or not isinstance(fields.get("bbox"), NDArrayField)
            or not isinstance(fields.get("keypoints"), NDArrayField) or shapes["bbox"] != (4,)
            or len(shapes["keypoints"] or ()) != 2 or shapes["keypoints"][1] != 3):
        raise InputError(f"{path}: fields {sorted(fields)} with shapes {shapes} are not FDF's (image, bbox (4,), "
                         f"keypoints (K, 3), meta); {REBUILD}")
    image = reader.metadata[f"f{list(fields).index('image')}"]
    sizes = np.unique(np.concatenate([image["height"], image["width"]]))
    if reader.num_samples == 0 or len(sizes) != 1:
        raise InputError(f"{path}: {reader.num_samples} samples with crop sides {sizes.tolist()[:5]}; FDF crops "
                         f"are square and of one size; {REBUILD}")
    end = path.stat().st_size
    table = reader.alloc_table
    known = np.isin(image["data_ptr"], table["ptr"])
    inside = (table["ptr"] + table["size"] <= end).all()
    if not known.all() or not inside:
        first = int(np.flatnonzero(~known)[0]) if not known.all() else -1
        raise InputError(f"{path}: damaged allocation table or image pointers (first bad sample {first}, file "
                         f"{end} bytes); {REBUILD}")
    return BetonInfo(path, int(reader.num_samples), int(sizes[0]), int(shapes["keypoints"][0]))


@functools.lru_cache(maxsize=4)
def epoch_permutation(seed: int, epoch: int, n: int) -> np.ndarray:
    """Epoch `epoch`'s order of the `n` samples: a permutation drawn from (seed, epoch) alone."""
    return np.random.default_rng([seed, epoch, n]).permutation(n)


def sample_indices(positions: np.ndarray, seed: int, n: int) -> np.ndarray:
    """The samples at `positions` of the endless sequence of epochs (see the module docstring)."""
    epochs, offsets = np.divmod(positions, n)
    out = np.empty_like(positions)
    for e in np.unique(epochs):
        sel = epochs == e
        out[sel] = epoch_permutation(seed, int(e), n)[offsets[sel]]
    return out


def chunks(schedule: Schedule, start_step: int, world_size: int,
           chunk_images: int = CHUNK_IMAGES) -> Iterator[tuple[int, int, int]]:
    """(first step, number of steps, per-rank batch) of the Loaders from `start_step` to the end:
    runs of steps with one batch size, cut to at most `chunk_images` global images each."""
    step, total = start_step, schedule.total_steps
    while step < total:
        batch = schedule.at_step(step).batch_size
        end = step + max(1, chunk_images // batch)
        last = step
        while last + 1 < min(end, total) and schedule.at_step(last + 1).batch_size == batch:
            last += 1
        yield step, last + 1 - step, batch // world_size
        step = last + 1


def chunk_positions(schedule: Schedule, first_step: int, steps: int, world_size: int) -> np.ndarray:
    """Positions of a chunk, ordered so that FFCV's distributed stride (element j * W + r goes to rank
    r) gives every rank its slices of each step's batch in step order. Shape (steps * batch,)."""
    global_batch = schedule.at_step(first_step).batch_size
    start = schedule.images_before(first_step)
    per_rank = global_batch // world_size
    pos = start + np.arange(steps * global_batch, dtype=np.int64).reshape(steps, world_size, per_rank)
    return pos.transpose(0, 2, 1).reshape(-1)


def rank_slice(order: np.ndarray, rank: int, world_size: int) -> np.ndarray:
    """What FFCV's distributed mode gives `rank` of an index array (DistributedSampler, no shuffle)."""
    return order[rank::world_size]


@functools.lru_cache(maxsize=None)
def _ffcv_classes():
    """The checked JPEG decoder and the Loader whose thread errors reach the consumer (built on
    first use: importing ffcv costs seconds and the tar path never needs it)."""
    from ffcv.fields.decoders import SimpleRGBImageDecoder
    from ffcv.libffcv import imdecode, memcpy
    from ffcv.loader import Loader
    from ffcv.loader.epoch_iterator import EpochIterator
    from ffcv.pipeline.compiler import Compiler

    class CheckedJpegDecoder(SimpleRGBImageDecoder):
        """SimpleRGBImageDecoder that raises when turbojpeg reports an error (ffcv's drops it and
        hands on whatever the buffer holds)."""

        def generate_code(self):
            mem_read, imdecode_c, copy = self.memory_read, Compiler.compile(imdecode), Compiler.compile(memcpy)
            my_range = Compiler.get_iterator()

            def decode(batch_indices, destination, metadata, storage_state):
                bad = 0
                for dst_ix in my_range(len(batch_indices)):
                    field = metadata[batch_indices[dst_ix]]
                    data = mem_read(field["data_ptr"], storage_state)
                    h, w = field["height"], field["width"]
                    if field["mode"] == 0:  # jpg
                        bad += imdecode_c(data, destination[dst_ix], h, w, h, w, 0, 0, 1, 1, False, False) != 0
                    else:
                        copy(data, destination[dst_ix])
                if bad:
                    raise ValueError("a JPEG of this batch does not decode")
                return destination[:len(batch_indices)]

            decode.is_parallel = True
            return decode

    class GuardedEpochIterator(EpochIterator):
        """Hands an exception of the loading thread to `__next__` instead of leaving it waiting."""

        failure: BaseException | None = None
        failed_indices: Any = None

        def run_pipeline(self, b_ix, batch_indices, batch_slot, cuda_event):
            try:
                return super().run_pipeline(b_ix, batch_indices, batch_slot, cuda_event)
            except BaseException:
                self.failed_indices = np.array(batch_indices)
                raise

        def run(self):
            try:
                super().run()
            except BaseException as e:  # noqa: BLE001 - every error must reach the consumer
                self.failure = e
                while not self.terminate_event.is_set():
                    try:
                        self.output_queue.put(None, timeout=0.5)
                        return
                    except Exception:  # queue.Full
                        continue

        def __next__(self):
            result = self.output_queue.get()
            if result is None:
                self.close()
                if self.failure is not None:
                    raise LoaderThreadError(self.failure, self.failed_indices)
                raise StopIteration()
            slot, batch = result
            if self.cuda_streams[slot] is not None:  # as EpochIterator.__next__: wait for the copy
                self.current_stream.wait_stream(self.cuda_streams[slot])
            return batch

    class GuardedLoader(Loader):
        def __iter__(self):  # Loader.__iter__ with the guarded iterator
            Compiler.set_num_threads(self.num_workers)
            order = self.next_traversal_order()
            selected = order[:len(self) * self.batch_size]
            self.next_epoch += 1
            if self.code is None or self.recompile:
                self.generate_code()
            return GuardedEpochIterator(self, selected)

    return CheckedJpegDecoder, GuardedLoader


class LoaderThreadError(RuntimeError):
    """An exception of FFCV's loading thread, with the beton indices of the batch it was loading."""

    def __init__(self, cause: BaseException, indices: np.ndarray | None):
        super().__init__(f"{type(cause).__name__}: {cause}")
        self.cause, self.indices = cause, indices


def make_loader(beton: BetonInfo, order: np.ndarray, batch_size: int, num_workers: int, distributed: bool,
                batches_ahead: int = 3):
    """An FFCV Loader serving `order` (beton indices) in that order, `batch_size` per batch."""
    from ffcv.fields.decoders import NDArrayDecoder
    from ffcv.loader import OrderOption
    from ffcv.transforms import ToTensor
    decoder, loader = _ffcv_classes()
    return loader(str(beton.path), batch_size=batch_size, num_workers=max(1, num_workers),
                  order=OrderOption.SEQUENTIAL, distributed=distributed, indices=order, drop_last=False,
                  batches_ahead=batches_ahead, os_cache=True,
                  pipelines={"image": [decoder(), ToTensor()], "bbox": [NDArrayDecoder(), ToTensor()],
                             "keypoints": [NDArrayDecoder(), ToTensor()], "meta": None})


def to_batch(images: torch.Tensor, bbox: torch.Tensor, keypoints: torch.Tensor,
             keypoint_threshold: float) -> dict[str, torch.Tensor]:
    """FFCV's (B,S,S,3) uint8 / (B,4) / (B,K,3) as the tar stream's batch: (B,3,S,S) images (copied:
    FFCV reuses its buffers), keypoints (B,K,2) with low-score ones at (-1, -1)."""
    xy = keypoints[..., :2].clone()
    xy[keypoints[..., 2] < keypoint_threshold] = -1
    return {"images": images.permute(0, 3, 1, 2).contiguous(), "bbox": bbox.clone(), "keypoints": xy}


def first_bad_jpeg(beton: BetonInfo, indices: np.ndarray) -> int | None:
    """The first of `indices` whose JPEG turbojpeg refuses (the diagnosis of a failed batch)."""
    from ffcv.libffcv import imdecode
    from ffcv.reader import Reader
    reader = Reader(str(beton.path))
    field = reader.metadata[f"f{list(reader.handlers).index('image')}"]
    table = reader.alloc_table
    size_of = dict(zip(table["ptr"].tolist(), table["size"].tolist()))
    data = np.memmap(beton.path, "uint8", mode="r")
    for i in indices.tolist():
        meta = field[i]
        ptr = int(meta["data_ptr"])
        dst = np.zeros((meta["height"], meta["width"], 3), np.uint8)
        src = np.ascontiguousarray(data[ptr:ptr + size_of.get(ptr, 0)])
        h, w = int(meta["height"]), int(meta["width"])
        if src.size == 0 or imdecode(src, dst, h, w, h, w, 0, 0, 1, 1, False, False) != 0:
            return int(i)
    return None


class FFCVStream:
    """The batches of steps `start_step` … end of `schedule` for one rank, from a `.beton`."""

    def __init__(self, beton: BetonInfo, schedule: Schedule, start_step: int, rank: int, world_size: int,
                 seed: int, num_workers: int, keypoint_threshold: float, chunk_images: int = CHUNK_IMAGES):
        self.beton, self.schedule, self.start_step = beton, schedule, start_step
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.num_workers, self.keypoint_threshold, self.chunk_images = num_workers, keypoint_threshold, chunk_images

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for first, steps, batch in chunks(self.schedule, self.start_step, self.world_size, self.chunk_images):
            positions = chunk_positions(self.schedule, first, steps, self.world_size)
            order = sample_indices(positions, self.seed, self.beton.num_samples)
            mine = rank_slice(order, self.rank, self.world_size)  # what FFCV's distributed mode serves us
            log.debug("FFCV loader for steps %d to %d, %d per rank", first, first + steps - 1, batch)
            loader = make_loader(self.beton, order, batch, self.num_workers, self.world_size > 1)
            yield from self._batches(loader, mine, first, batch)

    def _batches(self, loader, mine: np.ndarray, first: int, batch: int) -> Iterator[dict[str, Any]]:
        step = first
        try:
            for images, bbox, keypoints in loader:
                out = to_batch(images, bbox, keypoints, self.keypoint_threshold)
                k = step - first
                out["indices"] = torch.from_numpy(mine[k * batch:(k + 1) * batch].astype(np.int64))
                out["step"] = step
                step += 1
                yield out
        except LoaderThreadError as e:
            raise self._error(e) from None

    def _error(self, e: LoaderThreadError) -> Exception:
        if isinstance(e.cause, ValueError) and "JPEG" in str(e.cause) and e.indices is not None:
            bad = first_bad_jpeg(self.beton, e.indices)
            which = f"the JPEG of sample {bad}" if bad is not None else f"a JPEG of samples {e.indices.tolist()}"
            return InputError(f"{self.beton.path}: {which} does not decode (corrupt file); {REBUILD}")
        return RuntimeError(f"FFCV's loader failed reading {self.beton.path}: {e}")
