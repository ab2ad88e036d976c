"""Progress display for long steps (rich, on stderr). Passes and libraries never print; the CLI
hands a Progress to the steps it runs."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

from rich.console import Console


class Progress:
    def __init__(self, enabled: bool = True) -> None:
        self.console = Console(stderr=True)
        self.enabled = enabled

    @contextlib.contextmanager
    def step(self, description: str) -> Iterator[None]:
        if not self.enabled:
            yield
            return
        start = time.perf_counter()
        with self.console.status(f"[bold]{description}[/]…"):
            yield
        self.console.print(f"[green]✓[/] {description} [dim]({time.perf_counter() - start:.1f} s)[/]")


QUIET = Progress(enabled=False)
