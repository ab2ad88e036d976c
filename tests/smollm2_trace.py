"""SmolLM2-135M loaded and traced once per pytest process, shared by the tests that build it (fp32, int8, trt).

Tracing is most of a SmolLM2 build (about 100 of 110 s on 2 cores); each test runs its recipe on a copy of
the trace with ``build_traced(..., copy=True)``, as ``graphopt compare`` does, and gets the same artifact a
``graphopt build`` would write (the build tests check it against Hugging Face).
"""

from __future__ import annotations

import functools
from typing import Any

from graphopt.build.artifact import BuildOptions, Loaded, build_traced, load, trace_loaded
from graphopt.build.quant import context_for
from graphopt.core.progress import QUIET


@functools.lru_cache(maxsize=1)
def smollm2_traced() -> Loaded:
    loaded = load("smollm2-135m", "sdpa", QUIET)
    trace_loaded(loaded, QUIET)
    return loaded


def build_smollm2(options: BuildOptions) -> dict[str, Any]:
    """Build ``options`` (its recipe, output, calibration and evaluation settings) from the shared trace."""
    loaded = smollm2_traced()
    return build_traced(loaded, options, QUIET, context_for(options, loaded, QUIET), copy=True)
