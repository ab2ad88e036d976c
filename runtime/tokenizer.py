"""An artifact's tokenizer (``tokenizer/``), loaded only after its files match the manifest's hashes and only
when it asks for no code of its own; always offline, always ``trust_remote_code=False``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from graphopt.core.artifact_files import TOKENIZER_DIR, refuse_remote_code, verify_files
from graphopt.core.errors import ArtifactError
from graphopt.core.manifest import load_manifest


def load_tokenizer(artifact: str | Path) -> Any:
    """The tokenizer of ``artifact``; ArtifactError (one line) for a missing, tampered or code-carrying one."""
    artifact = Path(artifact)
    manifest = load_manifest(artifact, verify_hashes=False)  # a folder with a graphopt manifest, or refused
    directory = artifact / TOKENIZER_DIR
    if directory.is_symlink() or not directory.is_dir():
        raise ArtifactError(f"artifact {artifact} has no {TOKENIZER_DIR}/ folder; rebuild it with 'graphopt build'")
    verify_files(artifact, manifest.files, prefix=f"{TOKENIZER_DIR}/")
    refuse_remote_code(directory)
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(directory, trust_remote_code=False, local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError, ImportError) as exc:
        reason = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
        raise ArtifactError(f"cannot load the tokenizer in {directory}: {reason}; rebuild the artifact with "
                            "'graphopt build'") from None
