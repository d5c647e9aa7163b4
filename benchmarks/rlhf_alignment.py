"""Alignment report of a finished curriculum run: every rlhf-kind stage against the distilled policy.

Each rlhf stage's final eval sampled the held-out prompts (fine-tuned identities, held-out speech) with its
policy and with the distilled policy from the same noise; the oracle judged both. Columns: the pairwise
oracle win rate over the distilled policy (the success measure, target >= 0.65), the learned reward of
both (a reward rise without an oracle win is reward hacking), the oracle utility of both, and the final
training KL to the distilled policy. Also the reward model's held-out pair accuracy.

    avatarforge run configs/curriculum/tiny.yaml configs/curriculum/rlhf_ablations.yaml
    .venv/bin/python benchmarks/rlhf_alignment.py runs/tiny [--windowed 24 [--stages rlhf ...] [--seed 1]]

--windowed N also compares every rlhf policy with the distilled one the way `generate` samples: N held-out
prompts of >= 1.6 s (several windows each) for the fine-tuned identities, same noise, scored by the oracle
(stages/quality.py), which is the longer, less noisy judgement (the in-stage eval uses single 9-frame
windows).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from omegaconf import OmegaConf

from avatarforge.stages.generate import REFERENCE_SECONDS


def stage_manifests(run_dir: Path) -> dict[str, dict]:
    return {p.parent.name: json.loads(p.read_text()) for p in sorted((run_dir / "stages").glob("*/DONE.json"))}


def report(run_dir: Path) -> str:
    manifests = stage_manifests(run_dir)
    lines = []
    for name, m in manifests.items():
        if m["kind"] == "reward_model":
            mt = m["metrics"]
            lines.append(f"reward model `{name}`: held-out pair accuracy {mt.get('eval/heldout/accuracy', float('nan')):.3f} "
                         f"vs the rater's labels, {mt.get('eval/heldout/oracle_accuracy', float('nan')):.3f} vs the "
                         f"noiseless oracle ({int(mt.get('eval/heldout_pairs', 0))} pairs)")
        if m["kind"] == "preference_collect":
            mt = m["metrics"]
            lines.append(f"preferences `{name}`: {int(mt.get('prompts', 0))} prompts, {int(mt.get('pairs', 0))} pairs, "
                         f"rater agreement with the noiseless oracle {mt.get('label_agreement_with_oracle', float('nan')):.3f}")
    lines += ["", "| stage | algorithm | KL coef | oracle win rate vs distilled | learned reward (policy / distilled) "
              "| oracle utility (policy / distilled) | train KL |", "|---|---|---|---|---|---|---|"]
    for name, m in manifests.items():
        if m["kind"] != "rlhf":
            continue
        options = OmegaConf.load(run_dir / "stages" / name / "config.yaml").stages[name].options
        mt = m["metrics"]
        get = {k: float(mt.get(k, float("nan"))) for k in (
            "eval/oracle_win_rate", "eval/reward", "eval/reward_distilled", "eval/oracle_utility",
            "eval/oracle_utility_distilled", "train/kl")}.__getitem__
        lines.append(
            f"| {name} | {options.get('algorithm', 'grpo')} | {options.get('kl_coef', 0.1)} | "
            f"{get('eval/oracle_win_rate'):.3f} | {get('eval/reward'):.3f} / {get('eval/reward_distilled'):.3f} | "
            f"{get('eval/oracle_utility'):.3f} / {get('eval/oracle_utility_distilled'):.3f} | {get('train/kl'):.4f} |"
        )
    return "\n".join(lines)


def windowed(run_dir: Path, count: int, workers: int, only: list[str] | None = None,
             reference_seconds: float = REFERENCE_SECONDS, seed: int = 0) -> str:
    """Each rlhf policy (or those in `only`) vs the distilled policy on windowed held-out prompts
    (stages/quality.py), both from the same noise (`seed`)."""
    from avatarforge.stages import quality as q
    from avatarforge.stages.generate import Generator

    manifests = stage_manifests(run_dir)
    distill = [n for n, m in manifests.items() if m["kind"] == "distill"]
    if len(distill) != 1:
        raise SystemExit(f"{run_dir}: expected one finished distill stage, found {distill}")
    teacher = Generator(run_dir / "stages" / distill[0])
    cfg = OmegaConf.to_container(OmegaConf.load(run_dir / "config.yaml"), resolve=True)
    world, prompts = q.tuned_identity_prompts(teacher.data, cfg, count, reference_seconds=max(REFERENCE_SECONDS, reference_seconds))
    base = q.Policy("distilled", teacher.model, steps=teacher.defaults["steps"])
    lines = ["", f"Windowed ({prompts[0].frames} frames, {len(prompts)} held-out prompts, fine-tuned identities, "
             f"{reference_seconds:g} s references, noise seed {seed}):", "",
             "| stage | oracle win rate vs distilled | sign-test p | utility (policy / distilled) | lip-sync corr "
             "| identity error | behaviour error |", "|---|---|---|---|---|---|---|"]
    for name, m in manifests.items():
        if m["kind"] != "rlhf" or (only and name not in only):
            continue
        gen = Generator(run_dir / "stages" / name)
        policy = q.Policy(name, gen.model, steps=gen.defaults["steps"])
        c = q.compare_policies(policy, base, teacher.autoencoder, prompts, world, workers=workers,
                               reference_seconds=reference_seconds, seed=seed)
        a, b = c.summary[name], c.summary["distilled"]
        lines.append(f"| {name} | {c.utility_win_rate:.3f} | {c.utility.get('sign_p', float('nan')):.3f} | "
                     f"{a['utility']:.3f} / {b['utility']:.3f} | "
                     f"{a.get('lipsync_corr', float('nan')):.3f} / {b.get('lipsync_corr', float('nan')):.3f} | "
                     f"{a.get('identity_error', float('nan')):.3f} / {b.get('identity_error', float('nan')):.3f} | "
                     f"{a.get('behaviour_error', float('nan')):.3f} / {b.get('behaviour_error', float('nan')):.3f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", nargs="?", default="runs/tiny")
    parser.add_argument("--windowed", type=int, default=0, help="held-out windowed prompts per comparison (0: off)")
    parser.add_argument("--workers", type=int, default=1, help="oracle processes")
    parser.add_argument("--stages", nargs="*", default=None, help="windowed: only these rlhf stages")
    parser.add_argument("--reference-seconds", type=float, default=REFERENCE_SECONDS,
                        help="windowed: reference length (default: generate's; 1.44 = the training length)")
    parser.add_argument("--seed", type=int, default=0, help="windowed: the noise both policies sample from")
    args = parser.parse_args()
    print(report(Path(args.run_dir)))
    if args.windowed:
        print(windowed(Path(args.run_dir), args.windowed, args.workers, args.stages, args.reference_seconds,
                       args.seed))


if __name__ == "__main__":
    main()
