"""Rich renderings of build reports and manifests (only the CLI calls these)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from graphopt.build.features import describe
from graphopt.core.manifest import Manifest
from graphopt.passes.pipeline import PassRecord


def pass_table(records: list[PassRecord], verify: bool) -> Table:
    table = Table(title="pipeline", show_lines=False)
    for col in ("pass", "modified", "nodes", "Δ", "ms", "stats") + (("max |Δlogits|",) if verify else ()):
        table.add_column(col, justify="right" if col in ("nodes", "Δ", "ms") else "left")
    for r in records:
        stats = ", ".join(f"{k}={v}" for k, v in r.stats.items())
        row = [r.name, "yes" if r.modified else "no", str(r.nodes_after), f"{r.nodes_after - r.nodes_before:+d}",
               f"{r.seconds * 1000:.0f}", stats]
        if verify:
            row.append("—" if r.max_abs_diff is None else f"{r.max_abs_diff:.2e}" + (" (lossy)" if r.lossy else ""))
        table.add_row(*row)
    return table


def print_build_summary(console: Console, report: dict[str, Any], output: Path) -> None:
    for note in report["unfused"]:
        console.print(f"[yellow]not fused:[/] {note}")
    print_precision(console, report)
    t = report["timings"]
    console.print(
        f"[bold green]built[/] {output}  nodes {report['nodes']['traced']} → {report['nodes']['final']}  "
        f"size {report['artifact_bytes'] / 2**20:.1f} MiB  time {t['total_s']:.1f} s "
        f"(trace {t['trace_s']:.1f} s, passes {t['passes_s']:.1f} s)  peak RSS {report['peak_rss_mib']:.0f} MiB"
    )


def print_precision(console: Console, report: dict[str, Any]) -> None:
    """Precision, the fp8-simulation warning and the fidelity measured against fp32 (quantized builds)."""
    precision = dict(report.get("precision") or {})
    note = precision.pop("note", None)
    if precision and precision.get("weights", "fp32") != "fp32" or "fidelity" in report:
        console.print("precision: " + ", ".join(f"{k} {v}" for k, v in precision.items()))
    if note:
        console.print(f"[yellow]note:[/] {note}")
    if report.get("fidelity"):
        console.print(fidelity_line(report["fidelity"]))
    if report.get("mixed_precision"):
        console.print(mixed_line(report["mixed_precision"]))


def mixed_line(mixed: dict[str, Any]) -> str:
    """``--kl-budget``: what the search promoted, and the KL it found (graphopt/build/mixed_precision.py)."""
    promoted = ", ".join(f"{len(names)} → {precision}" for precision, names in mixed["promoted"].items()) or "none"
    return (f"mixed precision (--kl-budget {mixed['kl_budget']}): {mixed['layers_promoted']} of "
            f"{mixed['layers']} {mixed['base']} layers promoted ({promoted}"
            + (f", +{mixed['added_weight_bytes'] / 2**20:.1f} MiB of weights" if "added_weight_bytes" in mixed else "")
            + f"); KL {mixed['kl_plain']:.4f} plain → "
            f"{mixed['kl_search']:.4f} in the search, {len(mixed['probes'])} probes")


def fidelity_line(fidelity: dict[str, Any]) -> str:
    budget = fidelity.get("budget")
    verdict = "" if budget is None else "  [green]within budget[/]" if budget["within"] else \
        f"  [red]over budget: {'; '.join(budget['misses'])}[/]"
    text = f" of {fidelity['text']}, sha256 {fidelity['text_sha256'][:12]}…" if "text_sha256" in fidelity else ""
    return (f"fidelity vs fp32 on {fidelity['tokens']} tokens{text}: KL {fidelity['kl_mean']:.4f}, "
            f"top-1 {fidelity['top1_agreement']:.1%}, perplexity {fidelity['ppl_reference']:.2f} → "
            f"{fidelity['ppl_candidate']:.2f}{verdict}")


def print_inspect(manifest: Manifest, report: dict[str, Any]) -> None:
    console = Console()
    d = manifest.dims
    console.print(f"[bold]{manifest.source.id}[/] ({manifest.source.architecture}) → target {manifest.target}, "
                  f"recipe {manifest.recipe}, graphopt {manifest.graphopt_version}")
    console.print(f"layers {d.num_layers}, heads {d.num_heads}/{d.num_kv_heads} kv, head dim {d.head_dim}, "
                  f"hidden {d.hidden_size}, vocab {d.vocab_size}, max_seq {d.max_seq}, eos {list(d.eos_token_ids)}")
    console.print(f"precision {manifest.precision}")
    if report.get("features"):
        console.print(f"architecture features: {describe(report['features'])}")
    io = Table(title="I/O")
    for col in ("name", "dir", "dtype", "shape", "role"):
        io.add_column(col)
    for direction, specs in (("in", manifest.inputs), ("out", manifest.outputs)):
        for s in specs:
            if s.layer in (None, 0):
                name = s.name if s.layer is None else s.name.replace(".0", ".{i}")
                io.add_row(name, direction, s.dtype, str(list(s.shape)), s.role)
    console.print(io)
    for name, entry in manifest.files.items():
        console.print(f"{name}: {entry['bytes'] / 2**20:.1f} MiB sha256 {entry['sha256'][:16]}…")
    if report:
        ops = report["ops"]["final"]
        console.print(f"nodes {report['nodes']['final']}: " + ", ".join(f"{k}×{v}" for k, v in ops.items()))
        for note in report.get("unfused", []):
            console.print(f"[yellow]not fused:[/] {note}")
        if report.get("fidelity"):
            console.print(fidelity_line(report["fidelity"]))
        if report.get("mixed_precision"):
            console.print(mixed_line(report["mixed_precision"]))
            for precision, names in report["mixed_precision"]["promoted"].items():
                console.print(f"  {precision}: {', '.join(names)}")
