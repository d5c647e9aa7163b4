"""Streaming loaders: an infinite, exactly resumable train stream per rank, and fixed eval batches.

Train stream layout. Each (rank, DataLoader worker) pair is a "slot" (global index
rank * workers + worker) reading its own infinite shard sequence (see shards.py). Each worker batches
its own samples, so every DataLoader item is a whole batch, and batch b of a rank comes from worker
b % workers (DataLoader's in-order round robin). Batch k of a worker always covers raw sample
positions [k * B, (k + 1) * B) of its slot, bad samples included, so resuming after `start_batch`
batches is a sample-position seek that never decodes video.

Bad samples are skipped and counted: a batch keeps its fixed shape by repeating its good samples
(or, when all B are bad, borrowing the next good sample of the stream), and batch["skipped"] says how
many of its B positions were bad. Past max_bad_fraction of samples seen by a worker, the worker raises
a RuntimeError naming the shards (DataLoader re-raises it in the training process).

Resume is exact for the same (dataset, seed, batch_size, world_size, num_workers, identities); changing
any of them changes the stream. `identities` selects chosen identities' samples at the stream level
(selection.py): the selected samples form the stream, so seeking past consumed batches stays arithmetic.

A batch: video [B, 3, T, H, W] float in [-1, 1] (train batches with data.video_uint8: uint8 0..255,
converted by the trainer on its device, see pixels.py; eval batches are always float), audio [B, S], text /
text_mask [B, L], key, identity, skipped, and per-sample ground truth for the oracle (identity_params: the
json's dict, phonemes: the crop's phoneme timeline; None where a clip has none); for datasets whose index
lists identity references (the synthetic world), also reference [B, 3, Tr, H, W] (Tr =
data.reference_frames, data.reference_stride frames apart, another scene of the same identity) and
reference_audio [B, Sr] over the same span. References live once per identity and shard (see
synth/generate.py) and are attached while streaming, so resume arithmetic never sees them.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from functools import partial
from typing import Any

import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .config import CAPTION_KEYS, DataConfig
from .decode import BadSample, ClipSpec, collate, decode_clip
from .health import SampleHealth
from .index import read_index, shard_paths
from .seeding import derive_seed
from .selection import select_identities, whole_split
from .shards import ShardVisit, slot_visits
from .stream import MISSING, visit_samples
from .tokenizer import TOKENIZERS

log = logging.getLogger(__name__)

Batch = dict[str, Any]


@dataclass(frozen=True)
class _StreamSpec:
    """Everything a worker needs; plain values so it pickles into worker processes cheaply."""

    urls: tuple[str, ...]
    counts: tuple[int, ...]
    keys: tuple[frozenset[str] | None, ...]  # per shard: the selected sample keys, None for all
    clip: ClipSpec
    batch_size: int
    rank: int
    world_size: int
    num_workers: int
    seed: int
    start_batch: int
    shuffle_buffer: int
    max_bad_fraction: float
    video_uint8: bool = False


def _decode_stage(
    samples: Iterator[dict[str, Any]], *, clip: ClipSpec, seed: int | None, health: SampleHealth
) -> Iterator[dict[str, Any] | None]:
    """Raw samples -> decoded samples, or None for a bad one (recorded in `health`, which may raise).

    seed=None decodes the first frames (eval); otherwise the crop offset is seeded by (seed, epoch, key).
    """
    for raw in samples:
        url, key = str(raw.get("__url__", "?")), raw.get("__key__")
        if MISSING in raw:
            health.failed(url, key, raw[MISSING])
            yield None
            continue
        crop_seed = None if seed is None else derive_seed("crop", seed, raw.get("__epoch__", 0), key)
        try:
            sample = decode_clip(raw, clip, crop_seed=crop_seed)
        except BadSample as exn:
            if health.bad_by_shard[url] == 0:
                log.warning("skipping bad sample %s in %s: %s", key, url, exn)
            health.failed(url, key, str(exn))
            yield None
            continue
        health.ok()
        yield sample


def _batch_stage(
    items: Iterator[dict[str, Any] | None], *, batch_size: int, size: int, uint8: bool
) -> Iterator[Batch]:
    """Each batch consumes exactly batch_size stream positions (see module docstring)."""
    ahead: deque[dict[str, Any] | None] = deque()  # decoded but not yet consumed (lookahead)

    def pull() -> dict[str, Any] | None:
        return ahead.popleft() if ahead else next(items)

    while True:
        group = [pull() for _ in range(batch_size)]
        good = [s for s in group if s is not None]
        skipped = batch_size - len(good)
        while not good:  # borrow: the sample still gets its own turn at its own position later
            nxt = next(items)
            ahead.append(nxt)
            if nxt is not None:
                good = [nxt]
        yield collate([good[i % len(good)] for i in range(batch_size)], skipped, size, uint8=uint8)


class _SlotDataset(IterableDataset):
    def __init__(self, spec: _StreamSpec) -> None:
        super().__init__()
        self.spec = spec

    def __iter__(self) -> Iterator[Batch]:
        spec = self.spec
        info = get_worker_info()
        workers = max(1, spec.num_workers)
        # A fresh DataLoader asks worker 0 first, but batch `start_batch` belonged to worker
        # start_batch % workers in the uninterrupted run: rotate the roles to match.
        logical = ((info.id if info is not None else 0) + spec.start_batch) % workers
        own_batches_done = (spec.start_batch - logical + workers - 1) // workers
        health = SampleHealth(spec.max_bad_fraction)
        pipeline = wds.DataPipeline(
            partial(
                slot_visits,
                spec.counts,
                seed=spec.seed,
                slot=spec.rank * workers + logical,
                n_slots=spec.world_size * workers,
                skip=own_batches_done * spec.batch_size,
            ),
            partial(visit_samples, urls=spec.urls, seed=spec.seed, shuffle_buffer=spec.shuffle_buffer,
                    keys=spec.keys, references=spec.clip.reference_frames > 0),
            partial(_decode_stage, clip=spec.clip, seed=spec.seed, health=health),
            partial(_batch_stage, batch_size=spec.batch_size, size=spec.clip.size, uint8=spec.video_uint8),
        )
        return iter(pipeline)


def _as_is(batch: Batch) -> Batch:
    """Workers emit finished batches: DataLoader's default per-item conversion would only walk (slowly)
    through the ground-truth lists and dicts."""
    return batch


class TrainLoader:
    """Infinite batches for one rank.

    `position` is the number of batches this rank has consumed; checkpoint it and pass it back as
    `start_batch` to continue exactly. Iterating again continues from `position` too.
    `stats` (this process's view): batches, samples (stream positions consumed) and skipped (bad ones).
    """

    def __init__(self, spec: _StreamSpec) -> None:
        self._spec = spec
        self._position = spec.start_batch
        self.stats = {"batches": 0, "samples": 0, "skipped": 0}

    @property
    def position(self) -> int:
        return self._position

    @property
    def batch_size(self) -> int:
        return self._spec.batch_size

    def __iter__(self) -> Iterator[Batch]:
        spec = replace(self._spec, start_batch=self._position)
        loader = DataLoader(
            _SlotDataset(spec),
            batch_size=None,  # workers emit whole batches
            collate_fn=_as_is,
            num_workers=spec.num_workers,
            pin_memory=torch.cuda.is_available(),
            # Own generator: DataLoader draws its worker base seed from the global RNG otherwise, which
            # would shift the training RNG stream and break exact resume.
            generator=torch.Generator().manual_seed(spec.seed),
        )
        for batch in loader:
            self._position += 1
            self.stats["batches"] += 1
            self.stats["samples"] += spec.batch_size
            self.stats["skipped"] += int(batch["skipped"])
            yield batch


def _clip_spec(cfg: DataConfig, index: dict[str, Any] | None = None) -> ClipSpec:
    """Decoding geometry; references only when configured and the split's index lists them."""
    if cfg.frames < 1 or cfg.size < 1 or cfg.fps <= 0 or cfg.sample_rate <= 0 or cfg.text_max_len < 1:
        raise ValueError("data.frames, size, fps, sample_rate and text_max_len must be positive")
    if cfg.captions not in CAPTION_KEYS:
        raise ValueError(f"data.captions must be one of {sorted(CAPTION_KEYS)}, got {cfg.captions!r}")
    if cfg.tokenizer not in TOKENIZERS:
        raise ValueError(f"data.tokenizer must be one of {TOKENIZERS}, got {cfg.tokenizer!r}")
    if cfg.reference_frames < 0 or cfg.reference_stride < 1:
        raise ValueError("data.reference_frames must be >= 0 and data.reference_stride >= 1")
    reference_frames = int(cfg.reference_frames)
    if reference_frames and index is not None and not index.get("references"):
        log.warning("data.reference_frames=%d but %s lists no identity references: batches carry none",
                    reference_frames, index.get("split", "this split"))
        reference_frames = 0
    return ClipSpec(
        frames=int(cfg.frames),
        size=int(cfg.size),
        fps=float(cfg.fps),
        sample_rate=int(cfg.sample_rate),
        text_max_len=int(cfg.text_max_len),
        caption_keys=CAPTION_KEYS[cfg.captions],
        tokenizer=cfg.tokenizer,
        word_ids=int(cfg.word_ids),
        reference_frames=reference_frames,
        reference_stride=int(cfg.reference_stride),
    )


def build_train_loader(
    cfg: DataConfig,
    *,
    batch_size: int,
    rank: int,
    world_size: int,
    seed: int,
    start_batch: int = 0,
    identities: Sequence[str] | None = None,
) -> TrainLoader:
    """The train split's infinite stream for `rank`, continuing after `start_batch` consumed batches.

    identities: only these identities' samples (None: all); an identity without samples is a ValueError.
    """
    if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size or start_batch < 0:
        raise ValueError(
            f"bad loader geometry: batch_size={batch_size} rank={rank}/{world_size} start={start_batch}"
        )
    index = read_index(cfg.root, cfg.train_split)
    paths = shard_paths(cfg.root, cfg.train_split, index)
    # empty shards would hold no stream positions; dropping them keeps seeking arithmetic simple
    chosen = (
        whole_split(paths, index["counts"]) if identities is None else select_identities(index, paths, identities)
    )
    if not chosen.counts:
        raise ValueError(f"{cfg.root}/{cfg.train_split}: the index lists no samples")
    return TrainLoader(
        _StreamSpec(
            urls=chosen.urls,
            counts=chosen.counts,
            keys=chosen.keys,
            clip=_clip_spec(cfg, index),
            batch_size=batch_size,
            rank=rank,
            world_size=world_size,
            num_workers=max(0, int(cfg.num_workers)),
            seed=seed,
            start_batch=start_batch,
            shuffle_buffer=int(cfg.shuffle_buffer),
            max_bad_fraction=float(cfg.max_bad_fraction),
            video_uint8=bool(cfg.video_uint8),
        )
    )


def build_eval_batches(cfg: DataConfig, *, split: str, batch_size: int, max_clips: int) -> list[Batch]:
    """The first `max_clips` good clips of `split` in index order, cropped at frame 0; no workers.

    The last batch may be smaller than batch_size; batch["skipped"] counts bad samples met while filling it.
    """
    if batch_size < 1 or max_clips < 1:
        raise ValueError("batch_size and max_clips must be >= 1")
    index = read_index(cfg.root, split)
    urls = shard_paths(cfg.root, split, index)
    visits = (ShardVisit(epoch=0, shard=i, count=n, offset=0) for i, n in enumerate(index["counts"]))
    clip = _clip_spec(cfg, index)
    raw = visit_samples(visits, urls, seed=0, shuffle_buffer=0, references=clip.reference_frames > 0)
    health = SampleHealth(float(cfg.max_bad_fraction))
    batches: list[Batch] = []
    pending: list[dict[str, Any]] = []
    skipped = taken = 0
    for sample in _decode_stage(raw, clip=clip, seed=None, health=health):
        if sample is None:
            skipped += 1
            continue
        pending.append(sample)
        taken += 1
        if len(pending) == batch_size or taken == max_clips:
            batches.append(collate(pending, skipped, clip.size))
            pending, skipped = [], 0
        if taken == max_clips:
            break
    if pending:
        batches.append(collate(pending, skipped, clip.size))
    return batches
