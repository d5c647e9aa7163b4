"""`avatarforge` command line: run / submit the curriculum, follow jobs, make data."""

from __future__ import annotations

import argparse
import json
import sys

from avatarforge.cluster import jobs
from avatarforge.data.cli import add_parsers as add_data_parsers


def _add_address(p: argparse.ArgumentParser, required: bool) -> None:
    p.add_argument("--address", required=required,
                   help="Ray dashboard URL, e.g. http://HOST:8265 (RAY_ADDRESS is used when omitted)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="avatarforge", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run a curriculum (embedded local Ray unless --address/RAY_ADDRESS)")
    run.add_argument("config")
    run.add_argument("overrides", nargs="*", help="key=value config overrides")
    run.add_argument("--rerun", action="append", default=[], metavar="STAGE",
                     help="retrain STAGE and its descendants even if done (repeatable)")
    run.add_argument("--address", default="", help="an existing Ray cluster (else embedded local)")
    run.add_argument("--plan", action="store_true", help="print what would run, and exit")

    submit = sub.add_parser("submit", help="submit a curriculum to a Ray cluster through the Jobs API")
    _add_address(submit, required=True)
    submit.add_argument("config")
    submit.add_argument("overrides", nargs="*")
    submit.add_argument("--rerun", action="append", default=[], metavar="STAGE")
    submit.add_argument("--python", default="python", help="python executable on the cluster")
    submit.add_argument("--follow", action="store_true", help="stream the job's logs until it ends")

    job = sub.add_parser("jobs", help="status | logs | stop | list of submitted jobs")
    job_sub = job.add_subparsers(dest="jobs_command", required=True)
    for name in ("status", "logs", "stop"):
        p = job_sub.add_parser(name)
        p.add_argument("job_id")
        _add_address(p, required=False)
        if name == "logs":
            p.add_argument("--follow", action="store_true")
    _add_address(job_sub.add_parser("list"), required=False)

    gen = sub.add_parser("generate", help="reference video + audio -> lip-synced mp4 with a trained model")
    gen.add_argument("--checkpoint", required=True,
                     help="a finished avatar stage dir (rlhf, distill, sft, a2v) or a curriculum run dir (its rlhf "
                          "stage, else distill, sft, a2v)")
    gen.add_argument("--reference", required=True, help="reference video of the person")
    gen.add_argument("--audio", required=True, help="driving speech (wav, mp3, or a video's audio)")
    gen.add_argument("--out", required=True)
    # unset: the checkpoint's own sampling (12 guided steps for a2v/sft; the student's few single-pass
    # steps at guidance 1 for distill/rlhf, whose guidance is baked in)
    gen.add_argument("--steps", type=int, default=None)
    gen.add_argument("--guidance-audio", type=float, default=None)
    gen.add_argument("--guidance-ref", type=float, default=None)
    gen.add_argument("--guidance-text", type=float, default=None)
    gen.add_argument("--guidance-text-interval", type=float, nargs=2, default=None, metavar=("LO", "HI"),
                     help="text guidance only at steps with LO <= t <= HI (1 = noise), 1 elsewhere")
    gen.add_argument("--caption", default="", help="optional text: the scene (a run with data.captions=scene "
                     "was trained on captions like 'a person in a blue room')")
    gen.add_argument("--reference-share", type=int, default=None, metavar="TOKENS",
                     help="weigh the reference like one of TOKENS reference tokens (the training reference's, "
                          "80 for tiny) whatever its length: the caption's scene then wins over a long "
                          "reference's backdrop; 0: plain joint attention")
    gen.add_argument("--reference-seconds", type=float, default=16.0,
                     help="condition on up to this much of the reference video (every data.reference_stride-th "
                          "frame; longer references keep identity better)")
    gen.add_argument("--seed", type=int, default=0)

    data = sub.add_parser("data", help="datasets: synth, ingest, inspect")
    add_data_parsers(data.add_subparsers(dest="data_command", required=True), _load_data_config)
    return parser


def _dashboard_address(address: str | None) -> str:
    import os

    address = address or os.environ.get("RAY_ADDRESS", "")
    if not address:
        raise jobs.JobsError("no cluster address: pass --address http://HOST:8265 or set RAY_ADDRESS")
    return address


def cmd_run(args: argparse.Namespace) -> int:
    from avatarforge.cluster.connect import connect, disconnect
    from avatarforge.stages.config import load_config
    from avatarforge.stages.data_setup import ensure_dataset
    from avatarforge.stages.runner import CurriculumRunner

    cfg = load_config(args.config, args.overrides)  # validated before Ray starts
    runner = CurriculumRunner(cfg, rerun=args.rerun)
    plans = runner.plan()
    for plan in plans:
        print(f"[curriculum] plan: {plan.stage:<12} {plan.action:<18} config {plan.config_hash}")
    if args.plan:
        return 0
    ensure_dataset(cfg)
    where = connect(args.address or cfg.ray.address, num_cpus=cfg.ray.num_cpus, namespace=cfg.ray.namespace)
    print(f"[curriculum] ray: {where}", flush=True)
    try:
        manifests = runner.run()
    finally:
        disconnect()
    print("\n[curriculum] finished. Where things are:")
    print(f"  run directory : {runner.run_dir}")
    print(f"  resolved config: {runner.run_dir / 'config.yaml'}")
    for stage, m in manifests.items():
        print(f"  {stage:<12} manifest {runner.stage_dir(stage) / 'DONE.json'}")
        print(f"  {'':<12} weights  {m.weights}")
        print(f"  {'':<12} checkpoint {m.final_checkpoint}")
    print(f"  W&B runs      : {runner.run_dir / 'wandb'} (offline: `wandb sync {runner.run_dir / 'wandb'}/offline-run-*`)")
    return 0


def cmd_submit(args: argparse.Namespace) -> int:
    from avatarforge.stages.config import load_config

    load_config(args.config, args.overrides)  # fail here, not on the cluster
    job_id = jobs.submit(args.address, args.config, args.overrides, rerun=args.rerun, python=args.python)
    print(job_id, flush=True)
    if args.follow:
        jobs.logs(args.address, job_id, follow=True)
        print(f"\n{job_id}: {jobs.status(args.address, job_id)}")
    return 0


def cmd_jobs(args: argparse.Namespace) -> int:
    address = _dashboard_address(args.address)
    if args.jobs_command == "status":
        print(json.dumps(jobs.info(address, args.job_id), indent=2))
    elif args.jobs_command == "logs":
        jobs.logs(address, args.job_id, follow=args.follow)
    elif args.jobs_command == "stop":
        print("stopped" if jobs.stop(address, args.job_id) else "already finished")
    else:
        for job in jobs.list_jobs(address):
            print(f"{job['job_id']:<32} {job['status']:<10} {job['entrypoint']}")
    return 0


def _load_data_config(path: str, overrides: list[str]):
    from omegaconf import OmegaConf

    from avatarforge.stages.config import load_config

    return OmegaConf.to_object(load_config(path, overrides).data)


def cmd_data(args: argparse.Namespace) -> int:
    return args.data_handler(args)


def cmd_generate(args: argparse.Namespace) -> int:
    from avatarforge.stages.generate import GenerateOptions, generate_file

    options = GenerateOptions(steps=args.steps, guidance_audio=args.guidance_audio, guidance_ref=args.guidance_ref,
                              guidance_text=args.guidance_text, guidance_text_interval=(tuple(args.guidance_text_interval)
                                                      if args.guidance_text_interval else None),
                              seed=args.seed, caption=args.caption,
                              reference_share_tokens=args.reference_share, reference_seconds=args.reference_seconds)
    result = generate_file(args.checkpoint, args.reference, args.audio, args.out, options)
    print(f"wrote {result['out']}: {result['frames']} frames, {result['seconds']:.2f} s "
          f"({result['kind']} stage {result['stage']!r}, {result['steps']} steps; reference "
          f"{result['reference_frames']} frames {result['reference_stride']} apart)")
    return 0


COMMANDS = {"run": cmd_run, "submit": cmd_submit, "jobs": cmd_jobs, "data": cmd_data, "generate": cmd_generate}


def main(argv: list[str] | None = None) -> int:
    from avatarforge.stages.config import ConfigError
    from avatarforge.stages.generate import GenerateError

    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except (ConfigError, jobs.JobsError, FileNotFoundError, GenerateError) as exc:
        print(f"avatarforge: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
