"""The compare gate on hand-written compare.json documents (no model), and bad input to compare: one line,
exit 2, nothing written."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
from click.testing import CliRunner

from graphopt.cli.main import main
from graphopt.core.errors import RecipeError
from graphopt.evaluate.gate import (DEFAULTS, CompareError, Thresholds, budgets_only, check, load_baseline, recipe_gate,
                           per_recipe, thresholds)


COST = {"decode_weight_bytes": 1000, "decode_kv_bytes": 100, "prefill_flops_per_token": 2000.5,
        "decode_flops_per_token": 2000, "prefill_peak_activation_bytes": 500, "decode_peak_activation_bytes": 50}


def entry(name: str, kl: float, decode: float, size: int = 1000, spread: float = 0.01) -> dict:
    ratio = decode / 100
    return {"recipe": name, "artifact_bytes": size,
            "fidelity": {"kl_mean": kl, "top1_agreement": 0.95, "ppl_candidate": 10.0},
            "speed": {"ttft_ms": 10.0, "decode_tokens_per_s": decode, "batch_tokens_per_s": 4 * decode},
            "relative": {"decode": ratio, "batch": ratio, "ttft": 1.0},
            "relative_interval": {"decode": [ratio - spread, ratio + spread], "batch": [ratio - spread, ratio + spread],
                                  "ttft": [1.0 - spread, 1.0 + spread]},
            "cost": {"at": {"batch": 1, "prompt_tokens": 64, "context": 96}, **COST}}


def run(kl: float = 0.01, decode: float = 150.0, size: int = 1000, spread: float = 0.01) -> dict:
    return {"format": "graphopt-compare", "model": "m", "model_sha256": "abc", "reference_recipe": "fp32",
            "recipes": [entry("fp32", 0.0, 100.0, 4000), entry("int4", kl, decode, size, spread)]}


LIMITS = {"fp32": DEFAULTS, "int4": DEFAULTS}


def lines(baseline: dict, current: dict, limits: dict = LIMITS) -> list[str]:
    found, _ = check(baseline, current, limits)
    return [r.line() for r in found]


def test_a_run_passes_against_itself() -> None:
    assert lines(run(), run()) == []


def test_fidelity_and_size_regressions_name_metric_and_values() -> None:
    assert lines(run(), run(kl=0.0115)) == []  # +15%: within the default +20%
    found = lines(run(), run(kl=0.0125, size=1100))
    assert found == ["int4: kl_mean 0.01 -> 0.0125 (+25.0%, limit +20%)",
                     "int4: artifact_bytes 1000 -> 1100 (+10.0%, limit +5%)"]
    worse = run()
    worse["recipes"][1]["fidelity"] |= {"top1_agreement": 0.93, "ppl_candidate": 10.5}
    assert lines(run(), worse) == ["int4: top1_agreement 0.95 -> 0.93 (-2.1%, limit -0.01)",
                                   "int4: perplexity 10 -> 10.5 (+5.0%, limit +2%)"]


def test_a_lowered_threshold_fails_the_same_numbers() -> None:
    tight = {"fp32": DEFAULTS, "int4": Thresholds(kl_budget=0.005)}
    assert lines(run(), run(), tight) == ["int4: kl_mean 0.01 over the budget kl_budget 0.005"]
    assert [r.line() for r in budgets_only(run(), tight)] == ["int4: kl_mean 0.01 over the budget kl_budget 0.005"]
    assert budgets_only(run(), LIMITS) is None  # no budget set and no baseline: no gate at all


def test_timing_uses_ratios_to_the_reference_recipe() -> None:
    slower_machine = run()
    for item in slower_machine["recipes"]:  # everything half as fast, ratios unchanged
        item["speed"] = {key: value / 2 for key, value in item["speed"].items()}
    assert lines(run(), slower_machine) == []
    # the change 1.3/1.5 = -13.3%; its 95% bound: new's top (1.31/1.3) and old's bottom (1.5/1.49) in quadrature
    bound = 1.3 / 1.5 * math.exp(math.hypot(math.log(1.31 / 1.3), math.log(1.5 / 1.49))) - 1
    assert lines(run(), run(decode=130.0)) == [
        f"int4: decode tok/s vs reference 1.5 -> 1.3 (-13.3%, limit -10%; 95% at most {bound:+.1%})",
        f"int4: batch tok/s vs reference 1.5 -> 1.3 (-13.3%, limit -10%; 95% at most {bound:+.1%})"]
    assert f"{bound:+.1%}" == "-12.4%"  # 0.8667 · e^0.0102
    loose = {"fp32": DEFAULTS, "int4": Thresholds(decode_down=0.2, batch_down=0.2)}
    assert lines(run(), run(decode=130.0), loose) == []


def test_a_timing_interval_that_reaches_the_threshold_is_inconclusive() -> None:
    # median change -13.3%, but with new's top at 1.36 the change may be only -9.3%: not shown beyond -10%
    found, notes = check(run(), run(decode=130.0, spread=0.06), LIMITS)
    spread = math.hypot(math.log(1.36 / 1.3), math.log(1.5 / 1.49))
    assert found == [] and 1.3 / 1.5 * math.exp(spread) > 0.9
    line = f"(-13.3%, limit -10%; 95% at most {1.3 / 1.5 * math.exp(spread) - 1:+.1%}): inconclusive (±4.7%)"
    assert notes == [f"int4: decode tok/s vs reference 1.5 -> 1.3 {line}",
                     f"int4: batch tok/s vs reference 1.5 -> 1.3 {line}"]
    found, _ = check(run(), run(decode=130.0, spread=0.045), LIMITS)  # at most -10.3%: the whole interval
    assert [r.metric for r in found] == ["decode tok/s vs reference", "batch tok/s vs reference"]
    noisy_baseline = run()
    noisy_baseline["recipes"][1]["relative_interval"]["decode"] = [1.40, 1.80]  # its bottom: 7% below its median
    found, notes = check(noisy_baseline, run(decode=130.0, spread=0.045), LIMITS)
    assert [r.metric for r in found] == ["batch tok/s vs reference"] and "decode" in notes[0]
    old_format = run(decode=130.0)  # a document without intervals: the medians alone decide
    del old_format["recipes"][1]["relative_interval"]
    assert len(check(run(), old_format, LIMITS)[0]) == 2


def paired(change: float, low: float, high: float) -> dict:
    return {"relative": {"decode": change, "batch": 1.0, "ttft": 1.0}, "rounds": 7,
            "relative_interval": {"decode": [low, high], "batch": [0.98, 1.02], "ttft": [0.97, 1.03]}}


def test_timing_beside_the_baseline_artifact_is_tested_directly() -> None:
    """With vs_baseline (the baseline's artifact timed in the same rounds) the stored ratios are not used: a
    whole-run shift that moved the ratio to the reference fails nothing; a paired drop beyond the threshold
    fails, the reference recipe included; one whose interval reaches the threshold is inconclusive."""
    shifted = run(decode=120.0)  # stored ratio 1.5 -> 1.2 (-20%) ...
    shifted["recipes"][1]["vs_baseline"] = paired(0.99, 0.97, 1.01)  # ... but side by side nothing changed
    found, notes = check(run(), shifted, LIMITS)
    assert found == [] and notes == []
    slower = run()
    slower["recipes"][0]["vs_baseline"] = paired(0.8, 0.75, 0.86)  # the fp32 reference itself got slower
    slower["recipes"][1]["vs_baseline"] = paired(0.85, 0.7, 0.95)  # reaches -5%: inconclusive
    found, notes = check(run(), slower, LIMITS)
    assert [r.line() for r in found] == ["fp32: decode tok/s vs the baseline's artifact, same rounds 1 -> 0.8 "
                                         "(-20.0%, limit -10%; 95% at most -14.0%)"]
    assert notes == ["int4: decode tok/s vs the baseline's artifact, same rounds 1 -> 0.85 (-15.0%, limit -10%; "
                     "95% at most -5.0%): inconclusive (±14.7%)"]


def test_cost_model_is_held_to_one_percent() -> None:
    grown = run()
    grown["recipes"][1]["cost"] |= {"decode_weight_bytes": 1011, "decode_flops_per_token": 2020}  # +1.1%, +1.0%
    assert lines(run(), grown) == ["int4: cost decode_weight_bytes 1000 -> 1011 (+1.1%, limit +1%)"]
    elsewhere = run()
    elsewhere["recipes"][1]["cost"]["at"] = {"batch": 1, "prompt_tokens": 32, "context": 48}
    elsewhere["recipes"][1]["cost"]["decode_kv_bytes"] = 50_000
    found, notes = check(run(), elsewhere, LIMITS)
    assert found == [] and notes == [
        "int4: cost model not gated (baseline counted at {'batch': 1, 'prompt_tokens': 64, 'context': 96}, "
        "this run at {'batch': 1, 'prompt_tokens': 32, 'context': 48})"]


def test_timing_is_not_gated_when_the_reference_recipe_changed() -> None:
    other = run(decode=50.0)
    other["reference_recipe"] = "int4"
    found, notes = check(run(), other, LIMITS)
    assert found == [] and "reference recipe changed" in notes[0]


def test_fidelity_is_not_gated_across_evaluation_texts() -> None:
    worse, old = run(kl=0.05, size=1100), run()
    old["eval"], worse["eval"] = {"text": "installed-package-docs (40 packages)"}, {"sha256": "be64d7"}
    found, notes = check(old, worse, LIMITS)
    assert [r.metric for r in found] == ["artifact_bytes"] and "evaluation text changed" in notes[0]
    same_text = run()
    same_text["eval"] = worse["eval"]
    assert [r.metric for r in check(same_text, worse, LIMITS)[0]] == ["kl_mean", "artifact_bytes"]


def test_other_weights_are_refused() -> None:
    other = run()
    other["model_sha256"] = "def"
    with pytest.raises(CompareError, match="other weights"):
        check(run(), other, LIMITS)


def test_recipe_gate_table_and_command_line_precedence(tmp_path: Path) -> None:
    recipe = tmp_path / "r.toml"
    recipe.write_text('name = "r"\n[gate]\nkl_up = 0.5\nsize_up = 0.1\n[[pass]]\nname = "cleanup"\n')
    assert recipe_gate(str(recipe)) == {"kl_up": 0.5, "size_up": 0.1}
    chosen = thresholds(str(recipe), {"kl_up": 0.3, "decode_down": None})
    assert (chosen.kl_up, chosen.size_up, chosen.decode_down) == (0.3, 0.1, DEFAULTS.decode_down)
    recipe.write_text('name = "r"\n[gate]\nkl_upp = 0.5\n[[pass]]\nname = "cleanup"\n')
    with pytest.raises(RecipeError, match="no key 'kl_upp'"):
        recipe_gate(str(recipe))
    assert recipe_gate("ort-cpu") == {}


@pytest.mark.parametrize("content,message", [
    (None, "does not exist"), ("{not json", "not valid JSON"), ('{"format": "other"}', "not a graphopt compare.json"),
    ('{"format": "graphopt-compare", "recipes": [{"recipe": "x"}]}', "lacks recipe/fidelity"),
])
def test_bad_baselines(tmp_path: Path, content: str | None, message: str) -> None:
    path = tmp_path / "base.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(CompareError, match=message):
        load_baseline(path)


@pytest.mark.parametrize("args,message", [
    (["no-such-recipe"], "unknown recipe 'no-such-recipe'"),
    (["ort-cpu", "--baseline", "{missing}"], "does not exist"),
    (["ort-cpu", "--baseline", "{malformed}"], "not valid JSON"),
    (["ort-cpu", "ort-cpu"], "repeat a name"),
    (["--bisect", "ort-cpu", "ort-cpu-int8"], "exactly one recipe"),
    (["ort-cpu", "--min-rounds", "2"], "--min-rounds 2 is too small"),
    (["ort-cpu", "--min-rounds", "8", "--max-rounds", "6"], "--max-rounds 6 is too small; use at least 8"),
    (["ort-cpu", "--precision", "0"], "--precision 0.0 / --time-cap"),
    ([], "at least one recipe"),
])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path: Path, args: list[str], message: str) -> None:
    (tmp_path / "malformed.json").write_text("[1, 2")
    args = [a.format(missing=tmp_path / "missing.json", malformed=tmp_path / "malformed.json") for a in args]
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["compare", *args, "--model", str(tmp_path / "no-model"), "--out", str(out)])
    assert result.exit_code == 2, result.output
    assert result.output.count("\n") == 1 and result.output.startswith("error: ") and message in result.output
    assert not out.exists()


def test_regression_line_for_a_zero_baseline() -> None:
    base = run()
    base["recipes"][1]["fidelity"]["kl_mean"] = 0.0
    assert lines(base, copy.deepcopy(run(kl=0.01))) == ["int4: kl_mean 0 -> 0.01 (new, limit +20%)"]
    assert json.dumps(DEFAULTS.__dict__)  # thresholds serialise into compare.json


def test_one_line_per_failing_recipe() -> None:
    """A recipe that got slower on every timing metric and grew is one failure: one line naming each metric."""
    slower = run(size=1100)
    slower["recipes"][1]["vs_baseline"] = {
        "relative": {"decode": 0.03, "batch": 0.12, "ttft": 0.25}, "rounds": 5,
        "relative_interval": {"decode": [0.02, 0.04], "batch": [0.1, 0.14], "ttft": [0.2, 0.3]}}
    found, _ = check(run(), slower, LIMITS)
    assert [r.metric for r in found] == ["artifact_bytes", "decode tok/s vs the baseline's artifact, same rounds",
                                         "batch tok/s vs the baseline's artifact, same rounds",
                                         "TTFT speed vs the baseline's artifact, same rounds"]
    [line] = per_recipe(found)
    assert line == "int4: " + "; ".join(r.detail() for r in found)
    assert line.startswith("int4: artifact_bytes 1000 -> 1100 (+10.0%, limit +5%); decode tok/s vs the baseline's")
    assert per_recipe([]) == []
