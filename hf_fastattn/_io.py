"""File output shared by artifacts, result records, plots and the eval suite: atomic writes of files and folders, and
a check that a folder is writable before a long run."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path


def atomic_write(path: str | os.PathLike, write: Callable[[str], None], *, what: str = "results") -> None:
    """Call ``write(temporary_path)`` on a temp file beside ``path``, then rename it into place.

    Parent folders are created. A reader never sees a half-written file, a failure leaves no temp file, and an
    unwritable location raises ``OSError("cannot write <what> to <path>: <reason>")``.
    """
    path = Path(path)
    temporary = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(handle)
        write(temporary)
        os.replace(temporary, path)
        temporary = None
    except OSError as error:
        raise OSError(f"cannot write {what} to {path}: {error.strerror or error}") from error
    finally:
        if temporary is not None:
            with contextlib.suppress(OSError):
                os.unlink(temporary)


@contextlib.contextmanager
def atomic_directory(final: str | os.PathLike, *, replace: bool = False) -> Iterator[Path]:
    """A new, empty folder beside ``final`` to fill in the block; it is published as ``final`` only if the block
    succeeds, so a reader sees a previous folder or the new one whole, never a mix of their files. If the block
    fails, the new folder is removed and ``final`` stays as it was.

    When ``final`` already exists at the end: ``replace=False`` keeps it (another process finished the same build
    first, as with converted assets); ``replace=True`` swaps the new folder in (for an instant, neither is there).
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = final.with_name(f".{final.name}.{uuid.uuid4().hex}.tmp")  # mkdir, not mkdtemp: the umask's permissions
    staging.mkdir()
    try:
        yield staging
        if not final.exists():
            os.replace(staging, final)
        elif replace:
            previous = staging.with_suffix(".previous")
            os.replace(final, previous)
            os.replace(staging, final)
            shutil.rmtree(previous)
        else:
            shutil.rmtree(staging)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def check_writable(directory: str | os.PathLike) -> Path:
    """Create ``directory`` and prove a file can be written there, before any long run; returns it as a Path.

    Raises ``OSError("cannot write results to <directory>: <reason>")``.
    """
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / ".write_test"
        probe.write_text("")
        probe.unlink()
    except OSError as error:
        raise OSError(f"cannot write results to {directory}: {error.strerror or error}") from error
    return directory
