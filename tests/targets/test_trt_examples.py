"""The C++ example (examples/trt_cpp/main.cpp) reads only manifest fields a real trt build writes: every
JSON path in its source resolves, with the type the C++ code expects, in the manifest of a plugin build
whose engine has been recorded."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

from graphopt.targets.trt_manifest import record_engine
from trt_helpers import built

SOURCE = Path(__file__).resolve().parents[2] / "examples" / "trt_cpp" / "main.cpp"
# the C++ names bound to manifest sub-objects, and where each points
ROOTS = {"m": lambda m: [m], "engineInfo": lambda m: [m["trt"]["engine"]], "plugin": lambda m: m["plugins"],
         "spec": lambda m: m["io"]["inputs"] + m["io"]["outputs"]}
ACCESS = re.compile(r"\b(m|engineInfo|plugin|spec)((?:\[(?:\"[a-z_]+\"|i|name)\])+)")


def _paths(source: str) -> set[tuple[str, tuple[str, ...]]]:
    found = set()
    for root, chain in ACCESS.findall(source):
        found.add((root, tuple(re.findall(r"\[(\"[a-z_]+\"|i|name)\]", chain))))
    return found


def _resolve(value, keys: tuple[str, ...], manifest: dict) -> list:
    values = [value]
    for key in keys:
        if key == "i":  # an index into a list: every element
            values = [item for v in values for item in v]
        elif key == "name":  # kv_cache.aliases[name] for a present output's name
            values = [v[o["name"]] for v in values for o in manifest["io"]["outputs"] if o["role"] != "logits"]
        else:
            name = key.strip('"')
            missing = [v for v in values if name not in v]
            assert not missing, f"manifest has no field {name!r} (path {keys})"
            values = [v[name] for v in values]
    return values


def test_cpp_example_reads_only_real_manifest_fields(tmp_path) -> None:
    artifact = tmp_path / "art"
    shutil.copytree(built("trt", attention="plugin"), artifact)
    (artifact / "engine.plan").write_bytes(b"plan")
    (artifact / "timing.cache").write_bytes(b"cache")
    record_engine(artifact, "10.13.0")
    manifest = json.loads((artifact / "manifest.json").read_text())
    paths = _paths(SOURCE.read_text())
    assert len(paths) >= 15, sorted(paths)  # the regex really sees the accesses
    for root, keys in sorted(paths):
        for value in _resolve_root(root, manifest, keys):
            assert value is not None, (root, keys)
    assert {("m", ('"kv_cache"', '"aliases"', "name")), ("m", ('"trt"', '"cache_capacity"'))} <= paths
    assert all(isinstance(v, str) for v in _resolve(manifest, ('"kv_cache"', '"aliases"', "name"), manifest))
    assert isinstance(manifest["trt"]["cache_capacity"], int) and isinstance(manifest["model"]["vocab_size"], int)
    assert {s["dtype"] for s in manifest["io"]["inputs"]} <= {"float32", "float16", "bfloat16", "int64", "int32"}
    assert all(isinstance(d, int) or d == "batch" or d in ("seq", "num_logits")
               for s in manifest["io"]["inputs"] for d in s["shape"])


def _resolve_root(root: str, manifest: dict, keys: tuple[str, ...]) -> list:
    return [v for base in ROOTS[root](manifest) for v in _resolve(base, keys, manifest)]
