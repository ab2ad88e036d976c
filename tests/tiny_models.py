"""Tiny random Hugging Face models (2 layers) made from transformers configs, saved as local folders."""

from __future__ import annotations

from pathlib import Path

import torch
import transformers

VOCAB = 96

CONFIGS = {
    "llama": lambda: transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=0),
    "mistral": lambda: transformers.MistralConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=1, max_position_embeddings=256, sliding_window=None, bos_token_id=1, eos_token_id=2),
    "qwen2": lambda: transformers.Qwen2Config(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, bos_token_id=1, eos_token_id=2),
    "gpt2": lambda: transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=256, bos_token_id=1, eos_token_id=2),
}


MATRIX_VOCAB = 256
WINDOW = 8  # sliding windows small enough that the matrix's prompts (≥ 12 tokens) cross them
_BASE = dict(vocab_size=MATRIX_VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, bos_token_id=1,
             eos_token_id=2, pad_token_id=0)
_ALTERNATING = ["sliding_attention", "full_attention"]

# The architecture coverage matrix (tests/build/test_arch_matrix.py): one tiny config per architecture, each
# set up to show the feature that architecture brings.
MATRIX = {
    "llama": lambda: transformers.LlamaConfig(**_BASE),
    "mistral": lambda: transformers.MistralConfig(**_BASE, sliding_window=WINDOW),  # one window, every layer
    "mixtral": lambda: transformers.MixtralConfig(**_BASE, num_local_experts=4, num_experts_per_tok=2,
                                                  sliding_window=None),  # MoE
    "qwen2": lambda: transformers.Qwen2Config(**_BASE),  # q/k/v biases
    "qwen3": lambda: transformers.Qwen3Config(**_BASE, head_dim=32),  # QK-norm, head_dim ≠ hidden/heads
    "qwen3_moe": lambda: transformers.Qwen3MoeConfig(**_BASE, head_dim=32, num_experts=4, num_experts_per_tok=2,
                                                     moe_intermediate_size=64, decoder_sparse_step=1),
    "gemma2": lambda: transformers.Gemma2Config(  # alternating windows, attention + final logit softcaps
        **_BASE, head_dim=32, query_pre_attn_scalar=24, sliding_window=WINDOW, attn_logit_softcapping=50.0,
        final_logit_softcapping=30.0),
    "gemma3_text": lambda: transformers.Gemma3TextConfig(  # QK-norm, alternating windows, scaled embeddings
        **_BASE, head_dim=32, query_pre_attn_scalar=24, sliding_window=WINDOW, layer_types=_ALTERNATING),
    "gpt2": lambda: transformers.GPT2Config(  # learned positions, LayerNorm with bias, fused c_attn
        vocab_size=MATRIX_VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=256, bos_token_id=1, eos_token_id=2),
    "gpt_neox": lambda: transformers.GPTNeoXConfig(  # partial rotary, parallel residual, MHA
        vocab_size=MATRIX_VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=256, rotary_pct=0.25, use_parallel_residual=True, bos_token_id=1, eos_token_id=2),
    "falcon": lambda: transformers.FalconConfig(  # new decoder architecture: GQA, parallel attention + MLP
        vocab_size=MATRIX_VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_kv_heads=2,
        new_decoder_architecture=True, parallel_attn=True, bias=False, alibi=False, max_position_embeddings=256,
        bos_token_id=1, eos_token_id=2),
    "starcoder2": lambda: transformers.Starcoder2Config(**_BASE, sliding_window=WINDOW),  # biases, GELU MLP
    "granite": lambda: transformers.GraniteConfig(  # embedding/residual/attention/logit multipliers
        **_BASE, embedding_multiplier=2.0, residual_multiplier=0.5, attention_multiplier=0.2, logits_scaling=4.0),
    "stablelm": lambda: transformers.StableLmConfig(**_BASE, partial_rotary_factor=0.25, use_qkv_bias=True),
    "gpt_oss": lambda: transformers.GptOssConfig(  # sinks, alternating windows, MoE with biases, yarn RoPE
        **dict(_BASE, intermediate_size=64), head_dim=16, num_local_experts=4, num_experts_per_tok=2,
        sliding_window=WINDOW, layer_types=_ALTERNATING),
}


def _llama_rope(**parameters):
    return lambda: transformers.LlamaConfig(**_BASE, rope_parameters={"rope_theta": 10000.0, **parameters})


# Variants of the matrix's families for the forms the matrix itself does not show: RoPE scalings, MQA,
# interleaved rotary (GPT-J), partial rotary with a parallel block (Phi), fused QKV (Phi-3), QK-norm after
# the projection (OLMo2). Built and checked like the matrix, without the int8/trt builds.
VARIANTS = {
    "llama-rope-linear": _llama_rope(rope_type="linear", factor=2.0),
    "llama-rope-dynamic": _llama_rope(rope_type="dynamic", factor=2.0),
    "llama-rope-llama3": _llama_rope(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                     original_max_position_embeddings=64),
    "llama-rope-yarn": _llama_rope(rope_type="yarn", factor=4.0, original_max_position_embeddings=64),
    "llama-rope-longrope": _llama_rope(rope_type="longrope", short_factor=[1.0] * 8, long_factor=[2.0] * 8,
                                       original_max_position_embeddings=64),
    "llama-mqa": lambda: transformers.LlamaConfig(**{**_BASE, "num_key_value_heads": 1}),
    "gptj": lambda: transformers.GPTJConfig(
        vocab_size=MATRIX_VOCAB, n_embd=64, n_layer=2, n_head=4, rotary_dim=8, n_positions=256, bos_token_id=1,
        eos_token_id=2),
    "phi": lambda: transformers.PhiConfig(**{**_BASE, "num_key_value_heads": 4}, partial_rotary_factor=0.5),
    "phi3": lambda: transformers.Phi3Config(**_BASE),
    "olmo2": lambda: transformers.Olmo2Config(**_BASE),
}


def tiny_tokenizer(directory: Path, vocab: int = VOCAB) -> None:
    """A word-level tokenizer over ``vocab`` tokens: '<pad>', '<s>', '</s>', '<unk>', 'w4' … 'w{vocab-1}'."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["<pad>", "<s>", "</s>", "<unk>"] + [f"w{i}" for i in range(4, vocab)]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    tokenizer.save_pretrained(directory)


def make_tiny_model(arch: str, directory: Path, seed: int = 0, table: dict | None = None, **overrides) -> Path:
    """Save a tiny random ``arch`` model from ``table`` (default CONFIGS; MATRIX for the coverage matrix)
    and a tokenizer into ``directory``; returns it."""
    config = (CONFIGS if table is None else table)[arch]()
    for key, value in overrides.items():
        setattr(config, key, value)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # random norms so a wrong weight shows up in the logits
        for name, param in model.named_parameters():
            if "norm" in name or "ln_" in name or "sinks" in name:  # sinks: logits that take real mass
                param.add_(torch.randn_like(param) * (1.0 if "sinks" in name else 0.1))
    model.save_pretrained(directory)
    tiny_tokenizer(directory, config.vocab_size)
    return directory


def tiny_calibration_model(root: Path) -> tuple[Path, Path]:
    """A tiny tied llama (hidden 128) for quantized builds, and ``words.txt``: 3,000 seeded words its
    word-level tokenizer knows (w4 … w95), for calibration and evaluation text."""
    import numpy as np

    hf = make_tiny_model("llama", root / "hf", tie_word_embeddings=True, hidden_size=128, intermediate_size=256)
    words = root / "words.txt"
    words.write_text(" ".join(f"w{i}" for i in np.random.default_rng(0).integers(4, VOCAB, 3000)))
    return hf, words
