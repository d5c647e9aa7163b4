"""Multi-condition classifier-free guidance for the avatar model (text, audio, reference).

Training: each condition is dropped independently per sample (`sample_condition_drop`), plus optionally
all of them at once, and the model gets the masks as `drop=`. Dropping is exactly leaving a condition out
(text: the empty caption, as in t2v), so the model learns every partial velocity.

Sampling: conditions are added one at a time in `order` (default reference -> audio -> text, as in
InstructPix2Pix's image-then-text guidance), each with its own scale:

    v = v(0) + s_ref (v(R) - v(0)) + s_audio (v(R,A) - v(R)) + s_text (v(R,A,T) - v(R,A))

All scales 1 give the conditional velocity, all 0 the unconditional one. It is evaluated as
(1 - s_1) v(0) + sum_k (s_k - s_{k+1}) v(c_1..c_k) (s_{n+1} = 0), skipping terms whose weight is 0, so
scale 1 for everything costs one pass and the usual case costs n + 1 passes. A reference cache and
audio windows computed once serve every pass and step.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch

from .avatar import CONDITIONS

DEFAULT_ORDER: tuple[str, ...] = ("reference", "audio", "text")


def sample_condition_drop(batch: int, probs: Mapping[str, float] | float, *, p_all: float = 0.0,
                          generator: torch.Generator | None = None, device=None) -> dict[str, torch.Tensor]:
    """{condition: [batch] bool (True = drop)}: independent drops with probs[condition] (one float = the
    same for all three), and with probability p_all every condition dropped together."""
    probs = dict.fromkeys(CONDITIONS, float(probs)) if isinstance(probs, (int, float)) else dict(probs)
    unknown = set(probs) - set(CONDITIONS)
    if unknown:
        raise ValueError(f"conditions must be among {CONDITIONS}, got {sorted(unknown)}")
    dev = generator.device if generator is not None else device

    def bern(p: float) -> torch.Tensor:
        return torch.rand(batch, generator=generator, device=dev) < p

    all_ = bern(p_all)
    return {name: (bern(p) | all_).to(device) for name, p in probs.items()}


def guidance_terms(scales: Mapping[str, float], present: Sequence[str],
                   order: Sequence[str] = DEFAULT_ORDER) -> list[tuple[float, tuple[str, ...]]]:
    """[(weight, kept conditions)] with sum_i weight_i * v(kept_i) the guided velocity."""
    chain = [c for c in order if c in present]
    s = [float(scales.get(c, 1.0)) for c in chain] + [0.0]
    terms = [(1.0 - s[0], ())] if chain else [(1.0, ())]
    terms += [(s[k] - s[k + 1], tuple(chain[: k + 1])) for k in range(len(chain))]
    return [(w, kept) for w, kept in terms if w != 0.0]


def guided_velocity(model: Callable[..., torch.Tensor], x: torch.Tensor, t: torch.Tensor,
                    cond: Mapping[str, object], scales: Mapping[str, float] | None = None,
                    order: Sequence[str] = DEFAULT_ORDER) -> torch.Tensor:
    """Guided velocity of model(x, t, text=, text_mask=, audio=, reference=, drop=) (an AvatarModel).

    cond holds any of text (+ text_mask), audio, reference; a condition not in `cond` (or None) is
    absent in every pass. scales: {condition: scale}, default 1 (no extra guidance)."""
    scales = dict(scales or {})
    unknown = set(scales) - set(CONDITIONS)
    if unknown:
        raise ValueError(f"scales must be among {CONDITIONS}, got {sorted(unknown)}")
    present = [c for c in CONDITIONS if cond.get(c) is not None]
    b = x.shape[0]
    out = None
    for weight, kept in guidance_terms(scales, present, order):
        kwargs = {k: v for k, v in cond.items() if k in ("text", "text_mask")}
        for name in ("audio", "reference"):
            kwargs[name] = cond.get(name) if name in kept else None
        drop = {}
        if "text" in present and "text" not in kept:  # the empty caption, as in t2v
            drop["text"] = torch.ones(b, dtype=torch.bool, device=x.device)
        v = model(x, t, drop=drop, **kwargs)
        out = weight * v if out is None else out + weight * v
    return out


def guided_model_fn(model: Callable[..., torch.Tensor], scales: Mapping[str, float] | None = None,
                    order: Sequence[str] = DEFAULT_ORDER) -> Callable[..., torch.Tensor]:
    """A model_fn(x, t, **cond) for flow.euler_sample: euler_sample(guided_model_fn(m, scales), shape, steps,
    text=ids, text_mask=mask, audio=m.encode_audio(...), reference=m.encode_reference(...))."""

    def fn(x: torch.Tensor, t: torch.Tensor, **cond) -> torch.Tensor:
        return guided_velocity(model, x, t, cond, scales, order)

    return fn


__all__ = ["DEFAULT_ORDER", "sample_condition_drop", "guidance_terms", "guided_velocity", "guided_model_fn"]
