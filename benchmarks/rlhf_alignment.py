"""Alignment report of a finished curriculum run: every rlhf-kind stage against the distilled policy.

Each rlhf stage's final eval sampled the held-out prompts (fine-tuned identities, held-out speech) with its
policy and with the distilled policy from the same noise; the oracle judged both. Columns: the pairwise
oracle win rate over the distilled policy (the success measure, target >= 0.65), the learned reward of
both (a reward rise without an oracle win is reward hacking), the oracle utility of both, and the final
training KL to the distilled policy. Also the reward model's held-out pair accuracy.

    avatarforge run configs/curriculum/tiny.yaml configs/curriculum/rlhf_ablations.yaml
    .venv/bin/python benchmarks/rlhf_alignment.py runs/tiny
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from omegaconf import OmegaConf


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", nargs="?", default="runs/tiny")
    print(report(Path(parser.parse_args().run_dir)))


if __name__ == "__main__":
    main()
