"""The per-worker training loop run by Ray Train: DeepSpeed engine, resume, eval, checkpoints, tracking."""

from __future__ import annotations

import contextlib
import itertools
import os
import random
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from omegaconf import OmegaConf
from safetensors.torch import save_file

from avatarforge.atomic import atomic_write
from avatarforge.data.pixels import float_video
from avatarforge.train import checkpoint as ckpt_io
from avatarforge.train.config import TrainConfig
from avatarforge.train.ema import EMA
from avatarforge.train.engine import DeepSpeedStrategy, ensure_accelerator
from avatarforge.train.task import RunSpec, TrainTask, resolve_factory
from avatarforge.train.throughput import ThroughputMeter, measure_matmul_peak_flops
from avatarforge.train.tracking import Tracker
from avatarforge.train.trainable import restrict_trainable


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def forward_flops(fn: Callable[[], Any]) -> float:
    """FLOPs PyTorch counts while `fn` runs (grad stays as it is; the graph is dropped unused)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    # Only the total is wanted: without the per-module tracker, whose backward hooks fail ("Expected
    # gradient function to be set") when a loss runs modules under no_grad on inputs that need grad
    # (teachers, critics, rollouts).
    counter.mod_tracker = _GlobalOnly()
    with counter:
        fn()
    return float(counter.get_total_flops())


class _GlobalOnly:
    """Stands in for FlopCounterMode's module tracker: every FLOP counts toward the "Global" total."""

    parents = frozenset({"Global"})

    def __enter__(self) -> _GlobalOnly:
        return self

    def __exit__(self, *args: object) -> None:
        return None


def to_device(batch: Any, device: torch.device) -> Any:
    """A training batch on `device`; uint8 video from the loader (data.video_uint8) becomes float there."""
    return float_video(_moved(batch, device))


def _moved(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: _moved(v, device) for k, v in batch.items()}
    if isinstance(batch, list | tuple):
        return type(batch)(_moved(v, device) for v in batch)
    return batch


def _train_config(spec: RunSpec) -> TrainConfig:
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(TrainConfig), spec.train))


class WorkerLoop:
    """One worker's run of one stage; `run()` is the whole life of the worker."""

    def __init__(self, spec: RunSpec) -> None:
        import ray.train

        self.spec = spec
        self.cfg = _train_config(spec)
        context = ray.train.get_context()
        self.rank, self.world_size = context.get_world_rank(), context.get_world_size()
        self.use_gpu = self.cfg.scaling.gpus_per_worker > 0
        ensure_accelerator(self.use_gpu)
        torch.set_num_threads(self.cfg.scaling.torch_threads or self.cfg.scaling.cpus_per_worker)

    def run(self) -> None:
        import ray
        import ray.train

        cfg, rank = self.cfg, self.rank
        node = ray.get_runtime_context().get_node_id()
        print(f"[{self.spec.stage}] rank {rank} of {self.world_size} on node {node}", flush=True)
        seed_everything(self.spec.seed)  # identical initial weights on every rank
        task: TrainTask = resolve_factory(self.spec.task_factory)(self.spec.task_args)
        model = task.build_model()
        resume = ray.train.get_checkpoint()
        if resume is None:
            task.init_from_parents(model)
        trainable = restrict_trainable(model, cfg.trainable)
        if cfg.trainable and rank == 0:
            print(f"[{self.spec.stage}] training {trainable:,} parameters matching {list(cfg.trainable)}", flush=True)

        strategy = DeepSpeedStrategy(cfg, self.world_size)
        strategy.setup(model)
        ema = EMA(strategy.module, cfg.ema.decay) if cfg.ema.enabled else None
        step = 0
        if resume is not None:
            with resume.as_directory() as directory:
                step = self._load(strategy, ema, directory)
            print(f"[{self.spec.stage}] rank {rank}: resumed at step {step}", flush=True)
        else:
            seed_everything(self.spec.seed * 1000 + rank + 1)  # per-rank noise streams

        tracker = Tracker(self.spec.tracking, enabled=rank == 0)
        batches = task.train_batches(rank=rank, world_size=self.world_size, start_batch=step * cfg.grad_accum)
        first = next(batches)
        meter = ThroughputMeter(
            self.world_size,
            flops_per_sample=self._count_flops(task, strategy, first),
            peak_flops=measure_matmul_peak_flops(device="cuda" if self.use_gpu else "cpu"),
        )
        batches = itertools.chain([first], batches)
        last_saved = step if resume is not None else -1
        metrics: dict[str, float] = {}
        first_step_time = 0.0
        while step < cfg.steps:
            logging_step = (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps
            metrics = self._train_step(task, strategy, batches, meter, measure_grad_norm=logging_step)
            step += 1
            if not first_step_time:
                first_step_time = time.time() - self.spec.launched_at
            metrics["perf/fit_to_first_step_s"] = first_step_time
            if ema is not None:
                ema.update(strategy.module)
            if step % cfg.log_every == 0 or step == cfg.steps:
                metrics.update(meter.read())
                tracker.log(metrics, step)
                if rank == 0:
                    print(f"[{self.spec.stage}] step {step}/{cfg.steps} loss {metrics['train/loss']:.4f}", flush=True)
            if step % cfg.eval.every_steps == 0 or step == cfg.steps:
                eval_metrics, media = self._evaluate(task, strategy, ema)
                metrics.update(eval_metrics)
                tracker.log(eval_metrics, step)
                tracker.log_videos(media, step)
            if step % cfg.checkpoint.every_steps == 0 and step < cfg.steps:
                self._report(strategy, ema, step, metrics, final=False)
                last_saved = step

        self._export(task, strategy, ema)
        if rank == 0:
            tracker.log_weights(f"{self.spec.stage}-weights", self.spec.export_path, {"step": step})
            tracker.summary({**metrics, "final_step": step})
        tracker.finish()
        if last_saved != step:
            self._report(strategy, ema, step, metrics, final=True)

    def _train_step(self, task: TrainTask, strategy: DeepSpeedStrategy, batches: Iterator[Any],
                    meter: ThroughputMeter, *, measure_grad_norm: bool) -> dict[str, float]:
        totals: dict[str, float] = {}
        for _ in range(self.cfg.grad_accum):
            wait_start = time.perf_counter()
            batch = to_device(next(batches), strategy.device)
            wait = time.perf_counter() - wait_start
            loss, extra = task.loss(strategy.module, batch)
            strategy.backward_step(loss, measure_grad_norm=measure_grad_norm)  # the norm costs a pass
            samples, tokens = task.batch_stats(batch)
            meter.add(samples, tokens, wait)
            for key, value in {"train/loss": float(loss.detach()), **extra}.items():
                totals[key] = totals.get(key, 0.0) + value / self.cfg.grad_accum
        totals["train/lr"] = strategy.lr()
        totals["train/grad_norm"] = strategy.grad_norm()
        return totals

    def _count_flops(self, task: TrainTask, strategy: DeepSpeedStrategy, batch: Any) -> float:
        """Forward FLOPs per sample of the loss, counted by PyTorch on one batch (for MFU)."""
        try:
            with torch.random.fork_rng(devices=[]):
                total = forward_flops(lambda: task.loss(strategy.module, to_device(batch, strategy.device)))
        except (AssertionError, RuntimeError) as exc:
            print(f"[{self.spec.stage}] FLOP counting failed ({exc}); MFU not reported", flush=True)
            return 0.0
        samples, _ = task.batch_stats(batch)
        return total / max(samples, 1)

    def _evaluate(self, task: TrainTask, strategy: DeepSpeedStrategy,
                  ema: EMA | None) -> tuple[dict[str, float], dict[str, np.ndarray]]:
        module = strategy.module
        was_training = module.training
        module.eval()
        try:
            # fork_rng: evaluation must not move the training RNG, or resumed runs would diverge.
            with torch.random.fork_rng(devices=[]), torch.no_grad():
                if ema is not None:
                    with ema.applied(module):
                        out = task.evaluate(module)
                else:
                    out = task.evaluate(module)
        finally:
            module.train(was_training)
        out = {k if k.startswith("eval/") else f"eval/{k}": v for k, v in out.items()}
        # arrays are sample videos (uint8 [T, H, W, 3]) for the tracker; the rest are metrics
        media = {k: v for k, v in out.items() if isinstance(v, np.ndarray)}
        return {k: float(v) for k, v in out.items() if k not in media}, media

    def _report(self, strategy: DeepSpeedStrategy, ema: EMA | None, step: int,
                metrics: dict[str, float], *, final: bool) -> None:
        import ray.train

        directory = tempfile.mkdtemp(prefix=f"ckpt-{self.spec.stage}-")
        try:
            trainer_state = {"step": step, "batches_consumed": step * self.cfg.grad_accum}
            strategy.save(directory, client_state={"step": step})
            ckpt_io.save_rank_state(directory, self.rank, trainer_state)
            if ema is not None and self.rank == 0:
                ckpt_io.save_ema(directory, ema.state_dict())
            strategy.barrier()
            ray.train.report(
                {**metrics, "step": step, "final": final},
                checkpoint=ray.train.Checkpoint.from_directory(directory),
                checkpoint_dir_name=f"step_{step:08d}",
            )
        finally:
            shutil.rmtree(directory, ignore_errors=True)

    def _load(self, strategy: DeepSpeedStrategy, ema: EMA | None, directory: str) -> int:
        strategy.load(directory)
        state = ckpt_io.load_rank_state(directory, self.rank)
        if ema is not None:
            ema_state = ckpt_io.load_ema(directory)
            if ema_state is None:
                raise FileNotFoundError(f"{directory} has no EMA weights but ema is enabled")
            ema.load_state_dict(ema_state)
        return int(state["step"])

    def _export(self, task: TrainTask, strategy: DeepSpeedStrategy, ema: EMA | None) -> None:
        """The stage's product: full weights (EMA ones when enabled) as safetensors, written by rank 0."""
        state = strategy.full_state_dict()
        if ema is not None:
            state.update({k: v.clone() for k, v in ema.state_dict().items()})
        finalize = getattr(task, "export_state", None)
        if finalize is not None:
            # e.g. a calibrated buffer or merged adapters, from the weights that get exported (EMA if on)
            module = strategy.module
            applied = ema.applied(module) if ema is not None else contextlib.nullcontext(module)
            with applied, torch.random.fork_rng(devices=[]), torch.no_grad():
                state = {k: v.detach().cpu().clone() for k, v in finalize(module, state).items()}
        if self.rank == 0:
            tensors = {k: v.contiguous() for k, v in state.items()}
            atomic_write(self.spec.export_path, lambda tmp: save_file(tensors, tmp))
        strategy.barrier()


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train entry point: `config["spec"]` is the stage's RunSpec."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    WorkerLoop(config["spec"]).run()
