"""`safeio.read_fd`: the whole file in one read when it fits READ_ONCE, in chunks otherwise, and the
limit checked on what was read (a file that grew since its size was taken is refused)."""

from __future__ import annotations

import os

import pytest

from tokedge import safeio
from tokedge.errors import ArtifactError


def _read(path, limit):
    fd = os.open(path, os.O_RDONLY)
    try:
        return safeio.read_fd(fd, limit, "test file")
    finally:
        os.close(fd)


@pytest.mark.parametrize("read_once", [safeio.READ_ONCE, 1000, 1])
@pytest.mark.parametrize("size", [0, 1, 4999, 5000])
def test_reads_every_byte(tmp_path, monkeypatch, read_once, size):
    data = os.urandom(size)
    (tmp_path / "f").write_bytes(data)
    monkeypatch.setattr(safeio, "READ_ONCE", read_once)
    assert _read(tmp_path / "f", 5000) == data


def test_over_the_limit_is_refused_before_reading(tmp_path):
    (tmp_path / "f").write_bytes(b"x" * 101)
    with pytest.raises(ArtifactError, match="101 bytes, over the limit of 100"):
        _read(tmp_path / "f", 100)


def test_a_file_that_grew_after_its_size_was_taken(tmp_path, monkeypatch):
    (tmp_path / "f").write_bytes(b"x" * 150)  # fstat is made to report 50 bytes: the file "grew" to 150
    real = os.fstat

    class Shrunk:
        def __init__(self, st):
            self.st_size, self.st_mode = 50, st.st_mode

    monkeypatch.setattr(safeio.os, "fstat", lambda fd: Shrunk(real(fd)))
    with pytest.raises(ArtifactError, match="grew past the limit of 100"):
        _read(tmp_path / "f", 100)
    assert _read(tmp_path / "f", 200) == b"x" * 150  # within the limit: every byte, not the stale size
