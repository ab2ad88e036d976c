"""Tiny random GGUF models, written the way llama.cpp's converter lays them out, for the GGUF source tests.

A file is made from a tiny random Hugging Face model (2 layers, hidden 64):
- tensors: every parameter under its GGUF name (``gguf.get_tensor_name_map``) in llama.cpp's layout (see
  ``_to_llama_cpp_layout`` and ``_expert_tensors``: Llama's rotary q/k row order, ``w + 1`` norms, GPT-2's
  ``[out, in]``, one ``[experts, out, in]`` tensor per expert projection, squeezed LFM2 kernels); the embedding
  as F16, block 0's FFN down projection as Q8_0, the rest F32; a tied head once (no ``output.weight``);
- metadata: the hyperparameters under ``<arch>.*`` keys, a chat template, and the tokenizer that family's
  real files carry (tests/gguf_vocab.py: byte-level BPE or sentencepiece); its size is the model's vocabulary.

``ARCHS`` maps a test name to its tiny Hugging Face config, its vocabulary and how llama.cpp names it.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable

import gguf
import numpy as np
import torch
import transformers

from gguf_vocab import VOCABULARIES, Vocabulary

CHAT_TEMPLATE = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
Q8_TENSORS = ("blk.0.ffn_down.weight", "blk.0.ffn_down_exps.weight")  # stored as Q8_0 (rows: 32-value blocks)


def _shape(vocab: Vocabulary) -> dict:
    return dict(vocab_size=len(vocab.tokens), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, **_ids(vocab))


def _ids(vocab: Vocabulary) -> dict:
    return dict(bos_token_id=vocab.ids["bos"], eos_token_id=vocab.ids["eos"], pad_token_id=vocab.ids["pad"])


@dataclasses.dataclass(frozen=True)
class GgufArch:
    """One architecture: its tiny config and how llama.cpp writes it."""

    gguf_arch: str  # general.architecture
    config: Callable[[Vocabulary], transformers.PretrainedConfig]
    vocab: str = "bpe"  # a VOCABULARIES key: what that family's real files carry
    name: str = "tiny"  # general.name; transformers reads a 'llama' file named 'mistral' as Mistral
    layer_norm: bool = False  # LayerNorm (attention.layer_norm_epsilon) rather than RMSNorm


# What transformers' loader does not read from a file takes the config class's default there (Qwen3 and
# gpt-oss head_dim, Qwen MoE expert widths, Falcon-7B's multi-query layout, GPT-2's 1024 positions), so the
# tiny models use those defaults too.
ARCHS: dict[str, GgufArch] = {
    "llama": GgufArch("llama", lambda v: transformers.LlamaConfig(**_shape(v)), vocab="llama"),
    "mistral": GgufArch("llama", lambda v: transformers.MistralConfig(**_shape(v), head_dim=16), vocab="llama",
                        name="mistral"),
    "qwen2": GgufArch("qwen2", lambda v: transformers.Qwen2Config(**_shape(v))),
    "qwen3": GgufArch("qwen3", lambda v: transformers.Qwen3Config(**_shape(v), head_dim=128)),
    "gemma2": GgufArch("gemma2", lambda v: transformers.Gemma2Config(**_shape(v), head_dim=32, sliding_window=8),
                       vocab="gemma"),
    "gemma3": GgufArch("gemma3", lambda v: transformers.Gemma3TextConfig(**_shape(v), head_dim=32,
                                                                         sliding_window=8), vocab="gemma"),
    "phi3": GgufArch("phi3", lambda v: transformers.Phi3Config(**_shape(v)), vocab="llama"),
    "falcon": GgufArch("falcon", lambda v: transformers.FalconConfig(
        vocab_size=len(v.tokens), hidden_size=64, num_hidden_layers=2, num_attention_heads=4, multi_query=True,
        parallel_attn=True, max_position_embeddings=256, **_ids(v)), layer_norm=True),
    "gpt2": GgufArch("gpt2", lambda v: transformers.GPT2Config(
        vocab_size=len(v.tokens), n_embd=64, n_layer=2, n_head=4, n_positions=1024, **_ids(v)), layer_norm=True),
    "starcoder2": GgufArch("starcoder2", lambda v: transformers.Starcoder2Config(**_shape(v)), layer_norm=True),
    "stablelm": GgufArch("stablelm", lambda v: transformers.StableLmConfig(**_shape(v)), layer_norm=True),
    "nemotron": GgufArch("nemotron", lambda v: transformers.NemotronConfig(**_shape(v))),  # LayerNorm1P
    "qwen2_moe": GgufArch("qwen2moe", lambda v: transformers.Qwen2MoeConfig(  # expert widths: defaults
        **_shape(v), num_experts=4, num_experts_per_tok=2, moe_intermediate_size=1408,
        shared_expert_intermediate_size=5632)),
    "qwen3_moe": GgufArch("qwen3moe", lambda v: transformers.Qwen3MoeConfig(  # expert width: default
        **_shape(v), head_dim=16, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=768)),
    "lfm2": GgufArch("lfm2", lambda v: transformers.Lfm2Config(  # short convolutions, then attention
        **_shape(v), layer_types=["conv", "full_attention"], block_auto_adjust_ff_dim=False)),
    "minimax_m2": GgufArch("minimax-m2", lambda v: transformers.MiniMaxM2Config(  # routing bias, partial RoPE
        **_shape(v), head_dim=16, rotary_dim=8, num_local_experts=4, num_experts_per_tok=2, use_routing_bias=True)),
    "qwen3_5": GgufArch("qwen35", lambda v: transformers.Qwen3_5TextConfig(  # GatedDeltaNet, then attention
        **_shape(v), head_dim=32, layer_types=["linear_attention", "full_attention"], linear_num_key_heads=2,
        linear_num_value_heads=2, linear_key_head_dim=16, linear_value_head_dim=16,  # 1 value head per key head:
        rope_parameters=dict(rope_type="default", rope_theta=1e4, partial_rotary_factor=0.25,  # no head reorder
                             mrope_section=[2, 1, 1], mrope_interleaved=True))),
    "gpt_oss": GgufArch("gpt-oss", lambda v: transformers.GptOssConfig(  # head_dim: default
        **{**_shape(v), "intermediate_size": 64}, head_dim=64, num_local_experts=4, num_experts_per_tok=2,
        sliding_window=8)),
}


def source_model(arch: str, seed: int = 0) -> transformers.PreTrainedModel:
    """The tiny random model a GGUF of ``arch`` is written from; norms and biases random too."""
    torch.manual_seed(seed)
    spec = ARCHS[arch]
    model = transformers.AutoModelForCausalLM.from_config(spec.config(VOCABULARIES[spec.vocab])).eval()
    with torch.no_grad():  # non-trivial norms and biases, so a misplaced one shows in the logits
        for name, param in model.named_parameters():
            if "norm" in name or "ln_" in name or name.endswith(".bias"):
                param.add_(torch.randn_like(param) * 0.1)
        for _, routing_bias in _routing_biases(model):
            routing_bias.add_(torch.randn_like(routing_bias) * 0.1)
    return model


def _routing_biases(model: transformers.PreTrainedModel) -> list[tuple[str, torch.Tensor]]:
    """MiniMax-M2's per-expert routing bias: a buffer, not a parameter, but a weight of the file."""
    return [(name, buffer) for name, buffer in model.named_buffers() if name.endswith("e_score_correction_bias")]


def write_tiny_gguf(arch: str, path: Path, seed: int = 0) -> Path:
    """Write ``source_model(arch, seed)`` as a GGUF file at ``path``; returns ``path``."""
    spec, model = ARCHS[arch], source_model(arch, seed)
    writer = gguf.GGUFWriter(path, spec.gguf_arch)
    writer.add_name(spec.name)
    _add_hyperparameters(writer, model.config, spec)
    _add_tokenizer(writer, VOCABULARIES[spec.vocab])
    for name, array in _gguf_tensors(model, spec.gguf_arch):
        _add_tensor(writer, name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _add_hyperparameters(writer: gguf.GGUFWriter, config: transformers.PretrainedConfig, spec: GgufArch) -> None:
    """The ``<arch>.*`` keys llama.cpp writes, read from the config (GPT-2 and Falcon spell them their way)."""
    hidden = config.hidden_size
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    writer.add_context_length(getattr(config, "n_positions", None) or config.max_position_embeddings)
    writer.add_embedding_length(hidden)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(getattr(config, "intermediate_size", None) or 4 * hidden)
    writer.add_head_count(heads)
    writer.add_head_count_kv(_kv_heads(config))
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_vocab_size(config.vocab_size)
    eps_names = ("rms_norm_eps", "layer_norm_epsilon", "layer_norm_eps", "norm_epsilon", "norm_eps")
    eps = next(getattr(config, n) for n in eps_names if hasattr(config, n))
    (writer.add_layer_norm_eps if spec.layer_norm else writer.add_layer_norm_rms_eps)(eps)
    rope = getattr(config, "rope_parameters", None) or {}
    rope = rope.get("full_attention", rope)  # Gemma 3 keeps one set per layer type
    if "rope_theta" in rope:
        writer.add_rope_freq_base(rope["rope_theta"])
        writer.add_rope_dimension_count(int(head_dim * rope.get("partial_rotary_factor", 1.0)))
    if getattr(config, "sliding_window", None):
        writer.add_sliding_window(config.sliding_window)
    if config.model_type == "qwen3_5_text":
        _add_gated_delta_net(writer, config)
    if getattr(config, "conv_L_cache", None):  # LFM2
        writer.add_shortconv_l_cache(config.conv_L_cache)
    experts = getattr(config, "num_experts", None) or getattr(config, "num_local_experts", None)
    if experts:
        writer.add_expert_count(experts)
        writer.add_expert_used_count(config.num_experts_per_tok)
        writer.add_expert_feed_forward_length(getattr(config, "moe_intermediate_size", config.intermediate_size))


def _add_gated_delta_net(writer: gguf.GGUFWriter, config: transformers.PretrainedConfig) -> None:
    """Qwen3.5's linear-attention shape, its layer pattern and its multimodal RoPE sections."""
    writer.add_full_attention_interval(config.layer_types.index("full_attention") + 1)
    writer.add_ssm_conv_kernel(config.linear_conv_kernel_dim)
    writer.add_ssm_state_size(config.linear_key_head_dim)
    writer.add_ssm_group_count(config.linear_num_key_heads)
    writer.add_ssm_time_step_rank(config.linear_num_value_heads)
    writer.add_ssm_inner_size(config.linear_value_head_dim * config.linear_num_value_heads)
    writer.add_rope_dimension_sections([*config.rope_parameters["mrope_section"], 0])


def _kv_heads(config: transformers.PretrainedConfig) -> int | list[int]:
    """KV heads; 1 for Falcon-7B's multi-query, one count per layer (0 on convolution layers) for LFM2."""
    if getattr(config, "multi_query", False) and not config.new_decoder_architecture:
        return 1
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    if config.model_type == "lfm2":
        return [kv_heads if kind == "full_attention" else 0 for kind in config.layer_types]
    return kv_heads


def _add_tokenizer(writer: gguf.GGUFWriter, vocab: Vocabulary) -> None:
    """``tokenizer.ggml.*`` and ``tokenizer.chat_template``."""
    writer.add_tokenizer_model(vocab.model)
    writer.add_tokenizer_pre("default")
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.types)
    if vocab.merges:
        writer.add_token_merges(vocab.merges)
    if vocab.scores:
        writer.add_token_scores(vocab.scores)
        writer.add_unk_token_id(vocab.ids["unk"])
    writer.add_bos_token_id(vocab.ids["bos"])
    writer.add_eos_token_id(vocab.ids["eos"])
    writer.add_pad_token_id(vocab.ids["pad"])
    writer.add_chat_template(CHAT_TEMPLATE)


def _gguf_tensors(model: transformers.PreTrainedModel, gguf_arch: str) -> list[tuple[str, np.ndarray]]:
    """Every parameter (a tied head once) under its GGUF name, in llama.cpp's layout."""
    arch = next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == gguf_arch)
    names = gguf.get_tensor_name_map(arch, model.config.num_hidden_layers)
    tensors = []
    for hf_name, param in [*model.named_parameters(), *_routing_biases(model)]:  # tied ones listed once
        array = param.detach().numpy()
        if hf_name.endswith(("e_score_correction_bias", "linear_attn.dt_bias")):  # no gguf name-map entry
            leaf = "exp_probs_b.bias" if hf_name.endswith("bias") and "e_score" in hf_name else "ssm_dt.bias"
            tensors.append((f"blk.{hf_name.split('.')[2]}.{leaf}", array))
            continue
        if ".mlp.experts." in hf_name and (gguf_arch == "gpt-oss" or hf_name.endswith("gate_up_proj")):
            tensors += _expert_tensors(hf_name, array, gguf_arch)
            continue
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise ValueError(f"{gguf_arch}: gguf has no tensor name for '{hf_name}'")
        name += "" if name.endswith((".weight", ".bias", "ssm_a")) else ".weight"  # 3-D experts, sinks
        tensors.append((name, _to_llama_cpp_layout(name, array, model.config, gguf_arch)))
    return tensors


def _expert_tensors(hf_name: str, array: np.ndarray, gguf_arch: str) -> list[tuple[str, np.ndarray]]:
    """Fused expert tensors as llama.cpp stores them: one [experts, out, in] tensor (and bias) per projection."""
    prefix, leaf = f"blk.{hf_name.split('.')[2]}.ffn_", hf_name.rsplit(".", 1)[1]
    if gguf_arch != "gpt-oss":  # Qwen MoE gate_up_proj: [experts, 2 * width, hidden], gate rows then up rows
        gate, up = np.split(array, 2, axis=1)
        return [(prefix + "gate_exps.weight", gate), (prefix + "up_exps.weight", up)]
    # gpt-oss keeps [experts, in, out], gate and up interleaved on the last axis
    if leaf == "gate_up_proj":
        return [(prefix + "gate_exps.weight", array[..., 0::2].transpose(0, 2, 1).copy()),
                (prefix + "up_exps.weight", array[..., 1::2].transpose(0, 2, 1).copy())]
    if leaf == "gate_up_proj_bias":
        return [(prefix + "gate_exps.bias", array[..., 0::2].copy()),
                (prefix + "up_exps.bias", array[..., 1::2].copy())]
    if leaf == "down_proj":
        return [(prefix + "down_exps.weight", array.transpose(0, 2, 1).copy())]
    return [(prefix + "down_exps.bias", array)]


def _to_llama_cpp_layout(name: str, array: np.ndarray, config: transformers.PretrainedConfig,
                         gguf_arch: str) -> np.ndarray:
    """The layout changes llama.cpp's converter makes (transformers' loader undoes each)."""
    if gguf_arch == "llama" and name.endswith(("attn_q.weight", "attn_k.weight")):
        heads = config.num_attention_heads if "attn_q" in name else config.num_key_value_heads
        return _rotary_permute(array, heads)
    if gguf_arch in ("gemma2", "gemma3", "nemotron", "qwen35") and name.endswith("norm.weight") \
            and "ssm_norm" not in name:
        return array + 1.0  # these norms scale by (1 + w); llama.cpp stores 1 + w
    if name.endswith("ssm_a"):
        return -np.exp(array)  # Qwen3.5 keeps log(-A); llama.cpp stores A
    if gguf_arch == "gpt2" and name.endswith(("attn_qkv.weight", "attn_output.weight", "ffn_up.weight",
                                              "ffn_down.weight")):
        return np.ascontiguousarray(array.T)  # Conv1D keeps [in, out]; llama.cpp stores [out, in]
    if name.endswith(("shortconv.conv.weight", "ssm_conv1d.weight")):
        return array.reshape(array.shape[0], -1)  # a depthwise kernel [channels, 1, L] is stored as [channels, L]
    if name.endswith("ffn_gate_inp_shexp.weight"):
        return array.reshape(-1)  # Qwen2-MoE's shared-expert gate [1, hidden] is stored as a vector
    return array


def _rotary_permute(weight_rows: np.ndarray, heads: int) -> np.ndarray:
    """Per head, interleave the two rotary halves: rows (h, half, i) → (h, i, half)."""
    rows, cols = weight_rows.shape
    per_head = weight_rows.reshape(heads, 2, rows // heads // 2, cols)
    return np.ascontiguousarray(per_head.swapaxes(1, 2).reshape(rows, cols))


def _add_tensor(writer: gguf.GGUFWriter, name: str, array: np.ndarray) -> None:
    """F16 embedding, Q8_0 for ``Q8_TENSORS``, F32 for the rest."""
    if name == "token_embd.weight":
        writer.add_tensor(name, array.astype(np.float16))
    elif name in Q8_TENSORS:
        quantized = gguf.quants.quantize(array.astype(np.float32), gguf.GGMLQuantizationType.Q8_0)
        writer.add_tensor(name, quantized, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    else:
        writer.add_tensor(name, np.ascontiguousarray(array, dtype=np.float32))
