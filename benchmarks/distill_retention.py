"""How much of the teacher a distilled student keeps: every distill-kind stage of a finished run (and every
rlhf stage trained from one: the final few-step policy) against its teacher (the personality_sft model, sampled as the distill stage's options say: `teacher_steps` guided Euler
steps), on
the same held-out windowed prompts (fine-tuned identities, held-out speech, as `generate` samples them) and
the same noise, judged by the oracle.

    .venv/bin/python benchmarks/distill_retention.py runs/tiny [--prompts 32] [--workers 1] [--stages distill rlhf] [--seeds 3]

Per student: function evaluations and wall time per video of both, the student's share of the teacher's
lip-sync, identity and behaviour scores (issue 5's target: >= 90% at >= 10x fewer evaluations), the paired
lip-sync difference with its 95% bootstrap interval and sign test, and the student's oracle win rate. The
distill stage's own eval uses a few prompts (tiny.yaml: 4), too few to tell a 50% share from 90%.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import OmegaConf

from avatarforge.stages.generate import REFERENCE_SECONDS


def students_of(run_dir: Path) -> tuple[str, list[str]]:
    """The run's personality_sft stage and its finished few-step policies: distill-kind stages, then the
    rlhf-kind stages trained from them (the curriculum's final policy)."""
    done = {p.parent.name: json.loads(p.read_text())["kind"] for p in (run_dir / "stages").glob("*/DONE.json")}
    sft = [n for n, kind in done.items() if kind == "personality_sft"]
    students = sorted(n for n, kind in done.items() if kind == "distill")
    if len(sft) != 1 or not students:
        raise SystemExit(f"{run_dir}: need one finished personality_sft stage and a distill stage, "
                         f"found {sft} and {students}")
    return sft[0], students + sorted(n for n, kind in done.items() if kind == "rlhf")


def distill_ancestor(cfg: dict, stage: str) -> str:
    """The distill stage a few-step policy descends from (itself, for a distill stage)."""
    todo, seen = [stage], set()
    while todo:
        name = todo.pop()
        if cfg["stages"][name]["kind"] == "distill":
            return name
        seen.add(name)
        todo += [n for n in cfg["stages"][name]["needs"] if n not in seen]
    raise SystemExit(f"stage {stage!r} has no distill stage above it")


def share_interval(student: np.ndarray, teacher: np.ndarray, n_boot: int = 2000) -> tuple[float, float]:
    """95% bootstrap interval of mean(student) / mean(teacher) lip sync; arrays [seeds, prompts], prompts
    resampled whole (a prompt's seeds are not independent)."""
    rng = np.random.default_rng(0)
    idx = rng.integers(0, student.shape[1], size=(n_boot, student.shape[1]))
    shares = np.nanmean(student[:, idx], axis=(0, 2)) / np.nanmean(teacher[:, idx], axis=(0, 2))
    return float(np.percentile(shares, 2.5)), float(np.percentile(shares, 97.5))


def retention(run_dir: Path, count: int, workers: int, only: list[str] | None = None, seeds: int = 1,
              reference_seconds: float = REFERENCE_SECONDS) -> str:
    from avatarforge.stages import quality as q
    from avatarforge.stages.generate import Generator

    sft, students = students_of(run_dir)
    students = [n for n in students if not only or n in only]
    teacher = Generator(run_dir / "stages" / sft)
    cfg = OmegaConf.to_container(OmegaConf.load(run_dir / "config.yaml"), resolve=True)
    world, prompts = q.tuned_identity_prompts(teacher.data, cfg, count, reference_seconds=max(REFERENCE_SECONDS, reference_seconds))
    lines = [f"Teacher `{sft}` vs each student, {len(prompts)} windowed held-out prompts ({prompts[0].frames} "
             f"frames, {reference_seconds:g} s references) x {seeds} noise seed(s), same noise:", "",
             "| student | NFE / video (teacher / student) | wall s / video | lip-sync corr (teacher / student) "
             "| keeps lip sync [95% CI] / identity / behaviour | lip-sync diff [95% CI], sign p | student win rate |",
             "|---|---|---|---|---|---|---|"]
    # the teacher's samples depend only on how it samples and the noise seed: sampled once for all students
    # (240 evaluations per video against a student's 20: most of the benchmark's time)
    cache: dict[tuple, tuple[q.SampleRun, list[dict[str, float]]]] = {}
    with q.Scorer(world, workers) as scorer:
        def sampled(policy: q.Policy, key: tuple, seed: int) -> tuple[q.SampleRun, list[dict[str, float]]]:
            if (key, seed) not in cache:
                cache[key, seed] = q.sample_and_score(policy, teacher.autoencoder, prompts, world, scorer,
                                                      seed=seed, reference_seconds=reference_seconds)
            return cache[key, seed]

        for name in students:
            lines.append(student_row(name, run_dir, teacher, sampled, seeds))
    return "\n".join(lines)


def student_row(name: str, run_dir: Path, teacher: Any, sampled: Callable, seeds: int) -> str:
    """One student's table row: its samples and the teacher's (as its distill stage sampled it), `seeds`
    noise seeds pooled."""
    from avatarforge.stages import quality as q
    from avatarforge.stages.common import typed
    from avatarforge.stages.distill import DistillOptions, ratio
    from avatarforge.stages.generate import Generator

    gen = Generator(run_dir / "stages" / name)
    student = q.Policy(name, gen.model, steps=gen.defaults["steps"])
    # the curriculum as the student's stage ran it (the run's config.yaml is the last `run`'s, which may
    # not name stages added by an earlier layered config)
    cfg = OmegaConf.to_container(OmegaConf.load(run_dir / "stages" / name / "config.yaml"), resolve=True)
    options = typed(DistillOptions, cfg["stages"][distill_ancestor(cfg, name)]["options"])  # how the teacher sampled
    teacher_policy = q.Policy("teacher", teacher.model, scales=options.teacher_scales(), steps=options.teacher_steps)
    teacher_key = ("teacher", options.teacher_steps, tuple(sorted(options.teacher_scales().items())))
    student_runs = [sampled(student, (name,), 1000 * k) for k in range(seeds)]  # per seed: (run, scores)
    teacher_runs = [sampled(teacher_policy, teacher_key, 1000 * k) for k in range(seeds)]
    mine = [x for _, scores in student_runs for x in scores]
    theirs = [x for _, scores in teacher_runs for x in scores]
    s, t = q.summarize(mine), q.summarize(theirs)
    keeps = [ratio(s[k], t[k], higher) for k, higher in
             (("lipsync_corr", True), ("identity_error", False), ("behaviour_error", False))]
    lips = [np.array([[x.get("lipsync_corr", np.nan) for x in scores] for _, scores in runs])
            for runs in (student_runs, teacher_runs)]  # [seeds, prompts] each
    low, high = share_interval(*lips)
    lip = q.metric_table(mine, theirs)["lipsync_corr"]
    wins = q.paired_stats([q.oracle_utility(x) for x in mine], [q.oracle_utility(x) for x in theirs])["win_rate"]
    nfe = [runs[0][0].nfe for runs in (teacher_runs, student_runs)]
    secs = [np.mean([run.seconds_per_video for run, _ in runs]) for runs in (teacher_runs, student_runs)]
    return (f"| {name} | {nfe[0]:.0f} / {nfe[1]:.0f} | {secs[0]:.2f} / {secs[1]:.2f} | "
            f"{t['lipsync_corr']:.3f} / {s['lipsync_corr']:.3f} | "
            f"{keeps[0]:.0%} [{low:.0%}, {high:.0%}] / {keeps[1]:.0%} / {keeps[2]:.0%}"
            f" | {lip['diff']:+.3f} [{lip['ci_low']:+.3f}, {lip['ci_high']:+.3f}], {lip['sign_p']:.3f} | "
            f"{wins:.3f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", nargs="?", default="runs/tiny")
    parser.add_argument("--prompts", type=int, default=32, help="held-out windowed prompts")
    parser.add_argument("--workers", type=int, default=1, help="oracle processes")
    parser.add_argument("--stages", nargs="*", default=None, help="only these few-step policies")
    parser.add_argument("--seeds", type=int, default=1, help="noise seeds per prompt (pooled; more power)")
    parser.add_argument("--reference-seconds", type=float, default=REFERENCE_SECONDS,
                        help="reference length (default: generate's; 1.44 = the training length)")
    args = parser.parse_args()
    print(retention(Path(args.run_dir), args.prompts, args.workers, args.stages, args.seeds, args.reference_seconds))


if __name__ == "__main__":
    main()
