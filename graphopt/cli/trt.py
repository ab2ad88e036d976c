"""TensorRT commands: ``graphopt engine ARTIFACT`` and ``graphopt export triton ARTIFACT REPO_DIR``.
(``build --target trt`` itself is the trt target's: graphopt/targets/trt.py.)"""

from __future__ import annotations

from pathlib import Path

import click



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
