"""The files of an artifact: every one the runtime reads is listed in the manifest's ``files`` with its sha256
and size, and every path the manifest names stays inside the artifact folder.

Checked when an artifact is opened (``manifest.load_manifest``):
- ``files`` is an object of ``"relative/path": {"sha256": 64 hex digits, "bytes": int}``; a path may not be
  absolute, contain ``..``, or pass through a symbolic link that leads out of the folder;
- every file under ``tokenizer/`` and ``generation_config.json`` is listed (the runtime reads them);
- sizes and hashes match.
An artifact whose tokenizer or config asks for remote code (``auto_map``, or ships ``.py`` files) is refused
before transformers sees it (``refuse_remote_code``).
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path, PurePosixPath
from typing import Any

from graphopt.core.errors import ArtifactError

MANIFEST = "manifest.json"
TOKENIZER_DIR = "tokenizer"
GENERATION_CONFIG = "generation_config.json"
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_REBUILD = "rebuild the artifact with 'graphopt build'"


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def file_entries(directory: Path, names: list[str]) -> dict[str, dict[str, Any]]:
    """sha256 and size of each named file in ``directory`` (for the manifest's ``files``)."""
    return {
        name: {"sha256": sha256_file(directory / name), "bytes": (directory / name).stat().st_size}
        for name in names
    }


def runtime_file_names(directory: Path) -> list[str]:
    """The files besides the graphs that the runtime reads: ``tokenizer/**`` and ``generation_config.json``."""
    names = sorted(p.relative_to(directory).as_posix() for p in (directory / TOKENIZER_DIR).rglob("*") if p.is_file())
    return names + ([GENERATION_CONFIG] if (directory / GENERATION_CONFIG).is_file() else [])


def artifact_path(directory: Path, name: Any, field: str) -> Path:
    """``directory / name`` for a path the manifest gives in ``field``; ArtifactError when it leaves the folder."""
    if not isinstance(name, str) or not name:
        raise ArtifactError(f"{directory / MANIFEST}: {field} must be a relative path string, got {name!r:.80}; "
                            f"{_REBUILD}")
    pure = PurePosixPath(name)
    if pure.is_absolute() or ".." in pure.parts or "\\" in name or name.startswith("~"):
        raise ArtifactError(f"{directory / MANIFEST}: {field} {name!r:.80} is not a path inside the artifact "
                            f"(absolute or with '..'); {_REBUILD}")
    path = directory / pure
    root = directory.resolve()
    if not path.resolve().is_relative_to(root):
        raise ArtifactError(f"{directory / MANIFEST}: {field} {name!r:.80} leads out of the artifact folder "
                            f"through a symbolic link; {_REBUILD}")
    return path


def check_entries(directory: Path, files: Any) -> dict[str, dict[str, Any]]:
    """``files`` as parsed JSON, checked for shape (not yet against the disk)."""
    where = directory / MANIFEST
    if not isinstance(files, dict) or not files:
        raise ArtifactError(f"{where}: 'files' must be a non-empty object of path -> {{sha256, bytes}}, got "
                            f"{type(files).__name__}; {_REBUILD}")
    for name, entry in files.items():
        artifact_path(directory, name, f"files key {name!r:.80}")
        if not isinstance(entry, dict) or not isinstance(entry.get("sha256"), str) \
                or not _SHA256.match(entry["sha256"]) or not _is_size(entry.get("bytes")):
            raise ArtifactError(f"{where}: files[{name!r:.80}] must be {{\"sha256\": 64 hex digits, \"bytes\": "
                                f"an integer >= 0}}, got {entry!r:.120}; {_REBUILD}")
    return files


def _is_size(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def verify_files(directory: Path, files: Any, prefix: str = "") -> None:
    """Shape, coverage (tokenizer/, generation_config.json), sizes and sha256 of every listed file (of those
    whose path starts with ``prefix``: ``"tokenizer/"`` checks just what loading the tokenizer reads)."""
    files = check_entries(directory, files)
    missing = [name for name in runtime_file_names(directory) if name not in files and name.startswith(prefix)]
    if missing:
        raise ArtifactError(f"{directory / MANIFEST} does not list {missing[0]!r} (and {len(missing) - 1} more) in "
                            f"'files', so its hash cannot be checked; {_REBUILD}")
    for name, entry in files.items():
        if not name.startswith(prefix):
            continue
        path = artifact_path(directory, name, f"files key {name!r:.80}")
        if not path.is_file():
            raise ArtifactError(f"artifact file {path} is missing; {_REBUILD}")
        if path.stat().st_size != entry["bytes"]:
            raise ArtifactError(f"artifact file {path} has {path.stat().st_size} bytes, manifest says "
                                f"{entry['bytes']} (truncated or replaced); {_REBUILD}")
        if sha256_file(path) != entry["sha256"]:
            raise ArtifactError(f"artifact file {path} does not match its sha256 in manifest.json (modified or "
                                f"corrupted); {_REBUILD}")


def refuse_remote_code(directory: Path) -> None:
    """ArtifactError when ``directory`` (a tokenizer or config folder) asks transformers to import its own code."""
    scripts = sorted(p.name for p in directory.glob("*.py"))
    if scripts:
        raise ArtifactError(f"{directory} holds Python files ({', '.join(scripts[:3])}); graphopt never runs code "
                            "from an artifact: rebuild it from a model that needs no remote code")
    for path in sorted(directory.glob("*.json")):
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError, RecursionError) as exc:
            raise ArtifactError(f"{path} is not valid JSON ({str(exc)[:80]}); {_REBUILD}") from None
        if isinstance(raw, dict) and "auto_map" in raw:
            raise ArtifactError(f"{path} has 'auto_map' (custom code); graphopt never runs code from an artifact "
                                "(no trust_remote_code): rebuild it from a model that needs no remote code")
