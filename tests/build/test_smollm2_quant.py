"""The real model quantized: SmolLM2-135M --int8 against fp32.

One build from the shared trace (tests/smollm2_trace.py): calibration on the built-in corpus's
calibration split (graphopt/quant/corpus/), SmoothQuant, int8 blocks, MatMulNBits with int8 activations,
the int8 tied embedding; the build report's fidelity is measured on its evaluation split (2,040
positions, disjoint text).

The budget is KL <= 0.01 and top-1 >= 97%. Measured on graphopt-prose-1 (fixed text, so the figure no
longer moves with the installed packages as it did on their prose, 96.7-97.0%): KL 0.0022, top-1
97.06% (60 disagreements of 2,040; the line is 61). The margin is one token: the error is the int8
activations inside MatMulNBits (accuracy_level 4), whose rounding can differ on a CPU with other
vector instructions, so a miss by a token or two elsewhere is that, not a regression.
"""

from __future__ import annotations

import pytest

from graphopt.build.artifact import BuildOptions
from graphopt.build.precision import PrecisionFlags, precision_recipe
from graphopt.runtime.llm import LLM
from graphopt.runtime.sampler import SamplingParams
from smollm2_trace import build_smollm2

pytestmark = pytest.mark.slow


def test_int8_build_is_within_budget_and_generates(tmp_path) -> None:
    out = tmp_path / "int8"
    report = build_smollm2(BuildOptions(precision_recipe(PrecisionFlags(int8=True), None, "ort-cpu"), out))
    fidelity = report["fidelity"]
    assert fidelity["kl_mean"] <= 0.01, fidelity
    assert fidelity["top1_agreement"] >= 0.97, fidelity
    ops = report["ops"]["final"]
    assert ops["com.microsoft::MatMulNBits"] == 30 * 5 + 1 and ops["com.microsoft::GatherBlockQuantized"] == 1
    assert report["artifact_bytes"] < 170e6  # fp32: 538 MB
    (result,) = LLM(out, max_slots=1, max_seq=128).generate([[1, 504, 3575, 282, 4649, 314]],
                                                            SamplingParams(max_new_tokens=8))
    assert len(result.token_ids) == 8
