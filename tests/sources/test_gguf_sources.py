"""GGUF sources: a tiny GGUF of each architecture transformers' GGUF loader reads builds and matches transformers.

For each architecture in tests/gguf_files.py ARCHS (files written by the `gguf` package's writer, 2 layers,
hidden 64, F32 weights with an F16 embedding and one Q8_0 tensor, a BPE or sentencepiece tokenizer):
- transformers loads the file with the weights it was written from (a check of the writer itself);
- `graphopt build FILE.gguf --verify` (ort-cpu) converts it through graphopt.sources and builds it;
- the artifact's prefill logits at every position are within 1e-4 of transformers' model loaded from the
  same file; its manifest names the architecture and the GGUF; its tokenizer round-trips text.
CONVERT_ONLY architectures (a trace too slow for the suite) are converted and checked, not built.
An architecture transformers cannot load from a GGUF, or loads with weights missing, is skipped with the
reason; graphopt itself refuses the latter (a build would carry random weights).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers

from gguf_files import ARCHS, source_model, write_tiny_gguf
from graphopt.build.artifact import BuildOptions, build
from graphopt.core.errors import SourceError
from graphopt.core.manifest import MANIFEST
from graphopt.passes.pipeline import load_recipe
from graphopt.core.progress import QUIET
from graphopt.runtime.engine import OrtEngine
from graphopt.sources import load_causal_lm, load_tokenizer, resolve_source

TOLERANCE = 1e-4
PROMPT = 20  # crosses the 8-key sliding windows of the Gemma files
LOSSY = 1e-3  # F16 or Q8_0 rounding of weights ~N(0, 0.02): Q8_0's step is max|w| / 127 per 32 values
EXACT = 1e-6  # F32 tensors; Gemma's and Nemotron's norms come back from w + 1 with a float rounding


# Also read by transformers' GGUF loader but beyond the issue's list: marked slow, so `make test-fast` leaves
# them out (a build is ~5-10 s on 2 cores, most of it torch.onnx.export); `make test` runs them all.
SLOW = {"stablelm", "nemotron", "qwen2_moe", "lfm2", "minimax_m2"}
# Converted and checked, not built: tracing Qwen3.5's GatedDeltaNet alone takes ~55 s here (73 s a build),
# and that trace does not depend on where the weights came from.
CONVERT_ONLY = {"qwen3_5"}
BUILT = [pytest.param(a, marks=pytest.mark.slow) if a in SLOW else a for a in ARCHS if a not in CONVERT_ONLY]


@pytest.fixture(scope="module", params=BUILT)
def built(request, tmp_path_factory):
    arch = request.param
    root = tmp_path_factory.mktemp(f"gguf-{arch}")
    gguf_path = write_tiny_gguf(arch, root / f"tiny-{arch}.gguf")
    hf = _transformers_model(arch, gguf_path)
    with pytest.MonkeyPatch.context() as env:
        env.setenv("GRAPHOPT_CACHE", str(root / "cache"))  # the conversion never touches ~/.cache
        report = build(str(gguf_path), BuildOptions(load_recipe("ort-cpu"), root / "artifact", verify=True), QUIET)
    return arch, gguf_path, report, root / "artifact", hf


def _transformers_model(arch: str, gguf_path: Path) -> transformers.PreTrainedModel:
    """transformers' own model from the file; skips where transformers cannot read the file whole."""
    version = f"transformers {transformers.__version__}"
    try:
        hf, info = transformers.AutoModelForCausalLM.from_pretrained(
            gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32, output_loading_info=True)
    except (NotImplementedError, ValueError) as exc:  # unknown architecture; a size mismatch is a writer bug
        pytest.skip(f"{version} cannot load a '{arch}' GGUF: {type(exc).__name__}: {' '.join(str(exc).split())[:240]}")
    missing = sorted({re.sub(r"^.*?\.\d+\.", "", key) for key in info["missing_keys"]})  # per layer
    if missing:
        pytest.skip(f"{version} loads a '{arch}' GGUF without some of its weights (left at random init, so "
                    f"there is no reference; graphopt refuses such a file): {', '.join(missing)}")
    return hf.eval()


def test_transformers_reads_the_written_weights(built) -> None:
    arch, _, _, _, hf = built
    written, loaded = source_model(arch).state_dict(), hf.state_dict()
    assert written.keys() <= loaded.keys(), sorted(written.keys() - loaded.keys())
    for name, weight in written.items():
        diff = (loaded[name] - weight).abs().max().item()
        limit = LOSSY if _is_lossy(arch, name) else EXACT
        assert diff <= limit, f"{arch}: {name} differs by {diff:.2e} after the GGUF round trip"


def _is_lossy(arch: str, hf_name: str) -> bool:
    """The F16 embedding (and a head tied to it) and the Q8_0 tensor of block 0 are stored lossily."""
    layer0_down = {"gpt2": "h.0.mlp.c_proj", "falcon": "h.0.mlp.dense_4h_to_h", "starcoder2": "layers.0.mlp.c_proj",
                   "lfm2": "layers.0.feed_forward.w2"}
    lossy = ("embed", "wte", "word_embeddings", "lm_head", "layers.0.mlp.experts.down_proj",
             layer0_down.get(arch, "layers.0.mlp.down_proj"))
    return any(part in hf_name for part in lossy)


def test_prefill_logits_match_transformers(built, record_property) -> None:
    arch, _, _, artifact, hf = built
    engine = OrtEngine(artifact, max_slots=1, max_seq=64, threads=1)
    engine.cache.allocate()
    prompt = np.random.default_rng(0).integers(0, hf.config.vocab_size, size=PROMPT).tolist()
    positions = np.arange(PROMPT)[None]
    got = engine.step(np.array([prompt]), positions, np.zeros(1, np.int32), np.array([PROMPT], np.int32),
                      positions)[0]
    with torch.no_grad():
        expected = hf(input_ids=torch.tensor([prompt]), use_cache=False).logits[0].numpy()
    diff = float(np.abs(got - expected).max())
    record_property("max_abs_logit_diff", diff)  # in --junitxml reports
    assert diff <= TOLERANCE, f"{arch}: prefill logits differ from transformers' by {diff:.2e}"


def test_manifest_names_the_architecture(built) -> None:
    arch, gguf_path, report, artifact, hf = built
    source = json.loads((artifact / MANIFEST).read_text())["source"]
    assert source == report["source"]
    assert source["architecture"] == type(hf).__name__
    assert source["model_type"] == hf.config.model_type
    assert source["id"] == gguf_path.stem and source["spec"] == str(gguf_path.resolve())


def test_tokenizer_and_chat_template_carried_over(built) -> None:
    arch, _, _, artifact, hf = built
    tokenizer = transformers.AutoTokenizer.from_pretrained(artifact / "tokenizer")
    ids = tokenizer("the thin", add_special_tokens=False)["input_ids"]
    assert ids and max(ids) < hf.config.vocab_size and tokenizer.decode(ids) == "the thin", (arch, ids)
    assert tokenizer.chat_template, f"{arch}: the GGUF's chat template was not carried into the artifact"


@pytest.mark.parametrize("arch", sorted(CONVERT_ONLY))
def test_conversion_matches_transformers(arch: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                        record_property) -> None:
    gguf_path = write_tiny_gguf(arch, tmp_path / f"tiny-{arch}.gguf")
    hf = _transformers_model(arch, gguf_path)
    monkeypatch.setenv("GRAPHOPT_CACHE", str(tmp_path / "cache"))
    source = resolve_source(str(gguf_path))
    assert source.architecture == type(hf).__name__ and source.model_id == gguf_path.stem
    converted = load_causal_lm(source)
    prompt = torch.tensor([np.random.default_rng(0).integers(0, hf.config.vocab_size, size=PROMPT).tolist()])
    with torch.no_grad():
        diff = (converted(input_ids=prompt).logits - hf(input_ids=prompt).logits).abs().max().item()
    record_property("max_abs_logit_diff", diff)
    assert diff <= TOLERANCE, f"{arch}: the converted folder's logits differ from transformers' by {diff:.2e}"
    assert load_tokenizer(source)("the thin", add_special_tokens=False)["input_ids"]


def test_gguf_read_without_some_weights_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A file transformers reads only in part (gpt-oss in 5.24: experts and sinks) is refused, not built random."""
    gguf_path = write_tiny_gguf("gpt_oss", tmp_path / "tiny-gpt_oss.gguf")
    _, info = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, gguf_file=gguf_path.name, dtype=torch.float32, output_loading_info=True)
    if not info["missing_keys"]:
        pytest.skip(f"transformers {transformers.__version__} reads gpt-oss GGUFs whole: nothing to refuse")
    monkeypatch.setenv("GRAPHOPT_CACHE", str(tmp_path / "cache"))
    with pytest.raises(SourceError, match=r"without some of the model's weights \(.*mlp\.experts\.gate_up_proj"):
        resolve_source(str(gguf_path))
    assert list((tmp_path / "cache" / "gguf").iterdir()) == []  # nothing cached
