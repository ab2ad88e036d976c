"""The TensorRT registration of the FlashAttention plugin, exercised on the CPU with a stand-in for
``tensorrt.plugin`` (the real module needs full TensorRT): the plugin id, the output descriptors (presents
alias pasts), the formats, and the AOT implementation returning sm_90a PTX with a symbolic launch grid."""

from __future__ import annotations

import types

import pytest

from graphopt.plugins import flash_attention_trt as plugin

pytest.importorskip("triton", reason="triton is not installed (pip install 'graphopt[trt]')")


class Desc:
    def __init__(self, shape, dtype="DataType.HALF"):
        self.shape_expr, self.dtype = shape, dtype

    def like(self):
        return ("like", tuple(self.shape_expr))

    def aliased(self):
        return ("aliased", tuple(self.shape_expr))


def fake_trtp():
    """A stand-in module recording what is registered under which plugin id."""
    registry: dict[tuple[str, str], object] = {}

    def decorator(kind):
        return lambda plugin_id: (lambda fn: registry.setdefault((kind, plugin_id), fn))

    class Exprs(list):
        def __init__(self, n):
            super().__init__([None] * n)

    return types.SimpleNamespace(
        registry=registry, register=decorator("register"), autotune=decorator("autotune"),
        aot_impl=decorator("aot_impl"), TensorDesc=Desc, KernelLaunchParams=types.SimpleNamespace,
        SymIntExprs=Exprs, SymInt32=lambda x: ("i32", x), AutoTuneCombination=lambda *a: a)


def _inputs(batch=4, seq=5, heads=9, kv_heads=3, dim=64, capacity=256):
    return (Desc([batch, seq, heads * dim]), Desc([batch, seq, kv_heads * dim]), Desc([batch, seq, kv_heads * dim]),
            Desc([batch, kv_heads, capacity, dim]), Desc([batch, kv_heads, capacity, dim]), Desc([batch], "INT32"))


def test_registers_descriptor_formats_and_aot() -> None:
    trtp = fake_trtp()
    plugin.register(trtp)
    assert set(trtp.registry) == {(k, "graphopt::FlashAttention") for k in ("register", "autotune", "aot_impl")}
    inputs = _inputs()
    attrs = dict(num_heads=9, kv_num_heads=3, scale=0.125, causal=1, softcap=0.0, window=-1)
    out, present_k, present_v = trtp.registry[("register", plugin.PLUGIN_ID)](*inputs, **attrs)
    assert out == ("like", (4, 5, 576)) and present_k == ("aliased", (4, 3, 256, 64)) and present_v[0] == "aliased"
    formats = trtp.registry[("autotune", plugin.PLUGIN_ID)](*inputs, **attrs, outputs=None)
    assert [f[0].split(", ")[5] for f in formats] == ["INT32", "INT32"] and formats[0][0].startswith("FP16")
    name, ptx, launch, extra = trtp.registry[("aot_impl", plugin.PLUGIN_ID)](*inputs, **attrs, outputs=None,
                                                                           tactic=0)
    assert ".target sm_90a" in ptx and f".entry {name}(" in ptx
    assert (launch.grid_x, launch.grid_y, launch.block_x) == (1, 36, 128) and launch.shared_mem > 0
    assert extra == [("i32", 5), ("i32", 256)]  # seq and capacity, after the input pointers
    with pytest.raises(ValueError, match="--attention standard"):
        trtp.registry[("aot_impl", plugin.PLUGIN_ID)](*inputs, **(attrs | {"window": 4}), outputs=None, tactic=0)


def test_launch_grid_covers_every_query_block() -> None:
    assert plugin.launch_grid(2, 1, 9) == (1, 18)
    assert plugin.launch_grid(3, 64, 4) == (1, 12) and plugin.launch_grid(3, 65, 4) == (2, 12)


def test_not_registered_without_tensorrt() -> None:
    try:
        import tensorrt.plugin  # noqa: F401
    except ImportError:
        assert plugin.REGISTERED is False
    else:
        assert plugin.REGISTERED is True
