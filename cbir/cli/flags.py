"""What every command shares: flag types checked as they are parsed, the store and source flags,
exit statuses."""
from __future__ import annotations

import argparse
import math
import os
import signal
import sys
from pathlib import Path

from cbir.images.sources import NPZ_SPLITS
from cbir.options import DEFAULT_EXTRACTOR
from cbir.store.redis.connect import URL_ENV

DEFAULT_DATABASE = "db"  # as in the thesis: `retrieve_images.py --path query.png` needs no --db-name


def hyphenated(argument: str) -> str:
    """A long flag as the parser knows it: ``--db_name`` (the thesis's spelling) -> ``--db-name``."""
    if not argument.startswith("--"):
        return argument
    name, equals, value = argument.partition("=")
    return name.replace("_", "-") + equals + value


class Parser(argparse.ArgumentParser):
    """argparse whose long flags are hyphenated (--db-name: what help and errors show) and answer
    to the thesis's underscore spelling too (--db_name)."""

    def add_argument(self, *names, **kwargs):
        return super().add_argument(*map(hyphenated, names), **kwargs)

    def parse_known_args(self, args=None, namespace=None):
        args = sys.argv[1:] if args is None else list(args)
        end = args.index("--") if "--" in args else len(args)  # after "--", every word is a value
        return super().parse_known_args([hyphenated(a) for a in args[:end]] + args[end:], namespace)


def whole(minimum: int, maximum: int | None = None):
    """argparse type: a whole number of at least ``minimum`` (and at most ``maximum``)."""
    def whole_number(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        if maximum is not None and value > maximum:
            raise argparse.ArgumentTypeError(f"must be at most {maximum}, got {value}")
        return value
    return whole_number


def real(minimum: float, maximum: float = math.inf, *, above: bool = False, below: bool = False):
    """argparse type: a finite number from ``minimum`` to ``maximum``, excluding an end with ``above``/``below``."""
    if maximum == math.inf:
        allowed = f"above {minimum:g}" if above else f"at least {minimum:g}"
    else:
        allowed = f"in {'(' if above else '['}{minimum:g}, {maximum:g}{')' if below else ']'}"

    def number(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        fits = (value > minimum if above else value >= minimum) and (value < maximum if below else value <= maximum)
        if not (math.isfinite(value) and fits):
            raise argparse.ArgumentTypeError(f"must be {allowed}, got {text}")
        return value
    return number


def output_path_type(folder: bool = False):
    """argparse type: a file (or with ``folder``, a folder) this command may write or make, checked
    before the work whose results it would hold. Files are written beside their final name first,
    so it is the folder that must be writable."""
    def output_path(text: str) -> str:
        path = Path(text).absolute()
        try:
            path.stat()
        except (FileNotFoundError, NotADirectoryError):  # to be made; a file on the way is named below
            pass
        except OSError as exc:  # a name too long, a loop of links
            raise argparse.ArgumentTypeError(f"{text}: {exc.strerror}") from None
        if path.exists() and path.is_dir() != folder:
            raise argparse.ArgumentTypeError(f"{text} is a {'file' if folder else 'folder'}, not a "
                                             f"{'folder' if folder else 'file'}")
        existing = next(p for p in ([path] if folder else []) + list(path.parents) if p.exists())
        if not existing.is_dir():
            raise argparse.ArgumentTypeError(f"{existing} is a file, so {text} cannot be made in it")
        if not os.access(existing, os.W_OK | os.X_OK):
            raise argparse.ArgumentTypeError(f"{existing} is not writable")
        return text
    return output_path


OUTPUT_FILE, OUTPUT_FOLDER = output_path_type(), output_path_type(folder=True)


def typed_file(suffixes: tuple[str, ...], what: str):
    """argparse type: an OUTPUT_FILE whose name ends in one of ``suffixes`` (the writer goes by it)."""
    def typed_output_file(text: str) -> str:
        OUTPUT_FILE(text)
        if Path(text).suffix.lower().lstrip(".") not in suffixes:
            raise argparse.ArgumentTypeError(f"{text}: the name of {what} must end in "
                                             f"{', '.join('.' + s for s in suffixes)}")
        return text
    return typed_output_file


PICTURE_FILE = typed_file(("png", "jpg", "jpeg", "pdf", "svg", "tif", "tiff", "webp", "eps"), "a picture")


WORKBOOK_FILE = typed_file(("xlsx",), "an Excel workbook")  # openpyxl writes and reads back only these


COUNT = whole(1)  # sizes, counts, k


NON_NEGATIVE = whole(0)  # seeds, worker numbers


POSITIVE = real(0, above=True)  # rates, temperatures


NON_NEGATIVE_REAL = real(0)  # weights that 0 turns off, waits


SOME_FILES_SKIPPED = 1  # the work is done, and a script can tell that some files were not part of it


OUTPUT_CLOSED = 128 + signal.SIGPIPE  # what a shell reports for a tool its pipe reader left


EXIT_STATUSES = ("exit status: 0 done; 1 done, but some input files were skipped (listed last on stderr); "
                 "2 an error (one line on stderr); 130 / 143 interrupted by Ctrl-C / SIGTERM; 141 the "
                 "output's reader left (| head)")


def counted(count: int, noun: str, plural: str | None = None) -> str:
    """``count`` with its noun: "1 image", "2 images"."""
    return f"{count} {noun if count == 1 else plural or noun + 's'}"


def skipped_summary(failures: list[str]) -> int:
    """List the files a command skipped (file: reason) at the end of its output; its exit status."""
    if not failures:
        return 0
    print(f"{counted(len(failures), 'file')} skipped:", file=sys.stderr)
    for failure in failures:
        print(f"  {failure}", file=sys.stderr)
    return SOME_FILES_SKIPPED


def store_arguments(parser: argparse.ArgumentParser, db_help: str | None = None) -> None:
    """--db-name (``db`` unless ``db_help`` says what leaving it out does) and --redis-url."""
    parser.add_argument("--db-name", default=None if db_help else DEFAULT_DATABASE,
                        help=db_help or f"database name (its keys live under cbir:<db_name>:; default: {DEFAULT_DATABASE})")
    parser.add_argument("--redis-url", default=None,
                        help=f"Redis URL (redis://, rediss://, with password, or unix:///path/redis.sock; a "
                             f"Cluster node works too; a private CA: rediss://...?ssl_ca_certs=ca.pem). "
                             f"Default: ${URL_ENV}, else an embedded Redis under $CBIR_HOME")


def writer_arguments(parser: argparse.ArgumentParser) -> None:
    """--wait and --durable, for a command that takes the database's writer lock."""
    parser.add_argument("--wait", type=NON_NEGATIVE_REAL, default=0.0, metavar="SECONDS",
                        help="wait up to this long for another process writing the database to finish "
                             "(default: 0, refuse at once)")
    parser.add_argument("--durable", action="store_true",
                        help="each write acknowledged only once it is on disk (Redis appendfsync always: the "
                             "embedded server is set so, a server of your own must be), so a machine that dies "
                             "right after the command loses nothing of it")


SOURCES = ("a folder with one sub-folder per class, a MedMNIST-style .npz, or an image (any format Pillow "
           "reads, or DICOM)")


def source_arguments(parser: argparse.ArgumentParser, path_help: str) -> None:
    parser.add_argument("--path", required=True, help=path_help)
    parser.add_argument("--split", default="train", choices=NPZ_SPLITS, help="split of a .npz (default: train)")


RERANK_HELP = ("k-reciprocal re-ranking (Zhong et al. 2017) of each query's 100 nearest candidates "
               "(k1 20, k2 6, lambda 0.3); scores stay cosine similarities")


def extractor_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--extractor", default=None,
                        help=f"backbone (default: the database's model, else {DEFAULT_EXTRACTOR}); the "
                             "ImageNet weights of efficientnet_lite0, _lite1 and _lite2 ship in packages and work "
                             "offline, the others' come from the Hugging Face Hub or its cache")
    parser.add_argument("--weights", default=None,
                        help="a cbir checkpoint (.safetensors, describes itself) or backbone weights for "
                             "--extractor (.pth/.pt/.safetensors, e.g. KimiaNet for densenet121)")
    parser.add_argument("--input-size", type=COUNT, default=None,
                        help="image side in pixels fed to the model (default: the backbone's, 224 mostly)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
