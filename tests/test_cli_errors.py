"""The ``guidekit`` command's errors: a user error exits 2 with one line (``guidekit: error: ...``) naming the
argument, before any work starts (issue 18, defects 3 and 10); a missing extra is named with its install
command, by the command and by the benchmark scripts; argparse's own errors exit 2 too."""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

import pytest
from cli_helpers import one_error_line, run_cli

from guidekit.cli import main

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def no_work(monkeypatch: pytest.MonkeyPatch) -> None:
    """Sampling, the video demo and training fail the test if they start: every check must come first."""

    def started(*args: object, **kwargs: object) -> None:
        raise AssertionError("work started before the inputs were checked")

    monkeypatch.setattr("guidekit.zoo.report.run_comparison", started)
    monkeypatch.setattr("guidekit.zoo.video.demo.run_video_demo", started)
    monkeypatch.setattr("guidekit.zoo.train.train_classifier", started)


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
    one_error_line(captured.err, message)
    assert captured.out == "" and not (tmp_path / "o").exists()


def test_binary_spec_file_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    spec = tmp_path / "image.json"
    spec.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00")
    assert main(["compare", "--spec", str(spec), "--out", str(tmp_path / "o"), "-q"]) == 2
    one_error_line(capsys.readouterr().err, f"--spec: expected a UTF-8 JSON or TOML file, got {str(spec)!r}")


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
    one_error_line(
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
        ("bench_loss_guidance.py", ["--per-class", "1", "--no-doc"]),
        ("bench_perturbation.py", ["--per-class", "1", "--no-write"]),
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


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["compare", "-s", "cgf:scale=3"], "unknown strategy 'cgf'; did you mean 'cfg'?"),
        (["compare", "-s", "cfg:scale=abc"], "strategy[cfg].scale: Input should be a valid number (got 'abc')"),
        (["compare", "-s", "cfg:scale"], "expected key=value after 'cfg:', got 'scale'"),
        (["compare", "-s", "{not json"], "--strategy: expected a JSON spec"),
        (["compare", "--spec", "/nonexistent/spec.json"], "spec file: cannot read '/nonexistent/spec.json'"),
        (["compare"], "expected at least one --strategy or --spec, got none"),
        (["compare", "-s", "cfg", "--sampler", "eulr"], "unknown sampler 'eulr'; did you mean 'euler'?"),
        (["compare", "-s", "cfg", "--steps", "0"], "steps: expected an integer >= 1, got 0"),
        (["demo", "--only", "samgg"], "unknown strategy 'samgg'; did you mean 'samg'?"),
    ],
)
def test_user_errors_exit_2_with_a_message(
    argv: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run_cli([*argv, "--out", str(tmp_path / "o"), "-q"], capsys)
    assert code == 2 and out == ""
    assert err.startswith("guidekit: error: ") and message in err
    assert "Traceback" not in err


def test_bad_spec_file_and_unwritable_output_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text("{oops")
    code, _, err = run_cli(["compare", "--spec", str(bad), "--out", str(tmp_path / "o"), "-q"], capsys)
    assert code == 2 and "expected valid JSON" in err and str(bad) in err
    blocker = tmp_path / "file"
    blocker.write_text("")
    code, _, err = run_cli(["compare", "-s", "cfg", "--out", str(blocker / "sub"), "-q"], capsys)
    assert code == 2 and "--out: expected a folder that can be written" in err and str(blocker / "sub") in err


def test_argparse_errors_also_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["compare", "--model", "mnist"])
    assert exc.value.code == 2 and "invalid choice: 'mnist'" in capsys.readouterr().err
