"""Writing files so that a crash, a kill or a full disk never leaves a damaged one: each file is
written to a temporary file in the same folder, flushed to disk, then renamed over the old one
(a rename within a folder is atomic), so a reader sees the old file or the new one, never a part.
A write that fails removes its temporary file and raises WriteError, which names the file and the
operating system's error."""
from __future__ import annotations

import contextlib
import errno
import os
from pathlib import Path
from typing import BinaryIO, Callable

TEMPORARY_SUFFIX = ".tmp"


class WriteError(Exception):
    """A file could not be written: disk full, read-only or missing folder, no permission."""

    def __init__(self, path: Path, error: OSError):
        self.path, self.error = Path(path), error
        code = f"[Errno {error.errno}] " if error.errno else ""
        name = f" ({errno.errorcode[error.errno]})" if error.errno in errno.errorcode else ""
        super().__init__(f"cannot write {path}: {code}{error.strerror or error}{name}")


def os_error_behind(e: BaseException | None) -> OSError | None:
    """The OSError that caused e, if any: torch.save reports a failed write as a RuntimeError
    ("unexpected pos") raised while handling the file's OSError."""
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, OSError):
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


def write_atomically(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """Replace `path` by what write(binary file) writes, atomically."""
    path = Path(path)
    temporary = path.with_name(f".{path.name}.{os.getpid()}{TEMPORARY_SUFFIX}")
    try:
        with open(temporary, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            temporary.unlink(missing_ok=True)
        cause = os_error_behind(e) if isinstance(e, Exception) else None
        if cause is not None:
            raise WriteError(path, cause) from e
        raise
    with contextlib.suppress(OSError):  # make the rename itself durable (not every file system can)
        folder = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)


def write_text_atomically(path: Path, text: str) -> None:
    write_atomically(path, lambda f: f.write(text.encode()))


def remove_temporary_files(folder: Path) -> list[Path]:
    """Delete what writes killed half-way (kill -9, power loss) left in folder; returns them."""
    removed = []
    for temporary in Path(folder).glob(f"*{TEMPORARY_SUFFIX}"):
        with contextlib.suppress(OSError):
            temporary.unlink()
            removed.append(temporary)
    return removed
