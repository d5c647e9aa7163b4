"""Shared fixtures: the tiny curriculum shrunk for tests, and a CLI runner in a subprocess."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from avatarforge.stages.config import cut_curriculum

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "curriculum" / "tiny.yaml"


def small_overrides(out: Path, data_root: Path, *, ae_steps: int = 12, t2v_steps: int = 12,
                    avatar_steps: int = 4) -> list[str]:
    """A few steps per stage, small data: what a real run does, in seconds."""
    return [
        f"output_dir={out}",
        f"data.root={data_root}",
        "data.synth.identities=4",
        "data.synth.heldout_identities=2",
        "data.synth.clips_per_identity=2",
        "data.synth.workers=1",
        "train_defaults.log_every=2",
        "train_defaults.eval.every_steps=6",
        "train_defaults.eval.batches=1",
        "train_defaults.checkpoint.every_steps=4",
        f"stages.autoencoder.train.steps={ae_steps}",
        f"stages.t2v.train.steps={t2v_steps}",
        "stages.autoencoder.options.eval_clips=4",
        "stages.t2v.options.eval_clips=4",
        "stages.autoencoder.options.calibration_clips=4",
        f"stages.a2v.train.steps={avatar_steps}",
        f"stages.sft.train.steps={avatar_steps}",
        "stages.a2v.options.eval_clips=4",
        "stages.a2v.options.eval_videos=2",
        "stages.a2v.options.sample_steps=3",
        "stages.sft.options.eval_clips=4",
        "stages.sft.options.eval_videos=2",
        "stages.sft.options.sample_steps=3",
        # the last four stages: a handful of steps / prompts each
        "stages.distill.train.steps=4",
        "stages.distill.options.guidance_batches=2",
        "stages.distill.options.teacher_steps=4",
        "stages.distill.options.student_steps=2",
        "stages.distill.options.eval_clips=2",
        "stages.distill.options.eval_videos=2",
        "stages.preferences.options.num_prompts=8",
        "stages.preferences.options.prompts_per_item=2",
        "stages.preferences.options.group_size=3",
        "stages.reward.train.steps=4",
        "stages.reward.options.sync_pretrain_steps=2",  # 2 sync steps on ground-truth clips, then 2 on pairs
        "stages.reward.options.sync_batch_size=4",
        "stages.reward.train.batch_size=4",
        "stages.rlhf.train.steps=4",
        "stages.rlhf.train.checkpoint.every_steps=2",  # a mid-stage checkpoint for the resume test
        "stages.rlhf.options.train_prompts=4",
        "stages.rlhf.options.group_size=2",
        "stages.rlhf.options.eval_prompts=2",
        "stages.rlhf.options.eval_videos=2",
    ]


def tiny_subset(directory: Path, stages: tuple[str, ...], overrides: list[str]) -> tuple[Path, list[str]]:
    """tiny.yaml cut to `stages` (written into `directory`) and those of `overrides` that still apply."""
    path = cut_curriculum(TINY, stages, directory / f"tiny_{'_'.join(stages)}.yaml")
    return path, [o for o in overrides if not o.startswith("stages.") or o.split(".")[1] in stages]


def cli_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONUNBUFFERED"] = "1"
    env.pop("RAY_ADDRESS", None)
    env["WANDB_MODE"] = "offline"
    env["WANDB_SILENT"] = "true"
    return env


def run_cli(*args: str, timeout: float = 600, env: dict[str, str] | None = None,
            check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "-m", "avatarforge.cluster.cli", *args],
        capture_output=True, text=True, timeout=timeout, env=env or cli_env(), cwd=ROOT,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"avatarforge {' '.join(args)} failed ({proc.returncode}):\n"
                             f"{proc.stdout[-6000:]}\n{proc.stderr[-6000:]}")
    return proc


def wait_for_checkpoint(storage: Path, proc: subprocess.Popen, timeout: float = 900) -> Path:
    """The first persisted, registered checkpoint of the stage stored under `storage` (Ray Train's run dir)."""
    import time

    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"the run ended before a {storage.name} checkpoint appeared:\n"
                                 f"{proc.stdout.read()[-4000:]}")
        snapshot = storage / "checkpoint_manager_snapshot.json"
        found = sorted(storage.glob("step_*"))
        if snapshot.exists() and found:
            return found[0]
        time.sleep(0.2)
    raise AssertionError(f"no {storage.name} checkpoint under {storage} in time")


def kill_at_checkpoint(args: list[str], storage: Path) -> None:
    """Run the CLI with `args`, SIGKILL the driver once the stage stored under `storage` has persisted its
    first checkpoint, and its embedded cluster with it (same session), as on a crashed machine."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "avatarforge.cluster.cli", *args], cwd=ROOT, env=cli_env(),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )
    try:
        wait_for_checkpoint(storage, proc)
        os.kill(proc.pid, signal.SIGKILL)  # the driver dies mid-stage, no cleanup
        proc.wait(timeout=30)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.fixture
def identity_streams(monkeypatch) -> list:
    """The identities each avatar-stage training stream asks the loader for (one fake batch each); the
    training split's index lists identities a, b, c, d."""
    import torch

    from avatarforge.data import index
    from avatarforge.stages import avatar

    asked: list = []

    def fake_stream(data, *, identities, **kwargs):
        asked.append(identities)
        yield {k: torch.zeros(1) for k in avatar.BATCH_KEYS}

    monkeypatch.setattr(avatar, "train_stream", fake_stream)
    monkeypatch.setattr(index, "read_index", lambda root, split: {"identities": ["a", "b", "c", "d"]})
    return asked


@pytest.fixture(scope="module")
def one_thread():
    """Single-threaded torch for a module of tiny-model tests: one thread is fastest there, and immune to
    a busy machine's OpenMP contention."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def shared_data(tmp_path_factory) -> Path:
    """One small synthetic dataset for all integration tests (generation is part of what is tested)."""
    root = tmp_path_factory.mktemp("data") / "tiny"
    out = tmp_path_factory.mktemp("gen")
    run_cli("data", "synth", "--config", str(TINY), *small_overrides(out, root)[1:], "--out", str(root))
    return root


@pytest.fixture(scope="session")
def finished_run(tmp_path_factory, shared_data) -> tuple[Path, subprocess.CompletedProcess]:
    """The tiny curriculum run once, uninterrupted; several tests inspect it."""
    out = tmp_path_factory.mktemp("runs")
    proc = run_cli("run", str(TINY), *small_overrides(out, shared_data), timeout=1500)
    return out / "tiny", proc


@pytest.fixture(scope="module")
def small_avatar_nets(tmp_path_factory, one_thread):
    """A tiny AvatarModel (gates opened) and a frozen 4-channel autoencoder, for sampling tests."""
    import torch
    from safetensors.torch import save_file

    from avatarforge.model.audio import AudioEncoderConfig
    from avatarforge.model.autoencoder import AutoencoderConfig, VideoAutoencoder
    from avatarforge.model.avatar import AvatarDiTConfig, AvatarModel
    from avatarforge.model.text_encoder import TextEncoderConfig
    from avatarforge.stages.common import FrozenAutoencoder

    torch.manual_seed(0)
    ae_cfg = {"latent_channels": 4, "base_channels": 8}
    path = Path(tmp_path_factory.mktemp("ae")) / "ae.safetensors"
    save_file(VideoAutoencoder(AutoencoderConfig(**ae_cfg)).state_dict(), str(path))
    model = AvatarModel(TextEncoderConfig(dim=32, layers=1, heads=2),
                        AvatarDiTConfig(latent_channels=4, dim=32, depth=2, heads=2, text_dim=32, audio_dim=32,
                                        identity_dim=32),
                        AudioEncoderConfig(dim=32, layers=1, heads=2)).eval()
    with torch.no_grad():  # open the zero-initialised gates so audio and reference change the output
        for p in model.parameters():
            if not p.any():
                p.normal_(0.0, 0.2)
    return model, FrozenAutoencoder(ae_cfg, path)
