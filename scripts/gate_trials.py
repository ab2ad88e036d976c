"""Run the compare gate N times against one baseline and print each outcome with its intervals.

    .venv/bin/python scripts/gate_trials.py --baseline out/trials/base/compare.json --trials 10
    .venv/bin/python scripts/gate_trials.py --baseline … --variant slower-norms --trials 10
    .venv/bin/python scripts/gate_trials.py --baseline … --variant fp32-lm-head --interleave --trials 10
    .venv/bin/python scripts/gate_trials.py --baseline … --variant accuracy-level-1 --trials 3
    .venv/bin/python scripts/gate_trials.py --regate [--variant …]   # gate finished trials again, run nothing

Each trial is one ``graphopt compare ort-cpu <int8 recipe> --model M --baseline B`` (a fresh process, default
thresholds and timing settings unless given after ``--``). ``--variant`` replaces the built-in ort-cpu-int8
recipe by a copy, under the same name so the gate compares it with the baseline's ort-cpu-int8, with one line
changed (:data:`VARIANTS`). Without ``--baseline`` the first run writes one (``OUT/base``). Prints one row per
trial (exit code, int8's decode ratio with its 95% interval, rounds, why timing stopped, wall time, the
regression lines) and a summary: how many failed and the median wall time.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
INT8 = ROOT / "models" / "ort-cpu-int8.toml"
VARIANTS = {  # name: (line in models/ort-cpu-int8.toml, its replacement)
    "slower-norms": ("rmsnorm = true", "rmsnorm = false"),  # RMSNorm not fused into (Skip)SimplifiedLayerNorm
    "fp32-lm-head": ("embedding = true", "embedding = false"),  # tied embedding / lm_head left in fp32
    "accuracy-level-1": ("accuracy_level = 4", "accuracy_level = 1"),  # MatMulNBits without int8 activations
}


def variant_recipe(name: str, out: Path) -> Path:
    old, new = VARIANTS[name]
    text = INT8.read_text()
    if text.count(old) != 1:
        sys.exit(f"{INT8} does not hold '{old}' exactly once; update VARIANTS in {__file__}")
    path = out / f"ort-cpu-int8-{name}.toml"
    path.write_text(f"# ort-cpu-int8 with '{old}' -> '{new}' (scripts/gate_trials.py --variant {name})\n"
                    + text.replace(old, new))
    return path


def run(recipe: str, model: str, out: Path, baseline: Path | None, extra: list[str]) -> dict:
    command = [str(ROOT / ".venv" / "bin" / "graphopt"), "compare", "ort-cpu", recipe, "--model", model,
               "--out", str(out), *(["--baseline", str(baseline)] if baseline else []), *extra]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    wall = time.perf_counter() - start
    lines = [line for line in done.stderr.splitlines() if line.startswith(("regression:", "note:", "gate:", "error:"))]
    result = json.loads((out / "compare.json").read_text()) if (out / "compare.json").is_file() else None
    return {"exit": done.returncode, "wall_s": wall, "lines": lines, "result": result}


def row(index: int, trial: dict) -> str:
    result = trial["result"]
    if result is None:
        return f"{index:>3}  exit {trial['exit']}  no compare.json  " + " | ".join(trial["lines"])
    int8 = result["recipes"][1]
    timing = result["timing"]
    ratios = "  ".join(f"{key} {int8['relative'][key]:.3f} [{low:.3f}, {high:.3f}]"
                       for key, (low, high) in int8["relative_interval"].items())
    return (f"{index:>3}  exit {trial['exit']}  {ratios}  rounds {timing['rounds']} ({timing['stopped']})  "
            f"wall {trial['wall_s']:.0f} s\n       " + "\n       ".join(trial["lines"]))


def regate(baseline: Path, out: Path) -> dict:
    """A finished trial gated again, in this process, by this checkout's gate (compare.json holds everything)."""
    from graphopt.evaluate.gate import Thresholds, check, load_baseline, per_recipe

    current = json.loads((out / "compare.json").read_text())
    limits = {name: Thresholds(**values) for name, values in current["thresholds"].items()}
    found, notes = check(load_baseline(baseline), current, limits)
    lines = [f"regression: {line}" for line in per_recipe(found)] + [f"note: {note}" for note in notes]
    return {"exit": 1 if found else 0, "wall_s": float("nan"), "lines": lines, "result": current}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--baseline", type=Path, help="compare.json to gate against (default: make one first)")
    parser.add_argument("--trials", type=int, default=10)
    parser.add_argument("--variant", choices=sorted(VARIANTS), help="replace ort-cpu-int8 by this variant")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--out", type=Path, default=ROOT / "out" / "trials")
    parser.add_argument("--interleave", action="store_true",
                        help="with --variant: alternate trials of the same commit and of the variant")
    parser.add_argument("--regate", action="store_true", help="run nothing: gate the trials already in --out again")
    parser.add_argument("extra", nargs="*", help="more compare options, after --")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.regate:
        label = args.variant or "same"
        done = sorted(args.out.glob(f"{label}-*/compare.json"), key=lambda p: int(p.parent.name.rsplit("-", 1)[1]))
        trials = [regate(args.baseline or args.out / "base" / "compare.json", path.parent) for path in done]
        for index, trial in enumerate(trials, 1):
            print(row(index, trial))
        print(f"{label}: {sum(t['exit'] == 1 for t in trials)}/{len(trials)} fail the gate (gated again now)")
        return
    if args.baseline is None:
        base = run("ort-cpu-int8", args.model, args.out / "base", None, args.extra)
        print(row(0, base), flush=True)
        args.baseline = args.out / "base" / "compare.json"
    kinds = {args.variant or "same": str(variant_recipe(args.variant, args.out)) if args.variant else "ort-cpu-int8"}
    if args.interleave and args.variant:  # same, variant, same, … so that both see the same drift in load
        kinds = {"same": "ort-cpu-int8"} | kinds
    trials: dict[str, list[dict]] = {label: [] for label in kinds}
    for index in range(1, args.trials + 1):
        for label, recipe in kinds.items():
            trials[label].append(run(recipe, args.model, args.out / f"{label}-{index}", args.baseline, args.extra))
            print(f"{label:>14}" + row(index, trials[label][-1]), flush=True)
    for label, done in trials.items():
        failed = sum(t["exit"] == 1 for t in done)
        errors = sum(t["exit"] not in (0, 1) for t in done)
        print(f"{label}: {failed}/{len(done)} failed the gate, {errors} errors; median wall "
              f"{statistics.median(t['wall_s'] for t in done):.0f} s, min–max {min(t['wall_s'] for t in done):.0f}–"
              f"{max(t['wall_s'] for t in done):.0f} s (baseline {args.baseline})")


if __name__ == "__main__":
    main()
