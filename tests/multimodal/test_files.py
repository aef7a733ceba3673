"""Atomic writes: a failed write leaves the previous file intact and no temporary; results are world-readable."""

import errno
import os

import pytest

from multimodal.files import OutputError, atomic_write, atomic_write_text, prepare_output_dir, remove_stale_temporaries


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


def test_stale_temporaries_are_removed_and_other_files_kept(tmp_path):
    (tmp_path / ".phase1_last.pth.x1.tmp").write_text("")
    (tmp_path / "phase1_last.pth").write_text("")
    assert [path.name for path in remove_stale_temporaries(tmp_path)] == [".phase1_last.pth.x1.tmp"]
    assert [path.name for path in tmp_path.iterdir()] == ["phase1_last.pth"]


def test_an_output_dir_under_a_file_is_a_one_line_error(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(OutputError, match="cannot create the output directory"):
        prepare_output_dir(tmp_path / "file" / "out")
