"""Files of a run: atomic writes, the temporaries a killed run leaves behind, file digests.

Every file a run writes goes through ``atomic_write``: a temporary file in the same folder, then ``os.replace``, so a
reader (or a run killed mid-write) never sees half a file; the result gets the usual permissions (0666 minus umask).
A temporary's name holds the writer's process id (``.NAME.writing-PID-XXXX.tmp``), so a later run removes only the
temporaries of writers that are gone, never another live run's, nor any other file.
"""

import errno
import hashlib
import os
import re
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from deim_lib.errors import OutputError

_TEMPORARY = re.compile(r"^\..+\.writing-(?P<pid>\d+)-[^.]+\.tmp$")
_FILESYSTEM_REFUSALS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG, errno.EIO}


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


def _filesystem_refusal(error: BaseException) -> OSError | None:
    """The ``OSError`` behind ``error``, itself or in its chain: torch.save re-raises a failed write as a
    RuntimeError whose message varies between versions, with the file's OSError as its context."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in _FILESYSTEM_REFUSALS:
            return error
        error = error.__cause__ or error.__context__
    return None


def atomic_write(path: str | Path, write: Callable[[BinaryIO], None]) -> None:
    """Call ``write(file)`` on a temporary file beside ``path``, then move it to ``path`` in one step.

    A failure (a full disk, an exception in ``write``) removes the temporary and leaves any previous ``path``
    untouched; it is raised as an ``OutputError`` naming ``path`` when the file system refused the write (a full
    disk, a quota, no permission), whichever exception carried that refusal.
    """
    path = Path(path)
    prefix = f".{path.name}.writing-{os.getpid()}-"
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=prefix, suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as file:
            write(file)
        os.chmod(temporary, 0o666 & ~_umask())  # mkstemp creates 0600
        os.replace(temporary, path)
    except BaseException as error:
        Path(temporary).unlink(missing_ok=True)
        refusal = _filesystem_refusal(error)
        if refusal is None:
            raise
        kept = f"the previous {path.name} is intact" if path.exists() else f"no {path.name} was written"
        reason = refusal.strerror or errno.errorcode.get(refusal.errno, "OSError")
        raise OutputError(
            f"{path}: cannot write ({reason}); {kept}; free disk space or pick another --output-dir"
        ) from error


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write(path, lambda file: file.write(text.encode()))


def process_alive(pid: int) -> bool:
    """Whether a process of this id runs on this machine."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's live process
    return True


def remove_stale_temporaries(directory: Path) -> list[Path]:
    """Delete the temporaries ``atomic_write`` left when its process died mid-write, and return them.

    Only names of that pattern whose writing process is gone: a live run's temporary and a user's own ``.x.tmp`` stay.
    """
    stale = []
    for path in sorted(directory.iterdir()):
        match = _TEMPORARY.match(path.name)
        if match and path.is_file() and not process_alive(int(match["pid"])):
            path.unlink(missing_ok=True)
            stale.append(path)
    return stale
