"""The ``cbir`` command line: thin wrappers over the package, one sub-command per capability.

The root scripts (``add_images.py``, ``retrieve_images.py``, ...) call :func:`main` with their
sub-command, so ``python add_images.py ...`` and ``cbir add ...`` are the same command.
"""
from __future__ import annotations

import argparse
import atexit
import os
import signal
import sys
import warnings

from cbir import __version__, interrupts
from cbir.cli import add, evaluate, info, pictures, remove, retrieve, serve, thumbnails, token, train, train_index
from cbir.cli.flags import EXIT_STATUSES, OUTPUT_CLOSED, Parser
from cbir.errors import CbirError


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="cbir", description="Content-based medical image retrieval. Flags are hyphenated "
                                             "(--db-name); the underscore spellings (--db_name) work too.")
    parser.add_argument("--version", action="version", version=f"cbir {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    add.register(commands)
    retrieve.register(commands)
    remove.register(commands)
    train_index.register(commands)
    train.register(commands)
    pictures.register(commands)
    info.register(commands)
    evaluate.register(commands)
    serve.register(commands)
    thumbnails.register(commands)
    token.register(commands)
    for command_parser in (parser, *commands.choices.values()):
        command_parser.epilog = EXIT_STATUSES
    return parser


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    return f"warning: {message}\n"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    warnings.formatwarning = _one_line_warning
    try:
        with interrupts.as_exceptions():
            return args.run(args)
    except CbirError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # the reader of the output left (`cbir info | head`): stop as quietly as it did
        # Python flushes stdout once more at exit; pointing it at /dev/null keeps that from failing too.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return OUTPUT_CLOSED
    except OSError as exc:  # a file the checks before the work could not foresee (a full disk, /proc)
        print(f"error: {exc.filename}: {exc.strerror}" if exc.filename and exc.strerror else f"error: {exc}",
              file=sys.stderr)
        return 2
    except (KeyboardInterrupt, interrupts.Terminated) as exc:
        reason = "interrupted" if isinstance(exc, KeyboardInterrupt) else "terminated"
        print(f"{reason}: {getattr(args, 'after_stop', 'no database was changed')}", file=sys.stderr)
        return 130 if isinstance(exc, KeyboardInterrupt) else 128 + signal.SIGTERM


def command(name: str | None = None) -> None:
    """Entry of a root script (``python add_images.py ARGS`` == ``cbir add ARGS``) and of ``cbir``."""
    exit_now(main(([name] if name else []) + sys.argv[1:]))


def exit_now(code: int) -> None:
    """End a one-shot command without Python's teardown of every module, which for torch's costs a
    good part of a short command's time (docs/PERFORMANCE.md). The exit handlers still run (the
    embedded Redis stops there) and the output is flushed first."""
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except BrokenPipeError:  # the reader of the output left (`cbir info | head -1`) before the last of it
            code = code or OUTPUT_CLOSED
        except (OSError, ValueError):  # a stream closed
            pass
    os._exit(code)


if __name__ == "__main__":
    sys.exit(main())
