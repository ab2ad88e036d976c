"""The graphopt command line: build, passes, inspect, generate, bench.

Any GraphoptError becomes one line on stderr and exit code 2; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import functools
import json
import logging
import sys
from pathlib import Path

import click

from graphopt import __version__
from graphopt.core.errors import GraphoptError
from graphopt.quant.text import CALIB_TOKENS


class _Group(click.Group):
    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except GraphoptError as exc:
            if ctx.obj and ctx.obj.get("debug"):
                raise
            click.echo(f"error: {exc}", err=True)
            sys.exit(exc.exit_code)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "--version", "-V", prog_name="graphopt", message="%(prog)s %(version)s")
@click.option("--debug", is_flag=True, help="Show tracebacks and debug logs.")
@click.pass_context
def main(ctx: click.Context, debug: bool) -> None:
    """graphopt — a compiler for LLM inference graphs."""
    ctx.ensure_object(dict)["debug"] = debug
    logging.basicConfig(level=logging.DEBUG if debug else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if not debug:
        logging.getLogger("torch.onnx").setLevel(logging.ERROR)  # e.g. "torchvision is not installed"
        import transformers

        transformers.utils.logging.disable_progress_bar()
        transformers.utils.logging.set_verbosity_error()


@main.command()
@click.argument("model")
@click.option("-o", "--output", type=click.Path(path_type=Path), help="Artifact directory (default: out/<model>).")
@click.option("--recipe", default=None, help="Recipe name in models/ or a TOML path (default: the target's).")
@click.option("--target", default=None, help="ort-cpu (default), trt, or another registered target "
              "(graphopt/targets); with --recipe, the recipe's own target.")
@click.option("--verify", is_flag=True, help="Check the graph and its logits after every pass.")
@click.option("--dump-after", default=None, metavar="PASS", help="Also save the graph after this pass.")
@click.option("--attn-implementation", default="sdpa", type=click.Choice(["sdpa", "eager"]), show_default=True)
@click.option("--force", is_flag=True, help="Replace an existing artifact directory.")
@click.option("--json", "as_json", is_flag=True, help="Print the build report as JSON.")
@click.option("--strict", is_flag=True, help="Exit 1 when a quantized build misses its fidelity budget "
              "(the artifact is written either way).")
@click.option("--int4", is_flag=True, help="int4 weights, AWQ-style (recipe <target>-int4).")
@click.option("--int4-block", type=int, default=None, help="int4 block size: 32 (default), 64 or 128.")
@click.option("--int8", is_flag=True, help="int8 weights and activations (recipe <target>-int8).")
@click.option("--fp8", is_flag=True, help="fp8 e4m3 weights and activations (recipe <target>-fp8).")
@click.option("--keep-quant", is_flag=True, help="A pre-quantized GGUF's (Q4_0/Q4_1/Q5_0/Q5_1/Q8_0/Q4_K/Q5_K/Q6_K) "
              "or GPTQ/AWQ folder's own int4/int8 weights, exactly (recipe <target>-keep-quant).")
@click.option("--kl-budget", type=float, default=None, metavar="KL", help="With --int4/--int8/--fp8: promote the "
              "most sensitive MatMuls (int4→int8→float, fp8→float) until the eval KL vs fp32 is within KL.")
@click.option("--kv-cache", default=None, metavar="fp8|int8", help="Quantize the KV cache (per-layer scales).")
@click.option("--calib-text", type=click.Path(path_type=Path), default=None,
              help="UTF-8 calibration text (default: graphopt's built-in corpus, calibration split).")
@click.option("--calib-tokens", default=CALIB_TOKENS, show_default=True, help="Calibration tokens to use.")
@click.option("--experts", default="routed", type=click.Choice(["routed", "dense"]), show_default=True,
              help="Mixture-of-experts blocks: gather the chosen experts' weights, or run every expert.")
@click.option("--attention", default="standard", type=click.Choice(["standard", "plugin"]), show_default=True,
              help="trt: FlashAttention as TensorScatter + Attention, or the graphopt plugin node.")
@click.option("--dtype", default="float16", type=click.Choice(["float16", "bfloat16", "float32"]),
              show_default=True, help="trt: compute and KV-cache dtype.")
@click.option("--trt-max-seq", default=0, show_default=True, help="trt: static KV-cache length (0 = model's, ≤4096).")
@click.option("--trt-max-batch", default=8, show_default=True, help="trt: rows per call in the profiles.")
@click.option("--trt-max-prefill", default=512, show_default=True, help="trt: tokens per prefill call (profile).")
@click.option("--aot-check", default=None, metavar="sm89,sm120",
              help="trt: parse and AOT-build with TensorRT-RTX for these archs after writing.")
def build(model, output, recipe, target, verify, dump_after, attn_implementation, force, as_json, strict,
          int4, int4_block, int8, fp8, keep_quant, kl_budget, kv_cache, calib_text, calib_tokens, experts, attention,
          dtype, trt_max_seq, trt_max_batch, trt_max_prefill, aot_check) -> None:
    """Build MODEL (HF folder, .gguf file, or 'smollm2-135m') into an artifact."""
    from graphopt.build.artifact import BuildOptions, build as run_build
    from graphopt.build.precision import PrecisionFlags, build_target, precision_recipe
    from graphopt.core.progress import Progress
    from graphopt.build.report import pass_table, print_build_summary

    flags = PrecisionFlags(int4, int4_block, int8, fp8, kv_cache, keep_quant)
    chosen_target = build_target(target, recipe)
    values = {"attention": attention, "dtype": dtype, "trt_max_seq": trt_max_seq, "trt_max_batch": trt_max_batch,
              "trt_max_prefill": trt_max_prefill, "aot_check": aot_check}
    target_flags = {TARGET_OPTIONS[param]: value for param, value in values.items() if _given(param)}
    chosen, target_options = chosen_target.configure(precision_recipe(flags, recipe, chosen_target),  # before loading
                                                     target_flags)
    run_build = _builder(chosen, kl_budget) or run_build
    suffix = f"-{flags.weights}" if flags.weights else ""
    output = output or Path("out") / (Path(model.rstrip("/")).name.removesuffix(".gguf") + suffix)
    options = BuildOptions(chosen, output, force, verify, dump_after, attn_implementation, calib_text, calib_tokens,
                           experts=experts, target=chosen_target.name, target_options=target_options)
    progress = Progress(enabled=not as_json)
    if not keep_quant:
        _keep_quant_hint(model)
    records = []
    report = run_build(model, options, progress, on_pass=records.append)
    trt_steps = report.get("target_steps", [])  # post-build step (trt: AOT check, engine.plan where possible)
    budget = report.get("fidelity", {}).get("budget")
    if budget is not None:  # quantized: machine-readable verdict next to the figures
        report["within_budget"] = budget["within"]
    if as_json:
        click.echo(json.dumps(report, indent=2))
    else:
        progress.console.print(pass_table(records, verify))
        print_build_summary(progress.console, report, output)
        for line in trt_steps:
            click.echo(line)
    if strict and budget is not None and not budget["within"]:
        click.echo(f"error: {output} is over its fidelity budget ({'; '.join(budget['misses'])}); the artifact was "
                   "written, drop --strict to accept it or use a wider precision", err=True)
        sys.exit(1)


def _keep_quant_hint(model: str) -> None:
    """One line when a plain build would dequantize a pre-quantized GGUF or GPTQ/AWQ folder that --keep-quant
    could keep."""
    from graphopt.sources import gguf_file_of, hf_quant
    from graphopt.sources.gguf_weights import keep_quant_hint

    path, folder = gguf_file_of(model), Path(model).expanduser()
    if path is not None:
        hint = keep_quant_hint(path)
    else:
        hint = hf_quant.keep_quant_hint(folder) if folder.is_dir() else None
    if hint:
        click.echo(f"note: {hint}", err=True)


def _builder(recipe, kl_budget: float | None):
    """``--kl-budget``: the budget search's build (checked before loading), else None for the plain one."""
    if kl_budget is None:
        return None
    from graphopt.build.mixed_precision import build_within_budget, check_budget

    check_budget(recipe, kl_budget)
    return functools.partial(build_within_budget, budget=kl_budget)


TARGET_OPTIONS = {"attention": "attention", "dtype": "dtype", "trt_max_seq": "max_seq", "trt_max_batch": "max_batch",
                  "trt_max_prefill": "max_prefill", "aot_check": "aot_check"}  # build's parameter -> target option


def _given(parameter: str) -> bool:
    """Whether the user set ``parameter`` (on the command line or through the environment)."""
    source = click.get_current_context().get_parameter_source(parameter)
    return source is not None and source is not click.core.ParameterSource.DEFAULT


@main.command()
def passes() -> None:
    """List the registered passes with their options."""
    from graphopt.passes import REGISTRY, pass_options, summary

    for name, cls in REGISTRY.items():
        options = ", ".join(f"{k}: {getattr(t, '__name__', t)} = {d!r}"  # list[str] | None has no __name__
                            for k, (t, d) in pass_options(cls).items()) or "no options"
        click.echo(f"{name:18} {summary(cls)}\n{'':18} options: {options}")


@main.command()
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True)
def inspect(artifact: Path, as_json: bool) -> None:
    """Print an artifact's manifest and build report."""
    from graphopt.core.manifest import load_manifest
    from graphopt.build.report import print_inspect

    manifest = load_manifest(artifact)
    report_path = artifact / "build-report.json"
    report = json.loads(report_path.read_text()) if report_path.is_file() else {}
    if as_json:
        click.echo(json.dumps({"manifest": manifest.raw, "build_report": report}, indent=2))
    else:
        print_inspect(manifest, report)


from graphopt.cli.run import bench, generate  # noqa: E402  (commands registered on main)

main.add_command(generate)
main.add_command(bench)

from graphopt.cli.serve import serve  # noqa: E402

main.add_command(serve)

from graphopt.cli.eval import eval_command  # noqa: E402

main.add_command(eval_command)

from graphopt.cli.compare import compare_command, diff_command  # noqa: E402

main.add_command(compare_command)
main.add_command(diff_command)

from graphopt.cli.trt import engine_command, export_group  # noqa: E402

main.add_command(engine_command)
main.add_command(export_group)
