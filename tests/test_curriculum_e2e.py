"""The tiny curriculum end to end through the real CLI: embedded Ray, DeepSpeed, W&B offline."""

from __future__ import annotations

import json
import re

import pytest
from safetensors.torch import load_file

from tests.conftest import TINY, run_cli, small_overrides
from tests.wandb_files import read_offline_run

pytestmark = [pytest.mark.slow, pytest.mark.integration]


def test_curriculum_produces_manifests_weights_and_metrics(finished_run):
    run_dir, proc = finished_run
    assert (run_dir / "config.yaml").exists()
    stages = (("autoencoder", "autoencoder", "eval/psnr"), ("t2v", "t2v_pretrain", "eval/flow_loss"),
              ("a2v", "a2v_pretrain", "eval/oracle/lipsync_corr"), ("sft", "personality_sft", "eval/oracle/jitter"))
    for stage, kind, metric in stages:
        stage_dir = run_dir / "stages" / stage
        done = json.loads((stage_dir / "DONE.json").read_text())
        assert done["kind"] == kind
        assert done["final_checkpoint"] and done["final_checkpoint"].startswith(str(run_dir / "ray" / stage))
        assert metric in done["metrics"], done["metrics"].keys()
        assert (stage_dir / "config.yaml").exists()
        weights = load_file(done["weights"])
        assert weights and all(v.isfinite().all() for v in weights.values())
    t2v = json.loads((run_dir / "stages" / "t2v" / "DONE.json").read_text())
    ae = json.loads((run_dir / "stages" / "autoencoder" / "DONE.json").read_text())
    assert t2v["parents"] == {"autoencoder": ae["config_hash"]}
    # throughput metrics reach the final report
    for key in ("perf/samples_per_s", "perf/tokens_per_s", "perf/data_wait_share", "perf/mfu"):
        assert key in t2v["metrics"]
    assert "W&B runs" in proc.stdout and "DONE.json" in proc.stdout


def test_autoencoder_learns(finished_run):
    run_dir, _ = finished_run
    psnr = json.loads((run_dir / "stages" / "autoencoder" / "DONE.json").read_text())["metrics"]["eval/psnr"]
    assert psnr > 12.0  # far above an untrained decoder on these clips (~5-8 dB)


def test_wandb_offline_runs_hold_metrics_and_group(finished_run):
    run_dir, _ = finished_run
    stages = (("autoencoder", "eval/psnr"), ("t2v", "eval/flow_loss"), ("a2v", "eval/oracle/lipsync_corr"),
              ("sft", "eval/oracle/identity_error"))
    for stage, metric in stages:
        record = read_offline_run(run_dir / "wandb", stage)
        assert record["group"] == "tiny"
        assert record["job_type"] == stage
        assert {"train/loss", "train/lr", "train/grad_norm", metric, "perf/samples_per_s"} <= record["history_keys"]
        assert record["artifacts"] >= 1  # exported weights logged as a reference artifact
        if stage in ("a2v", "sft"):
            assert "eval/samples/_type" in record["history_keys"]  # sampled videos (a wandb.Video)


def test_rerun_skips_done_stages_and_rejects_changed_config(finished_run, shared_data):
    run_dir, _ = finished_run
    out = run_dir.parent
    again = run_cli("run", str(TINY), *small_overrides(out, shared_data), "--plan")
    for stage in ("autoencoder", "t2v", "a2v", "sft"):
        assert re.search(rf"plan: {stage}\s+skip", again.stdout), again.stdout
    changed = run_cli("run", str(TINY), *small_overrides(out, shared_data, t2v_steps=13), check=False)
    assert changed.returncode == 2
    assert "'t2v'" in changed.stderr and "--rerun t2v" in changed.stderr
    assert "Traceback" not in changed.stderr


def test_last_stages_collect_rate_reward_and_align(finished_run):
    """distill -> preferences (Ray actors + oracle rater) -> reward (Bradley-Terry) -> rlhf (GRPO)."""
    import torch
    from omegaconf import OmegaConf

    from avatarforge.data.pair_shards import read_groups, shard_list
    from avatarforge.model.reward import RewardModel, RewardModelConfig
    from avatarforge.stages.common import typed
    from avatarforge.stages.policy import build_avatar_model

    run_dir, _ = finished_run
    stages = run_dir / "stages"
    prefs = json.loads((stages / "preferences" / "DONE.json").read_text())
    assert prefs["kind"] == "preference_collect" and prefs["weights"] == ""
    groups = read_groups(shard_list(prefs["extra"]["outputs"]["pairs"]), with_videos=True)
    assert len(groups) == 8 and prefs["metrics"]["items"] == 4  # 8 prompts, 2 per shard
    assert {g.meta["split"] for g in groups} == {"train", "heldout"}
    for g in groups:
        assert g.arrays["latents"].shape[0] == 3 and len(g.videos) == 3  # a group of 3 videos, mp4s included
        assert g.meta["labels"] and all(label["choice"] in ("a", "b") for label in g.meta["labels"])
        assert all(label["rater_id"] == "oracle" for label in g.meta["labels"])
    assert prefs["metrics"]["pairs"] == sum(len(g.meta["labels"]) for g in groups)
    assert len((stages / "preferences" / "to_label.jsonl").read_text().splitlines()) == 8 * 3

    reward = json.loads((stages / "reward" / "DONE.json").read_text())
    for key in ("eval/heldout/accuracy", "eval/heldout/oracle_accuracy", "eval/train_pairs/accuracy"):
        assert 0.0 <= reward["metrics"][key] <= 1.0
    cfg = OmegaConf.to_container(OmegaConf.load(stages / "reward" / "config.yaml"), resolve=True)
    model = RewardModel(typed(RewardModelConfig, cfg["stages"]["reward"]["options"]["model"]))
    model.load_state_dict(load_file(reward["weights"]))  # strict: the sync head (tiny: sync pretraining) too
    assert model.sync is not None and cfg["stages"]["reward"]["options"]["sync_pretrain_steps"] == 2
    # its audio encoder started from the distilled policy's (options.audio_encoder_from): still close to it
    policy = load_file(json.loads((stages / "distill" / "DONE.json").read_text())["weights"])
    for key in [k for k in policy if k.startswith("audio_encoder.") and policy[k].dim() == 2][:3]:
        cos = torch.nn.functional.cosine_similarity(model.state_dict()[key].flatten(), policy[key].flatten(), dim=0)
        assert cos > 0.9, (key, float(cos))

    rlhf = json.loads((stages / "rlhf" / "DONE.json").read_text())
    assert rlhf["parents"].keys() >= {"distill", "reward"}
    assert 0.0 <= rlhf["metrics"]["eval/oracle_win_rate"] <= 1.0
    for key in ("eval/reward", "eval/reward_distilled", "train/kl", "train/reward"):
        assert key in rlhf["metrics"], rlhf["metrics"].keys()
    build_avatar_model(cfg, rlhf["weights"])  # a plain AvatarModel: generate can load it

    record = read_offline_run(run_dir / "wandb", "preferences")
    assert record["job_type"] == "preferences" and "collect/utility" in record["history_keys"]
    record = read_offline_run(run_dir / "wandb", "rlhf")
    assert {"train/reward", "train/kl", "eval/oracle_win_rate", "eval/reward"} <= record["history_keys"]
