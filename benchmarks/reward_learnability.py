"""Can a reward model learn the oracle's preferences? A probe on a finished run, outside the curriculum.

    .venv/bin/python benchmarks/reward_learnability.py runs/tiny [--prompts 48 --seeds 4 --steps 80]

1. Groups: `--prompts` training speeches (whole 1.6 s clips) given to the fine-tuned identities, `--seeds`
   videos each from the distilled student, windowed as `generate` samples them; the oracle scores them.
   Pairs within a group are ordered by the noiseless oracle utility, 10% flipped (the rater's noise).
2. The curriculum's reward model (model/reward.py, the run's reward stage config, audio encoder from the
   policy) trained with Bradley-Terry, 4-fold cross-validation over prompts: held-out pair accuracy against
   the noiseless utility order and against the lip-sync order, on the whole clips and on their first window.
3. A SyncNet-shaped probe: centred per-latent-frame mouth-region features dotted with centred per-frame audio
   features, trained contrastively on the ground-truth training clips only (aligned audio preferred over
   the same clip's audio shifted by 2-5 latent frames and over another clip's), then asked zero-shot to
   rank the generated groups. It never sees a preference label.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file
from torch import nn

from avatarforge.data.preferences import oracle_utility
from avatarforge.model.audio import AudioEncoder, AudioEncoderConfig
from avatarforge.model.reward import RewardModel, bradley_terry_loss
from avatarforge.stages import quality as q
from avatarforge.stages.common import typed
from avatarforge.stages.generate import Generator
from avatarforge.stages.prompts import personality_identities
from avatarforge.stages.reward import reward_model_config


def odd_frames(video: np.ndarray) -> torch.Tensor:
    """uint8 [T, H, W, 3] -> [3, T', H, W] in [-1, 1] with T' = 1 + 2k frames (what the autoencoder takes)."""
    t = 1 + 2 * ((len(video) - 1) // 2)
    return torch.from_numpy(video[:t]).float().permute(3, 0, 1, 2) / 127.5 - 1


def pair_accuracy(scores: np.ndarray, truth: np.ndarray, prompts: list[int]) -> float:
    """Share of within-group pairs of `prompts` that scores [P, S] order like truth [P, S] (ties skipped)."""
    right = n = 0
    for p in prompts:
        for a in range(truth.shape[1]):
            for b in range(a + 1, truth.shape[1]):
                d = truth[p, a] - truth[p, b]
                if np.isfinite(d) and abs(d) > 1e-6:
                    right += (scores[p, a] - scores[p, b]) * d > 0
                    n += 1
    return right / max(n, 1)


class SyncProbe(nn.Module):
    """Centred mouth features . centred audio features per latent frame, averaged: a correlation-shaped score."""

    def __init__(self, audio: AudioEncoderConfig, latent_channels: int, rows: slice, cols: slice) -> None:
        super().__init__()
        self.rows, self.cols = rows, cols
        size = latent_channels * (rows.stop - rows.start) * (cols.stop - cols.start)
        self.audio = AudioEncoder(audio)
        self.video_head = nn.Sequential(nn.Linear(size, 128), nn.GELU(), nn.Linear(128, 32))
        self.audio_head = nn.Sequential(nn.Linear(audio.dim, 128), nn.GELU(), nn.Linear(128, 32))

    def features(self, latents: torch.Tensor, wave: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, _, t = latents.shape[:3]
        mouth = latents[..., self.rows, self.cols].permute(0, 2, 1, 3, 4).reshape(b, t, -1)
        win = self.audio.windows(self.audio(wave), t, 1)
        mask = win.mask.float().unsqueeze(-1)
        return self.video_head(mouth), self.audio_head((win.tokens * mask).sum(2) / mask.sum(2).clamp_min(1))

    @staticmethod
    def score(video: torch.Tensor, audio: torch.Tensor) -> torch.Tensor:
        video, audio = video - video.mean(1, keepdim=True), audio - audio.mean(1, keepdim=True)
        return (video * audio).sum(-1).mean(1)

    def forward(self, latents: torch.Tensor, wave: torch.Tensor) -> torch.Tensor:
        return self.score(*self.features(latents, wave))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", nargs="?", default="runs/tiny")
    parser.add_argument("--prompts", type=int, default=48)
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--steps", type=int, default=80, help="reward model steps per fold")
    parser.add_argument("--probe-steps", type=int, default=100)
    args = parser.parse_args()
    torch.manual_seed(0)
    run = Path(args.run_dir)
    student = Generator(run / "stages" / "distill")
    cfg = OmegaConf.to_container(OmegaConf.load(run / "config.yaml"), resolve=True)
    world = q.eval_world(student.data, f"{student.data.root}-quality", heldout_identities=8, reference_seconds=16.0)
    speeches, _ = q.read_world(world, world.train_split)
    targets = personality_identities(cfg, world)
    tuned = q.read_identities(world, world.train_split, targets)
    prompts = q.make_prompts(q.spread(speeches, args.prompts), tuned, world, count=args.prompts, targets=targets)
    policy = q.Policy("distilled", student.model, steps=student.defaults["steps"])
    ae, n, s = student.autoencoder, len(prompts), args.seeds

    # 1. groups
    latents, scores = [], []
    with torch.no_grad(), q.Scorer(world, workers=1) as scorer:
        for k in range(s):
            sampled, got = q.sample_and_score(policy, ae, prompts, world, scorer, seed=1000 * k, batch_size=16)
            scores.append(got)
            latents.append(torch.stack([ae.encode(odd_frames(v)[None])[0] for v in sampled.videos]))
        reference = torch.stack([ae.encode(p.reference[:, :9][None].float())[0] for p in prompts])
    lat = torch.stack(latents, dim=1)  # [P, S, C, T, H, W]
    samples = int(round(lat.shape[3] * 2 / world.fps * world.sample_rate))
    wave = torch.stack([torch.nn.functional.pad(p.wave, (0, max(0, samples - len(p.wave))))[:samples] for p in prompts])
    utility = np.array([[oracle_utility(scores[k][p]) for k in range(s)] for p in range(n)])
    lip = np.array([[scores[k][p].get("lipsync_corr", np.nan) for k in range(s)] for p in range(n)])
    flip = np.random.default_rng(0)
    pairs = [(p, a, b) if utility[p, a] > utility[p, b] else (p, b, a) for p in range(n) for a in range(s)
             for b in range(a + 1, s) if abs(utility[p, a] - utility[p, b]) > 1e-6]
    pairs = [(p, b, a) if flip.random() < 0.1 else (p, a, b) for p, a, b in pairs]
    report = {"prompts": n, "seeds": s, "frames": prompts[0].frames, "pairs": len(pairs)}

    # 2. the reward model, cross-validated over prompts
    policy_state = load_file(str(run / "stages" / "distill" / "weights.safetensors"))
    for clip, (x, w) in {"whole": (lat, wave), "first_window": (lat[:, :, :, :5], wave[:, :5760])}.items():
        rows = []
        for fold in range(4):
            torch.manual_seed(fold)
            rng = np.random.default_rng(fold)
            train = [pair for pair in pairs if pair[0] % 4 != fold]
            held = [p for p in range(n) if p % 4 == fold]
            model = RewardModel(reward_model_config(cfg, "reward"))
            model.load_audio_encoder(policy_state)
            opt = torch.optim.AdamW(model.parameters(), lr=5e-4, weight_decay=0.05)
            for _ in range(args.steps):
                batch = [train[i] for i in rng.choice(len(train), 16)]
                p, a, b = (torch.tensor(c) for c in zip(*batch, strict=True))
                r = model(torch.cat([x[p, a], x[p, b]]), torch.cat([w[p], w[p]]),
                          torch.cat([reference[p], reference[p]])).view(2, -1)
                loss, _ = bradley_terry_loss(r[0], r[1])
                opt.zero_grad()
                loss.backward()
                opt.step()
            with torch.no_grad():
                out = model(x.flatten(0, 1), w.repeat_interleave(s, 0), reference.repeat_interleave(s, 0))
            out = out.view(n, s).numpy()
            rows.append((pair_accuracy(out, utility, held), pair_accuracy(out, lip, held)))
        report[f"reward_model_{clip}"] = {"heldout_utility": float(np.mean([r[0] for r in rows])),
                                          "heldout_lipsync": float(np.mean([r[1] for r in rows]))}
        print(clip, report[f"reward_model_{clip}"], flush=True)

    # 3. the sync probe: ground-truth clips only, then zero-shot on the groups
    with torch.no_grad():
        gt = torch.stack([ae.encode(odd_frames(sp.video)[None])[0] for sp in speeches])
    gt_wave = torch.stack([torch.nn.functional.pad(sp.wave, (0, max(0, samples - len(sp.wave))))[:samples]
                           for sp in speeches])
    h, wd = lat.shape[-2:]
    probe = SyncProbe(typed(AudioEncoderConfig, cfg["model"]["audio"]), lat.shape[2], slice(round(0.45 * h), round(0.8 * h)),
                      slice(round(0.25 * wd), round(0.75 * wd)))
    probe.audio.load_state_dict({k.removeprefix("audio_encoder."): v for k, v in policy_state.items()
                                 if k.startswith("audio_encoder.")})
    opt = torch.optim.AdamW(probe.parameters(), lr=5e-4, weight_decay=0.05)
    rng, crop, t = np.random.default_rng(0), min(10, gt.shape[2] - 6), gt.shape[2]
    for _ in range(args.probe_steps):
        idx = torch.tensor(rng.integers(0, len(gt), 16))
        video, audio = probe.features(gt[idx], gt_wave[idx])
        start = rng.integers(0, t - crop + 1, 16)
        shifted = np.clip(start + rng.choice([-1, 1], 16) * rng.integers(2, 6, 16), 0, t - crop)

        def window(x: torch.Tensor, at: np.ndarray, order: list[int]) -> torch.Tensor:
            return torch.stack([x[j, at[i]:at[i] + crop] for i, j in enumerate(order)])

        own = list(range(16))
        v = window(video, start, own)
        aligned = SyncProbe.score(v, window(audio, start, own))
        loss = (bradley_terry_loss(aligned, SyncProbe.score(v, window(audio, shifted, own)))[0]
                + bradley_terry_loss(aligned, SyncProbe.score(v, window(audio, start, own[1:] + own[:1])))[0])
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        out = probe(lat.flatten(0, 1), wave.repeat_interleave(s, 0)).view(n, s).numpy()
    report["sync_probe_zero_shot"] = {"utility": pair_accuracy(out, utility, list(range(n))),
                                      "lipsync": pair_accuracy(out, lip, list(range(n))),
                                      "ground_truth_clips": len(gt)}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
