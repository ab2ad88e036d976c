"""Progress display for long steps (rich, on stderr). Passes and libraries never print; the CLI
hands a Progress to the steps it runs."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator

import rich.progress
from rich.console import Console


class Progress:
    def __init__(self, enabled: bool = True) -> None:
        self.console = Console(stderr=True)
        self.enabled = enabled
        self._status = None  # the spinner of the running step: a bar pauses it (one live display at a time)

    @contextlib.contextmanager
    def step(self, description: str) -> Iterator[None]:
        if not self.enabled:
            yield
            return
        start = time.perf_counter()
        with self.console.status(f"[bold]{description}[/]…") as status:
            outer, self._status = self._status, status
            try:
                yield
            finally:
                self._status = outer
        self.console.print(f"[green]✓[/] {description} [dim]({time.perf_counter() - start:.1f} s)[/]")

    @contextlib.contextmanager
    def bar(self, description: str, total: int) -> Iterator[Callable[[int], None]]:
        """A progress bar over ``total`` units; yields ``advance(n)``."""
        if not self.enabled:
            yield lambda n=1: None
            return
        start, status = time.perf_counter(), self._status
        columns = (*rich.progress.Progress.get_default_columns(), rich.progress.TimeElapsedColumn())
        if status is not None:
            status.stop()
        try:
            with rich.progress.Progress(*columns, console=self.console, transient=True) as bar:
                task = bar.add_task(description, total=total)
                yield lambda n=1: bar.advance(task, n)
        finally:
            if status is not None:
                status.start()
        self.console.print(f"[green]✓[/] {description} [dim]({time.perf_counter() - start:.1f} s)[/]")


QUIET = Progress(enabled=False)
