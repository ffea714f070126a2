"""Where outputs may go: a parent that is a file, --force on folders that are not ours, and
temporaries left behind by a killed run (issue 14, items 9, 11 and 12)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from llmrank.cli import build_parser, main
from llmrank.exporters import atomic
from llmrank.exporters.atomic import OutputPathError, UnsafeOverwriteError, atomic_files, atomic_path, check_writable


def names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def write_folder(tmp: Path, text: str) -> None:
    tmp.mkdir()
    (tmp / "report.json").write_text(json.dumps({"run": text}))


# ---------------------------------------------------------------- item 9: --out under a regular file


@pytest.mark.parametrize("below", ["out", "a/b/out"])
def test_out_under_a_regular_file_is_a_path_error(tmp_path, below):
    blocker = tmp_path / "notes.txt"
    blocker.write_text("mine")
    target = blocker / below
    for force in (False, True, 2):
        with pytest.raises(OutputPathError, match="notes.txt is a file, not a folder") as err:
            check_writable(target, force)
        assert isinstance(err.value, ValueError) and not isinstance(err.value, FileExistsError)
        assert "--force" not in str(err.value) + err.value.hint
    with pytest.raises(OutputPathError):
        with atomic_path(target):
            pass
    assert blocker.read_text() == "mine" and names(tmp_path) == ["notes.txt"]


def test_cli_out_under_a_file_does_not_suggest_force(tmp_path, capsys):
    blocker = tmp_path / "notes.txt"
    blocker.write_text("mine")
    # refused before any loading (the model path does not exist, so a regression fails fast, with another message)
    assert main(["prune", str(tmp_path / "no-model"), "--out", str(blocker / "slim")]) == 2
    err = capsys.readouterr().err
    assert "notes.txt is a file" in err and "--force" not in err and "Traceback" not in err


# ---------------------------------------------------------------- item 11: --force on a folder that is not ours


def test_force_replaces_an_llmrank_output(tmp_path):
    out = tmp_path / "slim"
    for run in ("first", "second"):
        with atomic_path(out, force=True) as tmp:
            write_folder(tmp, run)
    assert json.loads((out / "report.json").read_text()) == {"run": "second"}


def test_force_once_refuses_a_folder_without_report_json(tmp_path):
    out = tmp_path / "photos"
    out.mkdir()
    (out / "holiday.jpg").write_bytes(b"precious")
    with pytest.raises(UnsafeOverwriteError, match="--force --force") as err:
        with atomic_path(out, force=True) as tmp:
            write_folder(tmp, "x")
    assert isinstance(err.value, FileExistsError) and "report.json" in str(err.value)
    assert names(out) == ["holiday.jpg"] and names(tmp_path) == ["photos"]  # untouched, no temporary left
    with atomic_path(out, force=2) as tmp:  # --force --force: really replace it
        write_folder(tmp, "x")
    assert names(out) == ["report.json"]


def test_what_counts_as_an_llmrank_output(tmp_path):
    hf = tmp_path / "hf"  # a save_hf folder: config.json with an llmrank entry
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps({"model_type": "llama", "llmrank": {"metadata": {}}}))
    stock = tmp_path / "stock"  # somebody's own model folder
    stock.mkdir()
    (stock / "config.json").write_text(json.dumps({"model_type": "llama"}))
    empty = tmp_path / "empty"
    empty.mkdir()
    for path in (tmp_path / "model.onnx", tmp_path / "model.onnx.data", tmp_path / "notes.txt"):
        path.write_bytes(b"x")
    assert check_writable(hf, True) == hf and check_writable(empty, True) == empty
    assert check_writable(tmp_path / "model.onnx", True) and check_writable(tmp_path / "model.onnx.data", True)
    for path in (stock, tmp_path / "notes.txt"):
        with pytest.raises(UnsafeOverwriteError):
            check_writable(path, True)
        assert check_writable(path, 2) == path
    with pytest.raises(FileExistsError, match="--force"):
        check_writable(hf, False)


def test_cli_force_is_counted_and_documented(tmp_path, capsys):
    parser = build_parser()
    assert parser.parse_args(["prune", "m", "--out", "o"]).force == 0
    assert parser.parse_args(["prune", "m", "--out", "o", "--force"]).force == 1
    assert parser.parse_args(["prune", "m", "--out", "o", "--force", "--force"]).force == 2
    assert parser.parse_args(["export", "ckpt", "--out", "o.onnx", "--force", "--force"]).force == 2
    with pytest.raises(SystemExit):
        main(["prune", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "deleted" in text and "report.json" in text and "--force --force" in text
    # a folder of someone else's files survives a single --force, before any model is loaded
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    assert main(["prune", str(tmp_path / "no-model"), "--out", str(mine), "--force"]) == 2
    err = capsys.readouterr().err
    assert "--force --force" in err and (mine / "thesis.tex").read_text() == "years of work"


# ---------------------------------------------------------------- item 12: temporaries of killed runs


def test_sigkilled_run_leaves_a_temporary_that_the_next_run_removes(tmp_path):
    out = tmp_path / "slim"
    script = textwrap.dedent(f"""
        import os, signal
        from pathlib import Path
        from llmrank.exporters.atomic import atomic_path
        with atomic_path(Path({str(out)!r})) as tmp:
            tmp.mkdir()
            (tmp / "report.json").write_text("partial")
            os.kill(os.getpid(), signal.SIGKILL)
    """)
    proc = subprocess.run([sys.executable, "-c", script])
    assert proc.returncode == -9
    (left,) = names(tmp_path)
    assert left.startswith(".slim.tmp-") and str(proc.returncode) and not out.exists()
    with atomic_path(out) as tmp:
        write_folder(tmp, "next")
    assert names(tmp_path) == ["slim"]


def test_only_stale_temporaries_of_the_same_target_are_removed(tmp_path):
    out = tmp_path / "slim"
    gone = dead_pid()
    host = atomic._host_tag()
    stale = [f".slim.tmp-{host}-{gone}-0123abcd", f".model.onnx.tmp-{host}-{gone}-0123abcd"]
    kept = [
        f".slim.tmp-{host}-{os.getpid()}-0123abcd",   # this process: alive
        f".slim.tmp-{host}-{os.getppid()}-0123abcd",  # a live process
        f".slim.tmp-otherhost-{gone}-0123abcd",       # another machine's pid means nothing here
        f".slimmer.tmp-{host}-{gone}-0123abcd",       # another target
        ".slim.tmp-0123abcd",                          # no owner recorded: never guessed
        f"slim.tmp-{host}-{gone}-0123abcd",           # not hidden: a user's file
        "notes.txt",
    ]
    for name in stale[:1] + kept:
        (tmp_path / name).mkdir()
        (tmp_path / name / "f").write_text("x")
    with atomic_path(out) as tmp:
        write_folder(tmp, "new")
    assert names(tmp_path) == sorted(kept + ["slim"])
    # atomic_files (the ONNX writer) cleans its own target's staging folders the same way
    (tmp_path / stale[1]).mkdir()
    with atomic_files([tmp_path / "model.onnx"]) as staging:
        (staging / "model.onnx").write_bytes(b"onnx")
    assert stale[1] not in names(tmp_path) and (tmp_path / "model.onnx").read_bytes() == b"onnx"


def test_a_run_killed_mid_swap_gets_the_previous_output_back(tmp_path):
    out = tmp_path / "slim"
    host = atomic._host_tag()
    aside = tmp_path / f".slim.old-{host}-{dead_pid()}-0123abcd"  # renamed aside, then killed
    write_folder(aside, "previous")
    assert atomic.remove_stale_temporaries(out) == []
    assert json.loads((out / "report.json").read_text()) == {"run": "previous"} and names(tmp_path) == ["slim"]
    write_folder(aside, "older")  # the new output is in place: the aside copy is just stale
    assert atomic.remove_stale_temporaries(out) == [aside]
    assert json.loads((out / "report.json").read_text()) == {"run": "previous"}
