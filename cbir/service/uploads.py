"""What a request uploads: its files, read in memory (nothing is written to disk under a name the
client chose), zips opened by the standard library's decoder with their unpacked size bounded."""
from __future__ import annotations

import io
import zipfile
from dataclasses import dataclass

from fastapi import Request

from cbir.errors import CbirError

ZIP_MAGIC = b"PK\x03\x04"
MAX_ZIP_MEMBERS = 10_000


class ClientError(CbirError):
    """A request the service cannot answer, with its HTTP status."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Upload:
    name: str  # the file's name as the client gave it (a zip member: its path in the zip)
    data: bytes
    folder: str = ""  # the folder holding a zip member: its class, as `add` reads a folder of class folders


def check_size(request: Request, limit: int) -> None:
    length = int(request.headers.get("content-length") or 0)
    if length > limit:
        raise ClientError(413, f"the request is {length / 2**20:.1f} MB, over the limit of {limit / 2**20:g} MB")


async def uploads(form, unpacked_limit: int | None = None) -> list[Upload]:
    """Each file of the multipart field ``image``; at least one. With ``unpacked_limit`` (bytes), a
    zip (sniffed by content, never by name) gives its files instead, unpacked up to that size."""
    found = []
    for part in form.getlist("image"):
        if not hasattr(part, "read"):
            continue
        name, data = part.filename or "upload", await part.read()
        is_zip = unpacked_limit is not None and data.startswith(ZIP_MAGIC)
        found += unzipped(name, data, unpacked_limit) if is_zip else [Upload(name, data)]
    if not found:
        raise ClientError(400, "no image: send one or more files in the multipart field 'image'")
    return found


def unzipped(name: str, data: bytes, limit: int) -> list[Upload]:
    """The files of the zip ``data`` (folders, hidden files and macOS resource forks left out)."""
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            members = [member for member in archive.infolist() if not member.is_dir() and not _hidden(member.filename)]
            if len(members) > MAX_ZIP_MEMBERS:
                raise ClientError(413, f"{name}: holds {len(members):,} files, over the limit of {MAX_ZIP_MEMBERS:,}")
            # The sizes a zip declares bound what its reader inflates (and a member that inflates to
            # more or less than declared fails its check), so a zip bomb is refused before it is read.
            unpacked = sum(member.file_size for member in members)
            if unpacked > limit:
                raise ClientError(413, f"{name}: unpacks to {unpacked / 2**20:.1f} MB, over the limit of "
                                       f"{limit / 2**20:g} MB")
            return [Upload(member.filename, archive.read(member), _parent_folder(member.filename))
                    for member in members]
    except (zipfile.BadZipFile, zipfile.LargeZipFile, NotImplementedError, RuntimeError, EOFError, ValueError) as exc:
        raise ClientError(400, f"{name}: not a readable zip ({exc})") from None


def _hidden(path: str) -> bool:
    return any(part.startswith(".") or part == "__MACOSX" for part in path.split("/"))


def _parent_folder(path: str) -> str:
    parts = path.split("/")
    return parts[-2] if len(parts) > 1 else ""
