"""How `make test` spreads the suite over two processes (pytest-xdist, ``-n 2 --dist loadgroup``).

Each test file is one unit of work, so module-scoped fixtures (a tiny model built once per file) are built
once; every file that builds the real SmolLM2 (it imports ``smollm2_trace``) joins one unit, so the model is
traced once, as in a single process. Without xdist the marks do nothing.
"""

from __future__ import annotations

import pytest


@pytest.hookimpl(tryfirst=True)  # before xdist reads the marks into the node ids
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.get_closest_marker("xdist_group") is not None:
            continue
        module = getattr(item, "module", None)  # None for doctests in passes/
        traces_smollm2 = any(hasattr(module, name) for name in ("smollm2_traced", "build_smollm2"))
        item.add_marker(pytest.mark.xdist_group("smollm2" if traces_smollm2 else item.nodeid.split("::")[0]))
