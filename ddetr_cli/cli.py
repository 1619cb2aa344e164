"""The `ddetr` command line: train, eval, predict, export, bench, demo, data synth|check, build-ops.

Each command lives in its own module under `ddetr_cli/commands/`: a thin Typer face over the
engine in `ddetr_cli/engine/` (the Python API). This module wires them into one
Typer app and owns the error contract every command follows:

- a user error (bad path, bad option value, bad data or checkpoint) prints one red line naming
  the problem and exits 2;
- any other failure prints one red line with the reason and exits 1;
- tracebacks only with -v; Ctrl-C exits 130.
"""

from __future__ import annotations

# Typer evaluates the annotations at run time: Optional[...] keeps the commands working on Python 3.9.
# ruff: noqa: UP045
import os
import sys
from typing import Optional

import typer
from typer.core import TyperGroup

from ddetr_cli import __version__
from ddetr_cli.commands import bench as bench_cmd
from ddetr_cli.commands import bench_loader as bench_loader_cmd
from ddetr_cli.commands import bench_op as bench_op_cmd
from ddetr_cli.commands import build_ops as build_ops_cmd
from ddetr_cli.commands import data_check as data_check_cmd
from ddetr_cli.commands import demo as demo_cmd
from ddetr_cli.commands import evaluate as eval_cmd
from ddetr_cli.commands import export as export_cmd
from ddetr_cli.commands import predict as predict_cmd
from ddetr_cli.commands import synth as synth_cmd
from ddetr_cli.commands import train as train_cmd
from ddetr_cli.console import UserError, err_console, error, is_verbose, set_verbosity
from ddetr_cli.engine.settings import RESUME_AUTO

GLOBAL_FLAGS = {"-v": "--verbose", "--verbose": "--verbose", "-q": "--quiet", "--quiet": "--quiet"}
USER_ERROR_TYPES = ("UserError", "DataError", "CheckpointError")


def _normalise_args(args: list[str]) -> list[str]:
    """Let -v/-q appear anywhere (users put them last); give a bare `--resume` its 'auto' value."""
    head, rest = [], []
    for i, arg in enumerate(args):
        if arg == "--":
            rest.extend(args[i:])
            break
        if arg in GLOBAL_FLAGS:
            head.append(GLOBAL_FLAGS[arg])
            continue
        rest.append(arg)
        if arg == "--resume":
            following = args[i + 1] if i + 1 < len(args) else None
            if following is None or following.startswith("-"):
                rest.append(RESUME_AUTO)
    return head + rest


def _is_user_error(exc: BaseException) -> bool:
    return isinstance(exc, UserError) or any(t.__name__ in USER_ERROR_TYPES for t in type(exc).__mro__)


class DdetrGroup(TyperGroup):
    """The root command: runs the app and turns every outcome into the exit-code contract."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        args = list(sys.argv[1:] if args is None else args)
        code = 0
        try:
            rv = super().main(
                args=_normalise_args(args),
                prog_name=prog_name or "ddetr",
                complete_var=complete_var,
                standalone_mode=False,
                **extra,
            )
            code = rv if isinstance(rv, int) and not isinstance(rv, bool) else 0
        except typer.Abort:
            err_console.print("Aborted.")
            code = 130
        except Exception as exc:  # noqa: BLE001 - the single place every failure is reported
            code = _report(exc)
        if standalone_mode:
            sys.exit(code)
        return code


def _report(exc: BaseException) -> int:
    click_exceptions = _click_exception_types()
    if isinstance(exc, click_exceptions):  # usage errors: unknown option, bad value, missing argument
        message = exc.format_message()
        ctx = getattr(exc, "ctx", None)
        hint = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
        error(f"{message}{hint}")
        return int(getattr(exc, "exit_code", 2) or 2)
    if is_verbose():
        err_console.print_exception()
    if _is_user_error(exc):
        error(str(exc))
        return 2
    if isinstance(exc, MemoryError):
        error("out of memory (try a smaller --batch-size or --imgsz)")
        return 1
    reason = str(exc) or type(exc).__name__
    error(f"{type(exc).__name__}: {reason}" if not isinstance(exc, RuntimeError) else reason)
    if not is_verbose():
        err_console.print("[dim]Run again with -v for the traceback.[/dim]", soft_wrap=True)
    return 1


def _click_exception_types() -> tuple:
    types = []
    try:
        from typer._click.exceptions import ClickException as TyperClickException

        types.append(TyperClickException)
    except ImportError:  # older Typer: plain click
        pass
    try:
        from click.exceptions import ClickException

        types.append(ClickException)
    except ImportError:
        pass
    return tuple(types)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"ddetr {__version__}")
        raise typer.Exit()


app = typer.Typer(
    cls=DdetrGroup,
    name="ddetr",
    help="Deformable DETR: train, evaluate, predict and benchmark detectors.",
    epilog=(
        "Start with [bold]ddetr demo[/bold] (synthetic data, trains on a CPU in minutes). "
        "Global flags -v/--verbose and -q/--quiet may be given anywhere."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
    context_settings={"help_option_names": ["-h", "--help"]},
)


@app.callback()
def root(
    version: Optional[bool] = typer.Option(
        None, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="More output; tracebacks on errors."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Only results, warnings and errors."),
) -> None:
    set_verbosity(verbose=verbose, quiet=quiet)


def _epilog(examples: list[str]) -> str:
    return "[bold]Examples[/bold]\n\n" + "\n\n".join(f"  $ {e}" for e in examples)


app.command("train", help=train_cmd.HELP, epilog=_epilog(train_cmd.EXAMPLES))(train_cmd.command)
app.command("eval", help=eval_cmd.HELP, epilog=_epilog(eval_cmd.EXAMPLES))(eval_cmd.command)
app.command("predict", help=predict_cmd.HELP, epilog=_epilog(predict_cmd.EXAMPLES))(predict_cmd.command)
app.command("export", help=export_cmd.HELP, epilog=_epilog(export_cmd.EXAMPLES))(export_cmd.command)

bench_app = typer.Typer(
    help=bench_cmd.HELP,
    epilog=_epilog(bench_cmd.EXAMPLES),
    rich_markup_mode="rich",
    context_settings={"help_option_names": ["-h", "--help"]},
)
bench_app.callback(invoke_without_command=True)(bench_cmd.command)
app.add_typer(bench_app, name="bench")

data_app = typer.Typer(
    help="Datasets: check one as training would read it, or generate the synthetic one.",
    no_args_is_help=True,
    rich_markup_mode="rich",
    context_settings={"help_option_names": ["-h", "--help"]},
)
app.add_typer(data_app, name="data")


def _register(group: typer.Typer, name: str, function, examples: list[str]) -> None:
    group.command(name, epilog=_epilog(examples))(function)


_register(app, "demo", demo_cmd.demo, demo_cmd.EXAMPLES)
_register(app, "build-ops", build_ops_cmd.build_ops, build_ops_cmd.EXAMPLES)
_register(data_app, "synth", synth_cmd.synth, synth_cmd.EXAMPLES)
_register(data_app, "check", data_check_cmd.data_check, data_check_cmd.EXAMPLES)
_register(bench_app, "op", bench_op_cmd.bench_op, bench_op_cmd.EXAMPLES)
_register(bench_app, "loader", bench_loader_cmd.bench_loader, bench_loader_cmd.EXAMPLES)


def main() -> None:
    """Console-script entry point (`ddetr`)."""
    # OpenMP worker threads (torch's CPU ops) spin while they wait for work. When anything else
    # wants a core (the loader's threads, another job) CPU training ran 2.5-6x slower in our
    # measurements; passive waiting avoids that. Set before torch loads libgomp; a user's own
    # setting wins.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    app()


if __name__ == "__main__":
    main()
