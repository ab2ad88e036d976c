"""graphopt's own GPTQ / AWQ reader (graphopt.sources.hf_quant), on tiny checkpoints of each packing written by
tests/hf_quant_files.py:
- the dequantized weights, both the kept blocks' and the fp32 folder transformers loads, equal the numpy
  reference computed from the unpacked integers, bit for bit; symmetric GPTQ has no offset, act-order an order;
- bad input (unsupported bits or AWQ version, pickle-only, missing or disagreeing tensors) is one line, exit 2,
  nothing written, with or without --keep-quant; a plain build notes --keep-quant once.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from safetensors.numpy import load_file
from safetensors.torch import load_file as load_torch, save_file

from graphopt.cli.main import main
from graphopt.core.errors import SourceError
from graphopt.quant.hf_packing import hf_weight
from graphopt.sources import hf_quant, load_causal_lm, resolve_source
from hf_quant_files import write_checkpoint

PACKINGS = {  # name → write_checkpoint options
    "gptq-v1-asym": dict(method="gptq"),
    "gptq-sym-act-order": dict(method="gptq", sym=True, act_order=True),
    "gptq-asym-act-order": dict(method="gptq", act_order=True, group=16),
    "gptq-v2-int8-one-group": dict(method="gptq", bits=8, group=-1, fmt="gptq_v2"),
    "awq-gemm": dict(method="awq", fmt="gemm"),
}


def _same(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and np.array_equal(a.view(np.uint32), b.view(np.uint32))


@pytest.mark.parametrize("packing", sorted(PACKINGS))
def test_weights_equal_the_reference(tmp_path: Path, packing: str) -> None:
    options = PACKINGS[packing]
    reference = write_checkpoint(tmp_path / "hf", **options)
    kept = hf_quant.read_quantized(tmp_path / "hf")
    assert kept.kind == options["method"] and len(kept.by_content) == len(reference) == 14
    for key, (prefix, blocks) in kept.by_content.items():
        assert _same(hf_weight(blocks), reference[prefix]), prefix
        assert (blocks.offset is None) == options.get("sym", False)
        assert (blocks.input_order is not None) == options.get("act_order", False)
        assert blocks.bits == options.get("bits", 4) and blocks.q.min() >= -(1 << (blocks.bits - 1))
        assert blocks.scale.dtype == np.float32 and (blocks.offset is None or blocks.offset.dtype == np.float32)
    folder = hf_quant.cached_folder(tmp_path / "hf", tmp_path / "cache")
    stored = load_file(folder / "model.safetensors")
    assert all(_same(stored[f"{prefix}.weight"], weight) for prefix, weight in reference.items())
    assert not any(name.endswith((".qweight", ".qzeros", ".scales", ".g_idx")) for name in stored)
    assert "quantization_config" not in json.loads((folder / "config.json").read_text())


def test_transformers_loads_the_dequantized_model(tmp_path: Path) -> None:
    reference = write_checkpoint(tmp_path / "hf", method="awq")
    state = load_torch(tmp_path / "hf" / "model.safetensors")  # two shards and an index, as large checkpoints come
    names = sorted(state)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for shard, part in shards.items():
        save_file({name: state[name] for name in part}, tmp_path / "hf" / shard)
    (tmp_path / "hf" / "model.safetensors").unlink()
    weight_map = {name: shard for shard, part in shards.items() for name in part}
    (tmp_path / "hf" / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    source = resolve_source(str(tmp_path / "hf"), cache_dir=tmp_path / "cache")
    assert source.quant_dir == (tmp_path / "hf").resolve() and source.model_id == "hf"
    model = load_causal_lm(source)
    weights = {name.removesuffix(".weight"): p.detach().numpy() for name, p in model.named_parameters()}
    assert all(_same(weights[prefix], weight) for prefix, weight in reference.items())


def _edit(folder: Path, config: dict | None = None, drop: str | None = None, reshape: str | None = None) -> None:
    if config:
        raw = json.loads((folder / "config.json").read_text())
        raw["quantization_config"] |= config
        (folder / "config.json").write_text(json.dumps(raw))
    if drop or reshape:
        state = load_torch(folder / "model.safetensors")
        state.pop(drop, None)
        if reshape:
            state[reshape] = state[reshape][:-1].clone()
        save_file(state, folder / "model.safetensors")


LAYER = "model.layers.0.self_attn.q_proj"
BAD = {  # name → (write_checkpoint options, edit, fragments of the one line)
    "gptq-3-bit": (dict(method="gptq"), dict(config={"bits": 3}), ("GPTQ with bits=3 is not supported", "4/8-bit")),
    "awq-gemv": (dict(method="awq"), dict(config={"version": "gemv"}), ("AWQ version 'gemv'", "only 'gemm'")),
    "gptq-marlin": (dict(method="gptq"), dict(config={"checkpoint_format": "marlin"}), ("checkpoint_format 'marlin'",)),
    "no-qzeros": (dict(method="gptq"), dict(drop=f"{LAYER}.qzeros"), (f"'{LAYER}' has qweight but no qzeros",)),
    "no-scales": (dict(method="awq"), dict(drop=f"{LAYER}.scales"), (f"'{LAYER}' has qweight but no scales",)),
    "scales-disagree": (dict(method="gptq"), dict(reshape=f"{LAYER}.scales"), ("scales [1, 64] (expected [2, 64])",)),
    "g_idx-disagree": (dict(method="gptq"), dict(reshape=f"{LAYER}.g_idx"), ("g_idx [63] (expected [64])",)),
}


@pytest.mark.parametrize("keep", [True, False])
@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_checkpoint_is_one_line(tmp_path: Path, case: str, keep: bool) -> None:
    options, edit, fragments = BAD[case]
    write_checkpoint(tmp_path / "hf", **options)
    _edit(tmp_path / "hf", **edit)
    line = _fails(tmp_path, ["--keep-quant"] if keep else [])
    assert all(fragment in line for fragment in fragments), line


def test_missing_shard_is_one_line(tmp_path: Path) -> None:
    write_checkpoint(tmp_path / "hf", method="gptq")
    index = {"weight_map": {"lm_head.weight": "model-00002-of-00002.safetensors"}}
    (tmp_path / "hf" / "model.safetensors.index.json").write_text(json.dumps(index))
    assert "lacks 1 safetensors shard(s)" in _fails(tmp_path, ["--keep-quant"])


def test_a_shard_outside_the_folder_is_refused(tmp_path: Path) -> None:
    write_checkpoint(tmp_path / "hf", method="gptq")
    (tmp_path / "secret.safetensors").write_bytes(b"")
    index = {"weight_map": {"lm_head.weight": "../secret.safetensors"}}
    (tmp_path / "hf" / "model.safetensors.index.json").write_text(json.dumps(index))
    assert "names a shard outside the folder" in _fails(tmp_path, [])


def test_pickle_only_checkpoint_is_refused(tmp_path: Path) -> None:
    write_checkpoint(tmp_path / "hf", method="gptq")
    (tmp_path / "hf" / "model.safetensors").rename(tmp_path / "hf" / "pytorch_model.bin")
    for keep in (["--keep-quant"], []):
        assert "never unpickles" in _fails(tmp_path, keep)


def test_keep_quant_needs_power_of_two_blocks(tmp_path: Path) -> None:
    write_checkpoint(tmp_path / "hf", method="gptq", group=-1)  # down_proj: one group of 128, others 64: fine
    hf_quant.check_folder(tmp_path / "hf", keep_quant=True)
    write_checkpoint(tmp_path / "hf24", method="gptq", group=8)
    with pytest.raises(SourceError, match="groups of 8 inputs.*power of two ≥ 16"):
        hf_quant.check_folder(tmp_path / "hf24", keep_quant=True)


def test_uneven_act_order_groups_are_dequantized_but_not_kept(tmp_path: Path) -> None:
    reference = write_checkpoint(tmp_path / "hf", method="gptq", act_order=True)
    state = load_torch(tmp_path / "hf" / "model.safetensors")
    g_idx = state[f"{LAYER}.g_idx"]
    g_idx[int((g_idx == 0).nonzero()[0])] = 1  # group 0 now has 31 inputs, group 1 has 33
    save_file(state, tmp_path / "hf" / "model.safetensors")
    with pytest.raises(SourceError, match=f"--keep-quant: layer '{LAYER}'.*different number of inputs than 32"):
        hf_quant.read_quantized(tmp_path / "hf")
    folder = hf_quant.cached_folder(tmp_path / "hf", tmp_path / "cache")
    stored = load_file(folder / "model.safetensors")
    others = {prefix: weight for prefix, weight in reference.items() if prefix != LAYER}
    assert all(_same(stored[f"{prefix}.weight"], weight) for prefix, weight in others.items())
    assert not _same(stored[f"{LAYER}.weight"], reference[LAYER])  # one input now reads group 1's scale and zero


def test_plain_build_notes_keep_quant(tmp_path: Path) -> None:
    write_checkpoint(tmp_path / "hf", method="gptq")
    (tmp_path / "out").mkdir()  # an existing destination: the build stops before loading, after the note
    result = CliRunner().invoke(main, ["build", str(tmp_path / "hf"), "-o", str(tmp_path / "out")],
                                env={"GRAPHOPT_CACHE": str(tmp_path / "cache")})
    notes = [line for line in result.stderr.splitlines() if line.startswith("note:")]
    assert result.exit_code == 2 and len(notes) == 1, result.output
    assert "GPTQ 4-bit weights; --keep-quant keeps them exactly" in notes[0]


def _fails(tmp_path: Path, flags: list[str]) -> str:
    out, cache = tmp_path / "out", tmp_path / "cache"
    result = CliRunner().invoke(main, ["build", str(tmp_path / "hf"), *flags, "-o", str(out)],
                                env={"GRAPHOPT_CACHE": str(cache)})
    lines = [line for line in result.stderr.strip().splitlines() if not line.startswith("note:")]
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    assert not out.exists() and not any(cache.glob("hfquant/*")), "something was written"
    return lines[0]
