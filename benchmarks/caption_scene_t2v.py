"""Does the caption's room word set the backdrop? The t2v stage's recipe trained in-process from a run's
autoencoder (or its t2v stage's weights, --stage), then sampled from held-out captions alone: the share of
prompts whose backdrop is nearer the scene the caption asks for than another prompt's (0.5 = chance).

    .venv/bin/python benchmarks/caption_scene_t2v.py RUN [--captions as-is|short|phrases|room-first]
                                                      [--share 0.5] [--ngram 7] [--steps 300] [--stage]

--captions rewrites that share of training captions: `short` to `a person in a X room`, `phrases` drops
each descriptive phrase with probability 1/2, `room-first` moves the room to the front (also at eval);
--ngram puts a convolution over byte embeddings in front of the text encoder (position-free n-grams);
--words V tokenises captions into words hashed into V ids instead of bytes (data/tokenizer.py's
`data.tokenizer: words`; a colour is then one token wherever it stands).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file

from avatarforge.data.tokenizer import decode_ids, encode_text, encode_words
from avatarforge.model.flow import euler_sample
from avatarforge.stages import quality as q
from avatarforge.stages.t2v import T2VTask

ROOM = re.compile(r"in an? (\w+) room")


def room_first(text: str) -> str:
    """Either template -> 'in a X room: <the description>'."""
    m = ROOM.search(text)
    rest = [s.strip(" ,:") for s in (text[: m.start()], text[m.end():]) if s.strip(" ,:")]
    return f"{m.group(0)}: {', '.join(rest)}"


def rewrite(text: str, how: str, g: torch.Generator) -> str:
    m = ROOM.search(text)
    if m is None or how == "as-is":
        return text
    if how == "short":
        return f"a person {m.group(0)}"
    if how == "room-first":
        return room_first(text)
    parts = [s for s in re.split(r", |: ", text) if not ROOM.search(s)]  # phrases
    kept = [s for s in parts if torch.rand(1, generator=g).item() < 0.5]
    return ", ".join([*kept, m.group(0)]) if kept else f"a person {m.group(0)}"


def add_ngram(model: torch.nn.Module, k: int) -> None:
    te = model.text_encoder
    te.ngram = torch.nn.Conv1d(te.cfg.dim, te.cfg.dim, k, padding=k // 2)

    def forward(ids, mask=None):
        mask = ids != 0 if mask is None else mask
        tok = te.tok(ids) * mask[..., None]
        x = tok + te.ngram(tok.transpose(1, 2)).transpose(1, 2) + te.pos[: ids.shape[1]]
        for block in te.blocks:
            x = block(x, mask)
        return te.norm(x) * mask[..., None].to(x.dtype)

    te.forward = forward


def add_rope(model: torch.nn.Module) -> None:
    """Probe: relative (rotary) positions in the text encoder's self-attention instead of learned absolute ones."""
    from avatarforge.model.attention import RoPE3D
    te = model.text_encoder
    head_dim = te.cfg.dim // te.cfg.heads
    rope = RoPE3D(head_dim, axes_dim=[head_dim, 0, 0])
    with torch.no_grad():
        te.pos.zero_()
    te.pos.requires_grad_(False)

    def block_forward(block, x, mask, angles):
        h = block.norm1(x)
        q = block.attn.project_q(h, angles)
        k, v = block.attn.project_kv(h, angles)
        x = x + block.attn.attend(q, k, v, key_mask=mask)
        return x + block.mlp(block.norm2(x))

    def forward(ids, mask=None):
        mask = ids != 0 if mask is None else mask
        pos = torch.zeros(ids.shape[1], 3)
        pos[:, 0] = torch.arange(ids.shape[1])
        angles = RoPE3D.cos_sin(rope.angles(pos))
        x = te.tok(ids)
        for block in te.blocks:
            x = block_forward(block, x, mask, angles)
        return te.norm(x) * mask[..., None].to(x.dtype)

    te.forward = forward


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run")
    ap.add_argument("--captions", default="as-is", choices=("as-is", "short", "phrases", "room-first"))
    ap.add_argument("--share", type=float, default=0.5, help="share of training captions rewritten")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--ngram", type=int, default=0)
    ap.add_argument("--rope", action="store_true", help="rotary positions in the text encoder")
    ap.add_argument("--words", type=int, default=0, help="hashed word tokens, this many ids (0: bytes)")
    ap.add_argument("--stage", action="store_true", help="evaluate the run's t2v stage instead of training")
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    stages = Path(args.run) / "stages"
    cfg = OmegaConf.to_container(OmegaConf.load(stages / "t2v" / "config.yaml"), resolve=True)
    ae = json.loads((stages / "autoencoder" / "DONE.json").read_text())["weights"]
    task = T2VTask({"config": cfg, "stage": "t2v", "parent_weights": {"autoencoder": ae}})
    model = task.build_model()
    if args.ngram:
        add_ngram(model, args.ngram)
    if args.rope:
        add_rope(model)
    data = task.data
    encode = encode_text
    if args.words:
        te = model.text_encoder
        te.tok = torch.nn.Embedding(args.words, te.cfg.dim)
        torch.nn.init.normal_(te.tok.weight, std=0.5**0.5)  # as TextEncoder's

        def encode(text: str, max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
            return encode_words(text, max_len, args.words)
    if args.stage:
        model.load_state_dict(load_file(json.loads((stages / "t2v" / "DONE.json").read_text())["weights"]))
    else:  # the stage's optimiser settings (AdamW 1e-3, 20 warm-up steps, cosine), one process
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: min(1, (s + 1) / 20) * 0.5 * (1 + math.cos(math.pi * s / args.steps)))
        g, t0 = torch.Generator().manual_seed(1), time.time()
        for step, batch in enumerate(task.train_batches(rank=0, world_size=1, start_batch=0)):
            if step == args.steps:
                break
            texts = [decode_ids(row) for row in batch["text"]]
            texts = [rewrite(t, args.captions, g) if torch.rand(1, generator=g).item() < args.share else t
                     for t in texts]
            enc = [encode(t, data.text_max_len) for t in texts]
            video = batch["video"].float() / 127.5 - 1 if batch["video"].dtype == torch.uint8 else batch["video"]
            loss, _ = task.loss(model, {"video": video, "text": torch.stack([i for i, _ in enc]),
                                        "text_mask": torch.stack([m for _, m in enc])})
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
        print(f"[caption] trained {args.steps} steps in {time.time() - t0:.0f} s", flush=True)
    model.eval()
    world = q.eval_world(data, f"{data.root}-quality", heldout_identities=8, reference_seconds=16.0)
    speeches, heldout = q.read_world(world, world.eval_split, reference_seconds=16.0)
    prompts = q.make_prompts(q.spread(speeches, args.prompts), heldout, world, count=args.prompts)
    evals = {"held-out captions": [room_first(p.caption) if args.captions == "room-first" else p.caption
                                   for p in prompts],
             "short captions": [f"a person in a {p.scene['colour']} room" for p in prompts]}
    n = len(prompts)
    for name, captions in evals.items():
        enc = [encode(c, data.text_max_len) for c in captions]
        text, mask = torch.stack([i for i, _ in enc]), torch.stack([m for _, m in enc])
        with torch.no_grad():
            latents = task.latents(torch.zeros(n, 3, data.frames, data.size, data.size))
            x = euler_sample(lambda x, t, c=text, m=mask: model(x, t, c, m), latents.shape, 12,
                             torch.Generator().manual_seed(0))
            frames = [q.to_uint8(v) for v in task.autoencoder.decode(x)]
        size = data.size
        asked = np.array([q.colour_distance(q.backdrop_rgb(f), q.scene_backdrop_rgb(p.scene, size))
                          for f, p in zip(frames, prompts, strict=True)])
        other = np.array([q.colour_distance(q.backdrop_rgb(f), q.scene_backdrop_rgb(prompts[(i + 5) % n].scene, size))
                          for i, f in enumerate(frames)])
        print(f"[caption] {name}: backdrop error {asked.mean():.2f} to the asked scene, {other.mean():.2f} to "
              f"another prompt's; nearer the asked one in {np.mean(asked < other):.0%} of {n}", flush=True)


if __name__ == "__main__":
    main()
