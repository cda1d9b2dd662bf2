"""`python -m harness <command>`: subcommands are discovered from harness/commands/."""
from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import os
import pkgutil
import signal
import sys
import threading

import harness.commands
from harness.specs import UserError


def _command_modules():
    for info in sorted(pkgutil.iter_modules(harness.commands.__path__), key=lambda i: i.name):
        if not info.name.startswith("_"):
            yield info.name.replace("_", "-"), importlib.import_module(f"harness.commands.{info.name}")


def text_table(rows) -> str:
    """Rows of strings (the first is the header) as aligned columns for the terminal."""
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in rows)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m harness",
        description="Plan, simulate, run and measure distributed LLM inference on Apple Silicon clusters.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, module in _command_modules():
        p = sub.add_parser(name, help=module.HELP, description=getattr(module, "DESCRIPTION", module.HELP),
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(p)
        p.set_defaults(_run=module.run, _parser=p)
    return parser


def parse_args(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Unknown options are reported by the subcommand's parser, with its usage, not the top-level one
    (plain parse_args hands a subcommand's leftovers back up to the top-level parser)."""
    args, extras = parser.parse_known_args(argv)
    if extras:
        args._parser.error(f"unrecognized arguments: {' '.join(extras)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(build_parser(), argv)
    from harness.runfolder import Terminated
    with _console_guard():
        try:
            return int(args._run(args) or 0)
        except UserError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        except KeyboardInterrupt as exc:   # Ctrl-C, or SIGTERM (Terminated): the commands saved what finished
            terminated = isinstance(exc, Terminated)
            print("terminated" if terminated else "interrupted", file=sys.stderr)
            return 143 if terminated else 130


def exit_process(code: int):
    """Leave `python -m harness` with `code`. A process that loaded MLX (the mlx backend's tokenizer comes through
    mlx_lm, which imports mlx.core) skips the interpreter's teardown: MLX's C++ threads, destroyed there, aborted
    `bench --backend mlx` in 2 runs of 7 ("terminate called without an active exception", exit 134) after its
    run folder was written, and an exit code that lies cannot be scripted. Nothing is lost by skipping it: the
    command has returned, its run folder is on disk (every file moved into place whole), the atexit handlers
    (the launcher's rank clean-up, logging) still run and the console is flushed."""
    if "mlx.core" not in sys.modules:
        sys.exit(code)
    import atexit
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


class _PipeSafe:
    """A console stream that a closed pipe (`| head -1`) cannot break: once the reader is gone, output is
    dropped and the command carries on writing its run folder, exactly as it would on a terminal."""

    def __init__(self, stream):
        self._stream = stream
        self.reader_gone = False

    def write(self, text: str) -> int:
        if not self.reader_gone:
            try:
                return self._stream.write(text)
            except BrokenPipeError:
                self._drop()
        return len(text)

    def flush(self) -> None:
        if not self.reader_gone:
            try:
                self._stream.flush()
            except BrokenPipeError:
                self._drop()

    def _drop(self) -> None:
        """Point the descriptor at /dev/null, so the interpreter's own flush at exit cannot fail either."""
        self.reader_gone = True
        with contextlib.suppress(OSError, ValueError, io.UnsupportedOperation):
            null = os.open(os.devnull, os.O_WRONLY)
            os.dup2(null, self._stream.fileno())
            os.close(null)

    def __getattr__(self, name):
        return getattr(self._stream, name)


def _raise_terminated(_signum, _frame) -> None:
    from harness.runfolder import Terminated
    raise Terminated()


@contextlib.contextmanager
def _console_guard():
    """Pipe-safe stdout/stderr, and SIGTERM raised like Ctrl-C (in the main thread), for one command."""
    saved = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = _PipeSafe(sys.stdout), _PipeSafe(sys.stderr)
    in_main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _raise_terminated) if in_main else None
    try:
        yield
    finally:
        if in_main:
            signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)
        sys.stdout, sys.stderr = saved
