"""What every command shares: one-line errors (also from a DataLoader worker) and help that shows every default."""

import argparse

import pytest

from deim_lib.cli import HelpFormatter
from deim_lib.data.dataset import DatasetError
from deim_lib.errors import one_line


@pytest.mark.parametrize("name", ["DatasetError", "deim_lib.data.dataset.DatasetError"])
def test_a_worker_reraised_error_is_its_original_message(name):
    # What torch.utils.data does with an exception raised in a worker process: the traceback, then "<class>: <msg>".
    message = (
        "Caught DatasetError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n"
        '  File "worker.py", line 1, in _worker_loop\n'
        f"{name}: data/3.png: cannot read the image (truncated); fix or remove the file"
    )
    assert one_line(DatasetError(message)) == "data/3.png: cannot read the image (truncated); fix or remove the file"
    assert one_line(DatasetError("a.json: no images")) == "a.json: no images"


def test_help_shows_defaults_of_zero_but_not_of_unset_flags():
    parser = argparse.ArgumentParser(formatter_class=HelpFormatter)
    parser.add_argument("--seed", type=int, default=0, help="seed of the split")
    parser.add_argument("--ann", help="annotations")
    parser.add_argument("--draw", action="store_true", help="draw boxes")
    text = parser.format_help()
    assert "seed of the split (default: 0)" in text
    assert "annotations\n" in text and "draw boxes\n" in text
