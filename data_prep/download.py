"""Fetch and verify the photos of each planned shard into raw tar shards (FORMAT.md §1).

img2dataset-style: a thread pool per shard with a bounded window of records in flight, results
consumed in key order (so tar bytes do not depend on which request finishes first), every record
ending as `ok` or one short error reason. A shard is done when its stats file exists; the tar and
status files are written under temporary names and renamed before it, so a killed run leaves at
most temporary files, which the next run of that shard removes.
"""
from __future__ import annotations

import hashlib
import http.client
import io
import json
import logging
import time
import urllib.request
from collections import Counter, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Literal
from urllib.error import HTTPError, URLError
from urllib.parse import urljoin, urlsplit

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image
from tqdm import tqdm

from data_prep import licenses, plan
from fdf_core.tario import AtomicTarWriter, atomic_write_bytes, atomic_write_json, json_bytes, remove_partial
from fdf_core.errors import ConfigError, NothingToDoError
from fdf_core.shards import parse_shards

log = logging.getLogger(__name__)

# Formats the builder reads, with the extension their tar member gets (MPO: phone JPEGs).
FORMAT_EXT = {"JPEG": "jpg", "MPO": "jpg", "PNG": "png", "WEBP": "webp", "GIF": "gif",
              "BMP": "bmp", "TIFF": "tif"}
STATUS_SCHEMA = pa.schema([("key", pa.string()), ("photo_id", pa.string()), ("url", pa.string()),
                           ("status", pa.string()), ("error", pa.string()),
                           ("http_status", pa.int64()), ("bytes", pa.int64()),
                           ("seconds", pa.float64())])


@dataclass
class DownloadConfig:
    """Options of one download run; saved as options.json beside the shards.

    Args:
        metadata: YFCC100M metadata files (.tsv or .gz, 23 or 25 columns)
        output_dir: raw shards, plan.json, stats/ and options.json
        shard_size: records per shard (at most 10000: 4-digit index in keys)
        shards: shards to write: N, A:B, A:, :B or a comma list (fdf_core.shards); default all
        threads: concurrent requests per shard
        timeout: seconds per request attempt (connect + headers + body)
        retries: extra attempts after timeouts, connection errors and 5xx/429
        backoff: seconds before the first retry, doubled for each further one
        max_bytes: larger bodies are aborted while streaming
        max_pixels: more: decompression_bomb (PIL refuses > 2x its own)
        on_bad_line: malformed metadata line
        allowed_licenses: licenses whose photos are kept (data_prep.licenses)
        allow_empty: metadata that keeps no record is not an error (exit 4 otherwise)
        user_agent: the User-Agent header of every request
        progress: show progress bars
    """
    metadata: list[str]
    output_dir: str
    shard_size: int = 10000
    shards: str | None = None
    threads: int = 16
    timeout: float = 10.0
    retries: int = 2
    backoff: float = 0.5
    max_bytes: int = 30 * 1024 * 1024
    max_pixels: int = Image.MAX_IMAGE_PIXELS
    allowed_licenses: list[str] = field(default_factory=lambda: list(licenses.DEFAULT_ALLOWED))
    on_bad_line: Literal["error", "skip"] = "error"
    allow_empty: bool = False
    user_agent: str = "fdf-download/0.1"
    progress: bool = True

    def __post_init__(self) -> None:
        for name in ("threads", "max_bytes", "max_pixels"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name} must be at least 1, got {getattr(self, name)}")
        if self.timeout <= 0 or self.retries < 0 or self.backoff < 0:
            raise ConfigError(f"need --timeout > 0, --retries >= 0, --backoff >= 0; got {self.timeout}, "
                              f"{self.retries}, {self.backoff}")
        licenses.allowed_codes(self.allowed_licenses)
        parse_shards(self.shards)


class FetchError(Exception):
    def __init__(self, reason: str, http_status: int | None = None, retryable: bool = False):
        super().__init__(reason)
        self.reason, self.http_status, self.retryable = reason, http_status, retryable


@dataclass
class Result:
    status: str  # "ok" | "error"
    error: str | None = None
    http_status: int | None = None
    data: bytes | None = None
    seconds: float = 0.0
    format: str | None = None
    width: int = 0
    height: int = 0

    @property
    def nbytes(self) -> int:
        return len(self.data) if self.data is not None else 0


class _HttpOnlyRedirects(urllib.request.HTTPRedirectHandler):
    """Follow redirects only to http(s): never to file://, ftp:// or anything else."""

    def http_error_302(self, req, fp, code, msg, headers):
        target = headers.get("location") or headers.get("uri") or ""
        if urlsplit(urljoin(req.full_url, target)).scheme not in ("http", "https"):
            fp.close()
            raise FetchError("bad_scheme", code)
        return super().http_error_302(req, fp, code, msg, headers)

    http_error_301 = http_error_303 = http_error_307 = http_error_308 = http_error_302


def build_opener() -> urllib.request.OpenerDirector:
    """http(s) only: unlike `urllib.request.build_opener`, no file://, ftp:// or data: handlers."""
    opener = urllib.request.OpenerDirector()
    for handler in (urllib.request.ProxyHandler(), urllib.request.HTTPHandler(),
                    urllib.request.HTTPSHandler(), urllib.request.HTTPDefaultErrorHandler(),
                    _HttpOnlyRedirects(), urllib.request.HTTPErrorProcessor()):
        opener.add_handler(handler)
    return opener


def http_get(url: str, opener: urllib.request.OpenerDirector, timeout: float, max_bytes: int,
             user_agent: str) -> tuple[bytes, int]:
    """One attempt: the body and HTTP status, or :class:`FetchError` with a reason.

    `timeout` bounds every socket operation and the whole body; bodies past `max_bytes` (declared
    or streamed) are aborted.
    """
    deadline = time.monotonic() + timeout
    request = urllib.request.Request(url, headers={"User-Agent": user_agent})
    try:
        with opener.open(request, timeout=timeout) as resp:
            status = resp.status
            declared = resp.headers.get("Content-Length")
            declared = int(declared) if declared and declared.isdigit() else None
            if declared is not None and declared > max_bytes:
                raise FetchError("too_large", status)
            chunks, size = [], 0
            while chunk := resp.read1(1 << 16):
                size += len(chunk)
                if size > max_bytes:
                    raise FetchError("too_large", status)
                if time.monotonic() > deadline:
                    raise FetchError("timeout", status, retryable=True)
                chunks.append(chunk)
            if declared is not None and size < declared:
                raise FetchError("truncated", status, retryable=True)
            return b"".join(chunks), status
    except FetchError:
        raise
    except HTTPError as e:
        e.close()
        raise FetchError(f"http_{e.code}", e.code, retryable=e.code >= 500 or e.code == 429) from None
    except TimeoutError:
        raise FetchError("timeout", retryable=True) from None
    except URLError as e:
        if isinstance(e.reason, TimeoutError):
            raise FetchError("timeout", retryable=True) from None
        raise FetchError("connection", retryable=True) from None
    except http.client.IncompleteRead:
        raise FetchError("truncated", retryable=True) from None
    except (http.client.HTTPException, OSError):  # reset, refused, bad status line, TLS
        raise FetchError("connection", retryable=True) from None
    except ValueError:  # urllib's "no host given", http.client.InvalidURL
        raise FetchError("bad_url") from None


def verify_image(data: bytes, max_pixels: int) -> tuple[str, int, int]:
    """(format, width, height) of a fully decodable image, else :class:`FetchError`."""
    # Decoders raise many exception types on hostile input; one bad payload must not stop a crawl.
    try:
        im = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError:
        raise FetchError("decompression_bomb") from None
    except Exception:
        raise FetchError("not_image") from None
    with im:
        if im.format not in FORMAT_EXT:
            raise FetchError("not_image")  # an image, but not a format the builder reads
        if im.width * im.height > max_pixels:
            raise FetchError("decompression_bomb")
        try:
            im.load()
        except Image.DecompressionBombError:
            raise FetchError("decompression_bomb") from None
        except Exception as e:
            raise FetchError("truncated" if "truncat" in str(e).lower() else "corrupt") from None
        return im.format, im.width, im.height


def fetch(url: str, cfg: DownloadConfig, opener: urllib.request.OpenerDirector) -> Result:
    """Download with retries (timeouts, connection errors, 5xx, 429 only), then verify."""
    start = time.perf_counter()
    try:
        parts = urlsplit(url)
        host = parts.hostname
    except ValueError:  # e.g. an unclosed IPv6 bracket
        return Result("error", "bad_url")
    if parts.scheme.lower() not in ("http", "https"):
        return Result("error", "bad_scheme")
    if not host:
        return Result("error", "bad_url")
    for attempt in range(cfg.retries + 1):
        try:
            data, status = http_get(url, opener, cfg.timeout, cfg.max_bytes, cfg.user_agent)
            break
        except FetchError as e:
            if not e.retryable or attempt == cfg.retries:
                return Result("error", e.reason, e.http_status, seconds=time.perf_counter() - start)
            time.sleep(cfg.backoff * 2 ** attempt)
    try:
        fmt, width, height = verify_image(data, cfg.max_pixels)
    except FetchError as e:
        return Result("error", e.reason, status, seconds=time.perf_counter() - start)
    return Result("ok", None, status, data, time.perf_counter() - start, fmt, width, height)


def _ordered(pool: ThreadPoolExecutor, fn: Callable, items: Iterable, window: int) -> Iterator:
    """`(item, fn(item))` in input order, with at most `window` items submitted and not yet yielded."""
    pending = deque()
    for item in items:
        pending.append((item, pool.submit(fn, item)))
        if len(pending) >= window:
            item, fut = pending.popleft()
            yield item, fut.result()
    while pending:
        item, fut = pending.popleft()
        yield item, fut.result()


def _sample_json(rec: dict, res: Result) -> dict:
    return {"key": rec["key"], "photo_id": rec["photo_id"], "line_index": rec["line_index"],
            "user_nsid": rec["user_nsid"], "author": rec["author"], "title": rec["title"],
            "page_url": rec["page_url"], "url": rec["url"], "license_name": rec["license_name"],
            "license_url": rec["license_url"], "width": res.width, "height": res.height,
            "format": res.format, "sha256": hashlib.sha256(res.data).hexdigest(), "bytes": res.nbytes}


def download_shard(shard: str, cfg: DownloadConfig, opener: urllib.request.OpenerDirector,
                   on_record: Callable[[Result], None] | None = None) -> dict:
    """Fetch one planned shard over http(s); write its tar, status parquet and (last) stats JSON."""
    return write_shard(shard, Path(cfg.output_dir), lambda r: fetch(r["url"], cfg, opener), cfg.threads,
                       on_record)


def write_shard(shard: str, out: Path, get: Callable[[dict], Result], threads: int,
                on_record: Callable[[Result], None] | None = None) -> dict:
    """Get every planned record of one shard with `get(record)` (a fetch, or a local read), in
    `threads` threads, results in key order; write the tar, status parquet and (last) stats JSON."""
    for target in (f"{shard}.*", f"{shard}_stats.json"):  # left by a killed run
        remove_partial(out, target)
    records = plan.read_shard(out, shard)
    start = time.perf_counter()
    rows, errors, ok_bytes = [], Counter(), 0
    pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix=f"get-{shard}")
    try:
        with AtomicTarWriter(out / f"{shard}.tar") as tar:
            for rec, res in _ordered(pool, get, records, window=4 * threads):
                if res.status == "ok":
                    tar.add_sample(rec["key"], {FORMAT_EXT[res.format]: res.data,
                                                "json": json_bytes(_sample_json(rec, res))})
                    ok_bytes += res.nbytes
                else:
                    errors[res.error] += 1
                rows.append({"key": rec["key"], "photo_id": rec["photo_id"], "url": rec["url"],
                             "status": res.status, "error": res.error, "http_status": res.http_status,
                             "bytes": res.nbytes, "seconds": round(res.seconds, 4)})
                if on_record is not None:
                    on_record(res)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows, schema=STATUS_SCHEMA), buf)
    atomic_write_bytes(out / f"{shard}.parquet", buf.getvalue())
    seconds = time.perf_counter() - start
    ok = len(rows) - sum(errors.values())
    stats = {"shard": shard, "count": len(rows), "ok": ok, "error": len(rows) - ok,
             "errors": dict(sorted(errors.items())), "bytes": ok_bytes, "seconds": round(seconds, 3),
             "images_per_s": round(ok / seconds, 2) if seconds else 0.0}
    atomic_write_json(out / f"{shard}_stats.json", stats)  # last: marks the shard done
    return stats


def plan_counts(stats: dict) -> str:
    """What the plan kept and dropped, in words: `12 kept of 15 lines; dropped: ...`."""
    rejected = {k.split(":", 1)[1]: v for k, v in stats.items() if k.startswith("license_rejected:")}
    dropped = [f"{sum(rejected.values())} by the license filter"
               + (f" ({', '.join(f'{k}={v}' for k, v in sorted(rejected.items()))})" if rejected else ""),
               f"{stats.get('videos', 0)} videos", f"{stats.get('no_url', 0)} without URL"]
    if stats.get("bad_lines"):
        dropped.append(f"{stats['bad_lines']} malformed lines")
    return f"{stats.get('kept', 0)} kept of {stats.get('lines', 0)} records; dropped: {', '.join(dropped)}"


def report_plan(the_plan: dict) -> None:
    """Say what the filters dropped, on every run: plan.json alone is easy to overlook. Skipped
    malformed lines are a warning: a file cut short or in another layout shows up here."""
    stats = the_plan.get("stats", {})
    log.info("plan: %s", plan_counts(stats))
    if stats.get("bad_lines"):
        first = the_plan.get("bad_lines") or ["?"]
        log.warning("%d malformed metadata lines skipped (--on_bad_line skip), first: %s",
                    stats["bad_lines"], first[0])


def run(cfg: DownloadConfig) -> dict:
    """Plan (once), then download every shard of `cfg.shards` that is not done; return a summary."""
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "options.json", asdict(cfg))
    the_plan = plan.make_plan(out, cfg.metadata, cfg.shard_size, cfg.allowed_licenses, cfg.on_bad_line)
    report_plan(the_plan)
    if the_plan["records"] == 0 and not cfg.allow_empty:
        raise NothingToDoError(f"{', '.join(cfg.metadata)}: no record to download "
                               f"({plan_counts(the_plan['stats'])}); check --metadata and "
                               "--allowed_licenses, or pass --allow_empty true")
    opener = build_opener()
    return write_shards(out, the_plan, cfg.shards, lambda r: fetch(r["url"], cfg, opener), cfg.threads,
                        cfg.progress)


def write_shards(out: Path, the_plan: dict, shards: str | None, get: Callable[[dict], Result], threads: int,
                 progress: bool) -> dict:
    """Write every planned shard of the `shards` range that is not done yet; return a summary.

    The summary totals the stats of all shards in the range (also those done before) and gives
    this run's throughput.
    """
    selected = plan.shard_range(shards, the_plan["num_shards"])
    todo = [s for s in selected if not (out / f"{s}_stats.json").exists()]
    log.info("%d records in %d shards; %d of %d selected shards already done, %d to write → %s",
             the_plan["records"], the_plan["num_shards"], len(selected) - len(todo), len(selected), len(todo), out)
    start = time.perf_counter()
    now = Counter()
    with tqdm(total=sum(plan.shard_length(out, s) for s in todo), unit="img",
              disable=not progress or not todo, dynamic_ncols=True) as bar:
        def on_record(res: Result) -> None:
            now[res.status] += 1
            bar.update(1)
            bar.set_postfix(ok=now["ok"], failed=now["error"], refresh=False)

        for shard in todo:
            write_shard(shard, out, get, threads, on_record)
    seconds = time.perf_counter() - start

    total, errors = Counter(), Counter()
    for s in selected:
        st = json.loads((out / f"{s}_stats.json").read_text())
        total.update({k: st[k] for k in ("count", "ok", "error", "bytes")})
        errors.update(st["errors"])
    summary = {"output_dir": str(out), "shards": len(selected),
               "shards_done_before": len(selected) - len(todo), "records": total["count"],
               "ok": total["ok"], "error": total["error"], "errors": dict(errors.most_common()),
               "bytes": total["bytes"], "plan": the_plan["stats"],
               "run_records": sum(now.values()), "run_ok": now["ok"],
               "run_seconds": round(seconds, 3),
               "run_images_per_s": round(now["ok"] / seconds, 2) if todo and seconds else 0.0}
    if todo:
        log.info("%d records in %.1fs: %d ok (%.1f img/s), %d failed", summary["run_records"], seconds, now["ok"],
                 summary["run_images_per_s"], now["error"])
    log.info("selected shards hold %d of %d photos; failures: %s", total["ok"], total["count"],
             ", ".join(f"{k}={v}" for k, v in errors.most_common()) or "none")
    return summary
