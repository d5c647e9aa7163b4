"""`avatarforge data ...` subcommands (registered by cluster/cli.py)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from avatarforge.data.config import DataConfig


def add_parsers(sub: Any, load_data_config) -> None:
    """Register data subcommands on `sub`; `load_data_config(path, overrides)` reads a curriculum's data."""
    synth = sub.add_parser("synth", help="generate the synthetic avatar world as WebDataset shards")
    synth.add_argument("--config", help="take the data section of this curriculum config")
    synth.add_argument("overrides", nargs="*")
    synth.add_argument("--out", help="dataset root (default: the config's data.root)")
    synth.add_argument("--identities", type=int, help="training identities")
    synth.add_argument("--heldout-identities", type=int, help="identities only in the held-out split")
    synth.add_argument("--clips-per-identity", type=int)
    synth.add_argument("--clip-seconds", type=float)
    synth.add_argument("--reference-seconds", type=float,
                       help="length of each identity's reference record (another scene); 0: none")
    synth.add_argument("--shard-size", type=int, help="clips per shard")
    synth.add_argument("--workers", type=int, help="generation processes")
    synth.add_argument("--size", type=int)
    synth.add_argument("--seed", type=int)
    synth.set_defaults(data_handler=lambda args: cmd_synth(args, load_data_config))

    ingest = sub.add_parser("ingest", help="cut real videos into clips with audio, as WebDataset shards")
    ingest.add_argument("sources", nargs="+", metavar="SRC",
                        help="folders, videos (mp4, mov, mkv, webm) or .txt files listing them")
    ingest.add_argument("--out", required=True, help="dataset root: clips go to OUT/SPLIT/")
    ingest.add_argument("--split", default="train")
    ingest.add_argument("--clip-seconds", type=float, default=2.0)
    ingest.add_argument("--size", type=int, default=DataConfig.size, help="square frame side in pixels")
    ingest.add_argument("--workers", type=int, default=0, help="processes (default: one per CPU)")
    ingest.add_argument("--shard-size", type=int, default=32, help="clips per shard")
    ingest.add_argument("--retry-skipped", action="store_true", help="retry sources an earlier run skipped")
    ingest.add_argument("--identity-from", choices=("stem", "folder"), default="stem",
                        help="identity of a video without a sidecar identity: its file stem or folder name")
    ingest.set_defaults(data_handler=cmd_ingest)

    inspect = sub.add_parser("inspect", help="counts, durations, identities and a contact sheet of a dataset")
    inspect.add_argument("root", metavar="DIR", help="dataset root, or one split's folder")
    inspect.add_argument("--sheet", help="contact sheet PNG (default: DIR/contact_sheet.png)")
    inspect.add_argument("--no-sheet", action="store_true", help="summary only, decode nothing")
    inspect.add_argument("--clips", type=int, default=4, help="contact sheet rows per split")
    inspect.add_argument("--frames", type=int, default=6, help="frames per row")
    inspect.set_defaults(data_handler=cmd_inspect)


def cmd_synth(args: argparse.Namespace, load_data_config) -> int:
    from avatarforge.data.synth import generate_dataset

    data = (load_data_config(args.config, args.overrides) if args.config
            else OmegaConf.to_object(OmegaConf.structured(DataConfig)))
    root = args.out or data.root
    for flag in ("identities", "heldout_identities", "clips_per_identity", "clip_seconds", "reference_seconds",
                 "shard_size", "workers", "seed"):
        if getattr(args, flag) is not None:
            setattr(data.synth, flag, getattr(args, flag))
    if args.size is not None:
        data.size = args.size
    indexes = generate_dataset(root, data.synth, size=data.size, fps=data.fps, sample_rate=data.sample_rate)
    for split, index in indexes.items():
        print(f"{split}: {index['total']} clips in {len(index['shards'])} shards -> {Path(root) / split}")
    return 0


def cmd_ingest(args: argparse.Namespace) -> int:
    import sys

    from avatarforge.data.ingest import IngestError, IngestOptions, ingest

    options = IngestOptions(clip_seconds=args.clip_seconds, size=args.size, workers=args.workers,
                            shard_size=args.shard_size, retry_skipped=args.retry_skipped,
                            identity_from=args.identity_from)
    try:
        report = ingest(args.sources, args.out, split=args.split, options=options)
    except IngestError as exn:
        print(f"avatarforge: error: {exn}", file=sys.stderr)
        return 2
    print(report.summary())
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    import sys

    from avatarforge.data.inspect import InspectError, format_inspection, inspect_dataset

    sheet = None if args.no_sheet else (args.sheet or str(Path(args.root) / "contact_sheet.png"))
    try:
        result = inspect_dataset(args.root, sheet=sheet, clips=args.clips, frames=args.frames)
    except InspectError as exn:
        print(f"avatarforge: error: {exn}", file=sys.stderr)
        return 2
    print(format_inspection(result))
    return 0
