"""Shared by the TensorRT tests: run a built artifact's graph on ONNX Runtime CPU with the KV contract."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx_ir as ir

from graphopt.plugins.flash_attention import expand_reference


def session(artifact: Path):
    """An ORT CPU session for the artifact's model.onnx (FlashAttention through its reference expansion)."""
    import onnxruntime as ort

    model = ir.load(artifact / "model.onnx")
    for value in model.graph.initializers.values():  # into memory: the session is made from bytes
        value.const_value = ir.tensor(value.const_value.numpy(), dtype=value.const_value.dtype, name=value.name)
    expand_reference(model)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(ir.to_proto(model).SerializeToString(), options, providers=["CPUExecutionProvider"])


def run_steps(sess, prompts: list[list[int]], decode: list[list[int]], capacity: int) -> list[np.ndarray]:
    """Batched right-padded prefill of ``prompts`` then one decode call per entry of ``decode``;
    the logits of every valid position of every call, stacked per step."""
    inputs = {i.name: i for i in sess.get_inputs()}
    past = {name: np.zeros((len(prompts), spec.shape[1], capacity, spec.shape[3]), _dtype(spec.type))
            for name, spec in inputs.items() if name.startswith("past_")}
    lens = np.array([len(p) for p in prompts], np.int32)
    seq = int(lens.max())
    ids = np.zeros((len(prompts), seq), np.int64)
    for row, prompt in enumerate(prompts):
        ids[row, :len(prompt)] = prompt
    cache = np.zeros(len(prompts), np.int32)
    steps = []
    for tokens, valid in [(ids, lens)] + [(np.array(d, np.int64)[:, None], np.ones(len(d), np.int32)) for d in decode]:
        width = tokens.shape[1]
        feeds = {"input_ids": tokens, "position_ids": cache[:, None].astype(np.int64) + np.arange(width),
                 "cache_lens": cache, "input_lens": valid,
                 "logit_positions": np.tile(np.arange(width, dtype=np.int64), (len(prompts), 1)), **past}
        names = [o.name for o in sess.get_outputs()]
        outs = dict(zip(names, sess.run(names, {k: v for k, v in feeds.items() if k in inputs})))
        past = {name: outs[name.replace("past_", "present_")] for name in past}
        steps.append(outs["logits"].astype(np.float32))
        cache = cache + valid
    return steps


def _dtype(ort_type: str) -> np.dtype:
    return {"tensor(float)": np.float32, "tensor(float16)": np.float16}[ort_type]


_BUILT: dict[tuple, Path] = {}
_ROOT: list[Path] = []


def built(recipe: str, arch: str = "llama", attention: str = "standard", dtype: str = "float16",
          **overrides) -> Path:
    """A tiny ``arch`` model built with ``recipe`` (trt recipes get ``attention``, ``dtype``), once per session."""
    import atexit
    import shutil
    import tempfile

    from graphopt.build.artifact import BuildOptions, build
    from graphopt.passes.pipeline import load_recipe
    from graphopt.core.progress import QUIET
    from graphopt.targets.trt_options import TrtOptions, apply_trt_options
    from tiny_models import make_tiny_model

    key = (recipe, arch, attention, dtype, tuple(sorted(overrides.items())))
    if key in _BUILT:
        return _BUILT[key]
    if not _ROOT:
        _ROOT.append(Path(tempfile.mkdtemp(prefix="graphopt-trt-")))
        atexit.register(shutil.rmtree, _ROOT[0], True)
    root = _ROOT[0]
    tag = "-".join([arch] + [f"{k}{v}" for k, v in sorted(overrides.items())])
    source = root / f"hf-{tag}"
    if not source.exists():
        make_tiny_model(arch, source, **overrides)
    chosen = load_recipe(recipe)
    if chosen.target == "trt":
        chosen = apply_trt_options(chosen, TrtOptions(attention=attention, dtype=dtype))
    out = root / f"{recipe}-{attention}-{dtype}-{tag}"
    build(str(source), BuildOptions(chosen, out, force=True), QUIET)
    _BUILT[key] = out
    return out
