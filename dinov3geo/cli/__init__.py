"""The ``dinov3geo`` command line: a thin layer over the Python API.

Each subcommand parses its arguments, calls one API function and prints a short summary. Subcommands are
registered by modules in this package (``register(subparsers)``), one per area; numeric options use the
validating types of :mod:`dinov3geo.cli._types`.

How :func:`main` reports problems (the same for every subcommand):

* an error is **one line** on stderr, ``dinov3geo <command>: error: <message>`` (terminal colour codes and
  line breaks removed; torch's advice to load checkpoints unsafely replaced), exit status 1; the traceback
  only with ``-v``. Bad options and options that do not fit together: the same line, exit status 2;
* a command that returns a non-zero status without having printed an error line gets one, made from the
  warnings it logged (also those hidden by ``-q``);
* Ctrl-C prints ``interrupted; re-run the same command to resume`` and exits with 130, also when the
  interrupt is caught and turned into another exception by a library (dask, Lightning's ``sys.exit(1)``);
  a second Ctrl-C while shutting down exits at once;
* a closed stdout (``dinov3geo info X --json | head -1``) ends the command quietly (exit status 141, as a
  SIGPIPE would): stdout is pointed at ``/dev/null`` so that nothing fails at exit;
* an option named in a message's ``(CLI: --option)`` hint that the command does not have is left out.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import logging
import os
import re
import signal
import sys
import threading
from collections.abc import Iterator, Sequence
from typing import Any, NoReturn

from dinov3geo import __version__
from dinov3geo.utils.progress import configure_logging, recent_problems, strip_ansi

log = logging.getLogger("dinov3geo")

#: the line printed on Ctrl-C
INTERRUPTED = "interrupted; re-run the same command to resume"
#: exit status after a closed stdout (128 + SIGPIPE)
EXIT_BROKEN_PIPE = 141


class CLIParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are one line (``dinov3geo <command>: error: ...``), exit status 2."""

    def error(self, message: str) -> NoReturn:
        msg = _one_line(message)
        self.exit(2, f"{self.prog}: error: {msg} (see `{self.prog} --help`)\n")


def _mark_commands(parser: argparse.ArgumentParser) -> None:
    """Give every (sub)parser a ``_command`` default: its name without ``dinov3geo``, for messages."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                sub.set_defaults(_command=sub.prog.removeprefix(parser.prog.split()[0]).strip(), _parser=sub)
                _mark_commands(sub)


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every subcommand."""
    from dinov3geo.cli import canopy as canopy_cmd
    from dinov3geo.cli import change as change_cmd
    from dinov3geo.cli import features as features_cmd
    from dinov3geo.cli import info as info_cmd
    from dinov3geo.cli import ingest as ingest_cmd
    from dinov3geo.cli import landcover as landcover_cmd
    from dinov3geo.cli import pretrain as pretrain_cmd
    from dinov3geo.cli import run as run_cmd

    p = CLIParser(
        prog="dinov3geo",
        description="Remote sensing with self-supervised DINOv3 backbones: ingest scenes into a tile store, "
        "pretrain, and map canopy height, land cover, land-use transitions and forest change.",
    )
    p.add_argument("--version", action="version", version=f"dinov3geo {__version__}")
    p.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv for debug); "
                   "tracebacks of errors")
    p.add_argument("-q", "--quiet", action="store_true", help="only errors; no progress bars")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for mod in (ingest_cmd, info_cmd, pretrain_cmd, features_cmd, canopy_cmd, landcover_cmd, run_cmd, change_cmd):
        mod.register(sub)
    _mark_commands(p)
    return p


# ---------------------------------------------------------------------------------------------- messages
_CLI_HINT = re.compile(r"\s*\(CLI: (--[a-z0-9][a-z0-9-]*)\)")


def _one_line(text: str) -> str:
    """``text`` as one line: terminal codes removed, line breaks and runs of spaces collapsed."""
    return " ".join(strip_ansi(text).split())


def _options_of(parser: argparse.ArgumentParser | None) -> set[str]:
    if parser is None:
        return set()
    return {s for a in parser._actions for s in a.option_strings}


def _describe(exc: BaseException, parser: argparse.ArgumentParser | None) -> str:
    """The one-line message of an error raised by a command."""
    text = str(exc)
    if isinstance(exc, OSError) and exc.filename is not None and (not text or text.startswith("[Errno")):
        what = exc.strerror or errno.errorcode.get(exc.errno or 0, type(exc).__name__)
        hint = {
            errno.EEXIST: "something else is in the way of the output; choose another path",
            errno.ENOTDIR: "a file is in the way of a folder of that path; choose another path",
            errno.EACCES: "check the permissions or choose another path",
            errno.EPERM: "check the permissions or choose another path",
            errno.ENOSPC: "free some space or write elsewhere",
            errno.EROFS: "write to another filesystem",
            errno.ENOENT: "check the path",
        }.get(exc.errno or 0, "")
        text = f"{exc.filename}: {what}" + (f" ({exc.filename2})" if exc.filename2 else "") + (f"; {hint}" if hint else "")
    elif isinstance(exc, MemoryError):
        opts = [o for o in ("--window", "--tile", "--batch-size", "--workers") if o in _options_of(parser)]
        text = (f"out of memory ({text or 'MemoryError'})"
                + (f"; use a smaller {' / '.join(opts)}" if opts else "; use a smaller input or a larger machine"))
    elif not text or isinstance(exc, KeyError | IndexError | AttributeError | TypeError | ZeroDivisionError
                                | AssertionError | NotImplementedError | RecursionError | UnboundLocalError):
        if isinstance(exc, KeyError) and len(exc.args) == 1 and isinstance(exc.args[0], str) and " " in exc.args[0]:
            text = exc.args[0]  # a KeyError carrying a sentence: keep the sentence
        else:
            text = (f"{type(exc).__name__}: {text or 'no details'} (an unexpected failure; re-run with -v for the "
                    "traceback and report it)")
    if "weights_only" in text or "Weights only load failed" in text:
        with contextlib.suppress(Exception):
            from dinov3geo.models.checkpoint import clean_load_message

            text = clean_load_message(text)
    if parser is not None:  # drop "(CLI: --x)" hints naming options this command does not have
        opts = _options_of(parser)
        text = _CLI_HINT.sub(lambda m: m.group(0) if m.group(1) in opts else "", text)
    return _one_line(text)


def _unexplained(rc: int) -> str:
    """The message for a command that failed without printing an error: what it logged, else the status."""
    problems = recent_problems()
    if not problems:
        return f"failed with exit status {rc} without a message; re-run with -v for details"
    _, last, _ = problems[-1]
    hidden = sum(not shown for _, _, shown in problems[:-1])
    more = len(problems) - 1
    tail = ""
    if more:
        tail = (f" ({more} more warning(s){', hidden by -q: re-run without -q to see them' if hidden else ' above'})")
    return f"{last}{tail}"


# ---------------------------------------------------------------------------------------------- streams
class _StderrWatch:
    """A transparent stand-in for ``sys.stderr`` that notes whether an error line was written."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self.error_written = False

    def write(self, s: str) -> int:
        if "error:" in s or s.startswith("ERROR "):
            self.error_written = True
        return self._inner.write(s)

    def writelines(self, lines: Any) -> None:
        for line in lines:
            self.write(line)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


def _stdout_to_devnull() -> None:
    """After a broken pipe: point stdout at /dev/null so the interpreter's final flush cannot fail."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):  # not a real file (captured): nothing to protect
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, fd)
    finally:
        os.close(devnull)


class _Interrupts:
    """Our SIGINT handler while a command runs: note the interrupt, raise KeyboardInterrupt; on a second
    Ctrl-C (during clean-up, or with the first one swallowed by a library) exit at once."""

    def __init__(self) -> None:
        self.fired = False
        self.reported = False
        self._previous: Any = None

    def _handler(self, signum: int, frame: Any) -> None:
        if self.fired:
            if not self.reported:
                with contextlib.suppress(Exception):
                    sys.stderr.write(f"\n{INTERRUPTED}\n")
                    sys.stderr.flush()
            os._exit(130)
        self.fired = True
        raise KeyboardInterrupt

    @contextlib.contextmanager
    def installed(self) -> Iterator[_Interrupts]:
        ok = threading.current_thread() is threading.main_thread()
        if ok:
            self._previous = signal.getsignal(signal.SIGINT)
            ok = self._previous is signal.default_int_handler  # not ignored, not the embedding app's own
        if ok:
            signal.signal(signal.SIGINT, self._handler)
        try:
            yield self
        finally:
            if ok:
                signal.signal(signal.SIGINT, self._previous)


def _caused_by_interrupt(exc: BaseException) -> bool:
    """Whether a KeyboardInterrupt is behind ``exc`` (a library turned it into another exception)."""
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        if isinstance(e, KeyboardInterrupt):
            return True
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return False


def _report_interrupt(intr: _Interrupts) -> int:
    intr.reported = True
    with contextlib.suppress(Exception):
        sys.stdout.flush()
    print(INTERRUPTED, file=sys.stderr, flush=True)
    return 130


# ---------------------------------------------------------------------------------------------- main
def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``dinov3geo`` console script (see the module docstring for the error handling)."""
    configure_logging()  # warnings of the imports below are log lines too; levels set once parsed
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        print("dinov3geo: error: choose a COMMAND (see above)", file=sys.stderr)
        return 2
    command = getattr(args, "_command", None) or args.command
    sub = getattr(args, "_parser", None)
    from dinov3geo.cli._types import UsageError

    watch = _StderrWatch(sys.stderr)
    saved_stderr, sys.stderr = sys.stderr, watch
    configure_logging(args.verbose, args.quiet)  # its handler writes through the watch
    intr = _Interrupts()
    try:
        with intr.installed():
            try:
                check = getattr(args, "_check", None)  # options that must agree with each other
                if check is not None:
                    check(args)
                rc = int(args.func(args) or 0)
                sys.stdout.flush()
            except BrokenPipeError:
                _stdout_to_devnull()
                return EXIT_BROKEN_PIPE
            except KeyboardInterrupt:
                return _report_interrupt(intr)
            except SystemExit as e:  # Lightning turns Ctrl-C into sys.exit(1)
                if intr.fired or _caused_by_interrupt(e):
                    return _report_interrupt(intr)
                raise
            except Exception as e:  # noqa: BLE001 - the CLI reports every error in one clear line
                if intr.fired or _caused_by_interrupt(e):
                    return _report_interrupt(intr)
                if args.verbose:
                    import traceback

                    traceback.print_exc()
                usage = isinstance(e, UsageError)
                print(f"dinov3geo {command}: error: {_describe(e, sub)}", file=sys.stderr, flush=True)
                return 2 if usage else 1
            if intr.fired:  # a library swallowed the KeyboardInterrupt and returned
                return _report_interrupt(intr)
            if rc != 0 and not watch.error_written:
                print(f"dinov3geo {command}: error: {_one_line(_unexplained(rc))}", file=sys.stderr, flush=True)
            return rc
    finally:
        if sys.stderr is watch:
            sys.stderr = saved_stderr


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
