"""Loader throughput (clips/s) vs raw decord decode of the same clips, measured in one run.

Raw = the floor of the work: decord opens each clip's mp4 bytes (already in memory) and decodes the same
number of frames from a random start into uint8 [T, H, W, 3], nothing else. Loader = `build_train_loader`
end to end (tar reading, mp4 + wav + json decode, crop, tensors, collate) with num_workers=0 and no
identity references, so both decode the same frames on one core and the ratio is the pipeline's overhead.
It is measured twice: as configured by default, delivering float video [B, 3, T, S, S] in [-1, 1]; and
with data.video_uint8, delivering the same frames as uint8 [B, 3, T, S, S], the float conversion left to
the trainer, which does it on its device after the host-to-device copy (data/pixels.py; not timed here).
Raw and the two loaders alternate every 2 batches, so a busy shared machine slows all alike; the table
shows medians over rounds. Each side is timed twice: wall clock, and this process's CPU time (all its
threads: decord decodes in a thread of its own). On a machine shared with other jobs the CPU-time ratio is
the steadier one, since time spent descheduled counts in neither. For information it also measures the
loader with DataLoader workers and with references (the training defaults). Usage:

    .venv/bin/python benchmarks/loader_throughput.py [--root DIR] [--clips 192] [--rounds 3] [--workers 2]

Without --root it generates a small synthetic world (12 identities x 4 clips, 64 px) in a temp folder.
"""

from __future__ import annotations

import argparse
import io
import tarfile
import tempfile
import time
from dataclasses import replace

import decord
import numpy as np
import torch

from avatarforge.data.config import DataConfig, SynthConfig
from avatarforge.data.index import read_index, shard_paths
from avatarforge.data.loader import build_train_loader


def train_mp4s(cfg: DataConfig) -> list[bytes]:
    """Every train clip's mp4 bytes, read into memory up front (raw decode then measures decoding only)."""
    out = []
    for url in shard_paths(cfg.root, cfg.train_split, read_index(cfg.root, cfg.train_split)):
        with tarfile.open(url) as tar:
            # exactly "<key>.mp4": identity reference records (".ref.mp4") are not clips
            out += [tar.extractfile(m).read() for m in tar if m.name.split(".", 1)[-1] == "mp4"]
    return out


class RawDecoder:
    """Bare decord over in-memory mp4s, cycling through them: open, decode `frames` from a random start."""

    def __init__(self, mp4s: list[bytes], frames: int, seed: int) -> None:
        self.mp4s, self.frames, self.i = mp4s, frames, 0
        self.rng = np.random.default_rng(seed)

    def clip(self) -> None:
        reader = decord.VideoReader(io.BytesIO(self.mp4s[self.i % len(self.mp4s)]), ctx=decord.cpu(0),
                                    num_threads=1)
        first = int(self.rng.integers(0, max(0, len(reader) - self.frames) + 1))
        reader.get_batch(list(range(first, first + self.frames))).asnumpy()
        self.i += 1


def _clock() -> np.ndarray:
    return np.array([time.perf_counter(), time.process_time()])


def interleaved(cfgs: list[DataConfig], mp4s: list[bytes], *, clips: int, batch: int, seed: int,
                chunk: int = 2) -> list[np.ndarray]:
    """Clips/s as [by wall clock, per CPU second] of raw decoding, then of a loader per config, timed in
    alternating chunks of `chunk` batches so background load on a shared machine lands on all alike.
    A loader's first batch is not timed."""
    loaders = [iter(build_train_loader(cfg, batch_size=batch, rank=0, world_size=1, seed=seed)) for cfg in cfgs]
    for loader in loaders:
        next(loader)
    raw = RawDecoder(mp4s, cfgs[0].frames, seed)
    spent = [np.zeros(2) for _ in range(1 + len(loaders))]
    done = 0
    while done < clips:
        t0 = _clock()
        for _ in range(chunk * batch):
            raw.clip()
        spent[0] += _clock() - t0
        for i, loader in enumerate(loaders, start=1):
            t0 = _clock()
            for _ in range(chunk):
                next(loader)
            spent[i] += _clock() - t0
        done += chunk * batch
    return [done / s for s in spent]


def loader_rate(cfg: DataConfig, clips: int, batch: int, seed: int) -> float:
    """Clips/s of the train loader alone, after its first batch (worker start-up is not throughput)."""
    loader = iter(build_train_loader(cfg, batch_size=batch, rank=0, world_size=1, seed=seed))
    next(loader)
    batches = clips // batch
    start = time.perf_counter()
    for _ in range(batches):
        next(loader)
    return batches * batch / (time.perf_counter() - start)


def generate(root: str, size: int) -> None:
    from avatarforge.data.synth import generate_dataset

    synth = SynthConfig(identities=12, heldout_identities=1, clips_per_identity=4, workers=2)
    generate_dataset(root, synth, size=size, fps=25.0, sample_rate=16000)


def measure(root: str, opts: argparse.Namespace) -> None:
    index = read_index(root, "train")
    size = int(index.get("size") or opts.size)
    defaults = DataConfig(root=root, frames=opts.frames, size=size)  # references as training uses them
    # Worker processes first: DataLoader forks them, and a parent that already holds decord readers
    # (the loader's reference cache) can leave forked workers hanging inside decord.
    parallel = loader_rate(replace(defaults, num_workers=opts.workers), opts.clips, opts.batch, seed=0)
    cfg = replace(defaults, num_workers=0, reference_frames=0)
    cfgs = [cfg, replace(cfg, video_uint8=True)]
    mp4s = train_mp4s(cfg)
    rounds = [interleaved(cfgs, mp4s, clips=opts.clips, batch=opts.batch, seed=r) for r in range(opts.rounds)]
    with_refs = loader_rate(replace(defaults, num_workers=0), opts.clips, opts.batch, seed=0)
    raw, load, load_u8 = (np.median([r[i] for r in rounds], axis=0) for i in range(3))  # [wall, cpu] each
    ratio, ratio_u8 = (np.median([r[i] / r[0] for r in rounds], axis=0) for i in (1, 2))
    print(f"\n{len(mp4s)} train clips of {index.get('frames_per_clip', '?')} frames at {size} px; "
          f"{opts.frames}-frame crops, batch {opts.batch}, {opts.clips} clips per round, "
          f"median of {opts.rounds} rounds")
    print("\n| measure | clips/s (wall) | clips per CPU second |\n|---|---|---|")
    print(f"| raw decord decode (uint8 frames), 1 process | {raw[0]:.1f} | {raw[1]:.1f} |")
    print(f"| loader, num_workers=0, float video (default) | {load[0]:.1f} | {load[1]:.1f} |")
    print(f"| loader, num_workers=0, data.video_uint8 (float on the trainer's device) "
          f"| {load_u8[0]:.1f} | {load_u8[1]:.1f} |")
    print(f"| ratio loader / raw, float video (target >= 0.9) | {ratio[0]:.2f} | {ratio[1]:.2f} |")
    print(f"| ratio loader / raw, video_uint8 (target >= 0.9) | {ratio_u8[0]:.2f} | {ratio_u8[1]:.2f} |")
    print(f"| loader, num_workers=0, with identity references (info) | {with_refs:.1f} | |")
    print(f"| loader, num_workers={opts.workers}, with references (info; workers share the cores) "
          f"| {parallel:.1f} | |")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--root", help="an existing dataset root (default: generate a small synthetic one)")
    parser.add_argument("--size", type=int, default=64, help="frame size of a generated dataset")
    parser.add_argument("--frames", type=int, default=9)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--clips", type=int, default=192, help="clips per measurement")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers of the info row")
    opts = parser.parse_args()
    torch.set_num_threads(1)  # both sides single-threaded: the comparison is per core
    if opts.root:
        measure(opts.root, opts)
        return
    with tempfile.TemporaryDirectory(prefix="loader-bench-") as tmp:
        generate(tmp, opts.size)
        measure(tmp, opts)


if __name__ == "__main__":
    main()
