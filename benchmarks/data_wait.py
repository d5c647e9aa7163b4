"""Data-wait share of a tiny training stage: the real autoencoder stage, run by the real CLI.

`avatarforge run` on the tiny curriculum reduced to its autoencoder stage (embedded Ray, DeepSpeed, the
streaming loader with DataLoader workers, a small synthetic world generated on the way). The runtime
times every `next(batch)`; `perf/data_wait_share` in the stage's DONE.json is that time over the wall
time of the last logging window (the second half of the run: steady state). Usage:

    .venv/bin/python benchmarks/data_wait.py [--steps 60] [--workers 1] [--workers 0 ...]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from omegaconf import OmegaConf

from avatarforge.stages.config import cut_curriculum

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "curriculum" / "tiny.yaml"


def run_stage(directory: Path, data_root: Path, *, steps: int, workers: int, threads: int) -> dict:
    """One stage run in a fresh output folder; returns its DONE.json metrics plus the wall time."""
    out = directory / f"run-w{workers}"
    overrides = [
        f"output_dir={out}", f"data.root={data_root}", f"data.num_workers={workers}",
        "data.synth.identities=4", "data.synth.heldout_identities=1", "data.synth.clips_per_identity=4",
        "data.synth.workers=1", "wandb.mode=disabled", f"ray.num_cpus={threads}",
        f"train_defaults.scaling.cpus_per_worker={threads}",
        f"stages.autoencoder.train.steps={steps}", f"train_defaults.log_every={steps // 2}",
        f"train_defaults.eval.every_steps={steps}", f"train_defaults.checkpoint.every_steps={steps * 10}",
        "stages.autoencoder.options.eval_clips=4",
    ]
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "avatarforge.cluster.cli", "run", str(cut_curriculum(TINY, ["autoencoder"], directory / "autoencoder.yaml")),
         *overrides],
        env=env, cwd=ROOT, capture_output=True, text=True,
    )
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"stage run failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    done = json.loads((out / "tiny" / "stages" / "autoencoder" / "DONE.json").read_text())
    return {**done["metrics"], "wall_s": wall}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--workers", type=int, action="append",
                        help="data.num_workers (repeatable; default 1)")
    parser.add_argument("--threads", type=int, default=2,
                        help="CPUs of the embedded Ray and of the train worker")
    opts = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="data-wait-") as tmp:
        directory = Path(tmp)
        rows = []
        for workers in opts.workers or [1]:
            metrics = run_stage(directory, directory / "data", steps=opts.steps, workers=workers,
                                threads=opts.threads)
            rows.append((workers, metrics))
    batch = OmegaConf.load(TINY).train_defaults.batch_size
    print(f"\nautoencoder stage, {opts.steps} steps of batch {batch}; "
          f"metrics of the last {opts.steps // 2} steps")
    print("\n| data.num_workers | samples/s | data-wait share (target <= 5%) | stage wall time (s) |")
    print("|---|---|---|---|")
    for workers, m in rows:
        print(f"| {workers} | {m['perf/samples_per_s']:.1f} | {100 * m['perf/data_wait_share']:.1f}% "
              f"| {m['wall_s']:.0f} |")


if __name__ == "__main__":
    main()
