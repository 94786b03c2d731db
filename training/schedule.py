"""Progressive-growing schedule, measured in images shown (not steps).

Phases: stabilize at the start resolution, then for each doubling a fade-in (alpha rises linearly
from 0 to 1 with the images shown) and a stabilization; the last stabilization runs to the end.
`stabilize_kimg_at` gives one resolution's stabilization its own length: a run that grows a finished
lower-resolution run (training.grow) states how long that run stayed at its top resolution, so
both runs put every step at the same images, resolution and alpha up to the point of growth.
A training step that starts at `images` images shown uses the phase containing `images` and that
phase's batch size, so everything (resolution, alpha, batch, data position) is a function of the
step index: resuming at a step continues the same schedule exactly.
"""
from __future__ import annotations

import bisect
import math
from dataclasses import dataclass, field
from functools import cached_property
from typing import Literal

from fdf_core.errors import ConfigError


def _paper_batch_sizes() -> dict[int, int]:
    return {8: 256, 16: 256, 32: 128, 64: 96, 128: 64}  # docs/reference.md, Training (global batch, all ranks)


@dataclass(frozen=True)
class Phase:
    index: int
    kind: Literal["stabilize", "fade"]
    resolution: int
    start_images: int
    end_images: int | None  # None: the open-ended last phase

    def alpha(self, images: int) -> float:
        if self.kind == "stabilize":
            return 1.0
        return min(1.0, (images - self.start_images) / (self.end_images - self.start_images))

    @property
    def name(self) -> str:
        return f"{self.kind}{self.resolution}"


@dataclass(frozen=True)
class StepInfo:
    step: int
    images: int  # images shown before this step (all ranks)
    phase: Phase
    alpha: float
    batch_size: int  # global batch of this step


@dataclass(frozen=True)
class _Segment:
    first_step: int
    first_images: int
    num_steps: int
    batch_size: int
    phase: Phase


@dataclass
class Schedule:
    """Defaults = the paper: 8x8 → 128x128, 1.2M images per fade-in and per stabilization."""

    start_resolution: int = 8
    max_resolution: int = 128
    fade_kimg: float = 1200.0
    stabilize_kimg: float = 1200.0
    total_kimg: float = 40000.0
    batch_sizes: dict[int, int] = field(default_factory=_paper_batch_sizes)
    stabilize_kimg_at: dict[int, float] = field(default_factory=dict)  # resolution -> its stabilization

    def __post_init__(self) -> None:
        for name in ("start_resolution", "max_resolution"):
            v = getattr(self, name)
            if v < 4 or v & (v - 1):
                raise ConfigError(f"schedule.{name} must be a power of two >= 4, got {v}")
        if self.start_resolution > self.max_resolution:
            raise ConfigError(f"schedule.start_resolution {self.start_resolution} > max_resolution "
                              f"{self.max_resolution}")
        if self.fade_kimg <= 0 or self.stabilize_kimg <= 0 or self.total_kimg <= 0:
            raise ConfigError("schedule: fade_kimg, stabilize_kimg and total_kimg must be > 0")
        self.batch_sizes = {int(k): int(v) for k, v in self.batch_sizes.items()}
        self.stabilize_kimg_at = {int(k): float(v) for k, v in (self.stabilize_kimg_at or {}).items()}
        odd = {r: v for r, v in self.stabilize_kimg_at.items() if r not in self.resolutions[:-1] or v <= 0}
        if odd:
            raise ConfigError(f"schedule.stabilize_kimg_at {odd}: give a length > 0 for resolutions below "
                              f"max_resolution among {self.resolutions[:-1]} (the last stabilization runs "
                              "to total_kimg)")
        missing = [r for r in self.resolutions if self.batch_sizes.get(r, 0) <= 0]
        if missing:
            raise ConfigError(f"schedule.batch_sizes has no positive batch size for resolution(s) {missing}")

    @property
    def resolutions(self) -> list[int]:
        lo, hi = int(math.log2(self.start_resolution)), int(math.log2(self.max_resolution))
        return [2 ** i for i in range(lo, hi + 1)]

    @property
    def total_images(self) -> int:
        return round(self.total_kimg * 1000)

    @cached_property
    def phases(self) -> list[Phase]:
        fade = round(self.fade_kimg * 1000)
        stab = {r: round(self.stabilize_kimg_at.get(r, self.stabilize_kimg) * 1000) for r in self.resolutions}
        kinds: list[tuple[str, int, int]] = [("stabilize", self.start_resolution, stab[self.start_resolution])]
        for r in self.resolutions[1:]:
            kinds += [("fade", r, fade), ("stabilize", r, stab[r])]
        phases, start = [], 0
        for i, (kind, res, length) in enumerate(kinds):
            end = None if i == len(kinds) - 1 else start + length
            phases.append(Phase(i, kind, res, start, end))
            start = start + length
        return phases

    def phase_at(self, images: int) -> Phase:
        starts = [p.start_images for p in self.phases]
        return self.phases[bisect.bisect_right(starts, images) - 1]

    @cached_property
    def _segments(self) -> list[_Segment]:
        """Runs of steps with one phase; a step belongs to the phase its first image falls in."""
        segments, step, images = [], 0, 0
        while images < self.total_images:
            phase = self.phase_at(images)
            batch = self.batch_sizes[phase.resolution]
            end = min(self.total_images, phase.end_images if phase.end_images is not None else self.total_images)
            n = math.ceil((end - images) / batch)
            segments.append(_Segment(step, images, n, batch, phase))
            step, images = step + n, images + n * batch
        return segments

    def first_step(self, phase: Phase) -> int:
        """The first training step of `phase` (phases shorter than one batch have none: IndexError)."""
        for seg in self._segments:
            if seg.phase.index == phase.index:
                return seg.first_step
        raise IndexError(f"no training step falls in phase {phase.name}")

    @property
    def total_steps(self) -> int:
        last = self._segments[-1]
        return last.first_step + last.num_steps

    def at_step(self, step: int) -> StepInfo:
        """Images shown, phase, alpha and global batch of training step `step` (0-based)."""
        if not 0 <= step < self.total_steps:
            raise IndexError(f"step {step} outside the schedule's {self.total_steps} steps")
        seg = self._segments[bisect.bisect_right([s.first_step for s in self._segments], step) - 1]
        images = seg.first_images + (step - seg.first_step) * seg.batch_size
        return StepInfo(step, images, seg.phase, seg.phase.alpha(images), seg.batch_size)

    def images_before(self, step: int) -> int:
        """Images shown before step `step` (after the last step when `step` == total_steps)."""
        if step >= self.total_steps:
            last = self._segments[-1]
            return last.first_images + last.num_steps * last.batch_size
        return self.at_step(step).images

    def images_in_steps(self, stop: int, residue: int = 0, modulus: int = 1) -> int:
        """Sum of the global batches of the steps k < `stop` with k % modulus == residue.

        The data loader's worker `residue` of `modulus` serves exactly those steps, so this is how
        far into its stream a worker has read when training resumes at step `stop`.
        """
        total = 0
        for seg in self._segments:
            lo, hi = seg.first_step, min(stop, seg.first_step + seg.num_steps)
            if hi <= lo:
                break
            first = lo + (residue - lo) % modulus
            if first < hi:
                total += seg.batch_size * ((hi - 1 - first) // modulus + 1)
        return total
