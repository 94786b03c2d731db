"""YFCC100M metadata lines: read (streaming, plain or gzip) and write (FORMAT.md §0).

Free-text fields (nickname, title, description, tags) are URL-encoded in the official files;
records hold them decoded, and `format_line` encodes them again.
"""
from __future__ import annotations

import gzip
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Literal
from urllib.parse import quote_plus, unquote_plus

from fdf_core.errors import InputError

COLUMNS_23 = (
    "photo_id", "user_nsid", "user_nickname", "date_taken", "date_uploaded", "capture_device",
    "title", "description", "user_tags", "machine_tags", "longitude", "latitude", "accuracy",
    "page_url", "download_url", "license_name", "license_url", "server_id", "farm_id", "secret",
    "secret_original", "extension_original", "marker",
)
COLUMNS_25 = ("line_number", "photo_id", "photo_hash") + COLUMNS_23[1:]
_INDEX = {n: {name: i for i, name in enumerate(cols)}
          for n, cols in ((23, COLUMNS_23), (25, COLUMNS_25))}


class MetadataError(InputError):
    """A metadata line that is not a YFCC100M record; the message names file and line and says
    how to go on (`--on_bad_line skip`)."""


@dataclass(frozen=True)
class YfccRecord:
    """The fields of one line that the pipeline keeps: what to fetch and whom to credit."""
    photo_id: str
    url: str  # download URL
    license_name: str
    license_url: str
    user_nsid: str = ""
    author: str = ""  # user nickname
    title: str = ""
    page_url: str = ""
    marker: int = 0  # 0 photo, 1 video
    line_index: int | None = None  # 25-column line number, else 0-based line of the file

    @property
    def is_video(self) -> bool:
        return self.marker == 1


def parse_line(line: str, where: str, file_line: int) -> YfccRecord:
    """One line (without newline) → record; `where` names the file in error messages."""
    cols = line.split("\t")
    if len(cols) not in _INDEX:
        raise MetadataError(f"{where}: line {file_line + 1}: expected 23 or 25 tab-separated "
                            f"columns (YFCC100M), got {len(cols)}")
    idx = _INDEX[len(cols)]
    get = lambda name: cols[idx[name]]  # noqa: E731
    marker = get("marker").strip()
    if marker not in ("0", "1"):
        raise MetadataError(f"{where}: line {file_line + 1}: photo/video marker must be 0 or 1, "
                            f"got {marker!r}")
    if not get("photo_id").strip():
        raise MetadataError(f"{where}: line {file_line + 1}: empty photo id")
    line_index = file_line
    if len(cols) == 25:
        try:
            line_index = int(get("line_number"))
        except ValueError:
            raise MetadataError(f"{where}: line {file_line + 1}: line number column is not an "
                                f"integer: {get('line_number')!r}") from None
    return YfccRecord(
        photo_id=get("photo_id").strip(), url=get("download_url").strip(),
        license_name=unquote_plus(get("license_name")), license_url=get("license_url").strip(),
        user_nsid=get("user_nsid"), author=unquote_plus(get("user_nickname")),
        title=unquote_plus(get("title")), page_url=get("page_url").strip(),
        marker=int(marker), line_index=line_index)


def _open_binary(path: Path):
    with open(path, "rb") as f:
        magic = f.read(2)
    return gzip.open(path, "rb") if magic == b"\x1f\x8b" else open(path, "rb")


def iter_records(path: str | os.PathLike, on_bad_line: Literal["error", "skip"] = "error",
                 skipped: Callable[[str], None] | None = None) -> Iterator[YfccRecord]:
    """Stream the records of one metadata file (gzip is recognized by its magic bytes).

    A malformed line raises :class:`MetadataError`, or with `on_bad_line="skip"` is passed to
    `skipped` as the error message. Empty lines are ignored.
    """
    path = Path(path)
    with _open_binary(path) as f:
        for file_line, raw in enumerate(f):
            raw = raw.rstrip(b"\r\n")
            if not raw:
                continue
            try:
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise MetadataError(f"{path}: line {file_line + 1}: not UTF-8 ({e.reason})") from None
                yield parse_line(line, str(path), file_line)
            except MetadataError as e:
                if on_bad_line == "error":
                    raise MetadataError(f"{e} (fix the line, or skip such lines with "
                                        "--on_bad_line skip)") from None
                if skipped is not None:
                    skipped(str(e))


def format_line(rec: YfccRecord, columns: Literal[23, 25] = 25, line_number: int = 0,
                photo_hash: str = "") -> str:
    """One official line for `rec` (columns the record does not hold are left empty; free text is
    URL-encoded, the license name is written as is, as in the official files)."""
    values = dict.fromkeys(COLUMNS_25, "")
    values.update(
        line_number=str(line_number), photo_id=rec.photo_id, photo_hash=photo_hash,
        user_nsid=rec.user_nsid, user_nickname=quote_plus(rec.author), title=quote_plus(rec.title),
        page_url=rec.page_url, download_url=rec.url, license_name=rec.license_name,
        license_url=rec.license_url, marker=str(rec.marker))
    if columns not in (23, 25):
        raise ValueError(f"columns must be 23 or 25, got {columns}")
    cols = COLUMNS_25 if columns == 25 else COLUMNS_23
    fields = [values[c] for c in cols]
    if any("\t" in v or "\n" in v for v in fields):
        raise ValueError(f"record {rec.photo_id}: a field holds a tab or newline")
    return "\t".join(fields)
