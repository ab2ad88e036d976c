"""Cheap integrity checks of model files before transformers opens them, so a truncated download is one line
naming the file (exit 2) rather than a traceback from deep inside a reader."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from graphopt.core.errors import SourceError

_MIB = 1 << 20

GGUF_MIN_BYTES = 24  # magic, version, tensor count, metadata count


def check_safetensors(path: Path) -> None:
    """The header (u64 length + JSON) must parse and the file must hold every tensor it lists."""
    size = path.stat().st_size
    try:
        with path.open("rb") as handle:
            length = int.from_bytes(handle.read(8), "little")
            if size < 8 or length > size - 8:
                raise ValueError(f"a header of {length} bytes in a {size}-byte file")
            header = json.loads(handle.read(length))
        ends = [entry["data_offsets"][1] for name, entry in header.items() if name != "__metadata__"]
    except (OSError, ValueError, KeyError, TypeError, IndexError, AttributeError) as exc:
        raise SourceError(f"'{path}' is not a readable safetensors file ({' '.join(str(exc).split())[:200]}); it may "
                          "be truncated: copy it again") from None
    if 8 + length + max(ends, default=0) > size:
        raise SourceError(f"'{path}' is truncated: its header lists {8 + length + max(ends)} bytes, the file has "
                          f"{size}; copy it again")


def has_gguf_magic(path: Path) -> bool:
    try:
        with path.open("rb") as handle:
            return handle.read(4) == b"GGUF"
    except OSError:
        return False


def check_gguf_header(path: Path) -> None:
    if not has_gguf_magic(path) or path.stat().st_size < GGUF_MIN_BYTES:
        raise SourceError(f"'{path}' is not a readable GGUF file (no 'GGUF' magic and header at its start; "
                          f"{path.stat().st_size} bytes); pass a whole .gguf model file, e.g. one written by "
                          "llama.cpp's convert_hf_to_gguf.py")


def update_with_ends(digest: Any, path: Path) -> None:
    """Feed a file's size, its first MiB and its last MiB into ``digest``."""
    size = path.stat().st_size
    digest.update(size.to_bytes(8, "little"))
    with path.open("rb") as handle:
        digest.update(handle.read(_MIB))
        if size > _MIB:
            handle.seek(max(_MIB, size - _MIB))
            digest.update(handle.read(_MIB))


def one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:300] or type(exc).__name__


def cached_entry(entry: Path, marker: str, write: Callable[[Path], None], what: str) -> Path:
    """The cache folder ``entry``, made first by ``write(staging)`` if absent (``marker`` names the file that
    ``write`` puts there last): staged in a temporary folder beside it and renamed into place, so the entry
    appears complete or not at all; when another process published it first, theirs is used."""
    if (entry / marker).is_file():
        return entry
    if entry.exists():
        raise SourceError(f"cache entry '{entry}' is incomplete (no {marker}); delete that folder and retry")
    entry.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".tmp-{entry.name}-", dir=entry.parent))
    try:
        write(staging)
        os.rename(staging, entry)
    except OSError as exc:
        if not (entry / marker).is_file():
            raise SourceError(f"cannot write {what} to '{entry}': {one_line(exc)}; check the cache folder's "
                              "permissions and free space, or pass another cache dir") from exc
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return entry
