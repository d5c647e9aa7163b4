"""Prompts for the personality stages (distill, preference_collect, rlhf): a chosen identity's reference,
caption and ground truth, driven by another clip's speech (its audio and phoneme timeline), so a fine-tuned
identity can be asked to say anything. Train-split speech feeds preference collection and RL; held-out speech
is kept for evaluation, so the RL policy is never scored on speech it was optimised on.
"""

from __future__ import annotations

from typing import Any

import torch

from avatarforge.data.config import DataConfig
from avatarforge.data.index import read_index
from avatarforge.data.loader import build_eval_batches

IDENTITY_KEYS = ("reference", "text", "text_mask", "identity_params", "identity")
SPEECH_KEYS = ("audio", "phonemes", "video", "key")


def personality_identities(config: dict[str, Any], data: DataConfig) -> list[str]:
    """The identities the curriculum's personality_sft stage fine-tunes (its options, else the first N)."""
    from avatarforge.stages.avatar import SFTOptions
    from avatarforge.stages.common import typed

    sft = [c for c in config["stages"].values() if c["kind"] == "personality_sft"]
    if len(sft) != 1:
        raise ValueError(f"expected one personality_sft stage in the curriculum, found {len(sft)}")
    options = typed(SFTOptions, sft[0]["options"])
    if options.identities:
        return list(options.identities)
    return list(read_index(data.root, data.train_split)["identities"][: options.num_identities])


def identity_rows(data: DataConfig, identities: list[str]) -> dict[str, dict[str, Any]]:
    """Per identity: the reference, caption and ground truth of its first train clip."""
    rows: dict[str, dict[str, Any]] = {}
    for batch in build_eval_batches(data, split=data.train_split, batch_size=8, max_clips=10**6):
        for i, name in enumerate(batch["identity"]):
            if name in identities and name not in rows:
                rows[name] = {k: batch[k][i] for k in IDENTITY_KEYS}
        if len(rows) == len(identities):
            break
    missing = [n for n in identities if n not in rows]
    if missing:
        raise ValueError(f"identities {missing} have no clips in split {data.train_split!r}")
    return rows


def speech_prompts(data: DataConfig, identities: list[str], *, split: str, count: int,
                   batch_size: int) -> list[dict[str, Any]]:
    """`count` prompts in batches: prompt i is speech clip i mod n of `split` (index order) spoken by identity
    (i + i // n) mod len(identities), so every (identity, speech) pair is used once before any repeats.
    Each batch has the loader's keys plus `prompt_id` ("identity|speech key")."""
    rows = identity_rows(data, identities)
    speech: list[dict[str, Any]] = []
    for batch in build_eval_batches(data, split=split, batch_size=batch_size, max_clips=count):
        speech += [{key: batch[key][i] for key in SPEECH_KEYS} for i in range(len(batch["key"]))]
    if not speech:
        raise ValueError(f"split {split!r} has no good clips for prompts")
    if count > len(speech) * len(identities):
        raise ValueError(f"split {split!r} has {len(speech)} good clips: at most {len(speech) * len(identities)} "
                         f"distinct prompts for {len(identities)} identities, {count} asked for")
    prompts: list[dict[str, Any]] = []
    for start in range(0, count, batch_size):
        index = range(start, min(start + batch_size, count))
        clips = [speech[i % len(speech)] for i in index]
        chosen = [rows[identities[(i + i // len(speech)) % len(identities)]] for i in index]
        prompt: dict[str, Any] = {key: [c[key] for c in clips] for key in ("phonemes", "key")}
        for key in ("audio", "video"):
            prompt[key] = torch.stack([c[key] for c in clips])
        for key in ("reference", "text", "text_mask"):
            prompt[key] = torch.stack([r[key] for r in chosen])
        for key in ("identity_params", "identity"):
            prompt[key] = [r[key] for r in chosen]
        prompt["prompt_id"] = [f"{r['identity']}|{c['key']}" for r, c in zip(chosen, clips, strict=True)]
        prompts.append(prompt)
    return prompts


def select(batch: dict[str, Any], index: list[int]) -> dict[str, Any]:
    """Rows `index` of a prompt batch (tensors and lists alike)."""
    out: dict[str, Any] = {}
    for key, value in batch.items():
        if isinstance(value, torch.Tensor):
            out[key] = value[index]
        elif isinstance(value, list):
            out[key] = [value[i] for i in index]
        else:
            out[key] = value
    return out
