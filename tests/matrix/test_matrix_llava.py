"""Family x method matrix, tiny-llava: every method through every command (tests/matrix/matrix_support.py)."""

from __future__ import annotations

import pytest

from .matrix_support import report_pairs, run_pair
from tokedge.reduce import METHODS

PRESET = "tiny-llava"
COVERED: list[dict] = []


@pytest.mark.parametrize("method", sorted(METHODS))
def test_pair(method, tmp_path, capsys, monkeypatch):
    COVERED.append(run_pair(PRESET, method, tmp_path, capsys, monkeypatch))


def test_pairs_listed():
    report_pairs(PRESET, COVERED)
