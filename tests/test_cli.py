"""The ``guidekit`` command: demo, compare and train end to end (tiny settings), list, strategy parsing and
the installed console script. Its errors are in test_cli_errors.py, its output folders in test_cli_output.py."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from cli_helpers import run_cli
from hypothesis import given
from hypothesis import strategies as st

import guidekit as gk
from guidekit.cli import CLIError, main, parse_strategy

TINY = ["--per-class", "4", "--steps", "3", "-q"]


def test_demo_writes_table_grid_plot_and_scale_maps(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    code = main(["demo", "--out", str(out), "--only", "cfg", "apg", "interval", "samg", *TINY])
    assert code == 0
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    assert [r["family"] for r in rows] == ["cfg"] * 4 + ["apg"] * 3 + ["interval"] * 3 + ["samg"] * 3
    assert all(0.0 <= float(r["acc"]) <= 1.0 and float(r["fd_test"]) > 0 for r in rows)
    assert {float(r["nfe"]) for r in rows if r["family"] == "cfg"} == {3.0, 6.0}  # scale 1 skips uncond
    meta = json.loads((out / "metrics.json").read_text())
    assert meta["model"] == "digits" and meta["settings"]["steps"] == 3 and len(meta["summary"]) == 13
    assert gk.build(meta["strategies"][-1]["spec"]) == gk.SAMG(w=3.0)
    assert "strategy" in (out / "metrics.txt").read_text()
    for name in ("grid.png", "frontier.png", "scale-maps-samg.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (out / "scale-maps-cfg.png").exists()  # CFG's scale is not spatial


def test_demo_runs_every_registered_strategy(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["demo", "--out", str(tmp_path), "--per-class", "4", "--steps", "2"])
    captured = capsys.readouterr()
    assert code == 0
    families = {r["family"] for r in csv.DictReader((tmp_path / "metrics.csv").open())}
    assert {"cfg", "apg", "interval", "samg"} <= families
    lines = captured.out.splitlines()
    skipped = {line.split()[1].rstrip(":") for line in lines if line.startswith("  skipped")}
    failed = {line.split()[1] for line in lines if line.startswith("  failed")}
    assert families | skipped | failed == set(gk.strategies.names())
    assert not failed, captured.out  # every built-in sweep runs on the digits model


def test_compare_from_command_line_and_spec_files_on_the_gmm(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    toml = tmp_path / "samg.toml"
    toml.write_text('name = "samg"\n[params]\nw_min = 1.0\nw_max = 4.0\n')
    spec = tmp_path / "apg.json"
    spec.write_text(json.dumps(gk.to_spec(gk.APG(scale=3.0, norm_threshold=2.5)).model_dump()))
    argv = ["compare", "--model", "gmm", "-s", "cfg:scale=2", "-s", '{"name": "cfg", "params": {"scale": 4}}']
    argv += [
        "--spec",
        str(toml),
        "--spec",
        str(spec),
        "--sampler",
        "euler",
        "--out",
        str(tmp_path),
        "--seeds",
        "0",
        "1",
    ]
    code = main([*argv, "--per-class", "4", "--steps", "3"])
    assert code == 0
    assert "±" in capsys.readouterr().out  # two seeds: the spread is shown
    meta = json.loads((tmp_path / "metrics.json").read_text())
    assert [s["label"] for s in meta["strategies"]] == [
        "cfg scale=2",
        "cfg scale=4",
        "samg w_min=1 w_max=4",
        "apg scale=3 norm_threshold=2.5",
    ]
    assert meta["model"] == "gmm" and meta["settings"]["sampler"] == "euler"
    assert len(meta["runs"]) == 8 and all("ed" in r and "p_y" in r for r in meta["runs"])
    assert (tmp_path / "scale-maps-samg.png").exists()


def test_list_shows_every_group_with_origins(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(["list"], capsys)
    assert code == 0
    for group, registry in gk.REGISTRIES.items():
        assert f"{group} ({len(registry.names())}):" in out
        for name in registry.names():
            assert f"  {name} " in out
    assert "guidekit.strategies.cfg.CFG" in out
    if "perp-cfg" in gk.strategies.names():  # the example plugin, when installed
        assert "plugin guidekit_example" in out
    code, out, _ = run_cli(["list", "samplers", "-v"], capsys)
    assert code == 0 and "strategies (" not in out and "ddim" in out


@given(st.floats(-20, 20, allow_nan=False), st.sampled_from(["{!r}", "{:g}", "{:.3f}"]))
def test_parse_strategy_reads_key_values(scale: float, fmt: str) -> None:
    text = fmt.format(scale)
    assert parse_strategy(f"cfg:scale={text}") == gk.CFG(float(text))


@given(st.floats(0.1, 10), st.floats(0.0, 1.0), st.floats(0.3, 10))
def test_parse_strategy_round_trips_json_and_nested_key_values(w: float, eta: float, hi: float) -> None:
    for strategy in (gk.APG(scale=w, eta=eta), gk.Interval(gk.CFG(w), 0.0, hi), gk.SAMG(w_min=min(w, hi), w_max=hi)):
        assert parse_strategy(json.dumps(gk.to_spec(strategy).model_dump())) == strategy
    inner = json.dumps({"name": "cfg", "params": {"scale": w}})
    assert parse_strategy(f"interval:inner={inner},sigma_hi={hi!r}") == gk.Interval(gk.CFG(w), sigma_hi=hi)
    with pytest.raises(CLIError):
        parse_strategy("interval:sigma_hi")


def test_console_script_is_installed() -> None:
    code = (
        "from importlib.metadata import entry_points\n"
        "ep = entry_points(group='console_scripts')['guidekit']\n"
        "print(ep.value)\n"
        "raise SystemExit(ep.load()(['list', 'mappers']))"
    )
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[0] == "guidekit.cli:main" and "linear" in done.stdout


def test_train_writes_loadable_checkpoints(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from guidekit import zoo

    argv = ["train", "--out", str(tmp_path), "--steps", "2", "--weak-steps", "2", "--classifier-epochs", "1"]
    assert main([*argv, "--no-eval"]) == 0
    assert "held-out accuracy" in capsys.readouterr().out
    record = zoo.checkpoint_record("digits_denoiser", tmp_path)
    assert record["training_command"] == "python -m guidekit.zoo.train " + " ".join([*argv[1:], "--no-eval"])
    assert record["recipe"]["steps"] == 2 and "held_out" not in record
    model = zoo.load_denoiser(tmp_path)
    assert model.prediction == "eps" and not any(p.requires_grad for p in model.parameters())
    assert zoo.load_weak_denoiser(tmp_path).channels == (16, 32)
    with pytest.raises(SystemExit) as exc:
        main(["train", "--help"])
    assert exc.value.code == 0 and "--weak-steps" in capsys.readouterr().out
