"""Entry point of the `knnflow` command."""

from __future__ import annotations

import os
import sys
import warnings

import typer

from knnflow.errors import KnnflowError, OptionError, OptionWarning

from . import (
    bench_commands,
    collapse_command,
    data_commands,
    fid_commands,
    memorization_command,
    reproduce_command,
    run_analysis_commands,
    train_commands,
)
from .console import flag, flags_named

app = typer.Typer(
    help="knnflow: the closed-form optimal velocity of a training set, fast and with a stated "
         "error, for flow-matching research. Errors print as one line; set KNNFLOW_DEBUG=1 "
         "for the full traceback.",
    no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)


def command(name: str, function, spelling: dict[str, str] | None = None) -> None:
    """Register a command whose library OptionErrors name its flags (spelling: the option
    names whose flag is not --NAME)."""
    app.command(name)(flags_named(spelling or {})(function))


command("datasets", data_commands.datasets)
command("build-index", data_commands.build_index)
command("index-info", data_commands.index_info)
command("train", train_commands.train_command, train_commands.TARGET_FLAG_NAMES)
command("sample", train_commands.sample_command)
command("memorization", memorization_command.memorization)
command("collapse", collapse_command.collapse, {"grid": "--t-grid"})
command("velocity-error", run_analysis_commands.velocity_error)
command("hybrid", run_analysis_commands.hybrid)
command("fid", fid_commands.fid, {"limit": "--ref-limit"})
command("train-classifier", fid_commands.train_classifier)
command("reproduce", reproduce_command.reproduce)
app.add_typer(bench_commands.app, name="bench")


# Ctrl-C: every folder knnflow writes (index, samples, reports) appears whole or not at all,
# and train says which checkpoint it kept (cli/train_commands.py).
INTERRUPTED = ("interrupted: nothing partial was left (knnflow writes each output folder "
               "whole or not at all); run the command again to redo it")

def run() -> None:
    """Run the app; user errors become one line on stderr and exit status 2: knnflow's own,
    the command line's (an unknown option, a missing argument, a value of the wrong type), and
    files that cannot be read or written. KNNFLOW_DEBUG=1 (any value but 0 or empty) lets
    knnflow's errors and OSErrors through with their tracebacks, to report a bug."""
    debug = os.environ.get("KNNFLOW_DEBUG", "") not in ("", "0")
    # Library warnings (a clamped option, a doubtful classifier) as one line each.
    warnings.showwarning = lambda message, *args, **kwargs: print(
        f"warning: {message.render(flag) if isinstance(message, OptionWarning) else message}",
        file=sys.stderr)
    try:
        code = app(standalone_mode=False, prog_name="knnflow")
    except KnnflowError as err:
        if debug:
            raise
        text = err.render(flag) if isinstance(err, OptionError) else str(err)
        print(f"error: {text}", file=sys.stderr)
        sys.exit(2)
    except OSError as err:
        if debug:
            raise
        where = f": {err.filename}" if err.filename else ""
        print(f"error: {err.strerror or err}{where}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print(INTERRUPTED, file=sys.stderr)
        sys.exit(130)
    except Exception as err:
        # The command line's own errors (click's, vendored by newer typer versions: matched
        # by name and shape rather than by an import path that moves between versions).
        kind = type(err).__name__
        if kind == "Abort":
            print(INTERRUPTED, file=sys.stderr)
            sys.exit(130)
        if not (hasattr(err, "format_message") and hasattr(err, "exit_code")):
            raise
        if kind == "NoArgsIsHelpError":  # a command group alone: its help
            print(err.format_message())
            sys.exit(2)
        ctx = getattr(err, "ctx", None)
        hint = f" (see {ctx.command_path} --help)" if ctx is not None else ""
        print(f"error: {' '.join(err.format_message().split())}{hint}", file=sys.stderr)
        sys.exit(err.exit_code)
    sys.exit(code if isinstance(code, int) else 0)

if __name__ == "__main__":
    run()
