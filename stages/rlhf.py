"""Stage `rlhf`: optimise the distilled policy against the learned reward, anchored to the distilled policy.

Algorithms (options.algorithm):
- `grpo` (default; Flow-GRPO): per prompt a group of SDE rollouts (so each step has a Gaussian density),
  rewards from the frozen reward model, group-relative advantages, the clipped ratio objective on every
  step's transition, plus kl_coef * KL(policy step || distilled step) (closed form: same std).
- `dpo` (Diffusion-DPO, flow-matching form): the collected preference pairs; the policy's velocity error
  on the winner must drop relative to the distilled policy's more than on the loser.
- `reward_gradient`: backpropagate the reward through the few-step ODE sampler, plus kl_coef * the mean
  squared velocity difference to the distilled policy along the trajectory.

Success is judged by the oracle, not by the learned reward: every eval samples the held-out prompts with
the policy and with the distilled policy from the same noise and reports the pairwise oracle win rate next
to both rewards, so a reward rise the oracle does not share (reward hacking) shows.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file
from torch import nn

from avatarforge.data.config import DataConfig
from avatarforge.data.preferences import UtilityWeights, oracle_utility
from avatarforge.data.synth.oracle import score_batch, summarize
from avatarforge.model.flow import interpolate, sampling_timesteps
from avatarforge.model.grpo import flow_dpo_loss, gaussian_kl_same_std, group_advantages, grpo_policy_loss
from avatarforge.model.reward import RewardModel
from avatarforge.model.sde import sde_sample, transition_log_prob
from avatarforge.stages.avatar import ORACLE_KEYS, to_uint8_frames
from avatarforge.stages.clip_rollouts import (
    clip_prompts,
    clip_rollout,
    prompt_rows,
    whole_clip_latents,
    window_conditions,
)
from avatarforge.stages.common import FrozenAutoencoder, epoch_batches, parent_of_kind, typed
from avatarforge.stages.policy import PolicySampler, build_avatar_model, distill_steps
from avatarforge.stages.prompts import personality_identities, select, speech_prompts
from avatarforge.stages.quality import Prompt, score_prompts, to_uint8
from avatarforge.stages.reward import pair_set, preference_groups, reward_model_config
from avatarforge.stages.sampling import sample_windows

ALGORITHMS = ("grpo", "dpo", "reward_gradient")
REWARD_TERMS = ("full", "sync")
REWARD_SOURCES = ("learned", "oracle")
ROLLOUTS = ("window", "clip")


@dataclass
class RLHFOptions:
    algorithm: str = "grpo"
    sample_steps: int = 0  # 0: the distill stage's student_steps
    kl_coef: float = 0.1  # the anchor to the distilled policy; 0 = off (see the reward-hacking check)
    # what is optimised: the reward model's whole score, or only its sync head (lip-sync perception trained
    # on ground-truth clips, which ranks generated clips where the preference-trained part does not)
    reward_terms: str = "full"
    # "learned": the reward_model parent (the stage's purpose); "oracle": the synthetic world's oracle utility
    # of each decoded rollout (the rater's utility, without its noise), a diagnostic upper bound: what the
    # optimiser does with a perfect reward model, so a failure can be put on the reward or on the optimiser.
    # Needs rollout "clip" (whole clips of known truth); the evals still report the learned reward.
    reward_source: str = "learned"
    # score encode(decode(x)) instead of the raw latents x: a reward gradient otherwise finds latent
    # directions the decoder ignores (or renders as something else) that the reward model was never shown
    reward_round_trip: bool = False
    # grpo
    group_size: int = 4
    noise_level: float = 0.7  # SDE noise (Flow-GRPO's a)
    clip_range: float = 1e-3  # per-element (mean) log-probs move ~1e-3 per update here, so the range is small
    log_prob_reduce: str = "mean"  # per-element log-densities keep ratios near 1 for large latents
    inner_updates: int = 1  # optimizer steps per rollout batch; > 1 makes the ratio (and clipping) bite
    train_timesteps: int = 0  # rollout steps trained on per update, drawn at random (Flow-GRPO's
    #                           timestep fraction); 0 = all
    # "window": one window of data.frames frames per rollout (cheap); "clip": training clips' whole speech
    # sampled in windows as `generate` does (stages/clip_rollouts.py), rewarded as whole clips; with
    # train_timesteps > 0 that many (window, step) transitions per update
    rollout: str = "window"
    train_prompts: int = 32  # train-split speech prompts of the fine-tuned identities
    # rollout "clip": seconds of each identity's reference record the rollouts and evals condition on
    # (`generate` reads up to 16 s; training records hold data.synth.reference_seconds); 0 = the training length
    rollout_reference_seconds: float = 0.0
    # dpo
    dpo_beta: float = 200.0
    # evaluation on held-out speech: policy vs distilled policy from the same noise
    eval_prompts: int = 16
    eval_videos: int = 4

    def validate(self) -> list[str]:
        errors = []
        if self.reward_terms not in REWARD_TERMS:
            errors.append(f"reward_terms: must be one of {REWARD_TERMS}, got {self.reward_terms!r}")
        if self.reward_source not in REWARD_SOURCES:
            errors.append(f"reward_source: must be one of {REWARD_SOURCES}, got {self.reward_source!r}")
        elif self.reward_source == "oracle" and (self.algorithm != "grpo" or self.rollout != "clip"):
            errors.append("reward_source: 'oracle' scores whole decoded clips: it needs algorithm grpo, rollout clip")
        if self.algorithm not in ALGORITHMS:
            errors.append(f"algorithm: must be one of {ALGORITHMS}, got {self.algorithm!r}")
        if self.rollout not in ROLLOUTS:
            errors.append(f"rollout: must be one of {ROLLOUTS}, got {self.rollout!r}")
        elif self.rollout == "clip" and self.algorithm != "grpo":
            errors.append("rollout: 'clip' is for algorithm grpo")
        if self.algorithm == "grpo" and (self.group_size < 2 or self.noise_level <= 0):
            errors.append("group_size, noise_level: grpo needs group_size >= 2 and noise_level > 0")
        if self.kl_coef < 0:
            errors.append("kl_coef: must be >= 0")
        if self.inner_updates < 1:
            errors.append("inner_updates: must be >= 1")
        if self.rollout_reference_seconds < 0 or (self.rollout_reference_seconds and self.rollout != "clip"):
            errors.append("rollout_reference_seconds: must be >= 0, and is for rollout 'clip'")
        if self.train_timesteps < 0:
            errors.append("train_timesteps: must be >= 0")
        if self.log_prob_reduce not in ("sum", "mean"):
            errors.append("log_prob_reduce: sum or mean")
        return errors


class RLHFTask:
    def __init__(self, args: dict[str, Any]) -> None:
        config, stage = args["config"], args["stage"]
        self.args, self.config, self.stage = args, config, stage
        self.options: RLHFOptions = typed(RLHFOptions, config["stages"][stage]["options"])
        if self.options.validate():
            raise ValueError("; ".join(self.options.validate()))
        self.data = typed(DataConfig, config["data"])
        self.batch_size = config["stages"][stage]["train"]["batch_size"]  # prompts (grpo) or pairs (dpo)
        self.seed = int(config["seed"])
        self.policy_weights = parent_of_kind(args, "distill")
        self.autoencoder = FrozenAutoencoder(config["model"]["autoencoder"], parent_of_kind(args, "autoencoder"))
        self.sampler = PolicySampler(self.autoencoder, self.data, distill_steps(config, stage, self.options.sample_steps))
        self.anchor = build_avatar_model(config, self.policy_weights).eval().requires_grad_(False)
        reward_stage = [p for p in config["stages"][stage]["needs"] if config["stages"][p]["kind"] == "reward_model"]
        if len(reward_stage) != 1:
            raise ValueError(f"stage {stage!r} needs exactly one reward_model parent, found {reward_stage}")
        self.reward = RewardModel(reward_model_config(config, reward_stage[0]))
        self.reward.load_state_dict(load_file(args["parent_weights"][reward_stage[0]]))
        self.reward.eval().requires_grad_(False)
        if self.options.reward_terms == "sync" and self.reward.sync is None:
            raise ValueError(f"stage {stage!r}: reward_terms=sync needs a reward model with model.sync.enabled")
        self.identities = personality_identities(config, self.data)
        self.utility = rater_utility(config, stage)
        self._train_prompts: list[dict[str, Any]] | None = None
        self._truth: dict[str, Prompt] = {}  # rollout clip: prompt id -> its prompt (truth for reward_source oracle)
        self._eval_prompts: list[dict[str, Any]] | None = None
        self._pairs = None
        self._rollout: tuple[list[str], Any, torch.Tensor] | None = None  # GRPO: (prompt ids, trajectory, rewards)
        every = config["stages"][stage]["train"]["checkpoint"]["every_steps"]
        if self.options.inner_updates > 1 and every % self.options.inner_updates:
            # a resume must start at a fresh rollout: the old log-probs of a half-used one are gone
            raise ValueError(f"stage {stage!r}: train.checkpoint.every_steps ({every}) must be a multiple of "
                             f"options.inner_updates ({self.options.inner_updates})")

    # -- model --------------------------------------------------------------------------------------

    def build_model(self) -> nn.Module:
        return build_avatar_model(self.config)

    def init_from_parents(self, model: nn.Module) -> None:
        model.load_state_dict(load_file(self.policy_weights))

    # -- data ---------------------------------------------------------------------------------------

    def rollout_reference_seconds(self) -> float | None:
        """None (the training length) unless options.rollout_reference_seconds asks for more."""
        return self.options.rollout_reference_seconds or None

    def train_prompts(self) -> list[dict[str, Any]]:
        if self._train_prompts is None and self.options.rollout == "clip":
            prompts = clip_prompts(self.data, self.identities, split=self.data.train_split,
                                   count=self.options.train_prompts, reference_seconds=self.rollout_reference_seconds())
            self._train_prompts = prompt_rows(prompts, self.data)
            self._truth = {row["prompt_id"][0]: p for row, p in zip(self._train_prompts, prompts, strict=True)}
        if self._train_prompts is None:
            self._train_prompts = speech_prompts(self.data, self.identities, split=self.data.train_split,
                                                 count=self.options.train_prompts, batch_size=1)
        return self._train_prompts

    def train_batches(self, *, rank: int, world_size: int, start_batch: int) -> Iterator[Any]:
        if self.options.algorithm == "dpo":
            if self._pairs is None:
                self._pairs = pair_set([g for g in preference_groups(self.args) if g.meta["split"] == "train"])
            source, make = self._pairs, self._pairs.batch
        else:
            rows = self.train_prompts()
            source = rows

            def make(index: list[int]) -> dict[str, Any]:
                return merge_rows([rows[i] for i in index])
        repeat = self.options.inner_updates if self.options.algorithm == "grpo" else 1
        first, skip = divmod(start_batch, repeat)
        for index in epoch_batches(len(source), self.batch_size, seed=self.seed, rank=rank,
                                   world_size=world_size, start_batch=first):
            for update in range(skip, repeat):  # GRPO: the same prompts (and rollouts) `repeat` times
                yield {**make(index), "update": update}
            skip = 0

    def batch_stats(self, batch: Any) -> tuple[int, int]:
        if self.options.algorithm == "dpo":
            return batch["chosen"].shape[0], 0
        n = batch["text"].shape[0]
        return n * (self.options.group_size if self.options.algorithm == "grpo" else 1), 0

    # -- losses -------------------------------------------------------------------------------------

    def loss(self, model: nn.Module, batch: Any) -> tuple[torch.Tensor, dict[str, float]]:
        if self.options.algorithm == "grpo":
            return self.grpo_loss(model, batch)
        if self.options.algorithm == "dpo":
            return self.dpo_loss(model, batch)
        return self.reward_gradient_loss(model, batch)

    def rewards(self, latents: torch.Tensor, rows: dict[str, Any], ref_latents: torch.Tensor) -> torch.Tensor:
        wave = rows["audio"].to(latents.device)
        if self.options.reward_round_trip:
            latents = self.autoencoder.round_trip(latents)
        if self.options.reward_terms == "sync":
            return self.reward.sync(latents, self.reward.encode_audio(wave, latents.shape[2])).float()
        return self.reward(latents, wave, ref_latents)

    def grpo_loss(self, model: nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
        o, device = self.options, batch["text"].device
        n, g = batch["text"].shape[0], o.group_size
        rows = select(batch, [i for i in range(n) for _ in range(g)])
        ref_latents = self.sampler.reference_latents(rows, device)
        if o.rollout == "clip":
            return self.grpo_clip_loss(model, batch, rows, ref_latents)
        if self.fresh_rollout(batch):
            with torch.no_grad():  # rollouts from the current policy; noise from the (checkpointed) global RNG
                cond_old = self.sampler.conditions(model, rows, device, ref_latents)
                shape = self.sampler.latent_shape(n * g)
                traj = sde_sample(model, shape, self.sampler.steps, o.noise_level, device=device,
                                  reduce=o.log_prob_reduce, **cond_old)
                rewards = self.rewards(traj.samples, rows, ref_latents)
            self._rollout = (batch["prompt_id"], traj, rewards)
        _, traj, rewards = self._rollout  # later inner updates reuse the rollout (old log-probs included)
        with torch.no_grad():
            cond_anchor = self.sampler.conditions(self.anchor, rows, device, ref_latents)
        cond = self.sampler.conditions(model, rows, device, ref_latents)  # with grad: encoders are policy
        ts = traj.timesteps

        def transition(i: int) -> tuple:
            return (traj.latents[i], traj.latents[i + 1], ts[i], ts[i + 1], traj.log_probs[:, i], cond, cond_anchor)

        return self.grpo_objective(model, traj.steps, transition, rewards, traj.samples)

    def grpo_clip_loss(self, model: nn.Module, batch: dict[str, Any], rows: dict[str, Any],
                       ref_latents: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """GRPO on whole-clip rollouts: rewards of the whole clips, the clipped objective and the KL on
        `train_timesteps` random (window, step) transitions (all if 0)."""
        o = self.options
        self.anchor.to(ref_latents.device)
        if self.fresh_rollout(batch):
            # noise from the (checkpointed) global RNG, so a resumed run draws what the first one would have
            seeds = torch.randint(0, 2**31 - 1, (len(rows["prompt_id"]),)).tolist()
            step_noise = torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, (1,))))
            with torch.no_grad():
                roll = clip_rollout(model, self.autoencoder, ref_latents, rows, self.data, steps=self.sampler.steps,
                                    noise_level=o.noise_level, reduce=o.log_prob_reduce, seeds=seeds,
                                    generator=step_noise)
                if o.reward_source == "oracle":
                    rewards = self.oracle_rewards(roll.video, rows["prompt_id"]).to(ref_latents.device)
                else:
                    latents, wave = whole_clip_latents(self.autoencoder, roll.video, rows["audio"], self.data)
                    rewards = self.rewards(latents, {"audio": wave}, ref_latents)
            self._rollout = (batch["prompt_id"], roll, rewards)
        _, roll, rewards = self._rollout
        reference = model.encode_reference(ref_latents)  # with grad: the encoders are policy
        with torch.no_grad():
            anchor_reference = self.anchor.encode_reference(ref_latents)

        def transition(j: int) -> tuple:
            tr = roll.transitions[j]
            with torch.no_grad():
                cond_anchor = window_conditions(self.anchor, rows, tr, self.data, anchor_reference)
            return (tr.x, tr.x_next, tr.t, tr.t_next, tr.log_prob,
                    window_conditions(model, rows, tr, self.data, reference), cond_anchor)

        return self.grpo_objective(model, len(roll.transitions), transition, rewards, roll.video)

    def oracle_rewards(self, video: torch.Tensor, prompt_ids: list[str]) -> torch.Tensor:
        """reward_source oracle: the oracle utility of each decoded clip [B, 3, T, H, W] against its prompt."""
        scores = score_prompts([to_uint8(v) for v in video.cpu()], [self._truth[p] for p in prompt_ids], self.data)
        return torch.tensor([oracle_utility(s, self.utility) for s in scores], dtype=torch.float32)

    def fresh_rollout(self, batch: dict[str, Any]) -> bool:
        """A batch's first inner update samples new rollouts; the later ones reuse them (and their old
        log-probs), unless a resume lost them."""
        return batch["update"] == 0 or self._rollout is None or self._rollout[0] != batch["prompt_id"]

    def grpo_objective(self, model: nn.Module, n_transitions: int, transition: Callable[[int], tuple],
                       rewards: torch.Tensor, samples: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """The clipped ratio objective + kl_coef * KL to the distilled policy, averaged over `train_timesteps`
        random transitions of the rollouts (all if 0). transition(i) -> (x, x_next, t, t_next, old log-prob,
        the policy's conditions, the anchor's conditions); samples: the rollouts' results, for diversity."""
        o, g = self.options, self.options.group_size
        advantages = group_advantages(rewards, g)
        chosen = range(n_transitions)
        if 0 < o.train_timesteps < n_transitions:
            chosen = sorted(torch.randperm(n_transitions)[: o.train_timesteps].tolist())
        total = torch.zeros((), device=samples.device)
        stats: dict[str, float] = {}
        for i in chosen:
            x, x_next, t, t_next, old_log_prob, cond, cond_anchor = transition(i)
            log_prob, mean, std = transition_log_prob(model, x, x_next, t, t_next, o.noise_level,
                                                      reduce=o.log_prob_reduce, **cond)
            policy_loss, metrics = grpo_policy_loss(log_prob, old_log_prob, advantages, o.clip_range)
            with torch.no_grad():
                _, mean_anchor, _ = transition_log_prob(self.anchor, x, x_next, t, t_next, o.noise_level,
                                                        reduce=o.log_prob_reduce, **cond_anchor)
            kl = gaussian_kl_same_std(mean, mean_anchor, std, reduce=o.log_prob_reduce).mean()
            total = total + (policy_loss + o.kl_coef * kl) / len(chosen)
            for k, v in {**metrics, "kl": kl}.items():
                stats[k] = stats.get(k, 0.0) + float(v.detach()) / len(chosen)
        flat = samples.flatten(1).view(-1, g, samples[0].numel())
        diversity = torch.cdist(flat, flat).sum() / (flat.shape[0] * g * (g - 1)) / flat.norm(dim=-1).mean()
        stats.update({"reward": float(rewards.mean()), "reward_std": float(rewards.std()),
                      "diversity": float(diversity)})
        return total, {f"train/{k}": v for k, v in stats.items()}

    def dpo_loss(self, model: nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
        """Diffusion-DPO on the collected pairs: winner and loser share t and noise; errors are per-sample
        velocity MSEs of the policy and of the frozen distilled policy."""
        device = batch["chosen"].device
        b = batch["chosen"].shape[0]
        x0 = torch.cat([batch["chosen"], batch["rejected"]])
        t = torch.rand(b, device=device).repeat(2)
        noise = torch.randn_like(batch["chosen"]).repeat(2, 1, 1, 1, 1)
        x_t = interpolate(x0, noise, t)
        rows = {k: torch.cat([batch[k]] * 2) for k in ("audio", "text", "text_mask")}
        ref = torch.cat([batch["reference"]] * 2)

        def errors(m: nn.Module) -> torch.Tensor:
            v = m(x_t, t, **self.sampler.conditions(m, rows, device, ref))
            return (v.float() - (noise - x0).float()).pow(2).flatten(1).mean(1)

        err = errors(model)
        with torch.no_grad():
            err_anchor = errors(self.anchor)
        loss, metrics = flow_dpo_loss(err[:b], err_anchor[:b], err[b:], err_anchor[b:], self.options.dpo_beta)
        return loss, {f"train/{k}": float(v) for k, v in metrics.items() if k != "loss"}

    def reward_gradient_loss(self, model: nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
        device = batch["text"].device
        ref_latents = self.sampler.reference_latents(batch, device)
        cond = self.sampler.conditions(model, batch, device, ref_latents)
        with torch.no_grad():
            cond_anchor = self.sampler.conditions(self.anchor, batch, device, ref_latents)
        x = torch.randn(self.sampler.latent_shape(batch["text"].shape[0]), device=device)
        ts = sampling_timesteps(self.sampler.steps, device=device)
        drift = torch.zeros((), device=device)
        for i in range(self.sampler.steps):
            t = ts[i].expand(x.shape[0])
            v = model(x, t, **cond)
            with torch.no_grad():
                v_anchor = self.anchor(x, t, **cond_anchor)
            drift = drift + (v - v_anchor).pow(2).mean() / self.sampler.steps
            x = x + (ts[i + 1] - ts[i]) * v
        reward = self.rewards(x, batch, ref_latents).mean()
        loss = -reward + self.options.kl_coef * drift
        return loss, {"train/reward": float(reward), "train/kl": float(drift)}

    # -- evaluation ---------------------------------------------------------------------------------

    def eval_prompts(self) -> list[dict[str, Any]]:
        if self._eval_prompts is None and self.options.rollout == "clip":  # whole clips, batches of 8
            prompts = clip_prompts(self.data, self.identities, split=self.data.eval_split,
                                   count=self.options.eval_prompts, reference_seconds=self.rollout_reference_seconds())
            self._eval_prompts = [{**merge_rows(prompt_rows(prompts[i:i + 8], self.data)), "prompts": prompts[i:i + 8]}
                                  for i in range(0, len(prompts), 8)]
        if self._eval_prompts is None:
            self._eval_prompts = speech_prompts(self.data, self.identities, split=self.data.eval_split,
                                                count=self.options.eval_prompts, batch_size=8)
        return self._eval_prompts

    def sample_policy(self, model: nn.Module, batch: dict[str, Any],
                      device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Decoded ODE samples [B, 3, T, H, W] from per-prompt seeded noise (the same for every policy) and
        their learned rewards: one window, or (rollout clip) the whole clip in windows as `generate`."""
        seeds = [self.seed * 100003 + hash_id(pid) for pid in batch["prompt_id"]]
        ref_latents = self.sampler.reference_latents(batch, device)
        if self.options.rollout == "clip":
            d = self.data
            video = sample_windows(model, self.autoencoder, ref_latents, batch["audio"].to(device),
                                   batch["text"], batch["text_mask"], frames_per_window=d.frames, size=d.size,
                                   fps=d.fps, sample_rate=d.sample_rate, steps=self.sampler.steps, seeds=seeds).video
            latents, wave = whole_clip_latents(self.autoencoder, video, batch["audio"].to(device), d)
            return video, self.rewards(latents, {"audio": wave}, ref_latents)
        cond = self.sampler.conditions(model, batch, device, ref_latents)
        latents = self.sampler.sample(model, cond, self.sampler.noise(seeds, device))
        return self.sampler.decode(latents), self.rewards(latents, batch, ref_latents)

    def score(self, video: torch.Tensor, batch: dict[str, Any]) -> list[dict[str, float]]:
        if "prompts" in batch:  # whole clips: stages.quality's prompts hold their truth
            return score_prompts([to_uint8(v) for v in video.cpu()], batch["prompts"], self.data)
        return score_batch(video.cpu(), batch, sample_rate=self.data.sample_rate, fps=self.data.fps,
                           use_references=False)

    def evaluate(self, model: nn.Module) -> dict[str, Any]:
        """Held-out prompts (rollout clip: whole clips): policy vs distilled policy from the same noise, judged
        by the oracle."""
        device = next(model.parameters()).device
        utility = self.utility
        wins, rewards, anchor_rewards, scores, anchor_scores, samples = [], [], [], [], [], []
        for batch in self.eval_prompts():
            video, rew = self.sample_policy(model, batch, device)
            video_a, rew_a = self.sample_policy(self.anchor.to(device), batch, device)
            s, s_a = self.score(video, batch), self.score(video_a, batch)
            for mine, theirs in zip(s, s_a, strict=True):
                u, u_a = oracle_utility(mine, utility), oracle_utility(theirs, utility)
                wins.append(1.0 if u > u_a else 0.5 if u == u_a else 0.0)
            scores += s
            anchor_scores += s_a
            rewards += rew.tolist()
            anchor_rewards += rew_a.tolist()
            if len(samples) < self.options.eval_videos:
                samples += [torch.cat([a, b], dim=-2) for a, b in zip(video.cpu(), video_a.cpu(), strict=True)]
        out: dict[str, Any] = {
            "oracle_win_rate": float(np.mean(wins)),
            "reward": float(np.mean(rewards)),
            "reward_distilled": float(np.mean(anchor_rewards)),
            "oracle_utility": float(np.mean([oracle_utility(s, utility) for s in scores])),
            "oracle_utility_distilled": float(np.mean([oracle_utility(s, utility) for s in anchor_scores])),
        }
        mine, theirs = summarize(scores), summarize(anchor_scores)
        out.update({f"oracle/{k}": mine[k] for k in ORACLE_KEYS if k in mine})
        out.update({f"oracle_distilled/{k}": theirs[k] for k in ORACLE_KEYS if k in theirs})
        if samples:  # policy above, distilled below, prompts side by side
            out["samples"] = to_uint8_frames(torch.cat(samples[: self.options.eval_videos], dim=-1))
        return out


def rater_utility(config: dict[str, Any], stage: str) -> UtilityWeights:
    """The oracle utility the preference rater used (so eval wins mean what the labels meant), else defaults."""
    from avatarforge.stages.preferences import PreferenceOptions

    for parent in config["stages"][stage]["needs"]:
        if config["stages"][parent]["kind"] == "preference_collect":
            return typed(PreferenceOptions, config["stages"][parent]["options"]).rater.utility
    return UtilityWeights()


def hash_id(text: str) -> int:
    import zlib

    return zlib.crc32(text.encode())


PROMPT_TENSORS = ("audio", "text", "text_mask", "reference")


def merge_rows(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Single-prompt batches -> one training batch of what the policy is conditioned on."""
    out: dict[str, Any] = {k: torch.cat([r[k] for r in rows]) for k in PROMPT_TENSORS}
    out["prompt_id"] = [x for r in rows for x in r["prompt_id"]]
    return out


def build_task(args: dict[str, Any]) -> RLHFTask:
    return RLHFTask(args)
