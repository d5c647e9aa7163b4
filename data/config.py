"""Structured (OmegaConf) config for the data layer: the dataset on disk and the streaming loader."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class SynthConfig:
    """The v0 synthetic avatar world: how many identities/clips, and how they are sharded."""

    identities: int = 12  # training identities
    heldout_identities: int = 3  # identities only in the held-out split
    clips_per_identity: int = 4
    clip_seconds: float = 1.6
    shard_size: int = 16  # samples per tar shard
    seed: int = 0
    workers: int = 2  # processes for generation


@dataclass
class DataConfig:
    """Where the shards live and how the loader crops, decodes and batches them."""

    root: str = "runs/data/tiny"  # {root}/{split}/clips-%06d.tar + {root}/{split}/index.json
    train_split: str = "train"
    eval_split: str = "heldout"
    frames: int = 9  # frames per training crop (1 + 4k so a 4x-causal autoencoder maps it cleanly)
    size: int = 64  # square frame size in pixels
    fps: float = 25.0
    sample_rate: int = 16000
    text_max_len: int = 96
    num_workers: int = 1  # DataLoader worker processes per rank
    shuffle_buffer: int = 16  # per-shard-visit shuffle buffer (samples); 0 or 1 keeps tar order
    max_bad_fraction: float = 0.05  # past this share of skipped samples the loader raises, naming the shards
    synth: SynthConfig = field(default_factory=SynthConfig)
