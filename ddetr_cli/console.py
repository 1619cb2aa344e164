"""Terminal output shared by every command: Rich consoles, verbosity, and the user-error type.

Messages and progress go to stderr so that stdout carries only results (tables, JSON paths) and
can be piped. The consoles resolve `sys.stdout` / `sys.stderr` when they print, so test runners
that swap the streams capture everything.
"""

from __future__ import annotations

from rich.console import Console
from rich.markup import escape

console = Console(highlight=False)
err_console = Console(stderr=True, highlight=False)

_state = {"verbose": False, "quiet": False}


class UserError(Exception):
    """A problem with what the user asked for (a path, an option value, a data file): exit code 2."""

    exit_code = 2


def set_verbosity(verbose: bool = False, quiet: bool = False) -> None:
    _state["verbose"] = bool(verbose)
    _state["quiet"] = bool(quiet) and not verbose


def is_verbose() -> bool:
    return _state["verbose"]


def is_quiet() -> bool:
    return _state["quiet"]


def info(message: str) -> None:
    """A progress message (suppressed by -q). `message` may hold Rich markup."""
    if not _state["quiet"]:
        err_console.print(message, soft_wrap=True)


def debug(message: str) -> None:
    """Detail shown with -v only."""
    if _state["verbose"]:
        err_console.print(f"[dim]{escape(message)}[/dim]", soft_wrap=True)


def warn(message: str) -> None:
    """A problem the command worked around (shown even with -q)."""
    err_console.print(f"[yellow]Warning:[/yellow] {escape(message)}", soft_wrap=True)


def error(message: str) -> None:
    """The single red line a failed command ends with."""
    err_console.print(f"[bold red]Error:[/bold red] {escape(message)}", soft_wrap=True)


def progress(disable: bool = False):
    """A Rich progress bar on stderr: description, bar, n/total, it/s, elapsed, ETA, and a `status`
    field the caller fills (loss, lr). Disabled with -q or on non-zero ranks."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        ProgressColumn,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )
    from rich.text import Text

    class RateColumn(ProgressColumn):
        def render(self, task):
            return Text(f"{task.speed:.2f} it/s" if task.speed else "-- it/s", style="cyan")

    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        RateColumn(),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        TextColumn("{task.fields[status]}"),
        console=err_console,
        disable=disable or is_quiet(),
        transient=False,
    )
