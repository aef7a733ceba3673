"""Files of a run: the output directory, atomic writes, the temporaries a killed run leaves behind, file digests.

Every file a run writes goes through ``atomic_write``: a temporary file in the same folder, then ``os.replace``, so a
reader (or a run killed mid-write) never sees half a file; the result gets the usual permissions (0666 minus umask).
"""

import hashlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from deim_lib.errors import UserError

TEMPORARY_SUFFIX = ".tmp"


class OutputError(UserError):
    """The output directory or a file in it cannot be written; the message names it and what is intact."""


def file_sha256(path: str | Path) -> str:
    """sha256 hex of a file's content, read in 1 MiB blocks (weights files can be large)."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str | Path, write: Callable[[BinaryIO], None]) -> None:
    """Call ``write(file)`` on a temporary file beside ``path``, then move it to ``path`` in one step.

    A failure (a full disk, an exception in ``write``) removes the temporary and leaves any previous ``path``
    untouched; it is raised as an ``OutputError`` naming ``path`` when the file system refused the write.
    """
    path = Path(path)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TEMPORARY_SUFFIX)
    try:
        with os.fdopen(handle, "wb") as file:
            write(file)
        os.chmod(temporary, 0o666 & ~_umask())  # mkstemp creates 0600
        os.replace(temporary, path)
    except BaseException as error:
        Path(temporary).unlink(missing_ok=True)
        # torch.save reports a failed write as RuntimeError("[enforce fail at inline_container.cc…] … write failed").
        if isinstance(error, OSError) or (isinstance(error, RuntimeError) and "PytorchStreamWriter" in str(error)):
            kept = f"the previous {path.name} is intact" if path.exists() else f"no {path.name} was written"
            reason = error.strerror if isinstance(error, OSError) and error.strerror else str(error).splitlines()[0]
            raise OutputError(
                f"{path}: cannot write ({reason}); {kept}; free disk space or pick another --output-dir"
            ) from error
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write(path, lambda file: file.write(text.encode()))


def remove_stale_temporaries(directory: Path) -> list[Path]:
    """Delete the temporaries of writes that never finished (a killed run); call before anything writes here."""
    stale = [path for path in directory.glob(f".*{TEMPORARY_SUFFIX}") if path.is_file()]
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


def prepare_output_dir(path: str | Path) -> Path:
    """Create the output directory; an impossible or read-only one is a one-line error before any work starts."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        reason = error.strerror or type(error).__name__
        raise OutputError(f"{path}: cannot create the output directory ({reason}); pass another --output-dir") from None
    if not os.access(path, os.W_OK):
        raise OutputError(f"{path}: the output directory is not writable; pass another --output-dir")
    return path
