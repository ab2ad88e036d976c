"""The compare gate: a recipe's numbers in this run against the same recipe in a baseline compare.json.

A regression names the recipe, the metric, the old and new values and the limit; the gate prints one line
per failing recipe, its regressions joined by "; " (:func:`per_recipe`)::

    ort-cpu-int4: kl_mean 0.0123 -> 0.0311 (+152.8%, limit +20%); top1_agreement 0.71 -> 0.64 (-9.9%, limit -0.01)

Thresholds (defaults below) come from, lowest to highest precedence: :data:`DEFAULTS`, the recipe's own
``[gate]`` table, then the command line (``--kl-up 0.1`` …)::

    [gate]
    kl_up = 0.2         # KL(fp32 ‖ recipe) may grow by 20% ...
    kl_abs = 1e-4       # ... and always by this much (an fp32 recipe's KL is ~1e-9: noise, not loss)
    kl_budget = 0.05    # absolute ceiling on KL, with or without a baseline (also bisect's budget)
    top1_down = 0.01    # top-1 agreement may drop by 1 point
    ppl_up = 0.02       # perplexity may grow by 2%
    decode_down = 0.1   # decode tok/s relative to the reference recipe may drop by 10%
    batch_down = 0.1    # batch throughput relative to the reference recipe may drop by 10%
    ttft_up = 0.25      # TTFT relative to the reference recipe may grow by 25%
    size_up = 0.05      # artifact bytes may grow by 5%
    cost_up = 0.01      # each cost-model figure (bytes / FLOPs per token, peak activations) may grow by 1%

Timing metrics are never compared as absolute numbers: each run divides them by the reference recipe's
(the first one) measured in the same round, and reports the median ratio with its 95% interval. The change
new/old of a ratio gets a 95% interval from both runs' intervals, combined in quadrature on a log scale (two
independent measurements); a timing regression is reported only when that whole interval lies beyond the
threshold. When only the median change does, the gate notes the line as ``inconclusive (±x%)`` and passes.
The cost model (graphopt.evaluate.cost_model) is exact, so it is held to ``cost_up`` as it is.

When the baseline's artifacts are still in its folder (``OLD/artifacts/RECIPE``, as compare writes them),
each is timed in the same rounds as this run's artifact of the same recipe, and the gate tests that paired
change instead (``vs_baseline``: new/old per round, its 95% interval against the threshold), so a load
shift between the two runs cannot fail it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import tomllib
from importlib import resources
from pathlib import Path
from typing import Any

from graphopt.core.errors import GraphoptError, RecipeError

FORMAT = "graphopt-compare"
COST_KEYS = ("decode_weight_bytes", "decode_kv_bytes", "prefill_flops_per_token", "decode_flops_per_token",
             "prefill_peak_activation_bytes", "decode_peak_activation_bytes")  # graphopt.evaluate.cost_model


class CompareError(GraphoptError):
    """Bad input to compare / diff: a baseline that cannot be read, recipes that cannot be compared."""


@dataclasses.dataclass(frozen=True)
class Thresholds:
    kl_up: float = 0.20
    kl_abs: float = 1e-4
    kl_budget: float | None = None
    top1_down: float = 0.01
    ppl_up: float = 0.02
    decode_down: float = 0.10
    batch_down: float = 0.10
    ttft_up: float = 0.25
    size_up: float = 0.05
    cost_up: float = 0.01


DEFAULTS = Thresholds()
FIELDS = tuple(f.name for f in dataclasses.fields(Thresholds))


@dataclasses.dataclass(frozen=True)
class Regression:
    recipe: str
    metric: str
    old: float | None
    new: float
    limit: str
    spread: float | None = None  # timing: the 95% half-width of log(new/old), both runs' intervals combined

    def line(self) -> str:
        return f"{self.recipe}: {self.detail()}"

    def detail(self) -> str:
        """The line without the recipe's name: metric, old -> new, change, limit."""
        if self.old is None:
            return f"{self.metric} {self.new:.4g} over the budget {self.limit}"
        change = f"{(self.new / self.old - 1):+.1%}" if self.old else "new"
        within = f"; 95% at most {self.new / self.old * math.exp(self.spread) - 1:+.1%}" if self.spread else ""
        return f"{self.metric} {self.old:.4g} -> {self.new:.4g} ({change}, limit {self.limit}{within})"

    def half_width(self) -> float:
        """The change's 95% half-width, relative (±x%)."""
        return math.exp(self.spread or 0.0) - 1


def per_recipe(found: list[Regression]) -> list[str]:
    """One line per failing recipe, its regressions joined by "; " in the order found (a recipe that got
    slower on decode, batch and TTFT at once is one failure, not three)."""
    by_recipe: dict[str, list[str]] = {}
    for regression in found:
        by_recipe.setdefault(regression.recipe, []).append(regression.detail())
    return [f"{recipe}: " + "; ".join(details) for recipe, details in by_recipe.items()]


def recipe_gate(spec: str) -> dict[str, float]:
    """The ``[gate]`` table of a recipe (built-in name or TOML path; already validated by load_recipe)."""
    path = Path(spec)
    if path.suffix == ".toml" or path.exists():
        text = path.read_text(encoding="utf-8")
    else:
        text = (resources.files("graphopt.models") / f"{spec}.toml").read_text(encoding="utf-8")
    table = tomllib.loads(text).get("gate", {})
    for key, value in table.items():
        if key not in FIELDS:
            raise RecipeError(f"recipe {spec}: [gate] has no key {key!r}; keys: {', '.join(FIELDS)}")
        if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
            raise RecipeError(f"recipe {spec}: [gate] {key} = {value!r} should be a number ≥ 0")
    return {key: float(value) for key, value in table.items()}


def thresholds(spec: str, overrides: dict[str, float | None]) -> Thresholds:
    """DEFAULTS, then the recipe's [gate], then the command line's values that were given."""
    given = {key: value for key, value in overrides.items() if value is not None}
    return dataclasses.replace(DEFAULTS, **(recipe_gate(spec) | given))


def load_baseline(path: Path) -> dict[str, Any]:
    """A compare.json from an earlier run; one-line errors for a missing, unreadable or foreign file."""
    if not path.is_file():
        raise CompareError(f"--baseline {path} does not exist; pass the compare.json of an earlier run "
                           "(e.g. the main branch's CI artifact) or drop --baseline")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CompareError(f"--baseline {path} is not valid JSON ({exc}); pass a compare.json written by "
                           "'graphopt compare'") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("recipes"), list):
        raise CompareError(f"--baseline {path} is not a graphopt compare.json (no format {FORMAT!r} with a "
                           "'recipes' list); pass the compare.json written by 'graphopt compare'")
    for entry in data["recipes"]:
        if not isinstance(entry, dict) or not {"recipe", "fidelity", "relative", "artifact_bytes"} <= set(entry):
            raise CompareError(f"--baseline {path}: a recipe entry lacks recipe/fidelity/relative/artifact_bytes; "
                               "regenerate it with this version of 'graphopt compare'")
    return data


def check(baseline: dict[str, Any], current: dict[str, Any],
          limits: dict[str, Thresholds]) -> tuple[list[Regression], list[str]]:
    """Regressions of every recipe in ``current`` (thresholds per recipe name), and notes on what was skipped."""
    notes: list[str] = []
    if baseline.get("model_sha256") != current.get("model_sha256"):
        raise CompareError(f"the baseline was measured on other weights ({baseline.get('model')}) than this run "
                           f"({current.get('model')}); compare the same model")
    same_reference = baseline.get("reference_recipe") == current.get("reference_recipe")
    if not same_reference:
        notes.append(f"timing not gated: the reference recipe changed ({baseline.get('reference_recipe')} -> "
                     f"{current.get('reference_recipe')})")
    same_text = _eval_text(baseline) == _eval_text(current)
    if not same_text:
        notes.append(f"fidelity not gated: the evaluation text changed ({_eval_text(baseline)} -> "
                     f"{_eval_text(current)}); KL and top-1 on different texts are not comparable")
    old_by_name = {entry["recipe"]: entry for entry in baseline["recipes"]}
    found: list[Regression] = []
    for entry in current["recipes"]:
        limit = limits[entry["recipe"]]
        found += budget(entry, limit)
        if (old := old_by_name.get(entry["recipe"])) is None:
            notes.append(f"{entry['recipe']}: not in the baseline, nothing to compare with")
            continue
        found += (fidelity_regressions(entry, old, limit) if same_text else []) + size_regressions(entry, old, limit)
        cost, cost_notes = cost_regressions(entry, old, limit)
        found, notes = found + cost, notes + cost_notes
        if "vs_baseline" in entry or (same_reference and entry["recipe"] != current.get("reference_recipe")):
            timing, timing_notes = timing_regressions(entry, old, limit)
            found, notes = found + timing, notes + timing_notes
    return found, notes


def _eval_text(data: dict[str, Any]) -> str | None:
    """The evaluation text's sha256 (its source name in a compare.json from before the hash was recorded)."""
    text = data.get("eval") or {}
    return text.get("sha256") or text.get("text")


def budgets_only(current: dict[str, Any], limits: dict[str, Thresholds]) -> list[Regression] | None:
    """Without a baseline only ``kl_budget`` can be checked; None when no recipe sets one (no gate)."""
    if all(limits[e["recipe"]].kl_budget is None for e in current["recipes"]):
        return None
    return [r for e in current["recipes"] for r in budget(e, limits[e["recipe"]])]


def budget(entry: dict[str, Any], limit: Thresholds) -> list[Regression]:
    kl = entry["fidelity"]["kl_mean"]
    if limit.kl_budget is not None and kl > limit.kl_budget:
        return [Regression(entry["recipe"], "kl_mean", None, kl, f"kl_budget {limit.kl_budget:g}")]
    return []


def fidelity_regressions(new: dict[str, Any], old: dict[str, Any], limit: Thresholds) -> list[Regression]:
    name, a, b = new["recipe"], old["fidelity"], new["fidelity"]
    found = []
    if b["kl_mean"] > a["kl_mean"] * (1 + limit.kl_up) and b["kl_mean"] - a["kl_mean"] > limit.kl_abs:
        found.append(Regression(name, "kl_mean", a["kl_mean"], b["kl_mean"], f"+{limit.kl_up:.0%}"))
    if b["top1_agreement"] < a["top1_agreement"] - limit.top1_down:
        found.append(Regression(name, "top1_agreement", a["top1_agreement"], b["top1_agreement"],
                                f"-{limit.top1_down:g}"))
    if b["ppl_candidate"] > a["ppl_candidate"] * (1 + limit.ppl_up):
        found.append(Regression(name, "perplexity", a["ppl_candidate"], b["ppl_candidate"], f"+{limit.ppl_up:.0%}"))
    return found


def size_regressions(new: dict[str, Any], old: dict[str, Any], limit: Thresholds) -> list[Regression]:
    if new["artifact_bytes"] > old["artifact_bytes"] * (1 + limit.size_up):
        return [Regression(new["recipe"], "artifact_bytes", old["artifact_bytes"], new["artifact_bytes"],
                           f"+{limit.size_up:.0%}")]
    return []


def timing_limits(limit: Thresholds) -> list[tuple[str, str, float, str]]:
    """(ratio key, metric, allowed relative drop of the ratio, the threshold as shown). TTFT's threshold is on
    time (+25%), its ratio is reference/ours, so the allowed drop of the ratio is 1 − 1/1.25."""
    return [("decode", "decode tok/s vs reference", limit.decode_down, f"-{limit.decode_down:.0%}"),
            ("batch", "batch tok/s vs reference", limit.batch_down, f"-{limit.batch_down:.0%}"),
            ("ttft", "TTFT speed vs reference", 1 - 1 / (1 + limit.ttft_up), f"+{limit.ttft_up:.0%} TTFT")]


def timing_regressions(new: dict[str, Any], old: dict[str, Any],
                       limit: Thresholds) -> tuple[list[Regression], list[str]]:
    """Ratios to the reference recipe (above 1 = better) whose median dropped by more than the threshold.
    One fails when the whole 95% interval of its change new/old lies beyond the threshold; otherwise it is a
    note: inconclusive (±x%). Without intervals (an older baseline) the medians alone decide."""
    if "vs_baseline" in new:
        return paired_regressions(new, limit)
    found, notes = [], []
    for key, metric, allowed, shown in timing_limits(limit):
        a, b = old["relative"].get(key), new["relative"].get(key)
        if a is None or b is None or b >= a * (1 - allowed):
            continue
        spread = _spread(old.get("relative_interval", {}).get(key), a, new.get("relative_interval", {}).get(key), b)
        regression = Regression(new["recipe"], metric, a, b, shown, spread)
        if b / a * math.exp(spread) < 1 - allowed:
            found.append(regression)
        else:
            notes.append(f"{regression.line()}: inconclusive (±{regression.half_width():.1%})")
    return found, notes


def paired_regressions(new: dict[str, Any], limit: Thresholds) -> tuple[list[Regression], list[str]]:
    """The recipe's artifact against its baseline artifact timed in the same rounds: the change new/old per
    round (above 1 = better). A regression when the whole 95% interval lies beyond the threshold."""
    found, notes = [], []
    paired = new["vs_baseline"]
    for key, metric, allowed, shown in timing_limits(limit):
        change, (low, high) = paired["relative"][key], paired["relative_interval"][key]
        if change >= 1 - allowed:
            continue
        name = metric.replace("vs reference", "vs the baseline's artifact, same rounds")
        regression = Regression(new["recipe"], name, 1.0, change, shown, math.log(high / change) if change else None)
        if high < 1 - allowed:
            found.append(regression)
        else:
            notes.append(f"{regression.line()}: inconclusive (±{(high - low) / 2 / change:.1%})")
    return found, notes


def _spread(old_interval: list[float] | None, a: float, new_interval: list[float] | None, b: float) -> float:
    """Half-width of log(b/a) toward 'no regression': b's upper side and a's lower side, in quadrature."""
    up = math.log(new_interval[1] / b) if new_interval else 0.0
    down = math.log(a / old_interval[0]) if old_interval else 0.0
    return math.hypot(up, down)


def cost_regressions(new: dict[str, Any], old: dict[str, Any], limit: Thresholds) -> tuple[list[Regression], list[str]]:
    """Cost-model figures that grew by more than ``cost_up`` (exact figures: no interval)."""
    a, b = old.get("cost"), new.get("cost")
    if a is None or b is None:
        return [], [] if b is None else [f"{new['recipe']}: cost model not gated (the baseline has none)"]
    if a["at"] != b["at"]:
        return [], [f"{new['recipe']}: cost model not gated (baseline counted at {a['at']}, this run at {b['at']})"]
    return [Regression(new["recipe"], f"cost {key}", a[key], b[key], f"+{limit.cost_up:.0%}")
            for key in COST_KEYS if b[key] > a[key] * (1 + limit.cost_up)], []
