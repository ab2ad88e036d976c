"""An artifact is checked before it runs: every file the runtime reads is hashed in the manifest (tokenizer/
included), every manifest path stays inside the folder, a tokenizer that asks for remote code is refused
before transformers sees it, and a manifest that disagrees with its graph is refused at start (exit 2)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Callable

import pytest
from click.testing import CliRunner

from graphopt.cli.main import main
from graphopt.core.errors import ArtifactError
from graphopt.core.manifest import file_entries, load_manifest
from graphopt.runtime.tokenizer import load_tokenizer
from serving_artifact import tiny_artifact


def _copy(tmp_path: Path) -> Path:
    return Path(shutil.copytree(tiny_artifact(), tmp_path / "art"))


def _edit_manifest(artifact: Path, change: Callable[[dict[str, Any]], Any]) -> None:
    path = artifact / "manifest.json"
    raw = json.loads(path.read_text())
    change(raw)
    path.write_text(json.dumps(raw))


def _rehash(artifact: Path) -> None:
    """Record the current tokenizer/ files in the manifest, as a tamperer who edits both would."""
    names = sorted(p.relative_to(artifact).as_posix() for p in (artifact / "tokenizer").rglob("*") if p.is_file())
    _edit_manifest(artifact, lambda raw: raw["files"].update(file_entries(artifact, names)))


def assert_fails(args: list[str], *fragments: str) -> str:
    result = CliRunner().invoke(main, args)
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 2 and "Traceback" not in result.output, (result.exit_code, result.output[-2000:])
    assert lines and lines[-1].startswith("error: ") and all(f in lines[-1] for f in fragments), lines
    return lines[-1]


def test_manifest_hashes_the_tokenizer_and_generation_config() -> None:
    files = load_manifest(tiny_artifact()).raw["files"]
    assert "generation_config.json" in files and "tokenizer/tokenizer_config.json" in files
    assert "tokenizer/tokenizer.json" in files


def test_a_modified_tokenizer_file_is_refused(tmp_path: Path) -> None:
    art = _copy(tmp_path)
    config = art / "tokenizer" / "tokenizer_config.json"
    text = config.read_text()
    assert "<unk>" in text
    config.write_text(text.replace("<unk>", "<UNK>"))  # same size, other bytes
    with pytest.raises(ArtifactError, match="tokenizer_config.json does not match its sha256"):
        load_tokenizer(art)
    assert_fails(["generate", str(art), "w4", "--max-new-tokens", "2"], "tokenizer_config.json", "sha256")


def test_a_tokenizer_with_auto_map_is_refused_before_any_import(tmp_path: Path) -> None:
    art = _copy(tmp_path)
    marker = tmp_path / "imported"
    (art / "tokenizer" / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    config = art / "tokenizer" / "tokenizer_config.json"
    raw = json.loads(config.read_text())
    raw["auto_map"] = {"AutoTokenizer": ["evil.EvilTokenizer", None]}
    config.write_text(json.dumps(raw))
    _rehash(art)
    assert_fails(["generate", str(art), "w4", "--max-new-tokens", "2"], "evil.py", "never runs code")
    (art / "tokenizer" / "evil.py").unlink()
    _rehash(art)
    _edit_manifest(art, lambda m: m["files"].pop("tokenizer/evil.py"))
    assert_fails(["generate", str(art), "w4", "--max-new-tokens", "2"], "auto_map")
    assert not marker.exists()


def test_an_unlisted_tokenizer_file_is_refused(tmp_path: Path) -> None:
    art = _copy(tmp_path)
    _edit_manifest(art, lambda raw: raw["files"].pop("tokenizer/tokenizer.json"))
    assert_fails(["generate", str(art), "w4", "--max-new-tokens", "2"], "does not list 'tokenizer/tokenizer.json'")


@pytest.mark.parametrize(("change", "fragment"), [
    (lambda m: m["files"].update({"/etc/hostname": {"sha256": "0" * 64, "bytes": 1}}), "'/etc/hostname'"),
    (lambda m: m["files"].update({"../x": {"sha256": "0" * 64, "bytes": 1}}), "'../x'"),
    (lambda m: m.update({"graphs": {"multi_token": "../../x/model.onnx"}}), "graphs.multi_token"),
])
def test_manifest_paths_must_stay_inside_the_artifact(tmp_path: Path, change, fragment: str) -> None:
    art = _copy(tmp_path)
    _edit_manifest(art, change)
    assert_fails(["inspect", str(art)], fragment, "inside the artifact")


def test_a_symlink_out_of_the_artifact_is_refused(tmp_path: Path) -> None:
    art = _copy(tmp_path)
    outside = tmp_path / "outside.txt"
    outside.write_text("secret")
    (art / "extra.txt").symlink_to(outside)
    _edit_manifest(art, lambda m: m["files"].update(file_entries(art, ["extra.txt"])))
    assert_fails(["inspect", str(art)], "'extra.txt'", "symbolic link")


@pytest.mark.parametrize(("change", "field"), [
    (lambda m: m["model"].update(vocab_size=m["model"]["vocab_size"] + 1), "model.vocab_size"),
    (lambda m: m["model"].update(head_dim=m["model"]["head_dim"] * 2), "model.head_dim"),
    (lambda m: m["model"].update(num_kv_heads=m["model"]["num_kv_heads"] + 1), "model.num_kv_heads"),
    (lambda m: m["kv_cache"].update(dtype="float16"), "kv_cache.dtype"),
    (lambda m: m["model"].update(eos_token_ids="2"), "model.eos_token_ids"),
    (lambda m: m["files"]["model.onnx"].pop("bytes"), "files['model.onnx']"),
    (lambda m: m.update(files=list(m["files"])), "'files'"),
    (None, "not a JSON object"),  # manifest.json holds null
])
def test_serve_refuses_a_manifest_that_disagrees_with_its_graph(tmp_path: Path, change, field: str) -> None:
    art = _copy(tmp_path)
    if change is None:
        (art / "manifest.json").write_text("null")
    else:
        _edit_manifest(art, change)
    assert_fails(["serve", str(art), "--port", "0", "--threads", "1"], field)


@pytest.mark.parametrize("what", ["missing", "file", "no-tokenizer"])
def test_generate_on_something_that_is_not_a_runnable_artifact(tmp_path: Path, what: str) -> None:
    target = tmp_path / "x"
    if what == "file":
        target.write_text("hello")
    elif what == "no-tokenizer":
        target = _copy(tmp_path)
        shutil.rmtree(target / "tokenizer")
    assert_fails(["generate", str(target), "w4"], str(target))


def test_a_graph_not_listed_in_files_is_refused(tmp_path: Path) -> None:
    art = _copy(tmp_path)
    graph = load_manifest(art).graphs["multi_token"]
    _edit_manifest(art, lambda m: m["files"].pop(graph))
    assert_fails(["inspect", str(art)], "graphs.multi_token", "not listed in 'files'")
