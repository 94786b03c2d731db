"""One face per track in a video: what the generator painted for a track, carried and blended in
the track's own crop coordinates.

Painting every frame independently makes a face shimmer (the generator answers each frame's
slightly different condition and pose with slightly different pixels) and costs a generator call
(and a keypoint call) per face per frame. The video path (eval.video) therefore keeps, per track,
the last painted face as an (r, r, 3) crop in the FDF crop of the track's smoothed box, which moves
and scales with the head:
- `paint_every` k: a track is painted on its first frame and then every k-th frame; in between its
  crop is carried (resized into the current crop by the paste), so the generator and the keypoint
  model run on 1/k of the face-frames;
- `keep` β: each new painting is blended with the track's previous one, face = β·previous +
  (1-β)·new, so the face changes gradually instead of at every painting; and the face glides to
  that blend in k equal steps over the frames until the next painting instead of taking it at
  once: a step at every painting was most of the flicker left on the zoom clip;
- a track takes the small-face method (eval.anonymizer, `small_face_size`) or the generator as its
  box's size says at its planned paintings, and keeps that choice in between: a face near the size
  limit whose box grows and shrinks by a pixel would otherwise switch between a blur and a painted
  face from one frame to the next (the quick crowd clip had such faces);
- `seam_keep`: the same for the colour correction that fits the face to the pixels around its box
  (eval.paste.SeamMemory), which otherwise changes every frame as the box slides over the scene.
Only generated pixels enter the memory (never a photo pixel), and the paste puts them inside the
current frame's box only, with that frame's surroundings as the boundary (eval.paste), so a
carried face covers the box exactly as a freshly painted one does.
"""
from __future__ import annotations

import numpy as np

from eval.paste import SeamMemory


class TrackFaces:
    """The painted face of every live track (see the module docstring)."""

    def __init__(self, paint_every: int = 1, keep: float = 0.0, seam_keep: float = 0.0):
        if paint_every < 1 or not 0.0 <= keep < 1.0:
            raise ValueError(f"need paint_every >= 1 (got {paint_every}) and 0 <= keep < 1 (got {keep})")
        self.paint_every, self.keep = paint_every, keep
        self.seams = SeamMemory(seam_keep)  # each track's seam with the frame around it (eval.paste)
        self.faces: dict[int, np.ndarray] = {}  # float32 (r, r, 3), the face shown in the last frame
        self._glide: dict[int, tuple[np.ndarray, int]] = {}  # the blended painting being reached, frames left
        self._since: dict[int, int] = {}  # frames since the track's last planned painting
        self._small: dict[int, bool] = {}  # whether the track takes the small-face method until its next painting

    def plan(self, track: int) -> bool:
        """Whether the track's face is painted in this frame; call once per face and frame, in frame order."""
        since = self._since.get(track)
        paint = since is None or since + 1 >= self.paint_every
        self._since[track] = 0 if paint else since + 1
        return paint

    def small(self, track: int, small_now: bool, planned: bool) -> bool:
        """Whether the track's face takes the small-face method in this frame: `small_now` (its box
        is under the size limit in this frame) where the frame is one of its planned paintings
        (`planned`, from :meth:`plan`) or it has no choice yet, else the choice made then."""
        if planned or track not in self._small:
            self._small[track] = bool(small_now)
        return self._small[track]

    def painted(self, track: int, face: np.ndarray) -> np.ndarray:
        """A new painting of the track, as uint8: its first is shown at once; a later one is blended
        with the face shown now and reached over the next `paint_every` frames (module docstring)."""
        new = face.astype(np.float32)
        shown = self.faces.get(track)
        if shown is None or shown.shape != new.shape:
            self.faces[track] = new
            self._glide.pop(track, None)
            return np.clip(new + 0.5, 0, 255).astype(np.uint8)
        target = self.keep * shown + (1.0 - self.keep) * new if self.keep else new
        self._glide[track] = (target, self.paint_every)
        return self._step(track)

    def carried(self, track: int) -> np.ndarray | None:
        """The track's face in this frame, one step further on its glide (None if it has none yet);
        call once per frame in which the track's face is not painted afresh."""
        if track not in self.faces:
            return None
        return self._step(track)

    def _step(self, track: int) -> np.ndarray:
        shown = self.faces[track]
        if track in self._glide:
            target, left = self._glide[track]
            shown = shown + (target - shown) / left
            if left > 1:
                self._glide[track] = (target, left - 1)
            else:
                del self._glide[track]
            self.faces[track] = shown
        return np.clip(shown + 0.5, 0, 255).astype(np.uint8)

    def forget(self, live: set[int]) -> None:
        for track in [t for t in self._since if t not in live]:
            self._since.pop(track, None)
            self._small.pop(track, None)
            self.faces.pop(track, None)
            self._glide.pop(track, None)
        self.seams.forget(live)
