"""Structured (OmegaConf) config for the data layer: the dataset on disk and the streaming loader."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class SynthConfig:
    """The synthetic avatar world: how many identities/clips, and how they are sharded."""

    identities: int = 12  # training identities
    heldout_identities: int = 3  # identities only in the held-out split
    clips_per_identity: int = 4
    clip_seconds: float = 1.6
    reference_seconds: float = 4.0  # each identity's reference record (another scene); 0: none
    caption_room: str = "last"  # where captions name the room: "last" (after the person) | "first"
    shard_size: int = 16  # samples per tar shard
    seed: int = 0
    workers: int = 2  # processes for generation


# data.captions -> the json field(s) of a record read as its text: with two, each training crop reads one of
# them at random (evaluation reads the first)
CAPTION_KEYS = {"full": ("caption",), "scene": ("scene_caption",), "mixed": ("caption", "scene_caption")}


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
    # what a sample's text is: "full" (its caption: the person and the scene) or "scene" (its scene_caption,
    # e.g. 'a person in a blue room', empty where a record has none): with a reference video saying who,
    # the text only says where; "mixed": each training crop one of the two at random, so the model follows
    # both (whole captions for the usual request, the scene alone for a request for another scene). The t2v
    # stage, which has no reference, always reads the full caption.
    captions: str = "full"
    # "bytes" or "words" (data/tokenizer.py: hashed word ids, so a word is one token wherever it stands);
    # model.text.vocab_size must be 257 for bytes, word_ids for words (checked before Ray starts)
    tokenizer: str = "bytes"
    word_ids: int = 4096
    num_workers: int = 1  # DataLoader worker processes per rank
    shuffle_buffer: int = 16  # per-shard-visit shuffle buffer (samples); 0 or 1 keeps tar order
    max_bad_fraction: float = 0.05  # past this share of skipped samples the loader raises, naming the shards
    # train batches' video / reference as uint8 [B, 3, T, size, size] (0..255), converted to float [-1, 1]
    # by the trainer after moving the batch to its device (pixels.float_video; the same values): a quarter
    # of the bytes through the DataLoader and the conversion on the accelerator. For GPU training; on a
    # CPU it moves the conversion from DataLoader workers into the training step. Batches whose frames
    # need a resize (dataset size != size) stay float; eval batches are always float.
    video_uint8: bool = False
    # identity references (datasets whose index lists them): batch["reference"] [B, 3, reference_frames,
    # size, size] taken every reference_stride frames from the identity's reference record (random
    # start in training, frame 0 in eval), and batch["reference_audio"] covering the same span.
    reference_frames: int = 9  # 0: no references in batches
    reference_stride: int = 4
    synth: SynthConfig = field(default_factory=SynthConfig)
