"""The ``guidekit`` command under bad inputs and faults (issue 18): one-line errors before any work, and
output folders that hold the previous complete run or the new one, never a mix."""

from __future__ import annotations

import errno
import json
import os
import runpy
import signal
import sys
from pathlib import Path

import pytest

from guidekit.cli import main

ROOT = Path(__file__).resolve().parent.parent
MANIFEST = ".guidekit-run.json"  # guidekit.zoo.MANIFEST, spelled out: the tests must import on old code
GMM = ["compare", "--model", "gmm", "--per-class", "2", "--steps", "2", "-q"]


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def _leftovers(folder: Path) -> list[str]:
    """Staging or set-aside folders of a run left beside ``folder``."""
    return [p.name for p in folder.parent.iterdir() if p.name.startswith(f".{folder.name}.")]


def _one_error_line(err: str, message: str) -> None:
    assert err.startswith("guidekit: error: ") and err.count("\n") == 1, err
    assert message in err and "Traceback" not in err


@pytest.fixture
def no_work(monkeypatch: pytest.MonkeyPatch) -> None:
    """Sampling, the video demo and training fail the test if they start: every check must come first."""

    def started(*args: object, **kwargs: object) -> None:
        raise AssertionError("work started before the inputs were checked")

    monkeypatch.setattr("guidekit.zoo.report.run_comparison", started)
    monkeypatch.setattr("guidekit.zoo.video.demo.run_video_demo", started)
    monkeypatch.setattr("guidekit.zoo.train.train_classifier", started)


@pytest.fixture
def earlier_run(tmp_path: Path) -> Path:
    """A folder with a complete SAMG run (it has a scale-map figure) and a file of the user's."""
    out = tmp_path / "run"
    assert main([*GMM, "-s", "samg:w=2", "--out", str(out)]) == 0
    (out / "notes.txt").write_text("mine")
    assert (out / "scale-maps-samg.png").exists()
    return out


# -- defect 2: atomic output ---------------------------------------------------------------------------
def test_rerun_needs_force_then_replaces_only_the_earlier_run(
    earlier_run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert (earlier_run / MANIFEST).exists()
    before = _snapshot(earlier_run)
    capsys.readouterr()
    assert main([*GMM, "-s", "cfg:scale=3", "--out", str(earlier_run)]) == 2
    _one_error_line(capsys.readouterr().err, "expected a folder without an earlier run (pass --force to replace it)")
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
    _one_error_line(capsys.readouterr().err, "--out: expected to write the run into")
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


# -- defect 3 and 10: user errors end in one line, before any work -------------------------------------
@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["compare", "-s", "cfg", "--seeds", str(2**70)],
            f"--seeds: expected integers in [0, 2**32 - 1 = {2**32 - 1}], got {2**70}",
        ),
        (["demo", "--seeds", "-1"], "--seeds: expected integers in [0, 2**32 - 1"),
        (["demo", "--video", "--steps", "0"], "--steps: expected an integer >= 1, got 0"),
        (["demo", "--per-class", "-3"], "--per-class: expected an integer >= 1, got -3"),
        (["compare", "-s", "cfg:scale=3,scale=4"], "--strategy: expected each key once, got 'scale' twice"),
        (["compare", "-s", '{"name": "cfg", "params": {"scale": 3, "scale": 4}}'], "got 'scale' twice"),
        (["compare", "-s", "cfg", "--out", ""], "--out: expected a folder path, got ''"),
        (["demo", "--out", " "], "--out: expected a folder path, got ' '"),
        (["demo", "--video", "--out", "/proc/guidekit-out"], "--out: expected a folder that can be written"),
        (["compare", "-s", "cfg", "--out", "/proc/guidekit-out"], "--out: expected a folder that can be written"),
        (["compare", "-s", "cfg", "--out", "/proc"], "--out: expected a folder that can be written, got '/proc'"),
        (["train", "--steps", "-5", "--classifier-epochs", "1"], "--steps: expected an integer >= 1, got -5"),
        (["train", "--weak-steps", "0", "--classifier-epochs", "1"], "--weak-steps: expected an integer >= 1, got 0"),
        (["train", "--out", "/proc/guidekit-ckpt", "--classifier-epochs", "1"], "--out: expected a folder that"),
        (["train", "--out", "", "--classifier-epochs", "1"], "--out: expected a folder path, got ''"),
    ],
)
def test_user_errors_are_one_line_before_any_work(
    argv: list[str], message: str, tmp_path: Path, no_work: None, capsys: pytest.CaptureFixture[str]
) -> None:
    if "--out" not in argv:
        argv = [*argv, "--out", str(tmp_path / "o")]
    assert main(argv if argv[0] == "train" else [*argv, "-q"]) == 2
    captured = capsys.readouterr()
    _one_error_line(captured.err, message)
    assert captured.out == "" and not (tmp_path / "o").exists()


def test_binary_spec_file_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    spec = tmp_path / "image.json"
    spec.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00")
    assert main(["compare", "--spec", str(spec), "--out", str(tmp_path / "o"), "-q"]) == 2
    _one_error_line(capsys.readouterr().err, f"--spec: expected a UTF-8 JSON or TOML file, got {str(spec)!r}")


@pytest.mark.parametrize(
    ("argv", "module", "package"),
    [
        (["demo"], "matplotlib", "matplotlib"),
        (["demo"], "sklearn", "scikit-learn"),
        (["compare", "-s", "cfg"], "matplotlib", "matplotlib"),
        (["demo", "--video"], "PIL", "pillow"),
        (["train", "--classifier-epochs", "1"], "sklearn", "scikit-learn"),
    ],
)
def test_missing_extra_is_named_before_any_work(
    argv: list[str],
    module: str,
    package: str,
    tmp_path: Path,
    no_work: None,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setitem(sys.modules, module, None)  # `import module` now raises ModuleNotFoundError
    assert main([*argv, "--out", str(tmp_path / "o")]) == 2
    _one_error_line(
        capsys.readouterr().err, f"got {package} not installed; install it with: pip install 'guidekit[demo]'"
    )
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    ("script", "argv"),
    [
        ("bench_quality.py", ["--per-class", "1"]),
        ("bench_samg.py", ["quality"]),
        ("bench_catalogue.py", ["quality"]),
        ("bench_video.py", ["--per-class", "1"]),
    ],
)
def test_benchmarks_name_missing_scikit_learn(
    script: str, argv: list[str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "sklearn", None)
    monkeypatch.setattr(sys, "argv", [script, *argv])
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    with pytest.raises(SystemExit) as exc:
        runpy.run_path(str(ROOT / "benchmarks" / script), run_name="__main__")
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.startswith(f"benchmarks/{script}") and err.count("\n") == 1
    assert "scikit-learn not installed; install it with: pip install 'guidekit[demo]'" in err
