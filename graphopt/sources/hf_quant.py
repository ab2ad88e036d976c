"""Hugging Face GPTQ and AWQ folders, read by graphopt itself (numpy + safetensors; no GPTQ/AWQ library, no pickle).

    folder: config.json (quantization_config: quant_method gptq|awq, bits, group_size, …) + *.safetensors
      │  check_folder(): the method and format are supported, every quantized Linear has qweight, qzeros,
      │  scales (+ g_idx) whose dtypes and shapes agree — from the safetensors headers, before anything is written
      ├─ plain build: cached_folder() → <cache_dir>/hfquant/<key>/, a Hugging Face folder transformers loads:
      │      config.json without quantization_config, <prefix>.weight fp32 = the dequantized W.T, other tensors
      │      as stored, tokenizer files copied; staged in a temporary folder, renamed into place, marker last
      └─ --keep-quant: read_quantized() → QuantizedWeights: fingerprint(fp32 weight) → (prefix, BlockQuant)

The fp32 weight is the definition, scale·(q − zero) (hf_packing.reference_weight: exact, so a plain build needs no
block form); --keep-quant checks every layer's blocks against it bit for bit while reading, so the traced weights
and the kept blocks agree and the 'keep-quant' pass finds each weight by its fingerprint.
Supported: GPTQ 4/8-bit ("gptq" v1 and "gptq_v2" checkpoint formats, desc_act/g_idx included), AWQ 4-bit "gemm".
"""

from __future__ import annotations

import collections
import hashlib
import json
import shutil
from pathlib import Path

import numpy as np

from graphopt.core.errors import SourceError
from graphopt.quant import hf_packing
from graphopt.quant.gguf_blocks import BlockQuant
from graphopt.sources.files import cached_entry, check_safetensors, update_with_ends
from graphopt.sources.gguf_convert import CACHE_MARKER
from graphopt.sources.gguf_weights import QuantizedWeights, fingerprint

METHODS = ("gptq", "awq")
_KEEP_FIX = "build without --keep-quant (graphopt dequantizes the weights to fp32 exactly)"
CACHE_VERSION = "v1"
PARTS = {"gptq": ("qweight", "qzeros", "scales", "g_idx"), "awq": ("qweight", "qzeros", "scales")}
_FIX = "use a GPTQ checkpoint of 4 or 8 bits (format gptq or gptq_v2) or an AWQ 4-bit 'gemm' one, or the model's " \
       "unquantized Hugging Face folder"


def method_of(folder: Path) -> str | None:
    """'gptq' or 'awq' when ``folder``'s config.json names that quantization method; else None."""
    config = _config(folder)
    method = (config.get("quantization_config") or {}).get("quant_method") if config else None
    return method.lower() if isinstance(method, str) and method.lower() in METHODS else None


def check_folder(folder: Path, keep_quant: bool = False) -> dict:
    """One-line SourceError for anything graphopt cannot read exactly; returns the checked settings
    (method, bits, group, v1). With ``keep_quant`` also the block size MatMulNBits needs."""
    if not list(folder.glob("*.safetensors")):
        raise SourceError(f"'{folder}' has no *.safetensors weights (graphopt never unpickles .bin/.pt files: "
                          "loading them can run arbitrary code); use the checkpoint's safetensors release, or convert "
                          "it once where you trust the file")
    for path in sorted(folder.glob("*.safetensors")):
        check_safetensors(path)
    index = folder / "model.safetensors.index.json"
    shards = set((_json(index) or {}).get("weight_map", {}).values()) if index.is_file() else set()
    outside = sorted(s for s in shards if not isinstance(s, str) or Path(s).name != s or s in ("", ".", ".."))
    if outside:  # a path read from a file stays inside its folder
        raise SourceError(f"'{index}' names a shard outside the folder ({str(outside[0])!r}); shards are plain file "
                          "names next to it: fix the index or re-download the checkpoint")
    missing = sorted(s for s in shards if not (folder / s).is_file())
    if missing:
        raise SourceError(f"'{folder}' lacks {len(missing)} safetensors shard(s) named in model.safetensors.index.json "
                          f"(first: {missing[0]}); copy the missing files")
    config = _config(folder) or {}
    settings = _settings(folder, config.get("quantization_config") or {})
    layers = _layers(folder, settings)
    if not layers:
        raise SourceError(f"'{folder}' says it is {settings['method'].upper()}-quantized but its safetensors hold no "
                          f"'*.qweight' tensor; {_FIX}")
    for prefix, parts in layers.items():
        _check_layer(folder, prefix, parts, settings, keep_quant)
    return settings


def keep_quant_hint(folder: Path) -> str | None:
    """One line for a plain build of a GPTQ/AWQ folder: that --keep-quant keeps its integer weights."""
    method = method_of(folder)
    if method is None:
        return None
    settings = check_folder(folder)
    return (f"{folder.name} holds {method.upper()} {settings['bits']}-bit weights; --keep-quant keeps them exactly "
            "as the checkpoint has them (int4/int8 blocks, no second rounding) instead of dequantizing them to fp32")


def read_quantized(folder: Path) -> QuantizedWeights:
    """Every quantized Linear of ``folder`` as a BlockQuant, keyed by the fingerprint of its fp32 [N, K] weight."""
    settings = check_folder(folder, keep_quant=True)
    found: dict[str, tuple[str, BlockQuant]] = {}
    types: collections.Counter[str] = collections.Counter()
    kind = f"{settings['method'].upper()}_INT{settings['bits']}"
    for prefix, unpacked in _unpacked(folder, settings):
        try:
            blocks = hf_packing.to_blocks(*unpacked, settings["bits"], kind)
        except hf_packing.PackingError as exc:
            raise SourceError(f"--keep-quant: layer '{prefix}' in '{folder}': {exc}, so its groups have no block "
                              f"form; {_KEEP_FIX}") from None
        weight = hf_packing.reference_weight(*unpacked).T
        differ = int(np.count_nonzero(hf_packing.hf_weight(blocks).view(np.uint32) != weight.view(np.uint32)))
        if differ:
            raise SourceError(f"--keep-quant: layer '{prefix}' in '{folder}': its int4/int8 blocks differ from the "
                              f"dequantized weight in {differ} places, so it has no exact form here; {_KEEP_FIX}")
        found[fingerprint(weight)] = (prefix, blocks)
        types[blocks.gguf_type] += 1
    size = sum(path.stat().st_size for path in folder.glob("*.safetensors"))
    return QuantizedWeights(folder, found, dict(types), size, kind=settings["method"])


def cached_folder(folder: Path, cache_dir: Path) -> Path:
    """The cached fp32 Hugging Face folder of a GPTQ/AWQ ``folder`` (checked first, written atomically)."""
    settings = check_folder(folder)
    digest = hashlib.sha256(f"graphopt-hfquant-{CACHE_VERSION}\0".encode() + (folder / "config.json").read_bytes())
    for path in sorted(folder.glob("*.safetensors")):
        digest.update(path.name.encode() + b"\0")
        update_with_ends(digest, path)
    entry = cache_dir / "hfquant" / digest.hexdigest()[:24]
    return cached_entry(entry, CACHE_MARKER, lambda out: _write_dequantized(folder, settings, out),
                        "the dequantized model")


def _write_dequantized(folder: Path, settings: dict, out: Path) -> None:
    import torch
    from safetensors.torch import save_file

    tensors = {f"{prefix}.weight": torch.from_numpy(np.ascontiguousarray(hf_packing.reference_weight(*unpacked).T))
               for prefix, unpacked in _unpacked(folder, settings)}
    parts = {f"{prefix}.{part}" for prefix in _layers(folder, settings) for part in PARTS[settings["method"]]}
    for name, (path, _, _) in _headers(folder).items():
        if name not in parts:
            tensors[name] = _tensor(path, name, numpy=False).contiguous()
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    config = _config(folder)
    config.pop("quantization_config")
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    for path in sorted(folder.iterdir()):
        if path.is_file() and path.name != "config.json" and not path.name.startswith("model.safetensors") \
                and path.suffix in (".json", ".model", ".txt", ".jinja"):
            shutil.copy2(path, out / path.name)
    marker = {"source": str(folder), "method": settings["method"], "cache_version": CACHE_VERSION}
    (out / CACHE_MARKER).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")  # last: marks it done


def _unpacked(folder: Path, settings: dict):
    """(prefix, (q [K, N], zero [G, N], scale [G, N], group of each input [K])) of every quantized Linear."""
    method, bits, group = settings["method"], settings["bits"], settings["group"]
    for prefix, parts in _layers(folder, settings).items():
        arrays = {part: _tensor(path, f"{prefix}.{part}") for part, (path, _, _) in parts.items()}
        qweight, qzeros, scales = arrays["qweight"], arrays["qzeros"], arrays["scales"]
        try:
            if method == "gptq":
                k = qweight.shape[0] * 32 // bits
                unpacked = hf_packing.gptq_layer(qweight, qzeros, scales, arrays.get("g_idx"), bits,
                                                 group if group > 0 else k, settings["v1"])
            else:
                unpacked = hf_packing.awq_layer(qweight, qzeros, scales, group)
        except hf_packing.PackingError as exc:
            raise SourceError(f"'{prefix}' in '{folder}': {exc}; the checkpoint is damaged or not {method.upper()} "
                              "as its config.json says: export it again") from None
        yield prefix, unpacked


def _settings(folder: Path, qc: dict) -> dict:
    method = str(qc.get("quant_method", "")).lower()
    bits = qc.get("bits", qc.get("w_bit"))
    group = qc.get("group_size", qc.get("q_group_size", -1))
    where = f"'{folder}/config.json' quantization_config"
    if method == "gptq":
        fmt = str(qc.get("checkpoint_format", qc.get("format", "gptq"))).lower()
        if fmt not in ("gptq", "gptq_v2"):
            raise SourceError(f"{where}: GPTQ checkpoint_format '{fmt}' is not read by graphopt (gptq and gptq_v2 "
                              f"are); {_FIX}")
        supported = (4, 8)
    else:
        fmt = str(qc.get("version", "gemm")).lower()
        if fmt != "gemm":
            raise SourceError(f"{where}: AWQ version '{fmt}' packs its weights in a layout graphopt does not read "
                              f"(only 'gemm'); {_FIX}")
        if qc.get("zero_point", True) is False:
            raise SourceError(f"{where}: AWQ without zero points (zero_point: false) is not read by graphopt; {_FIX}")
        supported = (4,)
    if bits not in supported:
        raise SourceError(f"{where}: {method.upper()} with bits={bits} is not supported (graphopt reads "
                          f"{'/'.join(map(str, supported))}-bit {method.upper()}); {_FIX}")
    if not isinstance(group, int) or (group <= 0 and not (method == "gptq" and group == -1)):
        raise SourceError(f"{where}: group_size {group!r} is not a positive integer (or -1 for GPTQ); fix config.json")
    return {"method": method, "bits": bits, "group": group, "v1": fmt == "gptq"}


def _check_layer(folder: Path, prefix: str, parts: dict, settings: dict, keep_quant: bool) -> None:
    method, bits = settings["method"], settings["bits"]
    missing = [p for p in PARTS[method][:3] if p not in parts]
    if missing:
        raise SourceError(f"'{folder}': quantized layer '{prefix}' has qweight but no {' or '.join(missing)}; "
                          f"the checkpoint is incomplete: copy all of its safetensors files")
    dtypes = {part: dtype for part, (_, dtype, _) in parts.items()}
    wanted = {"qweight": "I32", "qzeros": "I32", "scales": "F16", "g_idx": "I32"}
    wrong = [f"{p} is {d}" for p, d in dtypes.items() if d != wanted[p] and not (p == "scales" and d == "BF16")]
    if wrong:
        raise SourceError(f"'{folder}': layer '{prefix}': {', '.join(wrong)} (expected int32 qweight/qzeros/g_idx, "
                          f"fp16 scales); {_FIX}")
    shapes = {part: tuple(shape) for part, (_, _, shape) in parts.items()}
    (rows, cols), (groups, zcols), per = shapes["qweight"], shapes["qzeros"], 32 // bits
    k, n = (rows * per, cols) if method == "gptq" else (rows, cols * per)
    group = settings["group"] if settings["group"] > 0 else k
    expected = {"qzeros": (-(-k // group), n // per), "scales": (-(-k // group), n), "g_idx": (k,)}
    bad = [f"{p} {list(shapes[p])} (expected {list(e)})" for p, e in expected.items() if p in shapes and shapes[p] != e]
    if bad:
        raise SourceError(f"'{folder}': layer '{prefix}': qweight {list(shapes['qweight'])} means {k} inputs × {n} "
                          f"outputs with group_size {settings['group']}, but {'; '.join(bad)}; the tensors do not "
                          "agree with config.json: export the checkpoint again")
    if keep_quant and (k % group or group < 16 or group & (group - 1)):
        raise SourceError(f"--keep-quant: layer '{prefix}' has groups of {group} inputs over {k} inputs; kept blocks "
                          f"need a power of two ≥ 16 dividing the inputs (MatMulNBits); {_KEEP_FIX}")


def _layers(folder: Path, settings: dict) -> dict[str, dict[str, tuple[Path, str, list]]]:
    """prefix → part → (file, dtype, shape) for every '<prefix>.qweight' in the safetensors headers."""
    headers = _headers(folder)
    prefixes = sorted(name[: -len(".qweight")] for name in headers if name.endswith(".qweight"))
    return {prefix: {part: headers[f"{prefix}.{part}"] for part in PARTS[settings["method"]]
                     if f"{prefix}.{part}" in headers} for prefix in prefixes}


def _headers(folder: Path) -> dict[str, tuple[Path, str, list]]:
    out = {}
    for path in sorted(folder.glob("*.safetensors")):
        with path.open("rb") as handle:
            header = json.loads(handle.read(int.from_bytes(handle.read(8), "little")))
        out.update({name: (path, entry["dtype"], entry["shape"]) for name, entry in header.items()
                    if name != "__metadata__"})
    return out


def _tensor(path: Path, name: str, numpy: bool = True):
    from safetensors import safe_open

    with safe_open(path, framework="pt") as handle:
        tensor = handle.get_tensor(name)
    if not numpy:
        return tensor
    return tensor.float().numpy() if tensor.dtype.is_floating_point else tensor.numpy()


def _config(folder: Path) -> dict | None:
    return _json(folder / "config.json")


def _json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None
