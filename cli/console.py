"""Terminal output shared by the commands: tables on stdout, progress and errors on stderr."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from knnflow.errors import InputError, OptionError
from knnflow.files import human_bytes  # noqa: F401  (re-exported for the commands)

# Piped output (logs, CI) gets a wide console so tables are not squeezed to 80 columns.
console = Console() if Console().is_terminal else Console(width=160)
err_console = Console(stderr=True)


def flag(name: str) -> str:
    """The flag of a library option name: batch_size → --batch-size."""
    return "--" + name.replace("_", "-")


@contextmanager
def flags_named(spelling: dict[str, str]) -> Iterator[None]:
    """Within a command: library OptionErrors name this command's flags, `spelling` giving
    those that are not --NAME (knn-efm's `route` is train's --knn-route)."""
    try:
        yield
    except OptionError as err:
        raise InputError(err.render(lambda name: spelling.get(name, flag(name)))) from None


# Where stderr is not a terminal (nohup, a log file), a stage that runs longer than this
# prints a plain progress line this often, and one when it ends; short stages print nothing
# (a quick failure stays one line).
LOG_EVERY_SECONDS = 30.0


def log_throttle(every: float = LOG_EVERY_SECONDS,
                 clock: Callable[[], float] = time.monotonic) -> Callable[[str, bool], bool]:
    """due(key, final): whether a progress line for `key` should be printed now."""
    first: dict[str, float] = {}
    last: dict[str, float] = {}

    def due(key: str, final: bool = False) -> bool:
        now = clock()
        first.setdefault(key, now)
        if now - first[key] < every or (not final and now - last.get(key, first[key]) < every):
            return False
        last[key] = now
        return True

    return due


@contextmanager
def progress_bar() -> Iterator[Callable[[str, int, int], None]]:
    """A rich progress display; yields callback(stage, done, total), one bar per stage.

    Transient: the bars vanish when the work ends, so a result table or a one-line error is
    what stays on screen. Where stderr is not a terminal, plain lines instead (no bar residue
    in logs) for stages longer than LOG_EVERY_SECONDS: one that often, and one at the end.
    """
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn(), TimeRemainingColumn())
    terminal = err_console.is_terminal
    due = log_throttle()
    began: dict[str, float] = {}
    with Progress(*columns, console=err_console, transient=True, disable=not terminal) as bar:
        tasks: dict[str, int] = {}
        shown: dict[str, int] = {}

        def update(stage: str, done: int, total: int) -> None:
            if stage not in tasks:
                tasks[stage] = bar.add_task(stage, total=total)
                began[stage] = time.monotonic()
            elif shown[stage] == done:
                return
            shown[stage] = done
            bar.update(tasks[stage], completed=done, total=total)
            if not terminal and due(stage, done >= total):
                elapsed = time.monotonic() - began[stage]
                print(f"{stage}: {done}/{total} ({elapsed:.0f} s)", file=sys.stderr,
                      flush=True)

        yield update


def key_value_table(title: str, rows: list[tuple[str, object]]) -> Table:
    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    for key, value in rows:
        table.add_row(key, str(value))
    return table


