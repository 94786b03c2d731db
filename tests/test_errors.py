"""The error policy of the console scripts (README, "Errors and exit codes"), run as a user runs them.

Each ordinary mistake gives one line on stderr naming the file, line, key or flag, and its exit
status; a bug gives its traceback; batch jobs go on past bad items and say what they skipped.
Some scripts run as subprocesses (`python -m <stage>.cli [<script>]`, the same entry points as the
installed scripts), so the exit status and the very first line printed are what a user sees; the others call
`run_main` with the stage's `main` in this process (the same code, without the seconds each new
Python process spends importing torch).
"""
from __future__ import annotations

import configparser
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from data_prep import licenses
from data_prep.sample import write_yfcc_metadata
from data_prep.yfcc import YfccRecord
from data_prep.cli import download_main
from eval.cli import anonymize_main, wider_ap_main as wider_main
from fdf_builder.cli import main as build_main
from fdf_core import errors
from fdf_core.console import run_main
from fdf_pipeline.cli import main as pipeline_main

REPO = Path(__file__).resolve().parents[1]
PHOTO = "dlib__examples_faces_2008_001009.jpg"


def _script(module: str, *args, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "FDF_DEBUG"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def _in_process(capsys, main, prog: str, *args) -> subprocess.CompletedProcess:
    """`run_main(main, prog, args)` here, reported like a finished subprocess."""
    capsys.readouterr()
    code = run_main(main, prog, [str(a) for a in args])
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess([prog, *args], code, out, err)


def _error_line(done: subprocess.CompletedProcess) -> str:
    """The one line a user mistake prints: all of stderr, with no traceback before it."""
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr[-3000:]
    return lines[0]


@pytest.fixture(autouse=True)
def _no_debug(monkeypatch):
    monkeypatch.delenv("FDF_DEBUG", raising=False)


def _record(i: int, code: str = "by") -> YfccRecord:
    lic = licenses.LICENSES[code]
    return YfccRecord(photo_id=str(9_000 + i), url=f"http://127.0.0.1:9/{i}.jpg", license_name=lic.name,
                      license_url=lic.url, author="someone", title=f"photo {i}")


# ------------------------------------------------------------------ the mistakes of issue 9
def test_misspelt_option_names_the_flag_it_resembles(tmp_path):
    done = _script("fdf_builder.cli", "--inputdir", tmp_path, "--output_dir", tmp_path / "out")
    assert done.returncode == errors.EXIT_USAGE
    assert _error_line(done) == (f"fdf-build: error: unrecognized arguments: --inputdir {tmp_path} "
                                 "(did you mean --input_dir?) (see fdf-build --help)")


def test_missing_input_folder(tmp_path):
    done = _script("fdf_builder.cli", "--input_dir", tmp_path / "nonexistent", "--output_dir", tmp_path / "out")
    assert done.returncode == errors.EXIT_INPUT
    assert _error_line(done) == (f"fdf-build: error: --input_dir {tmp_path / 'nonexistent'}: no such raw "
                                 "shard folder (the --output_dir of fdf-download)")


def test_build_of_an_empty_folder_is_nothing_to_do_unless_allowed(capsys, tmp_path):
    args = ["--input_dir", tmp_path, "--output_dir", tmp_path / "out", "--progress", "false"]
    done = _in_process(capsys, build_main, "fdf-build", *args)
    assert done.returncode == errors.EXIT_NOTHING_TO_DO
    assert _error_line(done).startswith(f"fdf-build: error: --input_dir {tmp_path}: no finished raw shards")
    assert not (tmp_path / "out").exists()
    allowed = _in_process(capsys, build_main, "fdf-build", *args, "--allow_empty", "true")
    assert allowed.returncode == 0, allowed.stderr[-3000:]
    assert json.loads((tmp_path / "out" / "index.json").read_text())["photos"] == 0


def test_metadata_line_with_wrong_column_count_names_file_and_line(capsys, tmp_path):
    meta = write_yfcc_metadata(tmp_path / "meta.tsv", [_record(0), _record(1)], 23)
    lines = meta.read_text().splitlines()
    meta.write_text("\n".join([lines[0], "1\tonly three\tcolumns", lines[1]]) + "\n")
    done = _in_process(capsys, download_main, "fdf-download", "--metadata", f"[{meta}]",
                       "--output_dir", tmp_path / "raw")
    assert done.returncode == errors.EXIT_INPUT
    assert _error_line(done) == (f"fdf-download: error: {meta}: line 2: expected 23 or 25 tab-separated "
                                 "columns (YFCC100M), got 3 (fix the line, or skip such lines with "
                                 "--on_bad_line skip)")


def test_download_says_what_the_filters_and_skipped_lines_dropped(capsys, tmp_path):
    meta = write_yfcc_metadata(tmp_path / "meta.tsv", [_record(0), _record(1, "arr"), _record(2, "by-nd")], 23)
    meta.write_text(meta.read_text() + "not\ta record\n")
    done = _in_process(capsys, download_main, "fdf-download", "--metadata", f"[{meta}]",
                       "--output_dir", tmp_path / "raw", "--on_bad_line", "skip",
                       "--shards", "0:0")  # plan only: nothing is fetched
    assert done.returncode == 0, done.stderr[-3000:]
    assert ("fdf-download: plan: 1 kept of 3 records; dropped: 2 by the license filter (arr=1, by-nd=1), "
            "0 videos, 0 without URL, 1 malformed lines") in done.stderr.splitlines()
    assert (f"fdf-download: warning: 1 malformed metadata lines skipped (--on_bad_line skip), first: {meta}: "
            "line 4: expected 23 or 25 tab-separated columns (YFCC100M), got 2") in done.stderr.splitlines()


def test_metadata_that_keeps_no_record_is_nothing_to_do(capsys, tmp_path):
    meta = write_yfcc_metadata(tmp_path / "meta.tsv", [_record(0, "arr")], 23)
    done = _in_process(capsys, download_main, "fdf-download", "--metadata", f"[{meta}]",
                       "--output_dir", tmp_path / "raw")
    assert done.returncode == errors.EXIT_NOTHING_TO_DO
    assert done.stderr.splitlines()[-1] == (
        f"fdf-download: error: {meta}: no record to download (0 kept of 1 records; dropped: 1 by the license "
        "filter (arr=1), 0 videos, 0 without URL); check --metadata and --allowed_licenses, or pass "
        "--allow_empty true")


def test_missing_checkpoint_names_the_flag_and_the_variable(assets, tmp_path):
    done = _script("eval.cli", "anonymize", assets / "corpus" / "photos" / PHOTO, tmp_path / "out.jpg",
                   "--checkpoint", tmp_path / "nope.ckpt")
    assert done.returncode == errors.EXIT_INPUT
    assert _error_line(done) == (
        "anonymize: error: generator checkpoint (a training checkpoint, e.g. <run_dir>/checkpoints/final.ckpt, "
        "or an exported model) not found. Give it with --checkpoint PATH or the environment variable FDF_GENERATOR_CHECKPOINT. "
        f"Tried: flag --checkpoint: {tmp_path / 'nope.ckpt'}")


def test_input_that_is_not_a_photo_is_blamed_not_the_output(capsys, tmp_path):
    (tmp_path / "notes.txt").write_text("not a photo")
    done = _in_process(capsys, anonymize_main, "anonymize", tmp_path / "notes.txt", tmp_path / "out.txt")
    assert done.returncode == errors.EXIT_INPUT
    assert _error_line(done).startswith(f"anonymize: error: input {tmp_path / 'notes.txt'}: not a photo (.jpg")


def test_anonymize_of_an_empty_folder_is_nothing_to_do(capsys, tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "notes.txt").write_text("not a photo")
    done = _in_process(capsys, anonymize_main, "anonymize", tmp_path / "in", tmp_path / "out")
    assert done.returncode == errors.EXIT_NOTHING_TO_DO
    assert _error_line(done) == (f"anonymize: error: input {tmp_path / 'in'}: no photo (.jpg, .jpeg, .png, .webp, "
                                 ".bmp, .tif, .tiff) or video in the folder (1 other files); check the path, "
                                 "or pass --allow_empty true")


def test_anonymize_folder_writes_every_readable_photo_and_lists_the_rest(assets, tmp_path):
    src = tmp_path / "in"
    (src / "sub").mkdir(parents=True)
    good = (assets / "corpus" / "photos" / PHOTO).read_bytes()
    (src / "a.jpg").write_bytes(good)
    (src / "sub" / "b.jpg").write_bytes(good)
    (src / "sub" / "broken.jpg").write_bytes(good[:200])  # a cut download
    (src / "empty.png").write_bytes(b"")
    done = _script("eval.cli", "anonymize", src, tmp_path / "out", "--method", "blackout", "--progress", "false")
    assert done.returncode == errors.EXIT_SKIPPED, done.stderr[-3000:]
    summary = json.loads(done.stdout.splitlines()[-1])
    assert summary["written"] == 2 and summary["images"] == 2
    assert [s["file"] for s in summary["skipped"]] == [str(src / "empty.png"), str(src / "sub" / "broken.jpg")]
    assert all("not a readable image" in s["reason"] for s in summary["skipped"])
    assert (tmp_path / "out" / "a.jpg").is_file() and (tmp_path / "out" / "sub" / "b.jpg").is_file()
    assert not (tmp_path / "out" / "sub" / "broken.jpg").exists()
    lines = done.stderr.splitlines()
    assert f"anonymize: warning: skipped {src / 'sub' / 'broken.jpg'}: not a readable image" in done.stderr
    assert lines[-1].startswith(f"anonymize: error: 2 of 4 files skipped, the other 2 written to {tmp_path / 'out'}; "
                                f"first: {src / 'empty.png'}: not a readable image")


def test_pipeline_ends_with_status_5_when_its_anonymize_stage_skipped_files(capsys, tiny_run, assets, tmp_path):
    work, src = tmp_path / "work", tmp_path / "in"
    work.mkdir()
    src.mkdir()
    good = (assets / "corpus" / "photos" / PHOTO).read_bytes()
    (src / "a.jpg").write_bytes(good)
    (src / "broken.jpg").write_bytes(good[:200])
    done = _in_process(capsys, pipeline_main, "fdf-pipeline", "--workdir", work, "--stages", "[anonymize]",
                       "--anonymize_input", src, "--anonymize_checkpoint", tiny_run / "checkpoints" / "final.ckpt",
                       "--progress", "false")
    assert done.returncode == errors.EXIT_SKIPPED, done.stderr[-3000:]
    assert done.stderr.splitlines()[-1].startswith(
        f"fdf-pipeline: error: anonymize stage: 1 files skipped, first: {src / 'broken.jpg'}: not a readable image")
    assert (work / "anonymized" / "in_anonymized" / "a.jpg").is_file()


def test_wider_ap_warns_about_images_without_detection_files_and_fails_when_strict(capsys, assets, tmp_path):
    from eval import wider
    gt = wider.load_wider_gt()
    names = gt.names[:2]  # the ground truth as detections, for two of the 3,226 images
    wider.write_detections(tmp_path / "pred", {n: np.column_stack([gt.boxes_xyxy(gt.index(n)),
                                                                   np.ones(len(gt.boxes[gt.index(n)]))])
                                               for n in names})
    args = ["--pred_dir", tmp_path / "pred", "--output", tmp_path / "ap.json"]
    warned = _in_process(capsys, wider_main, "fdf-wider-ap", *args)
    assert warned.returncode == 0, warned.stderr[-3000:]
    message = (f"{len(gt.names) - 2} of {len(gt.names)} WIDER FACE val images have no detection file in "
               f"{tmp_path / 'pred'} (first: {Path(gt.names[2]).with_suffix('.txt')}); they count as images "
               "without detections, so a truncated run gives a low AP")
    assert warned.stderr.splitlines() == [f"fdf-wider-ap: warning: {message} (--strict true makes this an error)"]
    assert json.loads(warned.stdout)["images_without_detections"] == len(gt.names) - 2
    strict = _in_process(capsys, wider_main, "fdf-wider-ap", *args, "--strict", "true")
    assert strict.returncode == errors.EXIT_INPUT
    assert _error_line(strict) == f"fdf-wider-ap: error: {message}"


# ------------------------------------------------------------------ the policy itself, in process
def _fails_with(exc: BaseException):
    def main(argv):
        raise exc
    return main


def test_a_bug_shows_its_traceback(capsys):
    assert run_main(_fails_with(RuntimeError("index out of step")), "fdf-x", []) == errors.EXIT_BUG
    err = capsys.readouterr().err
    assert err.startswith("Traceback") and "RuntimeError: index out of step" in err
    assert err.splitlines()[-1].startswith("fdf-x: internal error (a bug")


def test_user_errors_are_one_line_unless_debugging(capsys, monkeypatch):
    monkeypatch.delenv("FDF_DEBUG", raising=False)
    main = _fails_with(errors.MissingInputError("--input_dir x: no such folder"))
    assert run_main(main, "fdf-x", []) == errors.EXIT_INPUT
    assert capsys.readouterr().err == "fdf-x: error: --input_dir x: no such folder\n"
    assert run_main(main, "fdf-x", ["--debug"]) == errors.EXIT_INPUT
    err = capsys.readouterr().err
    assert err.startswith("Traceback") and err.endswith("fdf-x: error: --input_dir x: no such folder\n")
    monkeypatch.setenv("FDF_DEBUG", "1")
    assert run_main(main, "fdf-x", []) == errors.EXIT_INPUT
    assert capsys.readouterr().err.startswith("Traceback")


def test_debug_flag_is_removed_before_the_stage_sees_it_but_not_after_a_double_dash():
    seen = []
    assert run_main(seen.append, "fdf-x", ["--a", "1", "--debug", "--", "--debug"]) == 0
    assert seen == [["--a", "1", "--", "--debug"]]


@pytest.mark.parametrize("exc,code,line", [
    (KeyboardInterrupt(), errors.EXIT_INTERRUPTED, "fdf-x: interrupted"),
    (PermissionError(13, "Permission denied", "/root/out"), errors.EXIT_INPUT,
     "fdf-x: error: [Errno 13] Permission denied: '/root/out'"),
    (errors.NothingToDoError("nothing"), errors.EXIT_NOTHING_TO_DO, "fdf-x: error: nothing"),
    (errors.SkippedItemsError("2 skipped"), errors.EXIT_SKIPPED, "fdf-x: error: 2 skipped"),
])
def test_exit_codes(capsys, monkeypatch, exc, code, line):
    monkeypatch.delenv("FDF_DEBUG", raising=False)
    assert run_main(_fails_with(exc), "fdf-x", []) == code
    assert capsys.readouterr().err == line + "\n"


def test_every_console_script_goes_through_the_policy():
    """setup.cfg's scripts are all `console_main` wrappers, defined in the stage whose `main(argv)` they run."""
    import importlib
    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    scripts = dict(line.split(" = ") for line in cfg["options.entry_points"]["console_scripts"].strip().splitlines())
    assert len(scripts) == 12
    for name, target in scripts.items():
        module, _, attr = target.partition(":")
        entry = getattr(importlib.import_module(module), attr)
        assert entry.prog == name
        main_module, _, main_name = entry.target.partition(":")
        assert main_module.split(".")[0] == module.split(".")[0]  # beside what it runs
        assert callable(getattr(importlib.import_module(main_module), main_name or "main"))
