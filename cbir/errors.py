"""Exceptions with messages a user can act on.

Every error the command line reports is a :class:`CbirError`; the CLI prints its message on
one line and exits with status 2, never a traceback.
"""


class CbirError(Exception):
    """Base class: a problem the user can fix (bad input, wrong model, unreachable Redis)."""


class ImageError(CbirError):
    """One image could not be read; the message names the file and the reason."""


class DataSourceError(CbirError):
    """A folder, .npz file or image path cannot be used as a source of images."""


class DataSourceWarning(UserWarning):
    """Something in a source is left out, and the user should know what."""


class StoreError(CbirError):
    """The Redis store is unreachable or the database is in a state we refuse to touch."""


class ModelMismatchError(StoreError):
    """The database was built by another feature extractor; mixing vectors is refused."""


class DatabaseBusyError(StoreError):
    """Another live process is writing to the same database."""


class LockWaitWarning(UserWarning):
    """A command waits for another process to finish writing the database."""


class ConnectionResumedWarning(UserWarning):
    """A write went on after its connection to Redis was lost and made again."""


class ModelError(CbirError):
    """A backbone, weights file or checkpoint cannot be loaded."""


def in_one_line(exc: BaseException, empty: str = "no reason given") -> str:
    """``Type: first line of its message`` (``empty`` where it has none): an exception's own words
    inside a one-line error."""
    lines = str(exc).splitlines()
    return f"{type(exc).__name__}: {lines[0] if lines else empty}"
