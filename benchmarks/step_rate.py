"""Ray Train + DeepSpeed step rate vs a plain single-process PyTorch loop, same model and batch, one run.

Also reports the time from `fit()` to the first finished step. Usage:

    .venv/bin/python benchmarks/step_rate.py [--steps 60] [--threads 2] [--dim 128 --depth 4]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import torch

from avatarforge.cluster.connect import connect, disconnect
from avatarforge.model.flow import flow_matching_loss
from avatarforge.stages.synthetic import build_task
from avatarforge.train.config import TrainConfig
from avatarforge.train.launcher import fit
from avatarforge.train.task import RunSpec


def plain_loop(args: dict, steps: int, warmup: int, threads: int, lr: float) -> float:
    """Steps/s of the most direct PyTorch loop: forward, backward, clip, AdamW."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    task = build_task(args)
    model = task.build_model()
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    batch = task.batch
    for i in range(warmup + steps):
        if i == warmup:
            start = time.perf_counter()
        loss = flow_matching_loss(model, batch["x0"], text=batch["text"], text_mask=batch["text_mask"])[0]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    return steps / (time.perf_counter() - start)


def ray_deepspeed(args: dict, steps: int, warmup: int, threads: int, lr: float) -> tuple[float, float]:
    """Steps/s of the same work through the project's runtime. It runs 2 x steps and logs every `steps`:
    the second window (what the final report holds) is steady state, like the plain loop after warmup."""
    train = TrainConfig(steps=2 * steps, batch_size=args["latent_shape"][0], log_every=steps)
    train.ema.enabled = False  # the plain loop has no EMA either
    train.checkpoint.every_steps = 10**9
    train.eval.every_steps = 10**9
    train.optimizer.lr = lr
    train.schedule.kind = "constant"
    train.schedule.warmup_steps = 1
    train.scaling.cpus_per_worker = threads
    from omegaconf import OmegaConf

    with tempfile.TemporaryDirectory() as tmp:
        spec = RunSpec(stage="bench", kind="synthetic", task_factory="avatarforge.stages.synthetic:build_task",
                       task_args=args, train=OmegaConf.to_container(OmegaConf.structured(train)), seed=0,
                       export_path=os.path.join(tmp, "w.safetensors"), tracking={"mode": "disabled"})
        result = fit(spec, storage_path=tmp)
    samples_per_s = result.metrics["perf/samples_per_s"]
    return samples_per_s / args["latent_shape"][0], result.metrics["perf/fit_to_first_step_s"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--batch", type=int, default=4)
    opts = parser.parse_args()
    args = {
        "latent_shape": [opts.batch, 8, 3, 8, 8],
        "text_len": 96,
        "text": {"dim": 128, "layers": 2},
        "dit": {"dim": opts.dim, "depth": opts.depth, "heads": 4},
    }
    plain = plain_loop(args, opts.steps, opts.warmup, opts.threads, 1e-3)
    connect(num_cpus=opts.threads)
    try:
        ray_rate, first_step = ray_deepspeed(args, opts.steps, opts.warmup, opts.threads, 1e-3)
    finally:
        disconnect()
    print("\n| measure | value |\n|---|---|")
    print(f"| plain PyTorch loop (steps/s) | {plain:.2f} |")
    print(f"| Ray Train + DeepSpeed runtime (steps/s) | {ray_rate:.2f} |")
    print(f"| ratio (target >= 0.9) | {ray_rate / plain:.2f} |")
    print(f"| fit() to first finished step (s) | {first_step:.1f} |")


if __name__ == "__main__":
    main()
