"""Helpers for the ``guidekit`` command tests: run it and capture what it printed, and check that an error
is one line (``guidekit: error: ...``) with no traceback."""

from __future__ import annotations

import pytest

from guidekit.cli import main


def run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


def one_error_line(err: str, message: str) -> None:
    assert err.startswith("guidekit: error: ") and err.count("\n") == 1, err
    assert message in err and "Traceback" not in err
