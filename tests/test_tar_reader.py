"""The shard tar reader: the same members as Python's tarfile for the formats shards are written in, and
errors (not garbage) for anything else."""

from __future__ import annotations

import io
import tarfile

import pytest

from avatarforge.data.tar_reader import TarError, iter_members

LONG = "deep/" * 30 + "a-very-long-sample-key.json"  # > 100 characters: needs a prefix, pax or GNU name


def _archive(fmt: int, members: list[tuple[str, bytes]], *, extra: bool = True) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        if extra:
            folder = tarfile.TarInfo("folder")
            folder.type = tarfile.DIRTYPE  # not a regular file: skipped
            tar.addfile(folder)
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), 1.5  # a float mtime makes tarfile write pax records
            tar.addfile(info, io.BytesIO(data))
        if extra:
            link = tarfile.TarInfo("link")
            link.type, link.linkname = tarfile.SYMTYPE, "x" * 150
            tar.addfile(link)
    return buf.getvalue()


MEMBERS = [("k1.json", b'{"a": 1}'), ("k1.mp4", bytes(range(256)) * 7), ("k2.wav", b""), (LONG, b"x" * 513),
           ("\u00e9t\u00e9-1.txt", b"utf-8 name")]


@pytest.mark.parametrize("fmt", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT])
def test_members_match_tarfile(fmt: int) -> None:
    data = _archive(fmt, MEMBERS)
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        expected = [(m.name, tar.extractfile(m).read()) for m in tar if m.isreg()]
    assert expected == MEMBERS
    assert list(iter_members(io.BytesIO(data))) == expected


def test_ustar_prefix_names() -> None:
    name = "p/" * 40 + "clip.mp4"  # 88 chars of directories + a short name: fits ustar's prefix field
    data = _archive(tarfile.USTAR_FORMAT, [(name, b"abc")], extra=False)
    assert list(iter_members(io.BytesIO(data))) == [(name, b"abc")]


class _Pipe(io.RawIOBase):
    """A non-seekable stream, like a `pipe:` shard URL."""

    def __init__(self, data: bytes) -> None:
        self._data = io.BytesIO(data)

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:  # noqa: ANN001
        chunk = self._data.read(min(len(b), 100))  # short reads
        b[: len(chunk)] = chunk
        return len(chunk)


@pytest.mark.parametrize("stream", [io.BytesIO, lambda d: io.BufferedReader(_Pipe(d))])
def test_rejected_members_are_skipped(stream) -> None:  # noqa: ANN001
    data = _archive(tarfile.PAX_FORMAT, MEMBERS)
    got = list(iter_members(stream(data), want=lambda n: n.endswith(".json")))
    assert got == [(n, d) for n, d in MEMBERS if n.endswith(".json")] and len(got) == 2


def test_truncated_and_foreign_files_raise() -> None:
    data = _archive(tarfile.PAX_FORMAT, MEMBERS)
    cut = data[: data.index(bytes(range(256))) + 100]  # inside the mp4 member's data
    members = []
    with pytest.raises(TarError, match="unexpected end of data"):
        for member in iter_members(io.BytesIO(cut)):
            members.append(member)
    assert members == MEMBERS[:1]
    with pytest.raises(TarError, match="checksum"):
        list(iter_members(io.BytesIO(b"this is not a tar file" * 100)))
    with pytest.raises(TarError, match="truncated tar header"):
        list(iter_members(io.BytesIO(data[:700])))
    assert list(iter_members(io.BytesIO(b""))) == []
