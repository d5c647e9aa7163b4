"""Inference: reference video + audio (any length) -> a lip-synced mp4 with the audio muxed in.

The audio is cut into windows of `data.frames` video frames sharing one frame each (see
stages/sampling.py, which the evals and the quality library use too). The reference is read whole, every
`data.reference_stride`-th frame, up to `reference_seconds` (16 s by default): Sparse Reference Attention
conditions on all of it, and a longer reference scores better on identity and lip sync than the training
length (README, claim e).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
import numpy as np
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file

from avatarforge.data.config import DataConfig
from avatarforge.data.footage import CutStats, SkipSource, read_audio, square_frame
from avatarforge.data.tokenizer import tokenize
from avatarforge.model.audio import AudioEncoderConfig
from avatarforge.model.autoencoder import AutoencoderConfig, temporal_factor
from avatarforge.model.avatar import AvatarDiTConfig, AvatarModel
from avatarforge.model.text_encoder import TextEncoderConfig
from avatarforge.stages.common import FrozenAutoencoder, typed
from avatarforge.stages.sampling import guided_velocity_fn, sample_windows

# preferred first when a run directory is given: the aligned policy, the distilled student, sft, a2v
AVATAR_KINDS = ("rlhf", "distill", "personality_sft", "a2v_pretrain")
FEW_STEP_KINDS = ("rlhf", "distill")  # guidance baked in: single-pass steps at scale 1
REFERENCE_SECONDS = 16.0  # the longest reference measured (README, claim e)


class GenerateError(ValueError):
    """Bad inference input; the message is one line for the user."""


@dataclass
class GenerateOptions:
    """None = the checkpoint's own sampling: 12 guided steps for a2v/sft (their eval settings), the student's
    few single-pass steps at guidance 1 for distill/rlhf."""

    steps: int | None = None
    guidance_audio: float | None = None
    guidance_ref: float | None = None
    guidance_text: float | None = None
    # text guidance only at lo <= t <= hi (t = 1 is noise), 1 elsewhere (README claim d); None: every step
    guidance_text_interval: tuple[float, float] | None = None
    seed: int = 0
    caption: str = ""
    # the reference's attention share calibrated to this many reference tokens (the training reference's:
    # a long reference then weighs like a training-length one, and the caption's scene wins over the
    # reference's backdrop, at some cost in identity; README claim d); None: the checkpoint's setting
    reference_share_tokens: int | None = None
    # how much of the reference video to condition on (every data.reference_stride-th frame); a shorter
    # video is used whole (at least the training length's frames, the last one repeated)
    reference_seconds: float = REFERENCE_SECONDS


def reference_indices(n_frames: int, stride: int, min_frames: int, max_frames: int, frames_per_latent: int) -> np.ndarray:
    """Which frames of an `n_frames` video make the reference: every `stride`-th, as many as the video
    holds up to `max_frames` (at least `min_frames`, repeating the last frame), trimmed to 1 + k *
    `frames_per_latent` frames as the causal autoencoder encodes them."""
    available = min(max_frames, -(-n_frames // stride))
    count = max(min_frames, 1 + frames_per_latent * ((available - 1) // frames_per_latent))
    return np.clip(np.arange(count) * stride, 0, n_frames - 1)


def sampling_defaults(cfg: dict[str, Any], stage: str) -> dict[str, float]:
    """How a stage's model is meant to be sampled (see GenerateOptions)."""
    from avatarforge.stages.policy import distill_steps

    kind, options = cfg["stages"][stage]["kind"], cfg["stages"][stage]["options"]
    if kind in FEW_STEP_KINDS:
        steps = options.get("student_steps") if kind == "distill" else None
        steps = int(steps) if steps else distill_steps(cfg, stage, int(options.get("sample_steps", 0)))
        return {"steps": steps, "guidance_audio": 1.0, "guidance_ref": 1.0, "guidance_text": 1.0}
    return {"steps": int(options.get("sample_steps", 12)), "guidance_audio": float(options.get("guidance_audio", 2.0)),
            "guidance_ref": float(options.get("guidance_reference", 1.5)),
            "guidance_text": float(options.get("guidance_text", 1.0))}


def resolve_stage(checkpoint: str | Path) -> Path:
    """A stage dir, its DONE.json, or a run dir (its sft stage, else a2v) -> the stage dir."""
    path = Path(checkpoint)
    if path.name == "DONE.json":
        path = path.parent
    if (path / "DONE.json").exists():
        return path
    if (path / "stages").is_dir():
        done = {p.parent: json.loads(p.read_text())["kind"] for p in (path / "stages").glob("*/DONE.json")}
        # several stages of a kind (e.g. rlhf ablations): the first in the run's config order
        order = list(OmegaConf.load(path / "config.yaml").stages) if (path / "config.yaml").exists() else []
        rank = {name: i for i, name in enumerate(order)}
        for kind in AVATAR_KINDS:
            found = sorted((d for d, k in done.items() if k == kind), key=lambda d: (rank.get(d.name, len(rank)), d.name))
            if found:
                return found[0]
        raise GenerateError(f"{path} has no finished avatar stage ({', '.join(AVATAR_KINDS)}; "
                            f"kinds found: {sorted(set(done.values()))})")
    raise GenerateError(f"{checkpoint} is not a finished stage or a curriculum run directory (no DONE.json)")


class Generator:
    def __init__(self, checkpoint: str | Path, device: str = "cpu") -> None:
        stage_dir = resolve_stage(checkpoint)
        done = json.loads((stage_dir / "DONE.json").read_text())
        if done["kind"] not in AVATAR_KINDS:
            raise GenerateError(f"{stage_dir} is a {done['kind']!r} stage; generate needs one of {AVATAR_KINDS}")
        cfg = OmegaConf.to_container(OmegaConf.load(stage_dir / "config.yaml"), resolve=True)
        ae_stages = [s for s, c in cfg["stages"].items() if c["kind"] == "autoencoder"]
        ae_done = stage_dir.parent / ae_stages[0] / "DONE.json" if ae_stages else None
        if ae_done is None or not ae_done.exists():
            raise GenerateError(f"the autoencoder stage of {stage_dir.parent.parent} is missing or unfinished")
        self.device = torch.device(device)
        self.data = typed(DataConfig, cfg["data"])
        self.frames_per_latent = temporal_factor(typed(AutoencoderConfig, cfg["model"]["autoencoder"]).temporal_downsample)
        self.autoencoder = FrozenAutoencoder(cfg["model"]["autoencoder"], json.loads(ae_done.read_text())["weights"])
        self.model = AvatarModel(typed(TextEncoderConfig, cfg["model"]["text"]),
                                 typed(AvatarDiTConfig, cfg["model"]["dit"]),
                                 typed(AudioEncoderConfig, cfg["model"]["audio"]))
        self.model.load_state_dict(load_file(done["weights"]))
        self.model.to(self.device).eval()
        self.stage, self.kind = stage_dir.name, done["kind"]
        self.defaults = sampling_defaults(cfg, stage_dir.name)

    def resolve(self, options: GenerateOptions) -> GenerateOptions:
        """Options with the checkpoint's sampling defaults filled in."""
        filled = {k: getattr(options, k) if getattr(options, k) is not None else v for k, v in self.defaults.items()}
        out = GenerateOptions(**{**options.__dict__, **filled})
        if out.steps < 1:
            raise GenerateError("--steps must be >= 1")
        return out

    # -- inputs -------------------------------------------------------------------------------------

    def read_reference(self, path: str | Path, seconds: float = REFERENCE_SECONDS) -> torch.Tensor:
        """[1, 3, Tr, S, S] in [-1, 1]: up to `seconds` of the video at data.fps (see reference_indices),
        centre-square, resized."""
        if seconds <= 0:
            raise GenerateError(f"--reference-seconds must be > 0, got {seconds}")
        frames = []
        try:
            with av.open(str(path)) as container:
                if not container.streams.video:
                    raise GenerateError(f"{path}: no video stream")
                stream = container.streams.video[0]
                for frame in container.decode(stream):
                    frames.append(square_frame(frame, None, self.data.size))
        except av.FFmpegError as exc:
            raise GenerateError(f"{path}: not a readable video ({str(exc).splitlines()[0]})") from None
        if not frames:
            raise GenerateError(f"{path}: the video has no frames")
        stride = self.data.reference_stride
        longest = max(1, int(seconds * self.data.fps / stride + 1e-9))
        idx = reference_indices(len(frames), stride, self.data.reference_frames, longest, self.frames_per_latent)
        video = torch.from_numpy(np.stack([frames[i] for i in idx])).float() / 127.5 - 1
        return video.permute(3, 0, 1, 2)[None]

    def read_audio(self, path: str | Path) -> torch.Tensor:
        try:
            audio = read_audio(str(path), self.data.sample_rate, CutStats())
        except SkipSource as exc:
            raise GenerateError(f"{path}: {exc}") from None
        except (av.FFmpegError, OSError) as exc:
            raise GenerateError(f"{path}: unreadable audio ({str(exc).splitlines()[0]})") from None
        wave = torch.from_numpy(audio.pcm.astype(np.float32) / 32768.0)
        if wave.numel() < self.data.sample_rate // self.data.fps:
            raise GenerateError(f"{path}: the audio is empty or shorter than one video frame")
        return wave

    # -- sampling -----------------------------------------------------------------------------------

    @torch.no_grad()
    def generate(self, reference: torch.Tensor, wave: torch.Tensor, options: GenerateOptions,
                 progress: bool = True) -> np.ndarray:
        """uint8 frames [N, S, S, 3] covering the audio."""
        options = self.resolve(options)
        if options.reference_share_tokens is not None:
            self.model.dit.set_reference_share(options.reference_share_tokens)
        text, mask = tokenize(options.caption, replace(self.data, text_max_len=self.model.text_encoder.cfg.max_len))
        scales = {"audio": options.guidance_audio, "reference": options.guidance_ref, "text": options.guidance_text}
        sampled = sample_windows(
            self.model, self.autoencoder, self.autoencoder.encode(reference.to(self.device)), wave[None],
            text[None], mask[None], frames_per_window=self.data.frames, size=self.data.size, fps=self.data.fps,
            sample_rate=self.data.sample_rate,
            velocity_fn=guided_velocity_fn(self.model, scales, {"text": options.guidance_text_interval}
                                           if options.guidance_text_interval else None),
            steps=options.steps, seeds=[options.seed], progress=progress,
        )
        return ((sampled.video[0].clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 3, 0).cpu().numpy()


def write_mp4(path: str | Path, frames: np.ndarray, fps: float, wave: torch.Tensor, sample_rate: int) -> None:
    """H.264 video + AAC audio (the audio trimmed to the video's length)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pcm = (wave.clamp(-1, 1).numpy() * 32767).astype(np.int16)[: int(len(frames) / fps * sample_rate)]
    with av.open(str(path), mode="w") as container:
        video = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001), options={"crf": "18"})
        video.width, video.height, video.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        audio = container.add_stream("aac", rate=sample_rate, layout="mono")
        for frame in frames:
            container.mux(video.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), "rgb24")))
        container.mux(video.encode())
        chunk = 1024
        for i in range(0, len(pcm), chunk):
            block = av.AudioFrame.from_ndarray(pcm[None, i:i + chunk], format="s16", layout="mono")
            block.sample_rate = sample_rate
            container.mux(audio.encode(block))
        container.mux(audio.encode())


def generate_file(checkpoint: str, reference: str, audio: str, out: str, options: GenerateOptions) -> dict[str, Any]:
    if options.steps is not None and options.steps < 1:
        raise GenerateError("--steps must be >= 1")
    interval = options.guidance_text_interval
    if interval is not None and not 0.0 <= interval[0] <= interval[1] <= 1.0:
        raise GenerateError(f"--guidance-text-interval must be LO HI with 0 <= LO <= HI <= 1 (1 = noise), got "
                            f"{list(interval)}")
    gen = Generator(checkpoint)
    ref, wave = gen.read_reference(reference, options.reference_seconds), gen.read_audio(audio)
    frames = gen.generate(ref, wave, options)
    write_mp4(out, frames, gen.data.fps, wave, gen.data.sample_rate)
    used = gen.resolve(options)
    return {"out": out, "frames": len(frames), "seconds": len(frames) / gen.data.fps, "stage": gen.stage,
            "kind": gen.kind, "steps": used.steps, "reference_frames": ref.shape[2], "reference_stride": gen.data.reference_stride}
