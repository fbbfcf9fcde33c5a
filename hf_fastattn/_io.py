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
def replaced_directory(path: str | os.PathLike) -> Iterator[Path]:
    """A new, empty folder beside ``path`` to fill in the block; if the block succeeds, it takes ``path``'s place whole.

    A reader sees the previous folder or the new one, never a mix of their files (for an instant, neither). If the
    block fails, the previous folder stays as it was and the new one is removed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")  # mkdir, not mkdtemp: the umask's permissions
    staging.mkdir()
    try:
        yield staging
        if path.exists():
            previous = staging.with_suffix(".previous")
            os.replace(path, previous)
            os.replace(staging, path)
            shutil.rmtree(previous)
        else:
            os.replace(staging, path)
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
