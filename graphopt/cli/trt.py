"""TensorRT commands: ``graphopt engine ARTIFACT`` and ``graphopt export triton ARTIFACT REPO_DIR``,
plus the ``build --target trt`` steps the build command delegates here (recipe options, AOT check, engine)."""

from __future__ import annotations

from pathlib import Path

import click

from graphopt.passes.pipeline import Recipe


def trt_recipe(recipe: Recipe, target: str, attention: str, dtype: str, max_seq: int, kv_cache: str | None,
               aot_check: str | None, max_batch: int = 8, max_prefill: int = 512) -> Recipe:
    """The build recipe with the trt options applied; one-line errors before any model is loaded."""
    from graphopt.targets.trt_aot import TrtError, parse_archs
    from graphopt.targets.trt_options import TrtOptions, apply_trt_options, check_trt_options

    options = TrtOptions(attention, dtype, max_seq, kv_cache, max_batch, max_prefill)
    check_trt_options(target, options)
    if aot_check is not None:
        if target != "trt":
            raise TrtError("--aot-check only applies to --target trt; add --target trt or drop it")
        parse_archs(aot_check)
    return apply_trt_options(recipe, options) if target == "trt" else recipe


def finish_trt_build(output: Path, target: str, aot_check: str | None) -> list[str]:
    """After a trt build: the AOT check when asked, then engine.plan where TensorRT and a GPU exist.
    Returns what happened, one line per step, for the CLI to print (or put in --json)."""
    from graphopt.targets.trt_aot import aot_check as run_aot, build_engine, full_tensorrt, parse_archs

    if target != "trt":
        return []
    lines = [f"aot {r.arch}: TensorRT-RTX parsed in {r.parse_s:.1f}s, built in {r.build_s:.1f}s "
             f"({r.engine_bytes / 2**20:.1f} MiB)" for r in (run_aot(output, parse_archs(aot_check)) if aot_check else [])]
    if full_tensorrt() is None:
        return lines + [f"wrote ONNX + manifest for TensorRT; on a machine with TensorRT and a GPU run "
                        f"'graphopt engine {output}' to write engine.plan"]
    engine = build_engine(output, force=True)
    return lines + [f"wrote {output / engine['file']} (TensorRT {engine['tensorrt']}, profiles {engine['profiles']})"]


@click.command("engine")
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("--force", is_flag=True, help="Replace an existing engine.plan.")
def engine_command(artifact: Path, force: bool) -> None:
    """Build ARTIFACT's engine.plan (+ timing cache) with TensorRT on this GPU machine."""
    from graphopt.targets.trt_aot import build_engine

    engine = build_engine(artifact, force=force)
    click.echo(f"wrote {artifact / engine['file']} (TensorRT {engine['tensorrt']}, profiles {engine['profiles']})")


@click.group("export")
def export_group() -> None:
    """Export an artifact for another server."""


@export_group.command("triton")
@click.argument("artifact", type=click.Path(path_type=Path))
@click.argument("repo_dir", type=click.Path(path_type=Path))
@click.option("--name", default=None, help="Model name in the repository (default: the artifact's folder name).")
@click.option("--max-batch", default=8, show_default=True, help="Triton max_batch_size.")
def export_triton_command(artifact: Path, repo_dir: Path, name: str | None, max_batch: int) -> None:
    """Write a Triton Inference Server model repository for ARTIFACT into REPO_DIR."""
    from graphopt.targets.triton import export_triton

    written = export_triton(artifact, repo_dir, name=name, max_batch=max_batch)
    click.echo(f"wrote {written} (config.pbtxt checked against Triton's model_config schema)")
