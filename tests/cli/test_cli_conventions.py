"""What a new user types first: --version, -h, bad ports; and quantized builds over their fidelity budget
(exit 0, said in --json; exit 1 with --strict)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from graphopt import __version__
from graphopt.build import quant as quant_build
from graphopt.cli.main import main
from serving_artifact import tiny_artifact
from tiny_models import make_tiny_model


def test_version_and_short_help() -> None:
    result = CliRunner().invoke(main, ["--version"])
    assert result.exit_code == 0 and result.stdout.strip() == f"graphopt {__version__}"
    for args in (["-h"], ["build", "-h"], ["serve", "-h"]):
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 0 and result.stdout.startswith("Usage: "), args


@pytest.mark.parametrize(("flag", "value"), [("--port", "99999"), ("--port", "-1"), ("--header-timeout", "0"),
                                             ("--body-timeout", "-5"), ("--max-connections", "0")])
def test_serve_refuses_bad_limits_in_one_line(flag: str, value: str) -> None:
    result = CliRunner().invoke(main, ["serve", str(tiny_artifact()), flag, value])
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1 and lines[0].startswith(f"error: {flag} {value} is invalid")


@pytest.mark.integration
def test_int8_over_budget_says_so_in_json_and_strict_exits_1(tmp_path: Path, monkeypatch) -> None:
    hf = make_tiny_model("llama", tmp_path / "hf")
    monkeypatch.setitem(quant_build.BUDGETS, "int8", (-1.0, None))  # every KL misses a negative ceiling
    plain = CliRunner().invoke(main, ["build", str(hf), "--int8", "--json", "-o", str(tmp_path / "a")])
    assert plain.exit_code == 0, plain.output[-2000:]
    report = json.loads(plain.stdout)
    assert report["within_budget"] is False and report["fidelity"]["budget"]["misses"]
    strict = CliRunner().invoke(main, ["build", str(hf), "--int8", "--json", "--strict", "-o", str(tmp_path / "b")])
    assert strict.exit_code == 1 and "over its fidelity budget" in strict.stderr
    assert json.loads(strict.stdout)["within_budget"] is False and (tmp_path / "b" / "manifest.json").is_file()
