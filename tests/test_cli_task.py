"""``guidekit demo --task``: inverse problems on the digits model (no guidance vs DPS vs DSG) end to end on a
tiny setting, and its input errors named before any sampling; the zoo's problems and the classifier loss."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from cli_helpers import one_error_line, run_cli

import guidekit as gk
from guidekit.cli import main
from guidekit.losses import ClassifierLoss
from guidekit.zoo.inverse import held_out, make_problem

PNG = b"\x89PNG\r\n\x1a\n"


def test_demo_task_writes_measurement_grid_and_metrics(tmp_path: Path) -> None:
    out = tmp_path / "sr"
    assert main(["demo", "--task", "sr", "--out", str(out), "--per-class", "1", "--steps", "3", "-q"]) == 0
    meta = json.loads((out / "metrics.json").read_text())
    assert meta["task"] == "sr" and meta["steps"] == 3 and meta["digits"] == 10
    assert [r["label"] for r in meta["rows"]] == ["none", "dps ζ=3", "dsg g_r=0.5"]
    assert all(r["nfe"] == 3 and 0 <= r["consistency"] <= 1 and r["psnr"] > 0 for r in meta["rows"])
    saved = torch.load(out / "measurement.pt")
    assert saved["measurement"].shape == (10, 1, 4, 4) and saved["truth"].shape == (10, 1, 8, 8)
    for name in ("grid.png", "measurement.png"):
        assert (out / name).read_bytes()[:8] == PNG
    assert "psnr_missing" in (out / "metrics.txt").read_text()
    # a second run into the same folder needs --force, like every demo
    assert main(["demo", "--task", "inpaint", "--only", "dsg", "--out", str(out), "--per-class", "1",
                 "--steps", "2", "-q", "--force"]) == 0  # fmt: skip
    assert [r["label"] for r in json.loads((out / "metrics.json").read_text())["rows"]] == ["dsg g_r=0.5"]


@pytest.fixture
def no_sampling(monkeypatch: pytest.MonkeyPatch) -> None:
    def started(*args: object, **kwargs: object) -> None:
        raise AssertionError("sampling started before the inputs were checked")

    monkeypatch.setattr("guidekit.zoo.inverse.write_demo", started)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--task", "inpant"], "--task: expected one of inpaint, inpaint-random, sr, got 'inpant'; did you mean"),
        (["--task", "deblur"], "--task: expected one of inpaint, inpaint-random, sr, got 'deblur'"),
        (["--task", "sr", "--video"], "--task: expected no --video"),
        (["--task", "sr", "--per-class", "36"], "--per-class: expected an integer in [1, 35]"),
        (["--task", "sr", "--only", "dps", "cfg"], "--only: expected names among none, dps, dsg with --task, got cfg"),
        (["--task", "sr", "--sampler", "euler"], "--sampler: expected the default 'ddim' with --task"),
        (["--task", "sr", "--steps", "0"], "--steps: expected an integer >= 1, got 0"),
    ],
)
def test_demo_task_errors_are_one_line_before_any_work(
    argv: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], no_sampling: None
) -> None:
    code, _, err = run_cli(["demo", *argv, "--out", str(tmp_path / "o")], capsys)
    assert code == 2
    one_error_line(err, message)
    assert not (tmp_path / "o").exists()


def test_problems_measure_what_their_task_says() -> None:
    truth, labels = held_out(2)
    box = make_problem("inpaint", truth, labels)
    assert box.null_dim == 16 and torch.equal(box.null_part(truth)[..., :2, :], torch.zeros(20, 1, 2, 8))
    sr = make_problem("sr", truth, labels)
    assert sr.measurement.shape == (20, 1, 4, 4) and sr.null_dim == 48
    assert torch.allclose(sr.operator(sr.null_part(truth)), torch.zeros(20, 1, 4, 4), atol=1e-6)  # in A's null space
    assert sr.loss(truth, None).mean() < 0.05 * 4 * 1.5  # the truth sits at the noise level
    with pytest.raises(gk.ConfigError, match="task: expected one of inpaint, inpaint-random, sr, got 'blur'"):
        make_problem("blur", truth, labels)


def test_classifier_loss_with_wrong_logits_is_named() -> None:
    x0 = torch.zeros(3, 1, 8, 8, requires_grad=True)
    with pytest.raises(gk.ShapeError, match=r"classifier: expected \(b, classes\) logits for b = 3, got \(3,\)"):
        ClassifierLoss(lambda x: x.flatten(1).sum(1), target=0)(x0, None)
