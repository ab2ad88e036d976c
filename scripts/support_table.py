"""Print the README's architecture support table, measured on the tiny models of the coverage matrix.

    .venv/bin/python scripts/support_table.py [ARCH ...] > table.md      (~10 minutes on 2 cores)

For each architecture in tests/tiny_models.py MATRIX (2 layers, random weights): trace once, then
- ort-cpu: build with --verify; ✓ when every prompt position's logits are within 1e-4 of Hugging Face's;
- trt: build --target trt (check-trt passes); "AOT" when TensorRT-RTX also builds an SM89 engine from it;
- int8 / int4: build; the cell shows the KL divergence against fp32 measured by the build;
- speculative: the int4 build drafts for the fp32 build (K = 4, batch 2, verified in one call on the
  multi-token graph); ✓ when the greedy tokens equal plain greedy decoding's.
A failure shows ✗ with the error's first words, so the table never claims what did not run.
"""

from __future__ import annotations

import logging
import sys
import tempfile
import traceback
from pathlib import Path

import numpy as np
import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from tiny_models import MATRIX, MATRIX_VOCAB, make_tiny_model  # noqa: E402

from graphopt.build import quant as quant_build  # noqa: E402
from graphopt.build.artifact import BuildOptions, build_traced, load, trace_loaded  # noqa: E402
from graphopt.build.features import describe  # noqa: E402
from graphopt.passes.pipeline import load_recipe  # noqa: E402
from graphopt.core.progress import QUIET  # noqa: E402
from graphopt.runtime.engine_api import open_engine  # noqa: E402
from graphopt.runtime.llm import LLM  # noqa: E402
from graphopt.runtime.sampler import SamplingParams  # noqa: E402
from graphopt.runtime.speculative import SpecConfig  # noqa: E402

COLUMNS = ("architecture", "features found", "ort-cpu", "trt", "int8 (KL)", "int4 (KL)", "speculative")


def _build(loaded, recipe: str, out: Path, **options) -> dict:
    opts = BuildOptions(load_recipe(recipe), out, **options)
    return build_traced(loaded, opts, QUIET, quant_build.context_for(opts, loaded, QUIET), copy=True)


def _cell(check) -> str:
    try:
        return check()
    except Exception as exc:  # the table reports it; the traceback goes to stderr
        traceback.print_exc()
        return "✗ " + " ".join(str(exc).split())[:40]


def _parity(artifact: Path, hf) -> str:
    prompt = np.random.default_rng(0).integers(3, MATRIX_VOCAB, size=20).tolist()
    engine = open_engine(artifact, max_slots=1, max_seq=64, threads=1)
    engine.cache.allocate()
    positions = np.arange(20)[None]
    got = engine.step(np.array([prompt]), positions, np.zeros(1, np.int32), np.array([20], np.int32), positions)[0]
    with torch.no_grad():
        expected = hf(input_ids=torch.tensor([prompt]), use_cache=False).logits[0].numpy()
    diff = float(np.abs(got - expected).max())
    return f"✓ ({diff:.0e})" if diff <= 1e-4 else f"✗ ({diff:.0e})"


def _trt(loaded, out: Path) -> str:
    _build(loaded, "trt", out)
    try:
        from graphopt.targets.trt_aot import aot_check

        aot_check(out, ["sm89"])
        return "✓ AOT"
    except ImportError:
        return "✓ lowers (no TensorRT-RTX here)"


def _speculative(target: Path, draft: Path) -> str:
    prompts = [[5 + i % 7 for i in range(24)], [9 + i % 5 for i in range(17)]]
    params = SamplingParams(max_new_tokens=24, temperature=0.0, ignore_eos=True)
    plain = [c.token_ids for c in LLM(target, max_slots=2, max_seq=64).generate(prompts, params)]
    spec = SpecConfig(method="draft", draft=draft, num_speculative_tokens=4, adaptive=False)
    fast = [c.token_ids for c in LLM(target, max_slots=2, max_seq=64, speculative=spec).generate(prompts, params)]
    return "✓" if fast == plain else "✗ tokens differ"


def row(arch: str, root: Path) -> list[str]:
    source = make_tiny_model(arch, root / "hf", table=MATRIX)
    words = root / "words.txt"  # the tiny word-level tokenizer knows only w4 … w255
    words.write_text(" ".join(f"w{4 + (i * 37) % (MATRIX_VOCAB - 4)}" for i in range(600)))
    quant = {"calib_text": words, "eval_text": words, "calib_tokens": 256, "eval_tokens": 256}
    loaded = load(str(source), "sdpa", QUIET)
    trace_loaded(loaded, QUIET)
    hf = transformers.AutoModelForCausalLM.from_pretrained(source, attn_implementation="eager").eval()
    report = _build(loaded, "ort-cpu", root / "fp32", verify=True)
    kl = lambda recipe, out: f"✓ {_build(loaded, recipe, out, **quant)['fidelity']['kl_mean']:.1e}"  # noqa: E731
    return [arch, describe(report["features"]), _cell(lambda: _parity(root / "fp32", hf)),
            _cell(lambda: _trt(loaded, root / "trt")), _cell(lambda: kl("ort-cpu-int8", root / "int8")),
            _cell(lambda: kl("ort-cpu-int4", root / "int4")),
            _cell(lambda: _speculative(root / "fp32", root / "int4"))]


def main(archs: list[str]) -> None:
    logging.disable(logging.WARNING)
    print("| " + " | ".join(COLUMNS) + " |")
    print("|" + "---|" * len(COLUMNS))
    for arch in archs or list(MATRIX):
        with tempfile.TemporaryDirectory(prefix=f"support-{arch}-") as tmp:
            print("| " + " | ".join(row(arch, Path(tmp))) + " |", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
