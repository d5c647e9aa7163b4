"""`avatarforge data inspect`: per-split numbers from the index, missing shards, and the contact sheet."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import av
import numpy as np
import pytest

from avatarforge.cluster.cli import main as cli_main
from avatarforge.data.contact_sheet import GUTTER
from avatarforge.data.ingest import IngestOptions, ingest
from avatarforge.data.inspect import InspectError, format_inspection, inspect_dataset
from tests.videos import tone, write_video

SIZE, CLIP_S = 32, 0.8
COLOURS = {"red": (200, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 200), "grey": (128, 128, 128)}


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("inspect")
    for split, names in (("train", ("red", "green", "blue")), ("heldout", ("grey",))):
        folder = base / "src" / split
        folder.mkdir(parents=True)
        for name in names:
            colour = np.array(COLOURS[name], np.uint8)
            write_video(folder / f"{name}.mp4", codec="libx264", width=48, height=40, fps=25, frames=40,
                        paint=lambda i, t, c=colour: np.broadcast_to(c, (40, 48, 3)).copy(),
                        audio=tone(1.6, 48000))
        options = IngestOptions(clip_seconds=CLIP_S, size=SIZE, shard_size=2, workers=1)
        ingest([folder], base / "ds", split=split, options=options, progress=False)
    return base / "ds"


def _png(path: Path) -> np.ndarray:
    with av.open(str(path)) as c:
        return next(c.decode(video=0)).to_ndarray(format="rgb24")


def test_summary_from_the_index(root: Path) -> None:
    result = inspect_dataset(root)
    assert result.sheet is None
    summary = {s.split: s for s in result.splits}
    assert list(summary) == ["heldout", "train"]
    train, heldout = summary["train"], summary["heldout"]
    assert (train.clips, train.shards, sorted(train.identities)) == (6, 3, ["blue", "green", "red"])
    assert (heldout.clips, heldout.identities) == (2, ["grey"])
    assert train.duration_seconds == pytest.approx(6 * CLIP_S)
    assert (train.fps, train.size, train.sample_rate, train.generator) == (25.0, SIZE, 16000, "ingest")
    assert train.size_bytes > 0 and not train.missing_shards
    text = format_inspection(result)
    assert "| train | 6 | 3 | 4.8 s |" in text and "train identities: blue, green, red" in text


def test_contact_sheet_rows_show_different_clips(root: Path, tmp_path: Path) -> None:
    result = inspect_dataset(root, sheet=tmp_path / "sheet.png", clips=3, frames=4)
    image = _png(Path(result.sheet))
    rows = len(result.sheet_rows)
    assert rows == 3 + 2  # 3 train clips spread over its shards, then both heldout clips
    assert [r.split("/")[0] for r in result.sheet_rows] == ["heldout"] * 2 + ["train"] * 3
    assert image.shape == (rows * SIZE + (rows + 1) * GUTTER, 4 * SIZE + 5 * GUTTER, 3)
    colours = []
    for r in range(rows):
        y = GUTTER + r * (SIZE + GUTTER)
        tiles = [image[y : y + SIZE, GUTTER + c * (SIZE + GUTTER) :][:, :SIZE] for c in range(4)]
        mean = np.mean([t.reshape(-1, 3).mean(axis=0) for t in tiles], axis=0)
        colours.append(min(COLOURS, key=lambda n: np.abs(np.array(COLOURS[n]) - mean).sum()))
    assert colours[:2] == ["grey", "grey"] and sorted(colours[2:]) == ["blue", "green", "red"]


def test_missing_shard_is_reported_and_skipped(root: Path, tmp_path: Path) -> None:
    copy = shutil.copytree(root, tmp_path / "ds")
    (copy / "train" / "clips-000001.tar").unlink()
    result = inspect_dataset(copy / "train", sheet=tmp_path / "s.png", clips=3, frames=2)  # a split folder
    (train,) = result.splits
    assert train.missing_shards == ["clips-000001.tar"]  # green's shard (identities sort blue, green, red)
    assert len(result.sheet_rows) == 3 and not any("green" in key for key in result.sheet_rows)
    assert "train: MISSING 1 shard(s): clips-000001.tar" in format_inspection(result)


def test_errors_are_one_line(root: Path, tmp_path: Path) -> None:
    with pytest.raises(InspectError, match="no such folder"):
        inspect_dataset(tmp_path / "nope")
    with pytest.raises(InspectError, match="no split folder"):
        inspect_dataset(tmp_path)
    bad = tmp_path / "bad" / "train"
    bad.mkdir(parents=True)
    (bad / "index.json").write_text(json.dumps({"schema_version": 99}))
    with pytest.raises(InspectError, match="schema_version 99"):
        inspect_dataset(tmp_path / "bad")


def test_cli(root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    copy = shutil.copytree(root, tmp_path / "ds")
    assert cli_main(["data", "inspect", str(copy), "--clips", "2", "--frames", "3"]) == 0
    out = capsys.readouterr().out
    assert "| heldout | 2 | 1 |" in out and f"contact sheet: {copy / 'contact_sheet.png'}" in out
    assert _png(copy / "contact_sheet.png").shape[1] == 3 * SIZE + 4 * GUTTER
    assert cli_main(["data", "inspect", str(copy), "--no-sheet"]) == 0
    assert "contact sheet" not in capsys.readouterr().out
    assert cli_main(["data", "inspect", str(tmp_path / "nope")]) == 2
    assert capsys.readouterr().err.strip() == f"avatarforge: error: {tmp_path / 'nope'}: no such folder"
