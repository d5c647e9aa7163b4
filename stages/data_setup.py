"""Make sure a curriculum's dataset exists before any stage reads it (generates the synthetic world)."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf


def dataset_ready(root: str | Path, splits: tuple[str, ...]) -> bool:
    return all((Path(root) / split / "index.json").exists() for split in splits)


def ensure_dataset(cfg: DictConfig) -> None:
    data = cfg.data
    splits = (data.train_split, data.eval_split)
    if dataset_ready(data.root, splits):
        return
    from avatarforge.data.synth import generate_dataset

    print(f"[data] no dataset at {data.root}: generating the synthetic avatar world", flush=True)
    synth = OmegaConf.to_object(data.synth)
    generate_dataset(data.root, synth, size=data.size, fps=data.fps, sample_rate=data.sample_rate)
    if not dataset_ready(data.root, splits):
        raise FileNotFoundError(f"dataset at {data.root} lacks the splits {splits} after generation")
