"""Atomic writes: a failed write leaves the previous file intact and no temporary; results are world-readable."""

import errno
import os
import subprocess
import sys

import pytest
import torch

from deim_lib.cli import make_output_dir
from deim_lib.errors import OutputError
from multimodal.files import atomic_write, atomic_write_text, remove_stale_temporaries


def test_a_failed_write_keeps_the_previous_file_and_names_it(tmp_path):
    path = tmp_path / "phase1_last.pth"
    atomic_write_text(path, "good")

    def full_disk(file):
        file.write(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OutputError, match=r"phase1_last\.pth: cannot write \(No space left on device\); the previous"):
        atomic_write(path, full_disk)
    assert path.read_text() == "good" and not list(tmp_path.glob(".*.tmp"))

    def bug(file):
        raise KeyError("not a disk problem")

    with pytest.raises(KeyError):  # anything else keeps its type and traceback
        atomic_write(path, bug)


def test_written_files_get_the_umask_permissions(tmp_path):
    old = os.umask(0o027)
    try:
        atomic_write_text(tmp_path / "report.md", "x")
    finally:
        os.umask(old)
    assert (tmp_path / "report.md").stat().st_mode & 0o777 == 0o640


class FullDisk:
    """A file object whose disk fills up after ``room`` bytes, as a real one does: the write raises ENOSPC."""

    def __init__(self, file, room: int):
        self.file, self.room = file, room

    def write(self, data) -> int:
        self.room -= len(data)
        if self.room < 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return self.file.write(data)

    def flush(self) -> None:
        self.file.flush()


def test_a_full_disk_under_torch_save_is_an_output_error_whatever_torch_wraps_it_in(tmp_path):
    path = tmp_path / "phase1_last.pth"
    with pytest.raises(OutputError, match=r"phase1_last\.pth: cannot write \(No space left on device\); no phase1"):
        atomic_write(path, lambda file: torch.save({"w": torch.zeros(100_000)}, FullDisk(file, 4096)))
    assert list(tmp_path.iterdir()) == []


def _mount_small_tmpfs(folder) -> bool:
    if sys.platform != "linux" or os.geteuid() != 0:
        return False
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(folder)], capture_output=True)
    return result.returncode == 0


def test_a_full_real_filesystem_is_an_output_error_and_keeps_the_previous_file(tmp_path):
    folder = tmp_path / "small"
    folder.mkdir()
    if not _mount_small_tmpfs(folder):
        pytest.skip("mounting a 1 MiB tmpfs needs root on Linux; the injected full disk above covers the same path")
    try:
        atomic_write(folder / "phase1_last.pth", lambda file: torch.save({"w": torch.zeros(1000)}, file))
        with pytest.raises(OutputError, match=r"No space left on device.*the previous phase1_last\.pth is intact"):
            atomic_write(folder / "phase1_last.pth", lambda file: torch.save({"w": torch.zeros(1_000_000)}, file))
        assert torch.load(folder / "phase1_last.pth")["w"].numel() == 1000
        assert [path.name for path in folder.iterdir()] == ["phase1_last.pth"]
    finally:
        subprocess.run(["umount", str(folder)], check=True)


def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_only_the_writers_own_temporaries_of_dead_processes_are_removed(tmp_path):
    killed = f".phase1_last.pth.writing-{_dead_pid()}-ab12cd.tmp"
    live = f".phase1_best.pth.writing-{os.getpid()}-ef34gh.tmp"  # this process is alive: another run's write
    for name in (killed, live, ".notes.tmp", ".phase1_last.pth.abc123.tmp", "phase1_last.pth"):
        (tmp_path / name).write_text("")
    assert [path.name for path in remove_stale_temporaries(tmp_path)] == [killed]
    assert sorted(path.name for path in tmp_path.iterdir()) == sorted(
        [live, ".notes.tmp", ".phase1_last.pth.abc123.tmp", "phase1_last.pth"]
    )


def test_a_temporary_is_named_for_its_writer(tmp_path):
    names = []
    atomic_write(tmp_path / "report.md", lambda file: names.extend(path.name for path in tmp_path.iterdir()))
    assert names[0].startswith(f".report.md.writing-{os.getpid()}-") and names[0].endswith(".tmp")


def test_an_output_folder_under_a_file_is_a_one_line_error_naming_the_file(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(OutputError, match=r"--output-dir .*/file/out: .*/file is a file, not a folder"):
        make_output_dir(tmp_path / "file" / "out", "--output-dir")
    with pytest.raises(OutputError, match=r"--output .*/file: .*/file is a file, not a folder"):
        make_output_dir(tmp_path / "file", "--output")
