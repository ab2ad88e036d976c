"""Renderings of a compare.json: a rich table (terminal), Markdown (a CI step summary) and a PNG plot.

The output files are written atomically as a set: into a temporary directory beside them, then renamed
one by one, so an interrupted run leaves the previous compare.json, never half of a new one.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from rich.table import Table

from graphopt.evaluate.gate import COST_KEYS, Regression, per_recipe

COLUMNS = ("recipe", "KL", "top-1", "ppl", "TTFT ms", "decode tok/s", "batch tok/s", "× decode", "size MiB",
           "build s", "nodes")
KL_FLOOR = 1e-7  # the plot's log axis: an fp32 recipe's KL (~1e-9) is drawn at this floor


def rows(result: dict[str, Any]) -> list[list[str]]:
    out = []
    for e in result["recipes"]:
        f, s = e["fidelity"], e["speed"]
        out.append([e["recipe"], f"{f['kl_mean']:.2e}", f"{f['top1_agreement']:.1%}", f"{f['ppl_candidate']:.3f}",
                    f"{s['ttft_ms']:.1f}", f"{s['decode_tokens_per_s']:.1f}", f"{s['batch_tokens_per_s']:.1f}",
                    _ratio(e, "decode"), f"{e['artifact_bytes'] / 2**20:.1f}", f"{e['build_s']:.1f}",
                    str(e["nodes"]["final"])])
    for p in result.get("peers", []):  # ONNX Runtime's own int4 (graphopt.evaluate.compare_peers): not timed
        if "skipped" in p:
            out.append([f"{p['name']} (peer)", "skipped"] + ["—"] * (len(COLUMNS) - 2))
            continue
        f = p["fidelity"]
        out.append([f"{p['name']} (peer)", f"{f['kl_mean']:.2e}", f"{f['top1_agreement']:.1%}",
                    f"{f['ppl_candidate']:.3f}", "—", "—", "—", "—", f"{p['artifact_bytes'] / 2**20:.1f}",
                    "—", "—"])
    return out


def _ratio(entry: dict[str, Any], key: str) -> str:
    """A ratio's median and its 95% interval as ± half-width (relative)."""
    median, (low, high) = entry["relative"][key], entry["relative_interval"][key]
    return f"{median:.2f} ±{(high - low) / 2 / median:.1%}"


def title(result: dict[str, Any]) -> str:
    s, t, timing = result["speed_settings"], result["timings"], result["timing"]
    stopped = ("precision reached" if not timing["short"] else
               f"{timing['stopped']} hit before ±{timing['precision']:.0%}: "
               f"widest ±{timing['widest_half_width']:.1%}")
    return (f"{result['model']} on {result['target']}: fidelity vs fp32 on {result['eval']['tokens']} tokens; "
            f"speed: {s['prompt_tokens']}-token prompt, {s['new_tokens']} new tokens, batch 1 and {s['batch']}, "
            f"median of {timing['rounds']} interleaved rounds in {timing['seconds']:.0f} s ({stopped}); "
            f"× decode = ratio to {result['reference_recipe']} ± its 95% interval; build s = passes + "
            f"writing (load {t.get('load_s', 0):.1f} s and trace {t.get('trace_s', 0):.1f} s shared by all)")


def table(result: dict[str, Any]) -> Table:
    out = Table(title=title(result))
    for column in COLUMNS:
        out.add_column(column, justify="left" if column == "recipe" else "right")
    for row in rows(result):
        out.add_row(*row)
    return out


def markdown(result: dict[str, Any], regressions: list[Regression] | None = None,
             notes: list[str] | None = None) -> str:
    lines = [f"## graphopt compare: {result['model']}", "", title(result), "",
             "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(row) + " |" for row in rows(result)]
    if result.get("peers"):
        lines += ["", "Peers (ONNX Runtime's own int4 at the int4 recipe's block size; fidelity and size only, not "
                  "gated): " + "; ".join(f"**{p['name']}** {p.get('skipped') or p['how']}" for p in result["peers"])]
    if regressions is not None:
        verdict = "**gate: failed**" if regressions else "**gate: passed** (no regression beyond the thresholds)"
        lines += ["", verdict, ""] + [f"- :x: {line}" for line in per_recipe(regressions)] + [f"- {n}" for n in notes or []]
    lines += ["", "<details><summary>passes per recipe</summary>", ""]
    for e in result["recipes"]:
        lines += [f"**{e['recipe']}** ({e['source']})", "", "| pass | modified | nodes | Δ | ms | stats |",
                  "|---|---|---|---|---|---|"]
        for p in e["passes"]:
            stats = ", ".join(f"{k}={v}" for k, v in p["stats"].items())
            lines.append(f"| {p['name']} | {'yes' if p['modified'] else 'no'} | {p['nodes_after']} | "
                         f"{p['nodes_after'] - p['nodes_before']:+d} | {p['seconds'] * 1e3:.0f} | {stats} |")
        lines.append("")
    lines += ["</details>", "", "<details><summary>op counts</summary>", "", _ops_table(result), "", "</details>", ""]
    lines += [_cost_table(result), ""]
    return "\n".join(lines)


def _cost_table(result: dict[str, Any]) -> str:
    """The cost model (graphopt.evaluate.cost_model) per recipe: exact figures, gated at +cost_up."""
    at = result["recipes"][0]["cost"]["at"]
    lines = [f"**cost model** (from each graph; batch 1, {at['prompt_tokens']}-token prefill, decode at context "
             f"{at['context']})", "", "| figure | " + " | ".join(e["recipe"] for e in result["recipes"]) + " |",
             "|" + "---|" * (len(result["recipes"]) + 1)]
    lines += [f"| {key} | " + " | ".join(f"{e['cost'][key]:,.0f}" for e in result["recipes"]) + " |"
              for key in COST_KEYS]
    return "\n".join(lines)


def _ops_table(result: dict[str, Any]) -> str:
    names = [e["recipe"] for e in result["recipes"]]
    ops = sorted({op for e in result["recipes"] for op in e["ops"]})
    lines = ["| op | " + " | ".join(names) + " |", "|" + "---|" * (len(names) + 1)]
    lines += [f"| {op} | " + " | ".join(str(e["ops"].get(op, 0)) for e in result["recipes"]) + " |" for op in ops]
    return "\n".join(lines)


PANELS = (("decode_tokens_per_s", "decode tok/s (batch 1)"), ("batch_tokens_per_s", "batch tok/s (batch {batch})"))


def plot(result: dict[str, Any], path: Path, baseline: dict[str, Any] | None = None) -> None:
    """KL vs fp32 (log) against decode tok/s (left) and batch throughput (right), one point per recipe: the
    median over rounds with min–max bars, marker area by artifact size, the baseline's points hollow, each KL
    budget a dashed line."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(11, 4.8), dpi=110)
    FigureCanvasAgg(figure)
    largest = max(e["artifact_bytes"] for e in result["recipes"] + (baseline or {}).get("recipes", []))
    colours = {e["recipe"]: f"C{i % 10}" for i, e in enumerate(result["recipes"])}
    for index, (key, label) in enumerate(PANELS):
        axes = figure.add_subplot(1, 2, index + 1)
        for entries, hollow in ((result["recipes"], False), ((baseline or {}).get("recipes", []), True)):
            for e in (e for e in entries if e["recipe"] in colours):
                _point(axes, e, key, colours[e["recipe"]], 30 + 270 * e["artifact_bytes"] / largest, hollow)
        budgets = {t["kl_budget"] for t in result.get("thresholds", {}).values() if t.get("kl_budget")}
        for budget in sorted(budgets):
            axes.axhline(budget, linestyle="--", color="red", linewidth=1, label=f"KL budget {budget:g}")
        axes.set_yscale("log")
        axes.margins(x=0.2, y=0.3)
        axes.set_xlabel(label.format(batch=result["speed_settings"].get("batch", "")))
        axes.set_ylabel(f"KL(fp32 ‖ recipe), nats (floor {KL_FLOOR:g})")
        axes.grid(True, which="both", alpha=0.3)
        if budgets:
            axes.legend(fontsize=7, loc="lower right")
    hollow = "; hollow: the baseline" if baseline else ""
    figure.suptitle(f"{result.get('model_name', result['model'])}: fidelity vs speed (median, bars min–max over "
                    f"{result['timing']['rounds']} rounds; area: artifact size{hollow})", fontsize=10)
    figure.tight_layout()
    figure.savefig(path, format="png")


def _point(axes: Any, entry: dict[str, Any], key: str, colour: str, area: float, hollow: bool) -> None:
    x, y = entry["speed"][key], max(entry["fidelity"]["kl_mean"], KL_FLOOR)
    low, high = entry.get("speed_range", {}).get(key, (x, x))
    axes.errorbar([x], [y], xerr=[[x - low], [high - x]], fmt="none", ecolor=colour, alpha=0.6, capsize=3)
    axes.scatter([x], [y], s=area, facecolors="none" if hollow else colour, edgecolors=colour, linewidths=1.5)
    if not hollow:
        axes.annotate(entry["recipe"], (x, y), textcoords="offset points", xytext=(6, 6), fontsize=8)


def plot_bisect(result: dict[str, Any], path: Path) -> None:
    """bisect.png: KL vs fp32 after each pass of the recipe (a step plot), the budget as a dashed line."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(8, 4.5), dpi=110)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    stages = result["stages"]
    kls = [max(s["fidelity"]["kl_mean"], KL_FLOOR) for s in stages]
    axes.step(range(len(stages)), kls, where="post", marker="o")
    axes.axhline(result["kl_budget"], linestyle="--", color="red", linewidth=1, label=f"KL budget {result['kl_budget']:g}")
    axes.set_xticks(range(len(stages)), [s["name"] for s in stages], rotation=45, ha="right", fontsize=7)
    axes.set_yscale("log")
    axes.set_ylabel(f"KL(fp32 ‖ after pass), nats (floor {KL_FLOOR:g})")
    axes.set_title(f"{result['model']}, recipe {result['recipe']}: KL after each pass", fontsize=10)
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, format="png")


def write_outputs(result: dict[str, Any], out: Path, regressions: list[Regression] | None,
                  notes: list[str] | None, baseline: dict[str, Any] | None = None) -> dict[str, Path]:
    """compare.json, compare.md and compare.png (the baseline's points hollow) in ``out``, all or none."""
    out.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".compare.", dir=out))
    try:
        (staging / "compare.json").write_text(json.dumps(result, indent=2))
        (staging / "compare.md").write_text(markdown(result, regressions, notes))
        plot(result, staging / "compare.png", baseline)
        for name in ("compare.json", "compare.md", "compare.png"):
            os.replace(staging / name, out / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return {name: out / f"compare.{name}" for name in ("json", "md", "png")}
