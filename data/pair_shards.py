"""Preference data on disk: one WebDataset sample per prompt group, one tar shard per collect work item.

A group is one prompt (a reference, speech, caption) and the G videos a policy sampled for it:

    {prompt_id}.json        prompt id, identity, speech key, split, video ids, per-video oracle scores,
                            utilities, and the rater's pair labels (a, b, choice, rater id, oracle choice)
    {prompt_id}.latents.npy [G, C, T, H, W] float32: the sampled latents (what reward models and DPO train on)
    {prompt_id}.reference.npy, audio.npy, text.npy, text_mask.npy: the prompt's conditioning
    {prompt_id}.v{k}.mp4    each video with its audio, for people to look at and label

Arrays are .npy read with allow_pickle=False: nothing from a shard is ever unpickled. Shards are written to a
temporary name and renamed, so a shard that exists is complete (that is the collect stage's resume rule).
"""

from __future__ import annotations

import io
import json
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import webdataset as wds

from avatarforge.atomic import atomic_write

ARRAYS = ("latents", "reference", "audio", "text", "text_mask")


@dataclass
class PromptGroupRecord:
    prompt_id: str
    meta: dict[str, Any]  # json-able: identity, speech_key, split, videos, scores, utilities, labels...
    arrays: dict[str, np.ndarray]  # ARRAYS
    videos: dict[str, bytes] = field(default_factory=dict)  # video id -> mp4 bytes


def _npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def _key(prompt_id: str) -> str:
    # webdataset splits keys at the first dot of a member name; prompt ids may hold dots and slashes
    return prompt_id.replace(".", "_").replace("/", "_")


def write_group_shard(path: str | Path, groups: list[PromptGroupRecord]) -> Path:
    """All groups of one work item as one tar, atomically."""
    missing = [(g.prompt_id, a) for g in groups for a in ARRAYS if a not in g.arrays]
    if missing:
        raise ValueError(f"prompt groups miss arrays: {missing[:3]}")

    def write(tmp: str) -> None:
        with wds.TarWriter(tmp) as sink:
            for g in groups:
                sample = {"__key__": _key(g.prompt_id),
                          "json": json.dumps({"prompt_id": g.prompt_id, **g.meta}).encode()}
                sample.update({f"{name}.npy": _npy(g.arrays[name]) for name in ARRAYS})
                sample.update({f"{vid}.mp4": data for vid, data in g.videos.items()})
                sink.write(sample)

    return atomic_write(Path(path), write)


def read_groups(paths: list[str | Path], *, with_videos: bool = False) -> list[PromptGroupRecord]:
    """Groups from shards, in shard order. Raises ValueError naming the shard when one is unreadable."""
    out: list[PromptGroupRecord] = []
    for path in paths:
        try:
            for sample in wds.WebDataset(str(path), shardshuffle=False, empty_check=False):
                meta = json.loads(sample["json"])
                arrays = {name: np.load(io.BytesIO(sample[f"{name}.npy"]), allow_pickle=False) for name in ARRAYS}
                videos = {k[:-4]: v for k, v in sample.items() if k.endswith(".mp4")} if with_videos else {}
                out.append(PromptGroupRecord(meta.pop("prompt_id"), meta, arrays, videos))
        except (KeyError, ValueError, OSError, tarfile.TarError) as exc:
            raise ValueError(f"preference shard {path} is unreadable: {exc}") from None
    return out


def shard_list(directory: str | Path) -> list[Path]:
    return sorted(Path(directory).glob("*.tar"))
