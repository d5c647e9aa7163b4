"""The curriculum runner: stages as a DAG, skip / resume / weights-only init, manifests with lineage.

Rerun semantics (torchtitan's, made a DAG): done + same hash -> skip; own checkpoint -> full resume;
otherwise weights-only init from the parents' exported weights. A changed config on a done (or
partly trained) stage is an error naming it, unless `--rerun STAGE`, which also invalidates descendants.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from avatarforge.atomic import atomic_write_text
from avatarforge.stages import manifest as mf
from avatarforge.stages.config import (
    ConfigError,
    descendants,
    stage_data,
    stage_fingerprint,
    to_yaml,
    topological_order,
)
from avatarforge.stages.registry import KINDS
from avatarforge.train.collect import CollectSpec, run_collect
from avatarforge.train.launcher import fit, has_checkpoint
from avatarforge.train.task import RunSpec
from avatarforge.train.tracking import tracking_settings, wandb_run_id

WEIGHTS = "weights.safetensors"


class StageConfigChanged(ConfigError):
    """A finished or partly trained stage whose config no longer matches."""


def task_config(cfg: DictConfig, stage: str) -> dict:
    """The config a stage's task is given: resolved, paths absolute (workers may start elsewhere), and the
    stage's own data overrides (stages.X.data) merged into `data`, so a task reads one data section."""
    resolved = OmegaConf.to_container(cfg, resolve=True)
    resolved["output_dir"] = str(Path(cfg.output_dir).resolve())
    resolved["data"] = OmegaConf.to_container(stage_data(cfg, stage), resolve=True)
    resolved["data"]["root"] = str(Path(cfg.data.root).resolve())
    return resolved


@dataclass
class StagePlan:
    stage: str
    action: str  # skip | resume | init_from_parents | start
    config_hash: str


class CurriculumRunner:
    def __init__(self, cfg: DictConfig, rerun: list[str] | tuple[str, ...] = ()) -> None:
        unknown = [s for s in rerun if s not in cfg.stages]
        if unknown:
            raise ConfigError(f"--rerun: unknown stage(s) {unknown}; stages are {list(cfg.stages)}")
        self.cfg = cfg
        self.run_dir = Path(cfg.output_dir).resolve() / cfg.name
        self.storage = self.run_dir / "ray"
        self.order = topological_order(cfg)
        self.rerun = set(rerun)
        for stage in rerun:
            self.rerun.update(descendants(cfg, stage))

    def stage_dir(self, stage: str) -> Path:
        return self.run_dir / "stages" / stage

    def invalidate(self, stage: str) -> None:
        """Forget a stage's results and checkpoints (for --rerun)."""
        shutil.rmtree(self.stage_dir(stage), ignore_errors=True)
        shutil.rmtree(self.storage / stage, ignore_errors=True)

    def has_progress(self, stage: str) -> bool:
        """A training stage's Ray Train checkpoint, or a collect stage's started (per-item resumable) work."""
        if KINDS[self.cfg.stages[stage].kind].runtime == "collect":
            return mf.read_started(self.stage_dir(stage)) is not None
        return has_checkpoint(str(self.storage), stage)

    def plan(self) -> list[StagePlan]:
        """What `run()` would do, without touching anything (also the config-change check)."""
        hashes: dict[str, str] = {}
        plans = []
        for stage in self.order:
            parents = {p: hashes[p] for p in self.cfg.stages[stage].needs}
            digest = hashes[stage] = stage_fingerprint(self.cfg, stage, parents)
            if stage in self.rerun:
                plans.append(StagePlan(stage, "init_from_parents" if parents else "start", digest))
                continue
            done = mf.read_done(self.stage_dir(stage))
            resumable = not done and self.has_progress(stage)
            started = mf.read_started(self.stage_dir(stage)) if resumable else None
            recorded = done.config_hash if done else (started or {}).get("config_hash")
            if recorded is not None and recorded != digest:
                what = "finished" if done else "has checkpoints"
                raise StageConfigChanged(
                    f"stage {stage!r} {what} with config hash {recorded}, but its config (or a parent's) "
                    f"now hashes to {digest}; rerun it with --rerun {stage} (also reruns its descendants)"
                )
            if done:
                action = "skip"
            elif resumable:
                action = "resume"
            else:
                action = "init_from_parents" if parents else "start"
            plans.append(StagePlan(stage, action, digest))
        return plans

    def run(self) -> dict[str, mf.Manifest]:
        plans = self.plan()
        for stage in self.rerun:
            self.invalidate(stage)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.run_dir / "config.yaml", to_yaml(self.cfg))
        manifests: dict[str, mf.Manifest] = {}
        for plan in plans:
            if plan.action == "skip":
                manifests[plan.stage] = mf.read_done(self.stage_dir(plan.stage))
                print(f"[curriculum] {plan.stage}: done with the same config, skipped", flush=True)
                continue
            print(f"[curriculum] {plan.stage}: {plan.action.replace('_', ' ')}", flush=True)
            manifests[plan.stage] = self.run_stage(plan, manifests)
        return manifests

    def run_stage(self, plan: StagePlan, parents: dict[str, mf.Manifest]) -> mf.Manifest:
        stage, cfg = plan.stage, self.cfg
        stage_cfg = cfg.stages[stage]
        kind = KINDS[stage_cfg.kind]
        stage_dir = self.stage_dir(stage)
        stage_dir.mkdir(parents=True, exist_ok=True)
        started = mf.read_started(stage_dir)
        started_at = started["started_at"] if started else time.time()
        mf.write_started(stage_dir, plan.config_hash, started_at)
        atomic_write_text(stage_dir / "config.yaml", to_yaml(cfg))

        resolved = task_config(cfg, stage)
        settings = tracking_settings(
            project=cfg.wandb.project, entity=cfg.wandb.entity, mode=cfg.wandb.mode, tags=list(cfg.wandb.tags),
            run_name=cfg.name, stage=stage, kind=stage_cfg.kind, directory=str(self.run_dir),
            config={"stage": resolved["stages"][stage], "config_hash": plan.config_hash,
                    "parents": {p: parents[p].config_hash for p in stage_cfg.needs}},
            parents=list(stage_cfg.needs),
        )
        task_args = {
            "config": resolved, "stage": stage, "stage_dir": str(stage_dir),
            "parent_weights": {p: parents[p].weights for p in stage_cfg.needs},
            "parent_outputs": {p: parents[p].extra.get("outputs", {}) for p in stage_cfg.needs},
        }
        if kind.runtime == "collect":
            checkpoint, weights, metrics, outputs = self._collect(stage, kind.task_factory, task_args, settings)
        else:
            checkpoint, weights, metrics, outputs = self._train(stage, kind.task_factory, task_args, settings)
        manifest = mf.Manifest(
            stage=stage,
            kind=stage_cfg.kind,
            config_hash=plan.config_hash,
            parents={p: parents[p].config_hash for p in stage_cfg.needs},
            final_checkpoint=checkpoint,
            weights=weights,
            metrics={k: v for k, v in metrics.items() if isinstance(v, int | float | str | bool)},
            wandb_run_id=wandb_run_id(cfg.name, stage),
            started_at=started_at,
            finished_at=time.time(),
            git_commit=mf.git_commit(),
            extra={"outputs": outputs} if outputs else {},
        )
        mf.write_done(stage_dir, manifest)
        print(f"[curriculum] {stage}: done -> {stage_dir / mf.DONE}", flush=True)
        return manifest

    def _train(self, stage: str, factory: str, task_args: dict, settings: dict) -> tuple:
        """One Ray Train run; its product is the exported weights."""
        resolved = task_args["config"]
        spec = RunSpec(
            stage=stage,
            kind=resolved["stages"][stage]["kind"],
            task_factory=factory,
            task_args=task_args,
            train=resolved["stages"][stage]["train"],
            seed=resolved["seed"],
            export_path=str(self.stage_dir(stage) / WEIGHTS),
            tracking=settings,
        )
        result = fit(spec, storage_path=str(self.storage))
        if not Path(spec.export_path).exists():
            raise RuntimeError(f"stage {stage!r} finished without exporting {spec.export_path}")
        return result.checkpoint, spec.export_path, result.metrics, {}

    def _collect(self, stage: str, factory: str, task_args: dict, settings: dict) -> tuple:
        """A pool of Ray actors (train.scaling sizes it); its products are the files it lists in `outputs`."""
        resolved = task_args["config"]
        scaling = resolved["stages"][stage]["train"]["scaling"]
        spec = CollectSpec(
            stage=stage, kind=resolved["stages"][stage]["kind"], task_factory=factory, task_args=task_args,
            num_actors=scaling["num_workers"], cpus_per_actor=scaling["cpus_per_worker"],
            gpus_per_actor=scaling["gpus_per_worker"], max_failures=scaling["max_failures"], tracking=settings,
        )
        result = run_collect(spec)
        outputs = {k: str(v) for k, v in result.metrics.pop("outputs", {}).items()}
        return None, "", {**result.metrics, "items": result.items}, outputs
