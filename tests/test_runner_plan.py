"""Curriculum planning without Ray: skip / resume / init decisions and the changed-config error."""

from pathlib import Path

import pytest

from avatarforge.stages import manifest as mf
from avatarforge.stages.config import ConfigError, load_config
from avatarforge.stages.runner import CurriculumRunner, StageConfigChanged, task_config

TINY = Path(__file__).resolve().parents[1] / "configs" / "curriculum" / "tiny.yaml"


def cfg_for(tmp_path, *extra):
    return load_config(TINY, [f"output_dir={tmp_path}", *extra])


def finish(runner: CurriculumRunner, stage: str, digest: str):
    mf.write_done(runner.stage_dir(stage), mf.Manifest(
        stage=stage, kind="autoencoder", config_hash=digest, parents={}, final_checkpoint=None,
        weights="w", metrics={}, wandb_run_id="x", started_at=0.0, finished_at=1.0, git_commit="c"))


def actions(runner):
    return {p.stage: p.action for p in runner.plan()}


def test_fresh_run_starts_everything(tmp_path):
    later = ("t2v", "a2v", "sft", "distill", "preferences", "reward", "rlhf")
    assert actions(CurriculumRunner(cfg_for(tmp_path))) == {"autoencoder": "start",
                                                            **dict.fromkeys(later, "init_from_parents")}


def test_done_stage_with_same_hash_is_skipped(tmp_path):
    runner = CurriculumRunner(cfg_for(tmp_path))
    finish(runner, "autoencoder", runner.plan()[0].config_hash)
    assert actions(runner)["autoencoder"] == "skip"
    assert actions(runner)["t2v"] == "init_from_parents"


def test_changed_config_on_done_stage_is_an_error_naming_it(tmp_path):
    runner = CurriculumRunner(cfg_for(tmp_path))
    finish(runner, "autoencoder", runner.plan()[0].config_hash)
    changed = CurriculumRunner(cfg_for(tmp_path, "stages.autoencoder.train.steps=3"))
    with pytest.raises(StageConfigChanged, match=r"'autoencoder'.*--rerun autoencoder"):
        changed.plan()
    # --rerun accepts the change and reruns the descendants too
    rerun = CurriculumRunner(cfg_for(tmp_path, "stages.autoencoder.train.steps=3"), rerun=["autoencoder"])
    assert actions(rerun)["autoencoder"] == "start"
    assert rerun.rerun == {"autoencoder", "t2v", "a2v", "sft", "distill", "preferences", "reward", "rlhf"}


def test_own_checkpoint_means_resume(tmp_path):
    runner = CurriculumRunner(cfg_for(tmp_path))
    plans = runner.plan()
    finish(runner, "autoencoder", plans[0].config_hash)
    snapshot = runner.storage / "t2v" / "checkpoint_manager_snapshot.json"
    snapshot.parent.mkdir(parents=True)
    snapshot.write_text("{}")
    mf.write_started(runner.stage_dir("t2v"), plans[1].config_hash, 0.0)
    assert actions(runner)["t2v"] == "resume"
    # the same checkpoint under a changed config must not be resumed silently
    with pytest.raises(StageConfigChanged, match="'t2v' has checkpoints"):
        CurriculumRunner(cfg_for(tmp_path, "stages.t2v.train.steps=3")).plan()


def test_unknown_rerun_stage(tmp_path):
    with pytest.raises(ConfigError, match="unknown stage"):
        CurriculumRunner(cfg_for(tmp_path), rerun=["nope"])


def test_invalidate_removes_results_and_checkpoints(tmp_path):
    runner = CurriculumRunner(cfg_for(tmp_path))
    finish(runner, "t2v", "h")
    (runner.storage / "t2v").mkdir(parents=True)
    runner.invalidate("t2v")
    assert not runner.stage_dir("t2v").exists() and not (runner.storage / "t2v").exists()


def test_started_collect_stage_resumes_per_item(tmp_path):
    """A collect stage has no Ray Train checkpoint: started work (its finished item shards) is resumed."""
    runner = CurriculumRunner(cfg_for(tmp_path))
    plans = {p.stage: p for p in runner.plan()}
    assert plans["preferences"].action == "init_from_parents"
    mf.write_started(runner.stage_dir("preferences"), plans["preferences"].config_hash, 0.0)
    assert actions(runner)["preferences"] == "resume"
    with pytest.raises(StageConfigChanged, match="'preferences'"):
        CurriculumRunner(cfg_for(tmp_path, "stages.preferences.options.num_prompts=8")).plan()


def test_options_validate_errors_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"stages\.preferences\.options\.group_size: must be >= 2"):
        cfg_for(tmp_path, "stages.preferences.options.group_size=1")
    with pytest.raises(ConfigError, match=r"stages\.rlhf\.options\.algorithm: must be one of"):
        cfg_for(tmp_path, "stages.rlhf.options.algorithm=ppo")
    with pytest.raises(ConfigError, match=r"stages\.preferences\.options\.rater\.path: human labels file"):
        cfg_for(tmp_path, "stages.preferences.options.rater.name=jsonl")


def test_task_config_merges_the_stage_data_overrides(tmp_path):
    cfg = cfg_for(tmp_path, "stages.sft.data.reference_frames=17", "data.root=rel/world")
    sft, a2v = task_config(cfg, "sft"), task_config(cfg, "a2v")
    assert sft["data"]["reference_frames"] == 17 and a2v["data"]["reference_frames"] == 9
    assert sft["data"]["root"] == str(Path("rel/world").resolve()) == a2v["data"]["root"]
    assert sft["output_dir"] == str(Path(tmp_path).resolve())
