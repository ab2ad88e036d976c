"""ONNX Runtime GenAI as a peer: its model of an artifact's source, at the artifact's precision.

A speed ratio means something only between models of the same precision: an int4 artifact against
GenAI's fp32 model mostly measures the bytes each decode step reads. So GenAI's model is built with
its own builder at the precision the artifact's manifest records, and cached per precision:

    artifact weights (manifest)          GenAI builder (-e cpu)                          cache key
    fp32                                 -p fp32                                         fp32
    int4 block B symmetric (…)           -p int4 block_size=B accuracy_level=A          int4-bB-aA
    int8 block B symmetric               -p int8 block_size=B accuracy_level=A          int8-bB-aA
    int8 per-channel symmetric           -p int8 block_size=32  (no per-channel int8)    mismatch, printed
    gguf Q4_1 … kept exactly (keep-quant) -p int4 (int8 without Q4_*) block_size=32       mismatch, printed
    fp8 / fp16 / bf16 / anything else    -p fp32  (no CPU mode for them)                 mismatch, printed

A is the artifact's MatMulNBits ``accuracy_level`` (its build report's lower-quant-ort-cpu pass; 4 =
int8 activations, GenAI's CPU default too; 0 becomes 1, fp32 activations). Both quantize with zero
point 0 (symmetric), GenAI by round-to-nearest without calibration in ONNX Runtime's full-range form (each
block's largest-magnitude weight maps to -8, 16 levels; graphopt's ``full_range``): the weights' values differ
(graphopt's AWQ scales and clips), the bytes read per token and the kernels do not. Both quantize the tied
embedding too: GenAI 0.18's int4 model reads one int4 table from its GatherBlockQuantized and its lm_head
MatMulNBits, as graphopt's does (checked on SmolLM2's: 151 MatMulNBits + 1 GatherBlockQuantized, 86.5 MB).

:func:`genai_logits` runs GenAI's ``model.onnx`` in a plain ONNX Runtime session as a fidelity ``Logits``,
so ``graphopt compare`` measures it against fp32 on the same rows as graphopt's artifacts (compare_peers).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from graphopt.core.errors import BenchError
from graphopt.core.progress import Progress
from graphopt.sources import default_cache_dir

DEFAULT_BLOCK = 32  # GenAI's builder's default block_size
DEFAULT_ACCURACY = 4  # GenAI's CPU default accuracy_level, and graphopt's lower-quant-ort-cpu's


@dataclasses.dataclass(frozen=True)
class PeerPrecision:
    """The precision GenAI's model is built at; ``mismatch`` says how it differs from the artifact's."""
    precision: str  # "fp32", "int8" or "int4": the builder's -p
    block_size: int | None = None
    accuracy_level: int | None = None
    mismatch: str | None = None

    @property
    def key(self) -> str:
        """The cache folder's precision part: fp32, int4-b32-a4, …"""
        if self.precision == "fp32":
            return "fp32"
        return f"{self.precision}-b{self.block_size}-a{self.accuracy_level}"

    def builder_args(self) -> list[str]:
        args = ["-p", self.precision, "-e", "cpu"]
        if self.precision != "fp32":
            args += ["--extra_options", f"block_size={self.block_size}", f"accuracy_level={self.accuracy_level}"]
        return args

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def peer_precision(weights: str, accuracy_level: int | None = None) -> PeerPrecision:
    """GenAI's precision for an artifact whose manifest says ``precision.weights == weights``."""
    words = weights.split()
    kind = words[0] if words else "fp32"
    level = max(1, DEFAULT_ACCURACY if accuracy_level is None else accuracy_level)
    block = re.search(r"\bblock (\d+)\b", weights)
    if kind == "fp32":
        return PeerPrecision("fp32")
    if kind in ("int4", "int8") and block:
        return PeerPrecision(kind, int(block.group(1)), level)
    if kind in ("gguf", "gptq", "awq"):  # --keep-quant: the file's own types (Q4_*/INT4 → int4 blocks, else int8)
        nearest = "int4" if re.search(r"\bQ4_|_INT4\b", weights) else "int8"
        return PeerPrecision(nearest, DEFAULT_BLOCK, level,
                             mismatch=f"the artifact keeps the {kind.upper()} file's quantization ('{weights}'); "
                                      f"GenAI's nearest model is {nearest} block {DEFAULT_BLOCK}, round-to-nearest")
    if kind == "int8":
        return PeerPrecision("int8", DEFAULT_BLOCK, level,
                             mismatch=f"the artifact's weights are '{weights}'; GenAI's builder quantizes int8 only "
                                      f"in blocks (16-256), so its model is int8 block {DEFAULT_BLOCK}")
    return PeerPrecision("fp32", mismatch=f"the artifact's weights are '{weights}'; GenAI's builder has no such CPU "
                                          "precision (fp32, int8, int4 only), so its model is fp32 — the speed "
                                          "ratio includes the precision difference")


def artifact_peer_precision(artifact: Path, manifest: Any) -> PeerPrecision:
    """:func:`peer_precision` of an artifact: its manifest's weights, its build report's accuracy_level."""
    return peer_precision(manifest.precision.get("weights", "fp32"), _accuracy_level(artifact))


def peer_precisions(artifact: Path, manifest: Any, peers: list[str]) -> dict[str, Any]:
    """The artifact's weight precision, each peer's, and a line for each difference between them."""
    weights = manifest.precision.get("weights", "fp32")
    out: dict[str, Any] = {"precision": weights, "peer_precision": {}, "precision_mismatch": []}
    if "hf" in peers:
        out["peer_precision"]["hf"] = "fp32"
        if weights != "fp32":
            out["precision_mismatch"].append(f"hf runs the source's fp32 weights in PyTorch; the artifact's are "
                                             f"'{weights}' (--vs genai matches fp32, int8 and int4)")
    if "genai" in peers:
        peer = artifact_peer_precision(artifact, manifest)
        out["peer_precision"]["genai"] = peer.precision
        out["genai_model"] = peer.to_json()
        out["precision_mismatch"] += [f"genai: {peer.mismatch}"] if peer.mismatch else []
    return out


def _accuracy_level(artifact: Path) -> int | None:
    report = Path(artifact) / "build-report.json"
    if not report.is_file():
        return None
    steps = json.loads(report.read_text()).get("pipeline") or []
    return next((int(step["accuracy_level"]) for step in steps
                 if step.get("name") == "lower-quant-ort-cpu" and "accuracy_level" in step), None)


def genai_model(source: Any, progress: Progress, peer: PeerPrecision = PeerPrecision("fp32")) -> Path:
    """onnxruntime-genai's CPU model of ``source`` at ``peer``'s precision, built once with its own builder
    and cached (one folder per source, precision and GenAI version)."""
    try:
        import onnxruntime_genai as og
    except ImportError:
        raise BenchError("--vs genai needs ONNX Runtime GenAI: pip install onnxruntime-genai") from None
    out = default_cache_dir() / "genai" / f"{source.sha256[:16]}-{peer.key}-og{og.__version__}"
    if (out / "genai_config.json").is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".building-") as tmp:
        command = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(source.model_dir),
                   "-o", f"{tmp}/model", "-c", f"{tmp}/hf-cache", *peer.builder_args()]
        with progress.step(f"building the ONNX Runtime GenAI {peer.key} model (once, cached in {out})"):
            proc = subprocess.run(command, capture_output=True, text=True, check=False)
        if proc.returncode != 0 or not Path(tmp, "model", "genai_config.json").is_file():
            lines = (proc.stderr or proc.stdout).strip().splitlines() or ["no output"]
            raise BenchError(f"onnxruntime-genai's builder failed on {source.model_dir}: {lines[-1]}; "
                             f"run it by hand to see why: {' '.join(command[1:])}")
        if not out.exists():  # else another process finished first
            os.rename(f"{tmp}/model", out)  # atomic: a half-built model is never seen at `out`
    return out


def genai_logits(model_dir: Path, threads: int | None = None):
    """Logits at every position of one row from GenAI's ``model.onnx`` run by a plain ONNX Runtime session
    (empty past, all-ones attention mask): a :data:`graphopt.measure.fidelity.Logits` for ``evaluate``,
    so GenAI's model gets KL / top-1 against fp32 on the same rows as graphopt's artifacts."""
    import numpy as np
    import onnxruntime as ort

    config = json.loads((Path(model_dir) / "genai_config.json").read_text())["model"]["decoder"]
    names = config["inputs"]
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(Path(model_dir) / config["filename"]), options,
                                   providers=["CPUExecutionProvider"])
    inputs = {i.name: i for i in session.get_inputs()}
    kv_dtype = np.float16 if "float16" in inputs[names["past_key_names"] % 0].type else np.float32
    empty = np.zeros((1, config["num_key_value_heads"], 0, config["head_size"]), kv_dtype)
    past = {names[kind] % layer: empty for layer in range(config["num_hidden_layers"])
            for kind in ("past_key_names", "past_value_names")}
    output = config["outputs"]["logits"]

    def run(row: Any) -> Any:
        ids = row.astype(np.int64)[None]
        feeds = {names["input_ids"]: ids, names["attention_mask"]: np.ones_like(ids), **past}
        if "position_ids" in inputs:
            feeds["position_ids"] = np.arange(ids.shape[1], dtype=np.int64)[None]
        return session.run([output], feeds)[0][0].astype(np.float32)

    return run
