"""The output folder of a ``guidekit`` run (issue 18, defect 2): it holds the previous complete run or the new
one, never a mix: a rerun needs --force and replaces only the earlier run's files; Ctrl-C, a full disk or a
failed move keep the previous run; a link to an empty folder is a valid --out."""

from __future__ import annotations

import errno
import json
import os
import signal
from pathlib import Path

import pytest
from cli_helpers import one_error_line

from guidekit.cli import main

MANIFEST = ".guidekit-run.json"  # guidekit.zoo.MANIFEST, spelled out: the tests must import on old code
GMM = ["compare", "--model", "gmm", "--per-class", "2", "--steps", "2", "-q"]


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def _leftovers(folder: Path) -> list[str]:
    """Staging or set-aside folders of a run left beside ``folder``."""
    return [p.name for p in folder.parent.iterdir() if p.name.startswith(f".{folder.name}.")]


@pytest.fixture
def earlier_run(tmp_path: Path) -> Path:
    """A folder with a complete SAMG run (it has a scale-map figure) and a file of the user's."""
    out = tmp_path / "run"
    assert main([*GMM, "-s", "samg:w=2", "--out", str(out)]) == 0
    (out / "notes.txt").write_text("mine")
    assert (out / "scale-maps-samg.png").exists()
    return out


def test_rerun_needs_force_then_replaces_only_the_earlier_run(
    earlier_run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert (earlier_run / MANIFEST).exists()
    before = _snapshot(earlier_run)
    capsys.readouterr()
    assert main([*GMM, "-s", "cfg:scale=3", "--out", str(earlier_run)]) == 2
    one_error_line(capsys.readouterr().err, "expected a folder without an earlier run (pass --force to replace it)")
    assert _snapshot(earlier_run) == before
    assert main([*GMM, "-s", "cfg:scale=3", "--out", str(earlier_run), "--force"]) == 0
    names = set(_snapshot(earlier_run))
    assert "scale-maps-samg.png" not in names  # nothing of the SAMG run is left beside the CFG run
    assert (earlier_run / "notes.txt").read_text() == "mine"
    meta = json.loads((earlier_run / "metrics.json").read_text())
    assert [s["label"] for s in meta["strategies"]] == ["cfg scale=3"]
    manifest = json.loads((earlier_run / MANIFEST).read_text())["files"]
    assert names == {*manifest, MANIFEST, "notes.txt"}
    assert not _leftovers(earlier_run)


def test_ctrl_c_while_writing_keeps_the_previous_run(
    earlier_run: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    before = _snapshot(earlier_run)

    def interrupted(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr("guidekit.zoo.report.frontier_plot", interrupted)  # after metrics.csv and .json
    assert main([*GMM, "-s", "cfg:scale=3", "--out", str(earlier_run), "--force"]) == 130
    assert capsys.readouterr().err == "guidekit: interrupted\n"
    assert _snapshot(earlier_run) == before and not _leftovers(earlier_run)


def test_out_may_be_a_link_to_an_empty_folder(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "link").symlink_to(real)
    assert main([*GMM, "-s", "cfg", "--out", str(tmp_path / "link")]) == 0
    assert (tmp_path / "link").is_symlink() and (real / "metrics.json").exists()


def test_ctrl_c_while_writing_a_first_run_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def interrupted(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr("guidekit.zoo.report.image_grid", interrupted)
    out = tmp_path / "new"
    assert main([*GMM, "-s", "cfg", "--out", str(out)]) == 130
    assert not out.exists() and not _leftovers(out)


def test_full_disk_is_one_line_and_keeps_the_previous_run(
    earlier_run: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    before = _snapshot(earlier_run)

    def full(*args: object, **kwargs: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("guidekit.zoo.report.image_grid", full)
    capsys.readouterr()
    assert main([*GMM, "-s", "cfg", "--out", str(earlier_run), "--force"]) == 2
    one_error_line(capsys.readouterr().err, "--out: expected to write the run into")
    assert _snapshot(earlier_run) == before and not _leftovers(earlier_run)


def test_a_failure_while_moving_the_files_in_is_rolled_back(
    earlier_run: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from guidekit.zoo import output

    before = _snapshot(earlier_run)
    real_replace, calls = output.os.replace, []

    def flaky(src: str | Path, dst: str | Path) -> None:
        calls.append(dst)
        if len(calls) == 9:  # the earlier run moved aside, some of the new files moved in
            raise OSError(errno.EIO, "Input/output error", str(dst))
        real_replace(src, dst)

    monkeypatch.setattr(output.os, "replace", flaky)
    capsys.readouterr()
    assert main([*GMM, "-s", "cfg", "--out", str(earlier_run), "--force"]) == 2
    assert "Input/output error" in capsys.readouterr().err
    assert len(calls) > 9 and _snapshot(earlier_run) == before and not _leftovers(earlier_run)


def test_ctrl_c_while_moving_the_files_in_waits_for_the_whole_run(
    earlier_run: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from guidekit.zoo import output

    real_replace, calls = output.os.replace, []

    def ctrl_c_once(src: str | Path, dst: str | Path) -> None:
        calls.append(dst)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGINT)  # a real Ctrl-C, in the middle of the moves
        real_replace(src, dst)

    monkeypatch.setattr(output.os, "replace", ctrl_c_once)
    assert main([*GMM, "-s", "cfg:scale=3", "--out", str(earlier_run), "--force"]) == 130
    manifest = json.loads((earlier_run / MANIFEST).read_text())["files"]
    assert set(_snapshot(earlier_run)) == {*manifest, MANIFEST, "notes.txt"}  # the new run, complete
    assert json.loads((earlier_run / "metrics.json").read_text())["strategies"][0]["label"] == "cfg scale=3"
    assert not _leftovers(earlier_run)
