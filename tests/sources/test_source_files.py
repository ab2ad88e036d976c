"""Truncated model files are one line naming the file (exit 2), not a traceback from a reader."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from graphopt.cli.main import main
from tiny_models import make_tiny_model


def _fails(args: list[str], *fragments: str) -> None:
    result = CliRunner().invoke(main, args)
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output[-2000:]
    assert lines[-1].startswith("error: ") and all(f in lines[-1] for f in fragments), lines


@pytest.mark.parametrize("keep", [0.5, 0.99, 4])
def test_truncated_safetensors(tmp_path: Path, keep: float) -> None:
    hf = make_tiny_model("llama", tmp_path / "hf")
    weights = hf / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: int(len(data) * keep)] if keep < 1 else data[:keep])
    _fails(["build", str(hf), "-o", str(tmp_path / "out")], "model.safetensors", "copy it again")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("data", [b"GGUF\x03\x00\x00\x00",  # magic + version only
                                  b"GGUF\x03\x00\x00\x00" + (5).to_bytes(8, "little") + (9).to_bytes(8, "little")
                                  + b"\x01\x00"])  # a header promising metadata that is not there
def test_truncated_gguf(tmp_path: Path, data: bytes, monkeypatch) -> None:
    monkeypatch.setenv("GRAPHOPT_CACHE", str(tmp_path / "cache"))  # a conversion attempt writes nothing elsewhere
    path = tmp_path / "x.gguf"
    path.write_bytes(data)
    _fails(["build", str(path), "-o", str(tmp_path / "out")], "x.gguf")
    assert not (tmp_path / "out").exists()
