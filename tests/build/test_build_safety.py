"""build -o / --force never destroys what is not a graphopt artifact, and a build killed with SIGKILL leaves
nothing behind that the next build into the same folder does not clean up."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from graphopt.build.artifact import BuildOptions, build
from graphopt.cli.main import main
from graphopt.passes.pipeline import load_recipe
from graphopt.core.progress import QUIET
from graphopt.build.staging import MARKER, sweep_leftovers
from tiny_models import make_tiny_model

TESTS = Path(__file__).resolve().parents[1]  # the shared helpers (tiny_models, ...)


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    return make_tiny_model("llama", tmp_path_factory.mktemp("safety") / "hf")


def _fails(args: list[str], *fragments: str) -> str:
    result = CliRunner().invoke(main, args)
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert lines[-1].startswith("error: ") and all(f in lines[-1] for f in fragments), lines
    return lines[-1]


def _tree(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): p.read_text() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("manifest", ['{"manifest_version": 3}', "null", "not json", '{"format": "other"}'])
def test_force_refuses_a_folder_whose_manifest_is_not_graphopts(source: Path, tmp_path: Path, manifest: str) -> None:
    out = tmp_path / "p"
    (out / "src").mkdir(parents=True)
    (out / "manifest.json").write_text(manifest)
    (out / "important.txt").write_text("keep")
    (out / "src" / "a.py").write_text("x = 1")
    before = _tree(out)
    _fails(["build", str(source), "-o", str(out), "--force"], str(out), "not a graphopt artifact")
    assert _tree(out) == before and sorted(p.name for p in tmp_path.iterdir()) == ["p"]


def test_output_that_is_a_file_is_refused(source: Path, tmp_path: Path) -> None:
    target = tmp_path / "model.bin"
    target.write_text("data")
    for extra in ([], ["--force"]):
        _fails(["build", str(source), "-o", str(target), *extra], str(target), "is a file")
    assert target.read_text() == "data" and [p.name for p in tmp_path.iterdir()] == ["model.bin"]


def _killed_build(source: Path, out: Path, moment: str) -> None:
    """Run a real build in a subprocess that SIGKILLs itself at ``moment``: 'staged' (the artifact is complete in
    its staging folder) or 'swapping' (the old artifact was moved aside, the new one not yet renamed)."""
    script = f"""
import os, signal, sys
sys.path.insert(0, {str(TESTS)!r})
from pathlib import Path
import graphopt.build.artifact as b
from graphopt.passes.pipeline import load_recipe
from graphopt.core.progress import QUIET

def die(staging, output):
    if {moment!r} == "swapping":
        os.replace(output, output.with_name(f".{{output.name}}.old-{{os.getpid()}}"))
    os.kill(os.getpid(), signal.SIGKILL)

b.swap_into_place = die
b.build({str(source)!r}, b.BuildOptions(load_recipe("ort-cpu"), Path({str(out)!r}), force=True), QUIET)
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=300)
    assert result.returncode == -signal.SIGKILL, result.stderr.decode()[-2000:]


def test_leftovers_of_a_killed_build_are_swept_by_the_next(source: Path, tmp_path: Path) -> None:
    out = tmp_path / "art"
    build(str(source), BuildOptions(load_recipe("ort-cpu"), out), QUIET)
    first = (out / "manifest.json").read_text()
    _killed_build(source, out, "staged")
    staged = [p for p in tmp_path.iterdir() if p.name.startswith(".art.build-")]
    assert len(staged) == 1 and (staged[0] / MARKER).is_file() and (staged[0] / "manifest.json").is_file()
    assert (out / "manifest.json").read_text() == first  # the killed build never touched the artifact
    (tmp_path / ".art.build-1.keep").mkdir()  # pid-like name but no marker: not ours, never deleted
    build(str(source), BuildOptions(load_recipe("ort-cpu"), tmp_path / "other"), QUIET)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".art.build-1.keep", "art", "other"]


def test_a_build_killed_between_its_renames_gives_the_old_artifact_back(source: Path, tmp_path: Path) -> None:
    out = tmp_path / "art"
    build(str(source), BuildOptions(load_recipe("ort-cpu"), out), QUIET)
    first = (out / "manifest.json").read_text()
    _killed_build(source, out, "swapping")
    assert not out.exists() and any(p.name.startswith(".art.old-") for p in tmp_path.iterdir())
    swept = sweep_leftovers(tmp_path)
    assert len(swept) == 2 and (out / "manifest.json").read_text() == first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]


def test_sweep_leaves_the_folders_of_a_running_build(tmp_path: Path) -> None:
    live = tmp_path / f".art.build-{os.getpid()}.abcd"
    live.mkdir()
    (live / MARKER).write_text(str(os.getpid()))
    assert sweep_leftovers(tmp_path) == [] and live.is_dir()
