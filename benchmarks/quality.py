"""The avatar quality claims on held-out prompts of the synthetic world, measured by its oracle on windowed
clips (whole 1.6 s clips, windows of data.frames frames sharing one frame), for a finished tiny run.

    .venv/bin/python benchmarks/quality.py [--run runs/tiny] [--prompts 32] [--sub-prompts 16] [--steps 12]
        [--lengths 1 4 16] [--workers 2] [--json results.json]

Claims (a paired comparison each: same prompts, same noise, one input changed):
  (a) lip sync with the prompt's audio vs the same model given another prompt's audio (--prompts);
  (b) identity error with the target's reference vs another identity's reference (caption kept);
  (c) a2v vs personality_sft on the fine-tuned identities (held-out speech): lip sync, identity, behaviour;
  (d) cross-scene: the reference is recorded in one scene, the caption asks for the speech clip's scene:
      is the backdrop closer to the asked scene than to the reference's, and are identity and habits as
      good as when the caption asks for the reference's own scene;
  (e) identity error vs reference length (1 / 4 / 16 s, and the training length) on the same prompts.
(a)-(d) sample with --reference-seconds of each reference (default 16 s, as `generate` reads a reference).
(b)-(e) use the first --sub-prompts prompts. The run's a2v model answers (a), (b), (d), (e): most held-out
identities are not the fine-tuned ones. The prompts come from a larger copy of the run's synthetic world
(same seed: the same identities; 8 held-out identities x 4 clips, 16 s references), generated once under
{data.root}-quality. Ground-truth clips are scored too (the oracle's ceiling), and their reconstructions by the
run's autoencoder in sampling's windows (the floor a perfect generator in that latent space would reach).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import OmegaConf

from avatarforge.data.synth.oracle import summarize
from avatarforge.stages import quality as q
from avatarforge.stages.avatar import A2VOptions
from avatarforge.stages.common import typed
from avatarforge.stages.generate import REFERENCE_SECONDS, Generator
from avatarforge.stages.prompts import personality_identities

OVERVIEW_KEYS = ("lipsync_corr", "lipsync_conf", "lipsync_abs_offset", "identity_error", "behaviour_error",
                 "jitter", "scene_error", "scene_error_ref")


def stage_of_kind(run: Path, kind: str) -> Path:
    for done in sorted((run / "stages").glob("*/DONE.json")):
        if json.loads(done.read_text())["kind"] == kind:
            return done.parent
    raise SystemExit(f"{run} has no finished {kind} stage")


def fmt(x: float, digits: int = 3) -> str:
    return "nan" if x is None or not np.isfinite(x) else f"{x:.{digits}f}"


def verdict(stats: dict[str, float], *, kept: bool = False, vacuous: bool = False) -> str:
    """holds: a beats b (CI of the difference excludes 0 in a's favour, sign test p < 0.05). For `kept`
    claims (a must not be worse than b): kept unless b clearly wins; `vacuous` when there was nothing to
    keep (the reference does not carry identity in the first place, claim b)."""
    if stats.get("n", 0) == 0:
        return "n/a"
    if kept and vacuous:
        return "vacuous (claim b fails: no identity to keep)"
    wins_clearly = stats["win_rate"] > 0.5 and stats["sign_p"] < 0.05
    loses_clearly = stats["win_rate"] < 0.5 and stats["sign_p"] < 0.05
    ci_a = (stats["ci_low"] > 0 or stats["ci_high"] < 0) and not (stats["ci_low"] < 0 < stats["ci_high"])
    if kept:
        return "fails (worse)" if loses_clearly and ci_a else "holds (not worse)"
    return "holds" if wins_clearly and ci_a else "fails"


def row(claim: str, what: str, metric: str, a: str, b: str, stats: dict[str, float], kept: bool = False,
        vacuous: bool = False) -> str:
    return (f"| {claim} | {what} | {metric} | {stats.get('n', 0)} | {a} {fmt(stats.get('mean_a'))} | "
            f"{b} {fmt(stats.get('mean_b'))} | {fmt(stats.get('diff'))} [{fmt(stats.get('ci_low'))}, "
            f"{fmt(stats.get('ci_high'))}] | {fmt(100 * stats.get('win_rate', np.nan), 0)}% | "
            f"{fmt(stats.get('sign_p'), 4)} | {verdict(stats, kept=kept, vacuous=vacuous)} |")


def paired(a: list[dict], b: list[dict], key: str, key_b: str | None = None) -> dict[str, float]:
    n = min(len(a), len(b))
    return q.paired_stats([s.get(key, np.nan) for s in a[:n]], [s.get(key_b or key, np.nan) for s in b[:n]],
                          higher_is_better=key not in q.LOWER_IS_BETTER)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", default="runs/tiny", help="a finished curriculum run directory")
    ap.add_argument("--world", default="", help="where the larger held-out world lives (default {data.root}-quality)")
    ap.add_argument("--prompts", type=int, default=32, help="prompts for (a) and (d)'s scene measure")
    ap.add_argument("--sub-prompts", type=int, default=16, help="prompts for (b), (c), (d), (e)")
    ap.add_argument("--steps", type=int, default=0, help="sampling steps (default: the a2v stage's sample_steps)")
    ap.add_argument("--lengths", type=float, nargs="*", default=[1.0, 4.0, 16.0], help="reference seconds for (e)")
    ap.add_argument("--batch", type=int, default=16, help="prompts sampled together")
    ap.add_argument("--workers", type=int, default=2, help="oracle processes (scoring overlaps sampling)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (default: cores - workers + 1)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--claims", default="abcde", help="which claims to measure (letters a-e)")
    ap.add_argument("--json", default="", help="also write every number here")
    ap.add_argument("--a2v", default="", help="an a2v stage dir to use instead of the run's (experiments)")
    ap.add_argument("--sft", default="", help="a personality_sft stage dir to use instead of the run's (claim c)")
    ap.add_argument("--reference-share", type=int, default=None, metavar="TOKENS",
                    help="sample with the reference's attention share calibrated to TOKENS reference tokens")
    ap.add_argument("--reference-seconds", type=float, default=REFERENCE_SECONDS,
                    help="reference length for claims a-d (default: generate's; 1.44 = the training length, 9 frames 4 apart)")
    ap.add_argument("--guidance", type=float, nargs=3, default=None, metavar=("TEXT", "AUDIO", "REF"),
                    help="guidance scales (default: the a2v stage's options)")
    ap.add_argument("--text-guidance-interval", type=float, nargs=2, default=None, metavar=("LO", "HI"),
                    help="text guidance only at LO <= t <= HI (1 = noise), 1 elsewhere")
    ap.add_argument("--prompt-captions", choices=("full", "scene"), default=None,
                    help="caption the prompts so (default: as the run's data.captions; a data.captions=mixed run "
                         "reads both: full for the usual request, scene for a request for another scene)")
    args = ap.parse_args()
    start = time.perf_counter()
    torch.set_num_threads(args.threads or max(1, (os.cpu_count() or 2) - args.workers + 1))
    run = Path(args.run)
    # an explicit --a2v / --sft stands in for the run's own (which the run then need not have)
    a2v_dir = Path(args.a2v) if args.a2v else stage_of_kind(run, "a2v_pretrain")
    sft_dir = Path(args.sft) if args.sft else stage_of_kind(run, "personality_sft")
    a2v, sft = Generator(a2v_dir), Generator(sft_dir)
    if args.reference_share is not None:
        for g in (a2v, sft):
            g.model.dit.set_reference_share(args.reference_share)
    sft_cfg = OmegaConf.to_container(OmegaConf.load(sft_dir / "config.yaml"), resolve=True)
    a2v_cfg = OmegaConf.to_container(OmegaConf.load(a2v_dir / "config.yaml"), resolve=True)
    a2v_opts = typed(A2VOptions, a2v_cfg["stages"][a2v_dir.name].get("options", {}))
    scales = {"text": a2v_opts.guidance_text, "audio": a2v_opts.guidance_audio,
              "reference": a2v_opts.guidance_reference}
    if args.guidance is not None:
        scales = dict(zip(("text", "audio", "reference"), args.guidance, strict=True))
    steps = args.steps or a2v_opts.sample_steps
    data = a2v.data if args.prompt_captions is None else replace(a2v.data, captions=args.prompt_captions)
    t0 = time.perf_counter()
    longest = max([*args.lengths, args.reference_seconds])  # every sampled condition names its reference length
    world = q.eval_world(data, args.world or f"{data.root}-quality", heldout_identities=8,
                         reference_seconds=max(REFERENCE_SECONDS, longest))
    world_s = time.perf_counter() - t0
    speeches, heldout = q.read_world(world, world.eval_split, reference_seconds=longest)
    chosen = q.spread(speeches, args.prompts)
    prompts = q.make_prompts(chosen, heldout, world, count=args.prompts)
    sub = prompts[: args.sub_prompts]
    targets = personality_identities(sft_cfg, world)
    tuned = q.read_identities(world, world.train_split, targets, reference_seconds=longest)
    sft_prompts = q.make_prompts(q.spread(speeches, args.sub_prompts), {**heldout, **tuned}, world,
                                 count=args.sub_prompts, targets=targets)
    intervals = {"text": tuple(args.text_guidance_interval)} if args.text_guidance_interval else None
    policy_a2v = q.Policy("a2v", a2v.model, scales=scales, guidance_intervals=intervals, steps=steps)
    policy_sft = q.Policy("sft", sft.model, scales=scales, guidance_intervals=intervals, steps=steps)
    ae = a2v.autoencoder
    print(f"[quality] {len(prompts)} prompts ({prompts[0].frames} frames = {prompts[0].frames / world.fps:.2f} s, "
          f"windows of {world.frames}), {steps} steps, guidance {scales} (intervals {intervals}), threads {torch.get_num_threads()}, "
          f"oracle workers {args.workers}; world ready in {world_s:.1f} s", flush=True)

    results: dict[str, Any] = {"runs": {}, "config": {**vars(args), "steps": steps, "scales": scales}}
    scores: dict[str, list[dict]] = {}
    with q.Scorer(world, args.workers) as scorer:
        gt_handles = scorer.submit([sp.video for sp in chosen], prompts)
        ae_handles = scorer.submit([q.autoencode_windows(a2v.autoencoder, sp.video, world.frames, a2v.device)
                                    for sp in chosen], prompts)
        want = set(args.claims)
        seconds_ad = args.reference_seconds  # claims a-d
        jobs = [
            # also scored against the next prompt's speech; every claim but (c) compares against it
            *([("right audio", policy_a2v, prompts, seconds_ad)] if want - {"c"} else []),
            *([("other audio", policy_a2v, q.with_other_audio(prompts), seconds_ad)] if "a" in want else []),
            *([("other identity's reference", policy_a2v, q.with_other_reference(sub, heldout), seconds_ad)]
              if "b" in want else []),
            *([("caption: reference's scene", policy_a2v,
                q.with_caption_scene(sub, [p.reference_scene for p in sub], world), seconds_ad)] if "d" in want else []),
            *([("sft identities, a2v", policy_a2v, sft_prompts, seconds_ad), ("sft identities, sft", policy_sft,
                                                                         sft_prompts, seconds_ad)] if "c" in want else []),
            *([(f"reference {s:g} s", policy_a2v, sub, s) for s in args.lengths] if "e" in want else []),
        ]
        for name, policy, ps, seconds in jobs:
            t = time.perf_counter()
            sampled, sc = q.sample_and_score(policy, ae, ps, world, scorer, reference_seconds=seconds,
                                             seed=args.seed, batch_size=args.batch, other_audio=name == "right audio")
            scores[name] = sc
            means = summarize(sc)
            results["runs"][name] = {
                "prompts": len(ps), "nfe_per_video": sampled.nfe, "seconds_per_video": sampled.seconds_per_video,
                "reference_frames": q.reference_frames_for(seconds, world.fps, world.reference_stride),
                **{k: means.get(k) for k in OVERVIEW_KEYS}, "scores": sc,
            }
            print(f"[quality] {name}: {len(ps)} videos in {time.perf_counter() - t:.0f} s "
                  f"(lip sync {fmt(means.get('lipsync_corr'))}, identity {fmt(means.get('identity_error'))})",
                  flush=True)
        scores["ground truth"] = scorer.result(gt_handles)
        scores["autoencoder reconstruction"] = scorer.result(ae_handles)
    for name in ("ground truth", "autoencoder reconstruction"):
        means = summarize(scores[name])
        results["runs"][name] = {"prompts": len(prompts), **{k: means.get(k) for k in OVERVIEW_KEYS}}

    right, n_sub = scores.get("right audio"), args.sub_prompts
    claims = []
    if "other audio" in scores:
        claims += [
            ("a", "right vs other audio", "lipsync_corr", "right", "other",
             paired(right, scores["other audio"], "lipsync_corr")),
            ("a", "right vs other audio", "lipsync_conf", "right", "other",
             paired(right, scores["other audio"], "lipsync_conf")),
        ]
    if right is not None:
        claims.append(("a", "same video: own vs other speech", "lipsync_corr", "own", "other",
                       paired(right, right, "lipsync_corr", "lipsync_corr_other_audio")))
    if "other identity's reference" in scores:
        claims.append(("b", "own vs other identity's reference", "identity_error", "own", "other",
                       paired(right[:n_sub], scores["other identity's reference"], "identity_error")))
    if "sft identities, sft" in scores:
        claims += [("c", "sft vs a2v, fine-tuned identities", metric, "sft", "a2v",
                    paired(scores["sft identities, sft"], scores["sft identities, a2v"], metric))
                   for metric in ("lipsync_corr", "identity_error", "behaviour_error")]
    if right is not None:
        claims.append(("d", "backdrop: asked scene vs reference's scene", "scene_error", "asked", "ref's",
                       paired(right, right, "scene_error", "scene_error_ref")))
    kept = [("d", "cross-scene vs same-scene caption", metric, "cross", "same",
             paired(right[:n_sub], scores["caption: reference's scene"], metric))
            for metric in ("identity_error", "behaviour_error") if "caption: reference's scene" in scores]
    lengths = sorted(args.lengths) if "e" in want else []
    if len(lengths) >= 2:
        claims.append(("e", f"reference {lengths[-1]:g} s vs {lengths[0]:g} s", "identity_error",
                       f"{lengths[-1]:g}s", f"{lengths[0]:g}s",
                       paired(scores[f"reference {lengths[-1]:g} s"], scores[f"reference {lengths[0]:g} s"],
                              "identity_error")))
    results["claims"] = [{"claim": c, "what": w, "metric": m, "stats": s} for c, w, m, _, _, s in claims + kept]

    out = ["| claim | comparison | metric | n | A | B | A − B [95% CI] | A wins | sign p | verdict |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    identity_holds = any(c[0] == "b" and verdict(c[-1]) == "holds" for c in claims)
    out += [row(*c) for c in claims if c[0] <= "d"] + [row(*c, kept=True, vacuous=not identity_holds) for c in kept]
    out += [row(*c) for c in claims if c[0] > "d"]
    out += ["", "| condition | n | NFE/video | s/video | lip sync corr | conf | abs offset | identity err | "
                "behaviour err | jitter | scene err (asked) | scene err (ref's) |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in results["runs"].items():
        out.append(f"| {name} | {r['prompts']} | {fmt(r.get('nfe_per_video', np.nan), 0)} | "
                   f"{fmt(r.get('seconds_per_video', np.nan), 2)} | "
                   + " | ".join(fmt(r.get(k)) for k in OVERVIEW_KEYS) + " |")
    out += ["", "| reference | frames | span (s) | identity error (mean, 95% CI) | behaviour error |", "|---|---|---|---|---|"]
    length_rows = [(q.reference_frames_for(args.reference_seconds, world.fps, world.reference_stride), "right audio")] + [
        (q.reference_frames_for(s, world.fps, world.reference_stride), f"reference {s:g} s") for s in lengths]
    for frames, name in sorted(length_rows):
        if name not in scores:
            continue
        sc = scores[name][:n_sub]
        ident = np.array([s["identity_error"] for s in sc])
        boot = np.random.default_rng(0).choice(ident, (2000, len(ident))).mean(axis=1)
        span = ((frames - 1) * world.reference_stride + 1) / world.fps
        out.append(f"| {name if name != 'right audio' else 'claims a-d'} | {frames} | {span:.2f} | "
                   f"{ident.mean():.3f} [{np.percentile(boot, 2.5):.3f}, {np.percentile(boot, 97.5):.3f}] | "
                   f"{np.mean([s['behaviour_error'] for s in sc]):.3f} |")
    total = time.perf_counter() - start
    out += ["", f"Total {total:.0f} s (world generation {world_s:.0f} s) on {os.cpu_count()} cores, "
                f"load average {os.getloadavg()[0]:.1f}."]
    print("\n".join(out))
    results["seconds"] = total
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
