"""graphopt diff A B: how two pipelines differ — passes, pass options, and (for artifacts) op counts.

A and B are each an artifact directory (manifest.json + build-report.json) or a recipe (a built-in name or
a TOML path). The pass lists are aligned (difflib), so an inserted pass shows as one ``+`` line rather
than every later pass differing; aligned passes show their differing options. Op counts, node counts,
precision and size are compared when both sides are artifacts, and so is the cost model
(graphopt.evaluate.cost_model: bytes and FLOPs per token, peak activations; at compare's default 64-token
prompt and 96-token context), each figure in total and by op type.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
from pathlib import Path
from typing import Any

from graphopt.evaluate.gate import COST_KEYS, CompareError

COST_AT = (64, 96)  # prompt tokens, context: compare's defaults (--prompt-tokens 64, --new-tokens 32)


@dataclasses.dataclass(frozen=True)
class Side:
    label: str
    pipeline: list[dict[str, Any]]  # [{"name": pass, **options}]; options unknown -> {"name", "options?": True}
    report: dict[str, Any] | None  # build-report.json of an artifact
    graph: Path | None = None  # the artifact's model.onnx, when there is one


def load_side(spec: str) -> Side:
    path = Path(spec)
    if path.is_dir():
        return _artifact(path)
    from graphopt.passes.pipeline import load_recipe

    recipe = load_recipe(spec)
    return Side(f"recipe {recipe.name}", [{"name": s.name, **s.options} for s in recipe.passes], None)


def _artifact(path: Path) -> Side:
    report_path = path / "build-report.json"
    if not report_path.is_file():
        raise CompareError(f"{path} is a directory without build-report.json; pass an artifact built by "
                           "'graphopt build' or a recipe name/TOML")
    try:
        report = json.loads(report_path.read_text(encoding="utf-8"))
        pipeline = report.get("pipeline") or [{"name": p["name"], "?": "options not recorded"}
                                              for p in report["passes"]]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise CompareError(f"{report_path} is unreadable ({type(exc).__name__}: {exc}); rebuild the artifact") \
            from None
    graph = path / "model.onnx"
    return Side(f"artifact {path} ({report.get('recipe')})", pipeline, report, graph if graph.is_file() else None)


def diff(a: Side, b: Side) -> dict[str, Any]:
    names_a, names_b = [p["name"] for p in a.pipeline], [p["name"] for p in b.pipeline]
    passes: list[dict[str, Any]] = []
    for tag, i1, i2, j1, j2 in difflib.SequenceMatcher(a=names_a, b=names_b, autojunk=False).get_opcodes():
        if tag == "equal":
            for i, j in zip(range(i1, i2), range(j1, j2)):
                if changed := option_changes(a.pipeline[i], b.pipeline[j]):
                    passes.append({"change": "options", "pass": names_a[i], "index_a": i, "index_b": j,
                                   "options": changed})
            continue
        passes += [{"change": "removed", "pass": names_a[i], "index_a": i} for i in range(i1, i2)]
        passes += [{"change": "added", "pass": names_b[j], "index_b": j} for j in range(j1, j2)]
    out: dict[str, Any] = {"a": a.label, "b": b.label, "passes": passes}
    if a.report is not None and b.report is not None:
        out |= artifact_changes(a.report, b.report)
    if a.graph is not None and b.graph is not None:
        out["cost"] = cost_changes(a.graph, b.graph)
    return out


def cost_changes(a: Path, b: Path) -> dict[str, Any]:
    """Each cost-model figure as [A, B], and by op type where it differs."""
    from graphopt.evaluate.cost_model import cost_model

    cost_a, cost_b = cost_model(a, *COST_AT), cost_model(b, *COST_AT)
    by_op = {}
    for key in COST_KEYS:
        ops = sorted(set(cost_a["by_op"]) | set(cost_b["by_op"]))
        pairs = {op: [cost_a["by_op"].get(op, {}).get(key, 0), cost_b["by_op"].get(op, {}).get(key, 0)] for op in ops}
        by_op[key] = {op: pair for op, pair in pairs.items() if pair[0] != pair[1]}
    return {"at": cost_a["at"], "totals": {key: [cost_a[key], cost_b[key]] for key in COST_KEYS}, "by_op": by_op}


def option_changes(a: dict[str, Any], b: dict[str, Any]) -> dict[str, list[Any]]:
    keys = (set(a) | set(b)) - {"name"}
    return {k: [a.get(k), b.get(k)] for k in sorted(keys) if a.get(k) != b.get(k)}


def artifact_changes(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    ops_a, ops_b = a["ops"]["final"], b["ops"]["final"]
    ops = {op: [ops_a.get(op, 0), ops_b.get(op, 0)] for op in sorted(set(ops_a) | set(ops_b))
           if ops_a.get(op, 0) != ops_b.get(op, 0)}
    precision = {k: [a["precision"].get(k), b["precision"].get(k)]
                 for k in sorted(set(a["precision"]) | set(b["precision"]))
                 if a["precision"].get(k) != b["precision"].get(k)}
    return {"ops": ops, "nodes": [a["nodes"]["final"], b["nodes"]["final"]],
            "artifact_bytes": [a["artifact_bytes"], b["artifact_bytes"]], "precision": precision}


def lines(result: dict[str, Any]) -> list[str]:
    """The diff as text: '-'/'+' for passes only in A/B, '~' for changed options or counts."""
    out = [f"--- {result['a']}", f"+++ {result['b']}"]
    for p in result["passes"]:
        if p["change"] == "removed":
            out.append(f"- pass {p['index_a']}: {p['pass']}")
        elif p["change"] == "added":
            out.append(f"+ pass {p['index_b']}: {p['pass']}")
        else:
            opts = ", ".join(f"{k}: {v[0]!r} -> {v[1]!r}" for k, v in p["options"].items())
            out.append(f"~ pass {p['index_a']}/{p['index_b']} {p['pass']}: {opts}")
    if not result["passes"]:
        out.append("  passes and options: identical")
    for op, (x, y) in result.get("ops", {}).items():
        out.append(f"~ op {op}: {x} -> {y} ({y - x:+d})")
    if "nodes" in result:
        x, y = result["nodes"]
        out.append(f"  nodes {x} -> {y} ({y - x:+d}); size {result['artifact_bytes'][0] / 2**20:.2f} -> "
                   f"{result['artifact_bytes'][1] / 2**20:.2f} MiB")
        out += [f"~ precision {k}: {v[0]} -> {v[1]}" for k, v in result["precision"].items()]
    if "cost" in result:
        out += cost_lines(result["cost"])
    return out


def cost_lines(cost: dict[str, Any]) -> list[str]:
    at = cost["at"]
    out = [f"  cost model (batch 1, {at['prompt_tokens']}-token prefill, decode at context {at['context']}):"]
    for key, (x, y) in cost["totals"].items():
        change = f"{y / x - 1:+.1%}" if x else "new"
        out.append(f"{'~' if x != y else ' '} cost {key}: {x:,.0f} -> {y:,.0f}" + (f" ({change})" if x != y else ""))
        out += [f"~   {op}: {p:,.0f} -> {q:,.0f}" for op, (p, q) in cost["by_op"][key].items()]
    return out
