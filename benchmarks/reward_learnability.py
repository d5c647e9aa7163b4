"""Can a reward model learn the oracle's preferences? A probe on a finished run, outside the curriculum.

    .venv/bin/python benchmarks/reward_learnability.py runs/tiny [--prompts 48 --seeds 4 --steps 80]

1. Groups: `--prompts` training speeches (whole 1.6 s clips) given to the fine-tuned identities, `--seeds`
   videos each from the distilled student, windowed as `generate` samples them; the oracle scores them.
   Pairs within a group are ordered by the noiseless oracle utility, 10% flipped (the rater's noise).
2. The curriculum's reward model without its sync head (model/reward.py, the run's reward stage config,
   audio encoder from the policy) trained with Bradley-Terry on the pairs alone, 4-fold cross-validation over prompts: held-out pair accuracy against
   the noiseless utility order and against the lip-sync order, on the whole clips and on their first window.
3. The reward model's sync head alone (model.reward.SyncHead: centred per-latent-frame mouth-region features
   dotted with centred audio features), trained with sync_contrastive_loss on the ground-truth training
   clips only (aligned audio preferred over the same clip's shifted audio and over another clip's), then
   asked zero-shot to rank the generated groups. It never sees a preference label.
4. The run's own reward stage (its exported weights; tiny: sync pretraining, then Bradley-Terry on the 9-frame
   preference pairs) ranking the same groups.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file

from avatarforge.data.preferences import oracle_utility
from avatarforge.model.reward import RewardModel, SyncConfig, bradley_terry_loss, sync_contrastive_loss
from avatarforge.stages import quality as q
from avatarforge.stages.generate import Generator
from avatarforge.stages.prompts import personality_identities
from avatarforge.stages.reward import encode_clips, reward_model_config


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
            latents.append(torch.cat([ae.encode(q.to_float(v[: ae.encodable_frames(len(v))])[None])
                                      for v in sampled.videos]))
        reference = torch.stack([ae.encode(p.reference[:, :9][None].float())[0] for p in prompts])
    lat = torch.stack(latents, dim=1)  # [P, S, C, T, H, W]
    samples = round(prompts[0].frames * world.sample_rate / world.fps)  # the clips' whole audio
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
            model = RewardModel(replace(reward_model_config(cfg, "reward"), sync=SyncConfig(enabled=False)))
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
    gt, gt_wave = encode_clips(ae, speeches, world)
    # the reward model's own sync head (model/reward.py), trained alone: only its sync loss has gradients there
    probe = RewardModel(replace(reward_model_config(cfg, "reward"), sync=SyncConfig(enabled=True)))
    probe.load_audio_encoder(policy_state)
    opt = torch.optim.AdamW(probe.parameters(), lr=5e-4, weight_decay=0.05)
    crop = min(10, gt.shape[2] - 4)
    for step in range(args.probe_steps):
        idx = torch.randint(0, len(gt), (16,), generator=torch.Generator().manual_seed(step))
        loss, _ = sync_contrastive_loss(probe, gt[idx], gt_wave[idx], crop=crop,
                                        generator=torch.Generator().manual_seed(10_000 + step))
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        flat = lat.flatten(0, 1)
        out = probe.sync(flat, probe.encode_audio(wave.repeat_interleave(s, 0), flat.shape[2])).view(n, s).numpy()
    report["sync_probe_zero_shot"] = {"utility": pair_accuracy(out, utility, list(range(n))),
                                      "lipsync": pair_accuracy(out, lip, list(range(n))),
                                      "ground_truth_clips": len(gt)}
    stage = run / "stages" / "reward"
    trained = RewardModel(reward_model_config(cfg, "reward"))
    trained.load_state_dict(load_file(str(stage / "weights.safetensors")))
    with torch.no_grad():
        out = trained.eval()(flat, wave.repeat_interleave(s, 0), reference.repeat_interleave(s, 0)).view(n, s).numpy()
    report["run_reward_stage"] = {"utility": pair_accuracy(out, utility, list(range(n))),
                                  "lipsync": pair_accuracy(out, lip, list(range(n))),
                                  "sync_head": trained.sync is not None}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
