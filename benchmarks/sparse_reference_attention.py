"""Sparse Reference Attention vs dense joint attention, side by side in one run, on CPU.

1. One layer's attention (q/k/v/out projections + attention of the video, summary and reference tokens)
   as the reference grows from 1x to 16x the video tokens: sparse ("topk", and "fixed"), the "dense"
   pattern, and the naive full joint attention (one SDPA over every token). Sparse must grow near-linearly
   (log-log slope <= 1.15) and be >= 10x faster than dense at 16x.
2. Sampling: a denoising step of the avatar DiT with a cached 16x reference vs without a reference
   (<= 1.2x), and the one-off cost of encoding the reference.
3. Training-step MFU: FLOPs of one step (counted with FlopCounterMode on the math attention path) over
   the step time, against the measured fp32 matmul peak of this machine.

Usage:
    .venv/bin/python benchmarks/sparse_reference_attention.py [--threads 2] [--write benchmarks/RESULTS-model.md]

Timings are the best of `--repeats` interleaved rounds; a busy machine (others' jobs on shared cores)
still makes them noisy, so the load average is printed with the results.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from avatarforge.model.attention import RoPE3D
from avatarforge.model.audio import AudioEncoderConfig, AudioWindows
from avatarforge.model.avatar import AvatarDiT, AvatarDiTConfig, AvatarModel
from avatarforge.model.flow import flow_matching_loss
from avatarforge.model.reference_attention import (
    ReferenceKV,
    attend_reference,
    attention_lse,
    math_attention,
    merge_reference,
    reference_self_attention,
    sdpa,
)
from avatarforge.model.text_encoder import TextEncoderConfig


def timeit(fns: dict, repeats: int, warmup: int = 1) -> dict[str, float]:
    """Best time of each function over `repeats` rounds, the functions interleaved within a round so that
    a burst of load from other jobs hits all of them alike; the minimum is the least disturbed run."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    best = dict.fromkeys(fns, math.inf)
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def slope(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of log(y) against log(x)."""
    lx, ly = [math.log(x) for x in xs], [math.log(y) for y in ys]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly, strict=True)) / sum((a - mx) ** 2 for a in lx)


def dit_config(opts, **kw) -> AvatarDiTConfig:
    return AvatarDiTConfig(dim=opts.dim, heads=opts.heads, depth=opts.depth, text_dim=128, audio_dim=128,
                           ref_top_k=opts.top_k, ref_block=opts.block, query_block=opts.block, **kw)


# ---------------------------------------------------------------------------------------------------
# 1. one layer's attention


def layer_attention(block, hv, h_ref, rope_v, rope_ref, n_summary: int, pattern: str, chunk: int):
    """All attention work of one layer: video tokens hv, reference stream h_ref = [summary; reference]."""
    attn, cfg = block.attn, block.cfg
    q_v, (k_v, v_v) = attn.project_q(hv, rope_v), attn.project_kv(hv, rope_v)
    q_r, (k_r, v_r) = attn.project_q(h_ref, rope_ref), attn.project_kv(h_ref, rope_ref)
    kv = ReferenceKV.build(k_r, v_r, n_summary, cfg.ref_block)
    o_r = reference_self_attention(q_r, k_r, v_r, n_summary, "dense" if pattern == "dense" else "chunk", chunk)
    o_v, lse_v = attention_lse(q_v, k_v, v_v)
    o_vr, lse_vr = attend_reference(q_v, kv, pattern, cfg.ref_top_k, cfg.query_block)
    o = merge_reference(o_v, lse_v, o_vr, lse_vr, block.ref_gate)
    return [attn.out(x.transpose(1, 2).flatten(2)) for x in (o, o_r)]


def naive_joint_attention(block, hv, h_ref, rope_v, rope_ref):
    """The straightforward baseline: every token attends to every token, one SDPA call."""
    attn = block.attn
    h = torch.cat([hv, h_ref], 1)
    rope = tuple(torch.cat([a, b]) for a, b in zip(rope_v, rope_ref, strict=True))
    k, v = attn.project_kv(h, rope)
    return attn.out(sdpa(attn.project_q(h, rope), k, v).transpose(1, 2).flatten(2))


def bench_layer(opts) -> tuple[list[dict], dict]:
    torch.manual_seed(0)
    cfg = dit_config(opts)
    block = AvatarDiT(cfg).blocks[0].eval()
    with torch.no_grad():
        block.ref_gate.fill_(1.0)
    gt, gh, gw = opts.frames, opts.hw, opts.hw
    nv = gt * gh * gw
    n_sum = cfg.n_summary + cfg.n_static + cfg.n_dynamic
    chunk = cfg.ref_chunk_frames * gh * gw
    hv = torch.randn(1, nv, cfg.dim)
    rope_v = block_rope(cfg, gt, gh, gw)
    rows = []
    for m in opts.multipliers:
        tr = m * gt
        h_ref = torch.randn(1, n_sum + tr * gh * gw, cfg.dim)  # the reference stream: [summary; reference]
        pos = RoPE3D.grid(tr, gh, gw)
        pos[:, 0] -= tr
        rope_r = RoPE3D(cfg.dim // cfg.heads, cfg.rope_theta).angles(pos)
        rope_r = RoPE3D.cos_sin(torch.cat([rope_r.new_zeros(n_sum, rope_r.shape[-1]), rope_r]))
        row = {"multiplier": m, "ref_tokens": tr * gh * gw}

        def sparse(p, h_ref=h_ref, rope_r=rope_r):
            return layer_attention(block, hv, h_ref, rope_v, rope_r, n_sum, p, chunk)

        def naive(h_ref=h_ref, rope_r=rope_r):
            return naive_joint_attention(block, hv, h_ref, rope_v, rope_r)

        fns = {p: (lambda p=p: sparse(p)) for p in ("topk", "fixed", "dense")}
        with torch.no_grad():  # (warm up once, at the first size: the big dense calls need none)
            row.update(timeit(fns, opts.repeats, warmup=int(m == opts.multipliers[0])))
            row.update(timeit({"naive": naive}, 1, warmup=0))  # the baseline costs what "dense" does: once
        rows.append(row)
        print(f"  ref {m:>2}x ({row['ref_tokens']} tokens): topk {row['topk'] * 1e3:.1f} ms, fixed "
              f"{row['fixed'] * 1e3:.1f} ms, dense {row['dense'] * 1e3:.1f} ms, naive {row['naive'] * 1e3:.1f} ms",
              flush=True)
    xs = [r["ref_tokens"] for r in rows]
    summary = {name: slope(xs, [r[name] for r in rows]) for name in ("topk", "fixed", "dense", "naive")}
    summary["speedup_16x"] = rows[-1]["dense"] / rows[-1]["topk"]
    summary["video_tokens"] = nv
    return rows, summary


def block_rope(cfg, t, h, w):
    return RoPE3D.cos_sin(RoPE3D(cfg.dim // cfg.heads, cfg.rope_theta).angles(RoPE3D.grid(t, h, w)))


# ---------------------------------------------------------------------------------------------------
# 2. sampling with a cached reference


def bench_sampling(opts) -> dict:
    torch.manual_seed(0)
    cfg = dit_config(opts)
    model = AvatarDiT(cfg).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # a "trained" model: all paths open
        for p in model.parameters():
            if p.abs().sum() == 0:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    ph, pw = cfg.patch_size[1:]
    x = torch.randn(1, 8, opts.frames, opts.hw * ph, opts.hw * pw)
    ref = torch.randn(1, 8, opts.frames * opts.multipliers[-1], opts.hw * ph, opts.hw * pw)
    text, mask = torch.randn(1, 32, 128), torch.ones(1, 32, dtype=torch.bool)
    audio = AudioWindows(torch.randn(1, opts.frames, 12, 128), torch.ones(1, opts.frames, 12, dtype=torch.bool))
    t = torch.full((1,), 0.5)
    with torch.no_grad():
        encode = timeit({"encode": lambda: model.encode_reference(ref)}, max(1, opts.repeats // 2))["encode"]
        cache = model.encode_reference(ref)
        times = timeit({"ref": lambda: model(x, t, text, mask, audio=audio, reference=cache),
                        "none": lambda: model(x, t, text, mask, audio=audio)}, opts.repeats)
        step_ref, step_none = times["ref"], times["none"]
    steps = opts.sampling_steps
    return {"video_tokens": math.prod(model.token_grid(x.shape)), "ref_tokens": cache.num_tokens,
            "step_ref": step_ref, "step_none": step_none, "ratio": step_ref / step_none, "encode": encode,
            "steps": steps, "total_ratio": (encode + steps * step_ref) / (steps * step_none)}


# ---------------------------------------------------------------------------------------------------
# 3. training-step MFU


def matmul_peak(threads: int) -> float:
    """Measured fp32 matmul FLOP/s (best of a few 2048^3 products)."""
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    best = timeit({"mm": lambda: a @ b}, 10)["mm"]
    return 2 * 2048**3 / best


def bench_training(opts) -> dict:
    torch.manual_seed(0)
    cfg = dit_config(opts)
    model = AvatarModel(TextEncoderConfig(dim=128, layers=2), cfg, AudioEncoderConfig(dim=128, layers=2)).train()
    ph, pw = cfg.patch_size[1:]
    b = opts.train_batch
    x0 = torch.randn(b, 8, opts.frames, opts.hw * ph, opts.hw * pw)
    ref = torch.randn(b, 8, opts.frames * opts.train_ref_multiplier, opts.hw * ph, opts.hw * pw)
    text = torch.randint(1, 257, (b, 48))
    wave = torch.randn(b, 16000 * (1 + 4 * (opts.frames - 1)) // 25)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step():
        loss, _ = flow_matching_loss(model, x0, generator=torch.Generator().manual_seed(0), text=text,
                                     audio=wave, reference=ref)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    with FlopCounterMode(display=False) as counter, math_attention(), sdpa_kernel(SDPBackend.MATH):
        loss, _ = flow_matching_loss(model, x0, generator=torch.Generator().manual_seed(0), text=text,
                                     audio=wave, reference=ref)
        loss.backward()
    flops = counter.get_total_flops()
    seconds = timeit({"step": step}, max(2, opts.repeats // 2))["step"]
    return {"flops": flops, "step": seconds, "achieved": flops / seconds, "batch": b,
            "video_tokens": math.prod(model.dit.token_grid(x0.shape)),
            "ref_tokens": math.prod(model.dit.token_grid(ref.shape))}


# ---------------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--frames", type=int, default=8, help="video token-frames")
    parser.add_argument("--hw", type=int, default=16, help="tokens per side of a frame")
    parser.add_argument("--top-k", type=int, default=4)
    parser.add_argument("--block", type=int, default=64)
    parser.add_argument("--multipliers", type=lambda s: [int(x) for x in s.split(",")], default=[1, 2, 4, 8, 16])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--sampling-steps", type=int, default=25)
    parser.add_argument("--train-batch", type=int, default=2)
    parser.add_argument("--train-ref-multiplier", type=int, default=2)
    parser.add_argument("--write", default="", help="write the command and tables to this markdown file")
    opts = parser.parse_args()
    torch.set_num_threads(opts.threads)
    load_before = os.getloadavg()

    print(f"1. one layer's attention (dim {opts.dim}, {opts.heads} heads, top-k {opts.top_k} x {opts.block})")
    rows, summary = bench_layer(opts)
    print("2. sampling step with a cached reference")
    sampling = bench_sampling(opts)
    print("3. training step MFU")
    peak = matmul_peak(opts.threads)
    training = bench_training(opts)
    load_after = os.getloadavg()

    nv = summary["video_tokens"]
    lines = [
        f"Reference / video tokens, one layer's attention (forward; video {nv} tokens, summary tokens 16, "
        f"dim {opts.dim}, {opts.heads} heads, {opts.threads} thread{'s' if opts.threads > 1 else ''}):",
        "",
        "| reference | ref tokens | sparse top-k (ms) | sparse fixed (ms) | dense pattern (ms) | naive joint SDPA (ms) "
        "| dense / top-k |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['multiplier']}x | {r['ref_tokens']} | {r['topk'] * 1e3:.1f} | {r['fixed'] * 1e3:.1f} | "
                     f"{r['dense'] * 1e3:.1f} | {r['naive'] * 1e3:.1f} | {r['dense'] / r['topk']:.1f}x |")
    lines += [
        f"| log-log slope | | {summary['topk']:.2f} | {summary['fixed']:.2f} | {summary['dense']:.2f} | "
        f"{summary['naive']:.2f} | |",
        "",
        f"Sparse slope {summary['topk']:.2f} (target <= 1.15); dense / sparse at {opts.multipliers[-1]}x: "
        f"{summary['speedup_16x']:.1f}x (target >= 10x).",
        "",
        f"Sampling (avatar DiT depth {opts.depth}, {sampling['video_tokens']} video tokens, text + audio):",
        "",
        "| | per denoising step (ms) |",
        "|---|---|",
        f"| no reference | {sampling['step_none'] * 1e3:.1f} |",
        f"| cached {sampling['ref_tokens']}-token reference ({opts.multipliers[-1]}x) | "
        f"{sampling['step_ref'] * 1e3:.1f} ({sampling['ratio']:.2f}x; target <= 1.2x) |",
        f"| encoding that reference once (ReferenceCache) | {sampling['encode'] * 1e3:.1f} |",
        "",
        f"Whole {sampling['steps']}-step sampling including the one-off encode: {sampling['total_ratio']:.2f}x "
        "the cost without a reference.",
        "",
        f"Training step (AvatarModel, batch {training['batch']}, {training['video_tokens']} video + "
        f"{training['ref_tokens']} reference tokens, uncached reference with grad, AdamW):",
        "",
        "| step (s) | model FLOPs / step | achieved FLOP/s | fp32 matmul peak (measured) | MFU |",
        "|---|---|---|---|---|",
        f"| {training['step']:.2f} | {training['flops'] / 1e9:.1f} G | {training['achieved'] / 1e9:.1f} G | "
        f"{peak / 1e9:.1f} G | {100 * training['achieved'] / peak:.1f}% |",
        "",
        f"Load average before / after: {load_before[0]:.2f} / {load_after[0]:.2f} "
        f"({os.cpu_count()} CPUs; other jobs share them, so timings are noisy).",
    ]
    text = "\n".join(lines)
    print()
    print(text)
    if opts.write:
        command = "$ .venv/bin/python benchmarks/sparse_reference_attention.py " + " ".join(sys.argv[1:])
        with open(opts.write, "w") as f:
            f.write("# Model benchmarks\n\n## Sparse Reference Attention vs dense joint attention (CPU)\n\n")
            f.write(f"```\n{command}\n```\n\n{text}\n")


if __name__ == "__main__":
    main()
