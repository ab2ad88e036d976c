"""A synthetic artifact that follows the artifact I/O contract exactly, and its numpy reference.

Graph (per layer l; B batch, S new tokens, k logit rows, H heads, Hkv kv heads, D head dim, E = H*D)::

    x = Gather(embed, input_ids) + Gather(pos_embed, position_ids)               [B, S, E]
    q, k, v = x @ wq, x @ wk, x @ wv                                              [B, S, H*D | Hkv*D]
    a, present_key.l, present_value.l = com.microsoft.GroupQueryAttention(
        q, k, v, past_key.l, past_value.l, seqlens_k = cache_lens + S - 1,
        total_sequence_length = max(cache_lens) + S)                              past/present share memory
    x = x + a @ wo;  x = x + tanh(x @ wm)
    logits = GatherND(x, logit_positions[..., None], batch_dims=1) @ lm_head      [B, k, V]

The reference (``ContractModel.reference_logits``) runs the same weights in float64 over the
whole sequence with plain causal attention and no cache.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from graphopt.core.manifest import FORMAT, FORMAT_VERSION, file_entries


@dataclasses.dataclass
class ContractModel:
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    max_seq: int
    weights: dict[str, np.ndarray]

    def reference_logits(self, tokens: list[int]) -> np.ndarray:
        """Logits [L, V] for every position of ``tokens`` (positions 0..L-1), float64, full causal attention."""
        return self.reference(tokens)[0]

    def reference(self, tokens: list[int]) -> tuple[np.ndarray, list[np.ndarray], list[np.ndarray]]:
        """Logits [L, V] and, per layer, the keys and values [Hkv, L, D] the cache should hold."""
        w = {name: value.astype(np.float64) for name, value in self.weights.items()}
        ids = np.asarray(tokens)
        x = w["embed"][ids] + w["pos_embed"][np.arange(len(ids))]
        keys, values = [], []
        for layer in range(self.num_layers):
            attn, k, v = self._attention(x, w, layer)
            keys.append(k)
            values.append(v)
            x = x + attn @ w[f"wo.{layer}"]
            x = x + np.tanh(x @ w[f"wm.{layer}"])
        return x @ w["lm_head"], keys, values

    def reference_greedy(self, prompt: list[int], max_new_tokens: int, stop_ids: set[int]) -> tuple[list[int], str]:
        """Greedy continuation of ``prompt`` recomputed from scratch each token; (token ids, finish reason)."""
        tokens: list[int] = []
        while len(tokens) < max_new_tokens:
            tokens.append(int(np.argmax(self.reference_logits(prompt + tokens)[-1])))
            if tokens[-1] in stop_ids:
                return tokens, "stop"
        return tokens, "length"

    def _attention(self, x: np.ndarray, w: dict[str, np.ndarray], layer: int) -> tuple[np.ndarray, ...]:
        seq, d = x.shape[0], self.head_dim
        q = (x @ w[f"wq.{layer}"]).reshape(seq, self.num_heads, d).transpose(1, 0, 2)
        k = (x @ w[f"wk.{layer}"]).reshape(seq, self.num_kv_heads, d).transpose(1, 0, 2)
        v = (x @ w[f"wv.{layer}"]).reshape(seq, self.num_kv_heads, d).transpose(1, 0, 2)
        group = self.num_heads // self.num_kv_heads
        k_all, v_all = np.repeat(k, group, axis=0), np.repeat(v, group, axis=0)
        scores = q @ k_all.transpose(0, 2, 1) / np.sqrt(d)
        scores = np.where(np.tril(np.ones((seq, seq), dtype=bool)), scores, -np.inf)
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        return (probs @ v_all).transpose(1, 0, 2).reshape(seq, self.num_heads * d), k, v


def random_weights(model: ContractModel, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    hidden, d = model.num_heads * model.head_dim, model.head_dim

    def mat(rows: int, cols: int, scale: float) -> np.ndarray:
        return (rng.standard_normal((rows, cols)) * scale).astype(np.float32)

    weights = {"embed": mat(model.vocab_size, hidden, 1.0), "pos_embed": mat(model.max_seq, hidden, 0.5)}
    for layer in range(model.num_layers):
        weights[f"wq.{layer}"] = mat(hidden, hidden, hidden**-0.5)
        weights[f"wk.{layer}"] = mat(hidden, model.num_kv_heads * d, hidden**-0.5)
        weights[f"wv.{layer}"] = mat(hidden, model.num_kv_heads * d, hidden**-0.5)
        weights[f"wo.{layer}"] = mat(hidden, hidden, hidden**-0.5)
        weights[f"wm.{layer}"] = mat(hidden, hidden, hidden**-0.5)
    weights["lm_head"] = mat(hidden, model.vocab_size, hidden**-0.5)
    return weights


def _io_specs(model: ContractModel) -> tuple[list[dict], list[dict]]:
    cache_shape = ["batch", model.num_kv_heads, "max_seq", model.head_dim]
    inputs = [
        {"name": "input_ids", "dtype": "int64", "shape": ["batch", "seq"], "role": "input_ids"},
        {"name": "position_ids", "dtype": "int64", "shape": ["batch", "seq"], "role": "position_ids"},
        {"name": "cache_lens", "dtype": "int32", "shape": ["batch"], "role": "cache_lens"},
        {"name": "input_lens", "dtype": "int32", "shape": ["batch"], "role": "input_lens"},
        {"name": "logit_positions", "dtype": "int64", "shape": ["batch", "k"], "role": "logit_positions"},
    ]
    outputs = [{"name": "logits", "dtype": "float32", "shape": ["batch", "k", model.vocab_size], "role": "logits"}]
    for layer in range(model.num_layers):
        for kind in ("key", "value"):
            inputs.append({"name": f"past_{kind}.{layer}", "dtype": "float32", "shape": cache_shape,
                           "role": f"past_{kind}", "layer": layer})
            outputs.append({"name": f"present_{kind}.{layer}", "dtype": "float32", "shape": cache_shape,
                            "role": f"present_{kind}", "layer": layer})
    return inputs, outputs


_ONNX_TYPES = {"int64": TensorProto.INT64, "int32": TensorProto.INT32, "float32": TensorProto.FLOAT}


def _value_info(spec: dict) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(spec["name"], _ONNX_TYPES[spec["dtype"]], spec["shape"])


def _layer_nodes(model: ContractModel, layer: int, x: str) -> tuple[list[onnx.NodeProto], str]:
    def mm(out: str, a: str, b: str) -> onnx.NodeProto:
        return helper.make_node("MatMul", [a, b], [out])

    gqa = helper.make_node(
        "GroupQueryAttention",
        [f"q.{layer}", f"k.{layer}", f"v.{layer}", f"past_key.{layer}", f"past_value.{layer}",
         "seqlens_k", "total_sequence_length"],
        [f"attn.{layer}", f"present_key.{layer}", f"present_value.{layer}"],
        domain="com.microsoft", num_heads=model.num_heads, kv_num_heads=model.num_kv_heads,
    )
    nodes = [
        mm(f"q.{layer}", x, f"wq.{layer}"), mm(f"k.{layer}", x, f"wk.{layer}"), mm(f"v.{layer}", x, f"wv.{layer}"),
        gqa, mm(f"o.{layer}", f"attn.{layer}", f"wo.{layer}"),
        helper.make_node("Add", [x, f"o.{layer}"], [f"h.{layer}"]),
        mm(f"m.{layer}", f"h.{layer}", f"wm.{layer}"),
        helper.make_node("Tanh", [f"m.{layer}"], [f"mt.{layer}"]),
        helper.make_node("Add", [f"h.{layer}", f"mt.{layer}"], [f"x.{layer + 1}"]),
    ]
    return nodes, f"x.{layer + 1}"


def _lengths_nodes() -> list[onnx.NodeProto]:
    """seqlens_k = cache_lens + S - 1 and total_sequence_length = max(cache_lens) + S, computed in-graph."""
    return [
        helper.make_node("Shape", ["input_ids"], ["ids_shape"], start=1, end=2),
        helper.make_node("Cast", ["ids_shape"], ["seq_len"], to=TensorProto.INT32),
        helper.make_node("Sub", ["seq_len", "one_i32"], ["seq_minus_1"]),
        helper.make_node("Add", ["cache_lens", "seq_minus_1"], ["seqlens_k"]),
        helper.make_node("ReduceMax", ["cache_lens"], ["max_cache"], keepdims=1),
        helper.make_node("Add", ["max_cache", "seq_len"], ["total_1"]),
        helper.make_node("Squeeze", ["total_1"], ["total_sequence_length"]),
    ]


def build_graph(model: ContractModel) -> onnx.ModelProto:
    inputs, outputs = _io_specs(model)
    nodes = _lengths_nodes() + [
        helper.make_node("Gather", ["embed", "input_ids"], ["tok_emb"]),
        helper.make_node("Gather", ["pos_embed", "position_ids"], ["pos_emb"]),
        helper.make_node("Add", ["tok_emb", "pos_emb"], ["x.0"]),
    ]
    x = "x.0"
    for layer in range(model.num_layers):
        layer_nodes, x = _layer_nodes(model, layer, x)
        nodes += layer_nodes
    nodes += [
        helper.make_node("Unsqueeze", ["logit_positions", "minus_one"], ["gather_idx"]),
        helper.make_node("GatherND", [x, "gather_idx"], ["x_rows"], batch_dims=1),
        helper.make_node("MatMul", ["x_rows", "lm_head"], ["logits"]),
    ]
    initializers = [numpy_helper.from_array(value, name) for name, value in model.weights.items()]
    initializers += [numpy_helper.from_array(np.array([1], np.int32), "one_i32"),
                     numpy_helper.from_array(np.array([-1], np.int64), "minus_one")]
    graph = helper.make_graph(nodes, "contract_model", [_value_info(s) for s in inputs],
                              [_value_info(s) for s in outputs], initializers)
    opsets = [helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)]
    return helper.make_model(graph, opset_imports=opsets, ir_version=10)


def write_manifest(directory: Path, model: ContractModel, eos_token_ids: tuple[int, ...], files: list[str]) -> None:
    inputs, outputs = _io_specs(model)
    aliases = {f"present_{kind}.{i}": f"past_{kind}.{i}" for i in range(model.num_layers) for kind in ("key", "value")}
    manifest = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "graphopt_version": "0.1.0",
        "source": {"architecture": "ContractModel", "model_type": "synthetic", "id": "tests/contract_model",
                   "sha256": None},
        "target": "ort-cpu", "precision": {"weights": "float32", "activations": "float32", "kv_cache": "float32"},
        "model": {"num_layers": model.num_layers, "num_heads": model.num_heads, "num_kv_heads": model.num_kv_heads,
                  "head_dim": model.head_dim, "hidden_size": model.num_heads * model.head_dim,
                  "vocab_size": model.vocab_size, "max_seq": model.max_seq, "bos_token_id": None,
                  "eos_token_ids": list(eos_token_ids), "pad_token_id": 0},
        "io": {"inputs": inputs, "outputs": outputs},
        "kv_cache": {"layout": "slot-major BHSD", "dtype": "float32", "shape": inputs[-1]["shape"],
                     "aliases": aliases, "update": "in-place"},
        "plugins": [], "optimization_profiles": [],
        "files": file_entries(directory, files),
        "min_runtime": {"onnxruntime": "1.20"},
    }
    (directory / "manifest.json").write_text(json.dumps(manifest, indent=2), encoding="utf-8")


def build_contract_artifact(
    directory: str | Path,
    *,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    head_dim: int = 8,
    vocab_size: int = 32,
    max_seq: int = 64,
    eos_token_ids: tuple[int, ...] = (31,),
    seed: int = 0,
) -> ContractModel:
    """Write model.onnx (+ model.onnx.data), manifest.json, generation_config.json, tokenizer/ into ``directory``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model = ContractModel(num_layers, num_heads, num_kv_heads, head_dim, vocab_size, max_seq, {})
    model.weights = random_weights(model, seed)
    onnx.save_model(build_graph(model), directory / "model.onnx", save_as_external_data=True,
                    all_tensors_to_one_file=True, location="model.onnx.data", size_threshold=1024)
    (directory / "tokenizer").mkdir(exist_ok=True)
    generation = {"eos_token_id": list(eos_token_ids), "do_sample": False}
    (directory / "generation_config.json").write_text(json.dumps(generation), encoding="utf-8")
    write_manifest(directory, model, eos_token_ids, ["model.onnx", "model.onnx.data", "generation_config.json"])
    return model
