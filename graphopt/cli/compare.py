"""CLI: graphopt compare (table, compare.json/.md/.png, the --baseline gate, --bisect) and graphopt diff.

Exit codes: 0 fine; 1 the gate found regressions (one line each on stderr) or --bisect found the pass
that broke the KL budget; 2 bad input (one line, nothing written).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from graphopt.evaluate.gate import FIELDS, CompareError
from graphopt.evaluate.intervals import StopRule
from graphopt.quant.text import CALIB_TOKENS, EVAL_TOKENS

THRESHOLD_HELP = {
    "kl_up": "Allowed relative KL growth (0.2 = +20%).", "kl_abs": "KL growth always allowed (absolute, nats).",
    "kl_budget": "Absolute KL ceiling (gate and --bisect).", "top1_down": "Allowed top-1 drop (0.01 = 1 point).",
    "ppl_up": "Allowed relative perplexity growth.", "decode_down": "Allowed drop of decode tok/s vs reference.",
    "batch_down": "Allowed drop of batch throughput vs reference.", "ttft_up": "Allowed TTFT growth vs reference.",
    "size_up": "Allowed relative artifact size growth.",
    "cost_up": "Allowed relative growth of each cost-model figure (exact: bytes, FLOPs, activations).",
}


def threshold_options(command):
    for field in reversed(FIELDS):
        command = click.option(f"--{field.replace('_', '-')}", field, type=float, default=None,
                               help=THRESHOLD_HELP[field])(command)
    return command


@click.command("compare")
@click.argument("recipes", nargs=-1)
@click.option("--model", required=True, help="HF folder, .gguf file or 'smollm2-135m'.")
@click.option("--target", default="ort-cpu", type=click.Choice(["ort-cpu"]), show_default=True)
@click.option("--baseline", type=click.Path(path_type=Path), default=None, help="compare.json of an earlier run.")
@click.option("--out", type=click.Path(path_type=Path), default=Path("out/compare"), show_default=True)
@click.option("--bisect", is_flag=True, help="Evaluate the single RECIPE after every pass; blame the costly one.")
@click.option("--calib-text", type=click.Path(path_type=Path), default=None, help="Calibration text (UTF-8).")
@click.option("--calib-tokens", default=CALIB_TOKENS, show_default=True)
@click.option("--eval-text", type=click.Path(path_type=Path), default=None, help="Evaluation text (UTF-8).")
@click.option("--eval-tokens", default=EVAL_TOKENS, show_default=True)
@click.option("--prompt-tokens", default=64, show_default=True)
@click.option("--new-tokens", default=32, show_default=True)
@click.option("--batch", default=8, show_default=True, help="Batch size of the throughput measurement.")
@click.option("--precision", default=StopRule.precision, show_default=True,
              help="Time until every ratio's 95% interval is within ± this fraction of its median ...")
@click.option("--time-cap", default=StopRule.time_cap_s, show_default=True,
              help="... or for at most this many seconds.")
@click.option("--min-rounds", default=StopRule.min_rounds, show_default=True,
              help="Interleaved rounds before stopping.")
@click.option("--max-rounds", default=StopRule.max_rounds, show_default=True, help="Interleaved rounds at most.")
@click.option("--peers", default="ort-rtn,genai", show_default=True,
              help="With an int4 recipe: also measure ONNX Runtime's own int4 (MatMulNBitsQuantizer RTN, GenAI's "
                   "builder) as ungated fidelity + size rows; a comma list or 'none'.")
@click.option("--json", "as_json", is_flag=True, help="Print compare.json instead of the table.")
@threshold_options
def compare_command(recipes, model, target, baseline, out, bisect, calib_text, calib_tokens, eval_text, eval_tokens,
                    prompt_tokens, new_tokens, batch, precision, time_cap, min_rounds, max_rounds, peers, as_json,
                    **limits) -> None:
    """Build RECIPES of MODEL from one trace; compare fidelity, speed, size, build time and passes."""
    from graphopt.evaluate.compare import CompareOptions
    from graphopt.evaluate.compare_measure import SpeedSettings
    from graphopt.evaluate.compare_peers import parse_peers
    from graphopt.core.progress import Progress

    check_speed_args(prompt_tokens, new_tokens, batch, min_rounds, max_rounds)
    if not 0 < precision < 1 or time_cap <= 0:
        raise CompareError(f"--precision {precision} / --time-cap {time_cap}: use a fraction in (0, 1), e.g. 0.03, "
                           "and a positive number of seconds")
    speed = SpeedSettings(prompt_tokens, new_tokens, batch, stop=StopRule(precision, min_rounds, max_rounds, time_cap))
    options = CompareOptions(tuple(recipes), model, out, target, calib_text, calib_tokens, eval_text, eval_tokens,
                             speed, peers=parse_peers(peers))
    progress = Progress(enabled=not as_json)
    if bisect:
        sys.exit(bisect_main(options, limits, progress, as_json))
    sys.exit(compare_main(options, limits, baseline, progress, as_json))


def check_speed_args(prompt_tokens: int, new_tokens: int, batch: int, min_rounds: int, max_rounds: int) -> None:
    for flag, value, low in (("prompt-tokens", prompt_tokens, 1), ("new-tokens", new_tokens, 2),
                             ("batch", batch, 1), ("min-rounds", min_rounds, 3),
                             ("max-rounds", max_rounds, min_rounds)):
        if value < low:
            raise CompareError(f"--{flag} {value} is too small; use at least {low}")


def compare_main(options, limits: dict, baseline_path: Path | None, progress, as_json: bool) -> int:
    from rich.console import Console

    from graphopt.evaluate.compare import plan, run_compare
    from graphopt.evaluate.compare_report import table, write_outputs
    from graphopt.evaluate.gate import budgets_only, check, load_baseline, per_recipe

    baseline = load_baseline(baseline_path) if baseline_path is not None else None  # bad input fails first
    chosen = plan(options, limits)
    result = run_compare(options, chosen, progress, baseline_path.parent if baseline_path is not None else None)
    regressions, notes = check(baseline, result, chosen.limits) if baseline is not None else \
        (budgets_only(result, chosen.limits), None)
    files = write_outputs(result, options.out, regressions, notes, baseline)
    if as_json:
        click.echo(json.dumps(result, indent=2))
    else:
        Console(width=max(Console().width, 150)).print(table(result))
        click.echo("wrote " + ", ".join(str(path) for path in files.values()))
    for note in notes or []:
        click.echo(f"note: {note}", err=True)
    if regressions is None:
        return 0
    for line in per_recipe(regressions):
        click.echo(f"regression: {line}", err=True)
    against = f"against {baseline_path}" if baseline_path is not None else "(KL budgets only, no --baseline)"
    click.echo(f"gate: {'failed' if regressions else 'passed'} {against}", err=True)
    return 1 if regressions else 0


def bisect_main(options, limits: dict, progress, as_json: bool) -> int:
    from graphopt.evaluate.bisect import run_bisect
    from graphopt.core.errors import RecipeError

    if len(options.recipes) != 1:
        raise RecipeError(f"--bisect takes exactly one recipe, got {len(options.recipes)}")
    result = run_bisect(options, limits, progress)
    from graphopt.evaluate.compare_report import plot_bisect

    options.out.mkdir(parents=True, exist_ok=True)
    (options.out / "bisect.json").write_text(json.dumps(result, indent=2))
    plot_bisect(result, options.out / "bisect.png")
    if as_json:
        click.echo(json.dumps(result, indent=2))
    else:
        print_bisect(result)
    return 0 if result["within_budget"] else 1


def print_bisect(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    budget = f"budget {result['kl_budget']:g} from {result['budget_source']}"
    out = Table(title=f"{result['model']}, recipe {result['recipe']}: KL vs fp32 after each pass "
                      f"({result['eval_tokens']} tokens; {budget})")
    for column in ("#", "after pass", "modified", "KL", "KL spent", "top-1", "ppl"):
        out.add_column(column, justify="left" if column in ("after pass", "modified") else "right")
    culprit = (result["culprit"] or {}).get("index")
    for s in result["stages"]:
        f, mark = s["fidelity"], " ◀ broke the budget" if s["index"] == culprit else ""
        out.add_row(str(s["index"]), s["name"] + mark, "yes" if s["modified"] else "no", f"{f['kl_mean']:.2e}",
                    f"{s['kl_spent']:+.2e}", f"{f['top1_agreement']:.1%}", f"{f['ppl_candidate']:.3f}")
    Console(width=max(Console().width, 130)).print(out)
    costliest = result["costliest"]
    if result["culprit"]:
        click.echo(f"bisect: pass {culprit} '{result['culprit']['pass']}' broke the KL budget "
                   f"{result['kl_budget']:g} (final KL {result['final_kl']:.4g})")
    else:
        click.echo(f"bisect: within the KL budget {result['kl_budget']:g} (final KL {result['final_kl']:.3g}); "
                   f"costliest pass {costliest['index']} '{costliest['pass']}' ({costliest['kl_spent']:+.3g})")


@click.command("diff")
@click.argument("a")
@click.argument("b")
@click.option("--json", "as_json", is_flag=True)
def diff_command(a: str, b: str, as_json: bool) -> None:
    """Which passes, options and op counts differ between A and B (artifact directories or recipes)."""
    from graphopt.evaluate.diff import diff, lines, load_side

    result = diff(load_side(a), load_side(b))
    click.echo(json.dumps(result, indent=2) if as_json else "\n".join(lines(result)))
