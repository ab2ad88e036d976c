""".github/workflows/compare.yml and .ci/run checked here (actionlint is not installable from PyPI: its
wrapper downloads the binary at build time): the workflow parses, its structure and references hold, the
recipes and model it names exist, no step loosens a gate threshold, and its Compare step's shell script runs
as written on a tiny model — first as on main (no baseline), then as on a pull request (with main's output)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from graphopt.evaluate.gate import DEFAULTS, FIELDS
from graphopt.passes.pipeline import load_recipe
from graphopt.sources import BUILTIN_GGUF

ROOT = next(p for p in Path(__file__).resolve().parents if (p / "pyproject.toml").is_file())
WORKFLOW = ROOT / ".github" / "workflows" / "compare.yml"
THRESHOLD_FLAGS = re.compile("|".join(rf"--{field.replace('_', '-')}\b" for field in FIELDS))
sys.path.insert(0, str(ROOT / "scripts"))
import tiny_model  # noqa: E402


@pytest.fixture(scope="module")
def workflow() -> dict:
    data = yaml.safe_load(WORKFLOW.read_text())
    data["on"] = data.pop(True, data.get("on"))  # YAML 1.1 reads the key `on` as true
    return data


def steps(workflow: dict) -> list[dict]:
    return workflow["jobs"]["compare"]["steps"]


def step(workflow: dict, name: str) -> dict:
    return next(s for s in steps(workflow) if s.get("name") == name)


def test_structure_and_references(workflow: dict) -> None:
    assert workflow["on"]["push"]["branches"] == ["main"] and "pull_request" in workflow["on"]
    job = workflow["jobs"]["compare"]
    assert job["runs-on"].startswith("ubuntu-") and job["timeout-minutes"] <= 90
    ids = {s["id"] for s in steps(workflow) if "id" in s}
    for s in steps(workflow):
        assert ("uses" in s) != ("run" in s), s  # a step either uses an action or runs a script
        if "uses" in s:
            assert re.fullmatch(r"[\w.-]+/[\w.-]+@v\d+", s["uses"]), s["uses"]  # pinned to a major version
        text = json.dumps(s)
        assert set(re.findall(r"steps\.([\w-]+)\.", text)) <= ids, text
        assert set(re.findall(r"env\.(\w+)", text)) <= set(job["env"]), text
    for s in steps(workflow):
        if "run" in s:
            assert subprocess.run(["bash", "-n"], input=s["run"], text=True).returncode == 0, s["run"]


def test_names_exist_and_no_threshold_is_loosened(workflow: dict) -> None:
    env = workflow["jobs"]["compare"]["env"]
    recipes = env["RECIPES"].split()
    assert [load_recipe(name).name for name in recipes] == recipes
    assert env["MODEL"] in BUILTIN_GGUF
    bisect = step(workflow, "Blame the pass that spent the budget")["run"]
    assert re.search(r"--bisect (\S+)", bisect)[1] in recipes
    uploaded = step(workflow, "Upload compare results")["with"]["path"].split()
    assert {Path(p).name for p in uploaded} == {"compare.json", "compare.md", "compare.png", "bisect.json"}
    for s in steps(workflow):
        assert not THRESHOLD_FLAGS.search(s.get("run", "")), s["run"]
    ci_run = (ROOT / ".ci" / "run").read_text()
    assert "graphopt compare" in ci_run
    for flag, value in re.findall(r"--([a-z0-9-]+)\s+(\S+)", ci_run):  # .ci/run may tighten, never loosen
        field = flag.replace("-", "_")
        if field in FIELDS:
            default = getattr(DEFAULTS, field)
            assert default is None or float(value) < default, f".ci/run loosens --{flag} to {value}"
    assert subprocess.run(["bash", "-n", str(ROOT / ".ci" / "run")]).returncode == 0


def test_the_compare_step_runs_as_written(workflow: dict, tmp_path: Path) -> None:
    """The step's own script, with RECIPES / MODEL pointed at a tiny model (one recipe, to stay quick)."""
    tiny_model.main(tmp_path / "model")
    (tmp_path / ".venv").symlink_to(ROOT / ".venv")
    script = step(workflow, "Compare")["run"]
    env = os.environ | {"RECIPES": "ort-cpu", "MODEL": str(tmp_path / "model" / "hf"),
                        "GITHUB_STEP_SUMMARY": str(tmp_path / "summary.md")}
    first = subprocess.run(["bash", "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert first.returncode == 0, first.stderr[-2000:]
    assert "gate:" not in first.stderr and "## graphopt compare" in (tmp_path / "summary.md").read_text()
    (tmp_path / "baseline").mkdir()  # what "Baseline from main" downloads on a pull request
    shutil.copy(tmp_path / "out" / "compare" / "compare.json", tmp_path / "baseline" / "compare.json")
    again = subprocess.run(["bash", "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "gate: passed against baseline/compare.json" in again.stderr
    assert (tmp_path / "summary.md").read_text().count("**gate: passed**") == 1
