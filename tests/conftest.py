"""How `make test` spreads the suite over two processes (pytest-xdist: ``-n 2``).

One unit of work per test file, so a module-scoped fixture (a tiny model built once per file) is built once,
and the files that build the real SmolLM2 (they share one trace per process, tests/smollm2_trace.py) are one
unit, so the model is traced once, as in a single process. (xdist's own ``--dist loadgroup`` marks do not
group anything under pytest 9, which no longer lets a plugin rename a test's node id.)
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

SMOLLM2_FILES = {"test_smollm2.py", "test_smollm2_quant.py", "test_trt_smollm2.py"}


def unit_of(nodeid: str) -> str:
    """The unit a test runs in: its file, or "smollm2" for the files that trace SmolLM2."""
    path = nodeid.split("::")[0]
    return "smollm2" if Path(path).name in SMOLLM2_FILES else path


if importlib.util.find_spec("xdist") is not None:
    def pytest_xdist_make_scheduler(config, log):
        from xdist.scheduler import LoadScopeScheduling

        class ByFile(LoadScopeScheduling):
            def _split_scope(self, nodeid: str) -> str:
                return unit_of(nodeid)

        return ByFile(config, log)
