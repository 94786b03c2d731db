"""Deterministic, atomic tar shards, safe reading, and the one way any file reaches disk atomically.

Every output file of fdf (shards, JSON, checkpoints, images, videos, FFCV files) is written to a
temporary name beside its target (:func:`temporary_path`) and renamed into place after an fsync
(:func:`replace_durably`), so a killed run never leaves a partial file under its final name. Tar
member metadata is fixed (mtime 0, uid/gid 0, mode 0644) so that a rerun of the same input writes
the same bytes.
"""
from __future__ import annotations

import contextlib
import fnmatch
import glob
import io
import json
import os
import re
import socket
import tarfile
import threading
from pathlib import Path
from typing import Iterator


def _host() -> str:
    """This machine's short name, as it appears in temporary file names."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname().split(".")[0]) or "host"


_TAG = re.compile(r"\.tmp-(?P<host>[A-Za-z0-9_-]+)\.(?P<pid>\d+)")


def _temporary_name(path: Path, keep_suffix: bool, tag: str, escape=lambda part: part) -> str:
    """The one naming of temporary files: `<name>.tmp-<tag>`, or `.<stem>.tmp-<tag><suffix>`;
    `escape` applies to the target's own parts (glob.escape: a pattern for every writer's tag)."""
    if keep_suffix:
        return f".{escape(path.stem)}.tmp-{tag}{escape(path.suffix)}"
    return f"{escape(path.name)}.tmp-{tag}"


def temporary_path(path: str | os.PathLike, keep_suffix: bool = False) -> Path:
    """Where `path` is written before it is renamed into place: `<name>.tmp-<host>.<pid>` beside it,
    which :func:`remove_partial` finds. `keep_suffix` gives `.<stem>.tmp-<host>.<pid><suffix>`
    instead, for writers that choose the format by the extension (ffmpeg). The host is part of the
    name because SLURM tasks on several nodes write into one shared folder, where a pid alone says
    nothing."""
    path = Path(path)
    return path.with_name(_temporary_name(path, keep_suffix, f"{_host()}.{os.getpid()}"))


def replace_durably(tmp: str | os.PathLike, path: str | os.PathLike) -> None:
    """fsync the finished `tmp`, rename it onto `path`, fsync the folder: after a crash the target
    holds either its old bytes or all of the new ones."""
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fd = os.open(Path(path).parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, keep_suffix: bool = False) -> Iterator[Path]:
    """`with atomic_path(out) as tmp: write(tmp)`: the file appears at `out` only when the block
    finishes; on an exception the temporary file is removed and `out` is untouched. Temporaries of
    `out` that killed processes of this host left are removed first (a rerun leaves nothing behind)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_dead_temporaries(path, keep_suffix)
    tmp = temporary_path(path, keep_suffix)
    try:
        yield tmp
        replace_durably(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


_dead_by_folder: dict[Path, list[str]] = {}  # folder → its dead writers' temporaries, listed once
_dead_lock = threading.Lock()


def _remove_dead_temporaries(path: Path, keep_suffix: bool) -> None:
    """Remove the temporaries of `path` that killed processes of this host left (not another task's
    file that is being written now). The folder is listed once per process, its dead writers'
    files kept by name, and each write removes its target's among them. Why once: listing the
    folder at every write made writing n files into one folder O(n^2) (a write into a folder of
    50,000 files took 57 ms against 8 in an empty one; `anonymize` mirrors folders of that size).
    A process that dies while this one runs leaves its file to the next run."""
    folder = path.parent
    with _dead_lock:
        if folder not in _dead_by_folder:
            with os.scandir(folder) as entries:
                _dead_by_folder[folder] = [e.name for e in entries if ".tmp-" in e.name and _writer_is_dead(e.name)]
        dead = _dead_by_folder[folder]
        if not dead:
            return
        pattern = _temporary_name(path, keep_suffix, "*", glob.escape)
        for name in [n for n in dead if fnmatch.fnmatchcase(n, pattern)]:
            (folder / name).unlink(missing_ok=True)
            dead.remove(name)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_json(path: str | os.PathLike, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def remove_partial(directory: str | os.PathLike, name_glob: str) -> None:
    """Delete the temporary files a killed writer left for targets matching `name_glob`; only for
    a caller that is the targets' one writer (one shard's task). Files that every task writes go
    through :func:`atomic_path`, which removes only dead writers' leftovers."""
    for stale in Path(directory).glob(f"{name_glob}.tmp-*"):
        stale.unlink(missing_ok=True)


def _writer_is_dead(name: str) -> bool:
    """True if the temporary file `name` was written by a process of this host that no longer runs."""
    tag = _TAG.search(name)
    if tag is None or tag["host"] != _host():
        return False  # another node's (or an older naming's): not ours to judge
    try:
        os.kill(int(tag["pid"]), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False  # alive, another user's
    return False


def json_bytes(obj) -> bytes:
    """The one JSON encoding used inside shards (compact, sorted keys: byte-stable)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


class AtomicTarWriter:
    """Collects members, writes them on `close()` to a temporary file, renames it into place."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = temporary_path(self.path)
        self._tar = tarfile.open(self.tmp, "w", format=tarfile.USTAR_FORMAT)
        self.count = 0

    def add(self, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        info.mtime = 0
        info.mode = 0o644
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        self._tar.addfile(info, io.BytesIO(data))
        self.count += 1

    def add_sample(self, key: str, files: dict[str, bytes]) -> None:
        """Add one webdataset sample: members `<key>.<ext>` in sorted extension order."""
        for ext in sorted(files):
            self.add(f"{key}.{ext}", files[ext])

    def close(self) -> Path:
        self._tar.close()
        replace_durably(self.tmp, self.path)
        return self.path

    def abort(self) -> None:
        self._tar.close()
        self.tmp.unlink(missing_ok=True)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
        else:
            self.abort()


def check_member_name(tar_path: Path, name: str) -> None:
    parts = Path(name).parts
    if name.startswith("/") or ".." in parts or not parts:
        raise ValueError(f"{tar_path}: unsafe member name {name!r} (absolute or leaves the shard)")


def iter_samples(tar_path: str | os.PathLike) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Yield `(key, {ext: bytes})` for consecutive members sharing a key; never extracts to disk.

    Only regular files are read; links and names that would leave the target are refused.
    """
    tar_path = Path(tar_path)
    current_key, files = None, {}
    with tarfile.open(tar_path, "r") as tar:
        for member in tar:
            check_member_name(tar_path, member.name)
            if not member.isfile():
                raise ValueError(f"{tar_path}: member {member.name!r} is not a regular file")
            base = os.path.basename(member.name)
            key, _, ext = base.partition(".")
            if key != current_key and current_key is not None:
                yield current_key, files
                files = {}
            current_key = key
            files[ext] = tar.extractfile(member).read()
    if current_key is not None:
        yield current_key, files
