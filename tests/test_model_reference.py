"""Sparse Reference Attention and the avatar DiT: masks, dense equivalence, cache equivalence, zero-init."""

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from avatarforge.model.attention import RoPE3D
from avatarforge.model.audio import AudioWindows
from avatarforge.model.avatar import AvatarDiT, AvatarDiTConfig, AvatarModel, person_prior
from avatarforge.model.dit import DiT, modulate, timestep_embedding
from avatarforge.model.reference_attention import (
    ReferenceKV,
    attend_reference,
    attention_lse,
    math_attention,
    merge_reference,
    reference_self_attention,
    select_blocks,
    share_calibration,
)
from avatarforge.model.text_encoder import TextEncoder, TextEncoderConfig

pytestmark = pytest.mark.usefixtures("one_thread")


CFG = dict(dim=32, depth=2, heads=2, text_dim=16, audio_dim=16, identity_dim=32, n_summary=3, n_static=2,
           n_dynamic=2, ref_block=16, query_block=16, ref_top_k=2)


def open_gates(model: nn.Module, std: float = 0.05, gate: float | None = None) -> None:
    """Non-zero adaLN / output / gate weights so the tests see the network's behaviour."""
    g = torch.Generator().manual_seed(123)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("ref_gate"):
                p.fill_(gate) if gate is not None else p.copy_(0.5 + torch.rand(p.shape, generator=g))
            elif p.abs().sum() == 0:
                p.copy_(torch.randn(p.shape, generator=g) * std)


def inputs(b=2, t=3, hw=8, tr=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, 8, t, hw, hw, generator=g)
    ref = torch.randn(b, 8, tr, hw, hw, generator=g)
    text = torch.randn(b, 5, 16, generator=g)
    mask = torch.ones(b, 5, dtype=torch.bool)
    mask[0, 3:] = False
    return x, torch.rand(b, generator=g), text, mask, ref


# ---------------------------------------------------------------------------------------------------
# attention primitives


def test_attention_lse_matches_math_with_gradients():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, n, 8, generator=g, dtype=torch.float64) for n in (10, 13, 13))
    bias = torch.zeros(2, 3, 1, 13, dtype=torch.float64)
    bias[1, :, :, 9:] = -math.inf
    w_o, w_l = torch.randn(2, 3, 10, 8, generator=g), torch.randn(2, 3, 10, generator=g)
    results = []
    for force_math in (False, True):
        qq, kk, vv = (x.float().clone().requires_grad_() for x in (q, k, v))
        with math_attention() if force_math else torch.enable_grad():
            out, lse = attention_lse(qq, kk, vv, bias.float())
        ((out * w_o).sum() + (lse * w_l).sum()).backward()
        results.append((out, lse, qq.grad, kk.grad, vv.grad))
    s = q @ k.transpose(-1, -2) / math.sqrt(8) + bias
    assert torch.allclose(results[0][1].double(), s.logsumexp(-1), atol=1e-5)
    for fast, slow in zip(*results, strict=True):
        assert torch.allclose(fast, slow, atol=2e-5), (fast - slow).abs().max()
    assert results[0][3][1, :, 9:].abs().max() == 0  # masked keys get no gradient


def test_merge_is_joint_softmax_at_gate_one_and_video_only_at_zero():
    g = torch.Generator().manual_seed(1)
    q, kv_, vv_, kr, vr = (torch.randn(1, 2, n, 8, generator=g) for n in (6, 6, 6, 9, 9))
    o_v, l_v = attention_lse(q, kv_, vv_)
    o_r, l_r = attention_lse(q, kr, vr)
    joint = F.scaled_dot_product_attention(q, torch.cat([kv_, kr], 2), torch.cat([vv_, vr], 2))
    assert torch.allclose(merge_reference(o_v, l_v, o_r, l_r, torch.ones(2)), joint, atol=1e-5)
    assert torch.equal(merge_reference(o_v, l_v, o_r, l_r, torch.zeros(2)), o_v)
    keep = torch.zeros(1)
    assert torch.equal(merge_reference(o_v, l_v, o_r, l_r, torch.ones(2), keep), o_v)


def _ref_kv(n_ref=45, s=3, block=8, seed=2):
    g = torch.Generator().manual_seed(seed)
    k_s, v_s, k_r, v_r = (torch.randn(2, 2, n, 8, generator=g) for n in (s, s, n_ref, n_ref))
    return ReferenceKV.build(torch.cat([k_s, k_r], 2), torch.cat([v_s, v_r], 2), s, block), (k_s, v_s, k_r, v_r)


@pytest.mark.parametrize("pattern", ["topk", "fixed"])
def test_sparse_reference_attention_equals_masked_dense(pattern):
    """Block top-k (or the fixed pattern) over gathered blocks == full attention with the block mask."""
    kv, (k_s, v_s, k_r, v_r) = _ref_kv()  # 45 reference tokens: 6 blocks of 8, the last one padded
    q = torch.randn(2, 2, 21, 8, generator=torch.Generator().manual_seed(3))  # 21 queries: 3 blocks of 8
    out, lse = attend_reference(q, kv, pattern, top_k=2, query_block=8)
    qpad = F.pad(q, (0, 0, 0, 3)).unflatten(2, (3, 8))
    counts = torch.tensor([8.0, 8.0, 5.0])[:, None]
    idx = select_blocks(qpad.sum(3) / counts, kv, 2, pattern)  # [B, H, 3, 2]
    assert idx.shape == (2, 2, 3, 2)
    if pattern == "fixed":
        assert torch.equal(idx[0, 0], torch.tensor([[0, 3], [1, 4], [2, 5]]))
    block_of = torch.arange(45) // 8
    mask = torch.zeros(2, 2, 21, 3 + 45, dtype=torch.bool)
    mask[..., :3] = True  # summary tokens: always
    for qi in range(21):
        sel = idx[:, :, qi // 8]  # [B, H, k]
        mask[:, :, qi, 3:] = (block_of[None, None, :, None] == sel[:, :, None, :]).any(-1)
    k_all, v_all = torch.cat([k_s, k_r], 2), torch.cat([v_s, v_r], 2)
    bias = torch.zeros(mask.shape).masked_fill(~mask, -math.inf)
    ref_out, ref_lse = attention_lse(q, k_all, v_all, bias)
    assert torch.allclose(out, ref_out, atol=1e-5) and torch.allclose(lse, ref_lse, atol=1e-5)
    dense_out, _ = attend_reference(q, kv, "dense", top_k=2, query_block=8)
    assert not torch.allclose(out, dense_out, atol=1e-3)  # sparse really is sparse
    assert torch.allclose(dense_out, F.scaled_dot_product_attention(q, k_all, v_all), atol=1e-5)


def test_topk_selects_the_best_matching_block():
    kv, _ = _ref_kv(n_ref=32, block=8)
    target = kv.k_pool[:, :, 2]  # queries that look exactly like block 2's mean key
    q = target[:, :, None].expand(-1, -1, 8, -1) * 10
    idx = select_blocks(q.mean(2, keepdim=True), kv, 1, "topk")
    assert (idx == 2).all()


def test_reference_self_attention_chunks_and_summary():
    _, (k_s, v_s, k_r, v_r) = _ref_kv(n_ref=20)
    k_all, v_all = torch.cat([k_s, k_r], 2), torch.cat([v_s, v_r], 2)
    q = torch.randn(2, 2, 23, 8, generator=torch.Generator().manual_seed(4))  # 3 summary + 20 reference
    out = reference_self_attention(q, k_all, v_all, 3, "chunk", chunk=8)
    mask = torch.zeros(23, 23, dtype=torch.bool)
    mask[:3] = True  # summary rows: everything
    mask[:, :3] = True  # every row: the summary tokens
    for i in range(20):
        c = i // 8  # chunks of 8 reference tokens; the last one has 4
        mask[3 + i, 3 + 8 * c : 3 + min(20, 8 * c + 8)] = True
    assert torch.allclose(out, F.scaled_dot_product_attention(q, k_all, v_all, attn_mask=mask), atol=1e-5)
    dense = reference_self_attention(q, k_all, v_all, 3, "dense", chunk=8)
    assert torch.allclose(dense, F.scaled_dot_product_attention(q, k_all, v_all), atol=1e-5)
    kv = ReferenceKV.build(k_all, v_all, 3, 8)
    assert kv.k.shape[2] == 3 + 24 and kv.n_blocks == 3 and kv.n_ref == 20
    assert torch.allclose(kv.k_pool[:, :, 2], k_r[:, :, 16:].mean(2), atol=1e-6)  # padding not averaged


# ---------------------------------------------------------------------------------------------------
# the avatar DiT


def naive_joint_forward(model: AvatarDiT, x, t, text, text_mask, ref):
    """Straightforward dense joint attention: [video; summary; reference] as ONE sequence per layer, one
    masked attention (summary / reference rows cannot see video columns), gates open (= 1)."""
    cfg = model.cfg
    grid, rgrid = model.token_grid(x.shape), model.token_grid(ref.shape)
    c, ctx = model.condition(t, text, text_mask)
    ids = model.identity(ref)
    c = c + model.identity_ada(ids.pooled())
    c_ref = model.time_embed(timestep_embedding(torch.zeros(1), cfg.freq_dim))
    hv = model.patch_embed(model.patchify(x))
    if model.anchor_embed is not None:  # the reference's first frame, at the same place in every frame
        hv = hv + model.anchor_embed(model.patchify(ref[:, :, :1])).repeat(1, grid[0], 1)
    hr = model.patch_embed(model.patchify(ref)) + model.ref_segment
    hs = torch.cat([model.summary.expand(x.shape[0], -1, -1), ids.static, ids.dynamic], 1)
    rope_v = model.rope.angles(RoPE3D.grid(*grid))
    pos = RoPE3D.grid(*rgrid)
    pos[:, 0] -= rgrid[0]
    rope_r = model.rope.angles(pos)
    nv, ns = hv.shape[1], hs.shape[1]
    n = nv + ns + hr.shape[1]
    mask = torch.ones(n, n, dtype=torch.bool)
    mask[nv:, :nv] = False
    for blk in model.blocks:
        mv, mr = blk.ada(c)[:, None].chunk(6, -1), blk.ada(c_ref)[:, None].chunk(6, -1)
        a_v, a_s, a_r = (modulate(blk.norm1(h), m[0], m[1]) for h, m in ((hv, mv), (hs, mr), (hr, mr)))
        q = torch.cat([blk.attn.project_q(a_v, rope_v), blk.attn.project_q(a_s), blk.attn.project_q(a_r, rope_r)], 2)
        kvs = [blk.attn.project_kv(a_v, rope_v), blk.attn.project_kv(a_s), blk.attn.project_kv(a_r, rope_r)]
        k, v = torch.cat([kv[0] for kv in kvs], 2), torch.cat([kv[1] for kv in kvs], 2)
        o = blk.attn.out(F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2).flatten(2))
        hv, hs, hr = hv + mv[2] * o[:, :nv], hs + mr[2] * o[:, nv : nv + ns], hr + mr[2] * o[:, nv + ns :]
        hv = hv + blk.cross(blk.norm2(hv), context=ctx, key_mask=text_mask)
        hv, hs, hr = (h + m[5] * blk.mlp(modulate(blk.norm3(h), m[3], m[4])) for h, m in ((hv, mv), (hs, mr), (hr, mr)))
    shift, scale = model.final_ada(c)[:, None].chunk(2, dim=-1)
    return model.unpatchify(model.final(modulate(model.final_norm(hv), shift, scale)), grid)


def _model(**kw) -> AvatarDiT:
    torch.manual_seed(0)
    return AvatarDiT(AvatarDiTConfig(**{**CFG, **kw})).eval()


@pytest.mark.parametrize("anchor", [False, True])
def test_dense_pattern_equals_full_joint_attention(anchor):
    model = _model(ref_pattern="dense", ref_anchor=anchor)
    open_gates(model, gate=1.0)
    x, t, text, mask, ref = inputs()
    with torch.no_grad():
        out = model(x, t, text, mask, reference=ref)
        naive = naive_joint_forward(model, x, t, text, mask, ref)
    assert out.abs().mean() > 1e-3
    assert torch.allclose(out, naive, atol=1e-5), (out - naive).abs().max()


def test_sparse_pattern_differs_from_dense_and_all_blocks_equals_dense_for_video():
    x, t, text, mask, ref = inputs()
    outs = {}
    for pattern in ("topk", "fixed", "dense"):
        model = _model(ref_pattern=pattern, ref_chunk_frames=100)  # chunk = whole ref: stream is dense too
        open_gates(model, gate=1.0)
        with torch.no_grad():
            outs[pattern] = model(x, t, text, mask, reference=ref)
    assert not torch.allclose(outs["topk"], outs["dense"], atol=1e-4)
    model = _model(ref_pattern="topk", ref_top_k=100, ref_chunk_frames=100)
    open_gates(model, gate=1.0)
    with torch.no_grad():
        assert torch.allclose(model(x, t, text, mask, reference=ref), outs["dense"], atol=1e-5)


@pytest.mark.parametrize("pattern", ["topk", "dense"])
def test_cached_reference_equals_uncached_across_steps(pattern):
    model = _model(ref_pattern=pattern)
    open_gates(model)
    x, t, text, mask, ref = inputs()
    with torch.no_grad():
        cache = model.encode_reference(ref)
        for step in range(3):  # one cache serves every step
            xs, ts = x + step, torch.full((2,), 1.0 - 0.3 * step)
            assert torch.allclose(model(xs, ts, text, mask, reference=cache),
                                  model(xs, ts, text, mask, reference=ref), atol=1e-6)
        assert not torch.allclose(model(x, t, text, mask, reference=cache), model(x, t, text, mask), atol=1e-4)


def test_reference_stream_never_sees_the_noisy_input():
    model = _model()
    open_gates(model)
    x, t, text, mask, ref = inputs()
    captured = []
    for blk in model.blocks:
        orig = blk.reference_stream

        def hook(*a, _orig=orig, **k):
            out = _orig(*a, **k)
            captured.append(out)
            return out

        blk.reference_stream = hook
    x2, t2 = torch.randn_like(x), torch.rand(2)
    x.requires_grad_(True)
    out = model(x, t, text, mask, reference=ref)
    first = [(kv.k, kv.v, h) for kv, h in captured]
    captured.clear()
    model(x2, t2, text[:, :2], mask[:, :2], reference=ref)
    for a, b in zip(first, captured, strict=True):
        for ta, tb in zip(a, (b[0].k, b[0].v, b[1]), strict=True):
            assert torch.equal(ta, tb)
    # and autograd agrees: the reference K/V have no path back to x
    assert torch.autograd.grad(first[-1][0].sum(), x, allow_unused=True)[0] is None
    assert torch.autograd.grad(out.sum(), x)[0].abs().sum() > 0


@pytest.mark.parametrize("anchor", [False, True])
def test_drop_reference_is_exactly_no_reference(anchor):
    model = _model(ref_anchor=anchor)
    open_gates(model)
    x, t, text, mask, ref = inputs()
    with torch.no_grad():
        cache = model.encode_reference(ref)
        mixed = model(x, t, text, mask, reference=cache, drop={"reference": torch.tensor([True, False])})
        none = model(x, t, text, mask)
        full = model(x, t, text, mask, reference=cache)
    assert torch.allclose(mixed[0], none[0], atol=1e-6) and torch.allclose(mixed[1], full[1], atol=1e-6)


def test_odd_sizes_shapes_and_grad():
    model = _model(ref_block=7, query_block=5, ref_chunk_frames=2).train()
    open_gates(model)
    x, t, text, mask, ref = inputs(t=2, hw=6, tr=5)  # 18 video tokens, 45 reference tokens
    out = model(x, t, text, mask, reference=ref)
    assert out.shape == x.shape
    out.square().mean().backward()
    for name in ("blocks.0.ref_gate", "ref_segment", "summary", "identity_ada.weight", "blocks.1.attn.q.weight"):
        assert model.get_parameter(name).grad.abs().sum() > 0, name
    with pytest.raises(ValueError, match="ref_pattern"):
        AvatarDiT(AvatarDiTConfig(**{**CFG, "ref_pattern": "nope"}))
    with pytest.raises(ValueError, match="reference batch"):
        model(x, t, text, mask, reference=model.encode_reference(ref[:1]))


def test_grad_checkpointing_same_output():
    model = _model(grad_checkpointing=True).train()
    open_gates(model)
    x, t, text, mask, ref = inputs()
    a = model(x, t, text, mask, reference=ref)
    model.cfg.grad_checkpointing = False
    assert torch.allclose(a, model(x, t, text, mask, reference=ref), atol=1e-6)


def test_fresh_avatar_model_from_t2v_weights_equals_t2v():
    text_cfg = TextEncoderConfig(dim=16, layers=1, heads=2, max_len=16)
    cfg = AvatarDiTConfig(**CFG)
    torch.manual_seed(0)
    t2v = nn.ModuleDict({"text_encoder": TextEncoder(text_cfg), "dit": DiT(cfg.dit_config())})  # TextToVideo keys
    open_gates(t2v)
    from avatarforge.model.audio import AudioEncoderConfig

    model = AvatarModel(text_cfg, cfg, AudioEncoderConfig(dim=16, layers=1, heads=2)).eval()
    new_keys = model.load_t2v_state_dict(t2v.state_dict())
    assert new_keys and all(any(s in k for s in ("ref", "audio", "identity", "summary", "anchor")) for k in new_keys)
    x, t, _, _, ref = inputs()
    ids = torch.randint(1, 257, (2, 6))
    ids[0, 4:] = 0
    wave = torch.randn(2, 16000 * 9 // 25)
    with torch.no_grad():
        expected = t2v["dit"](x, t, t2v["text_encoder"](ids, ids != 0), ids != 0)
        got = model(x, t, ids, ids != 0, audio=wave, reference=ref)
    assert expected.abs().mean() > 1e-3
    assert torch.allclose(got, expected, atol=1e-6), (got - expected).abs().max()
    bad = dict(t2v.state_dict())
    bad["dit.extra.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match="unexpected"):
        model.load_t2v_state_dict(bad)
    bad = {k: v for k, v in t2v.state_dict().items() if "blocks.0.mlp" not in k}
    with pytest.raises(ValueError, match="missing"):
        model.load_t2v_state_dict(bad)


def test_avatar_config_from_omegaconf():
    from omegaconf import OmegaConf

    cfg = OmegaConf.merge(OmegaConf.structured(AvatarDiTConfig), {**CFG, "ref_pattern": "fixed"})
    model = AvatarDiT(cfg)
    x, t, text, mask, ref = inputs(b=1)
    audio = AudioWindows(torch.randn(1, 3, 12, 16), torch.ones(1, 3, 12, dtype=torch.bool))
    assert model(x, t, text, mask, audio=audio, reference=ref).shape == x.shape
    obj = OmegaConf.to_object(cfg)
    assert isinstance(obj, AvatarDiTConfig) and obj.dit_config().dim == 32


def test_reference_gate_init_one_is_joint_attention_from_t2v_weights():
    """ref_gate_init=1: loaded from t2v weights, the model is exact joint attention over [video; reference]
    (in-context conditioning), and the reference path gets gradient on the first step (at 0 it gets none)."""
    text_cfg = TextEncoderConfig(dim=16, layers=1, heads=2, max_len=16)
    from avatarforge.model.audio import AudioEncoderConfig

    grads = {}
    for init in (0.0, 1.0):
        cfg = AvatarDiTConfig(**{**CFG, "ref_pattern": "dense", "ref_gate_init": init})
        torch.manual_seed(0)
        t2v = nn.ModuleDict({"text_encoder": TextEncoder(text_cfg), "dit": DiT(cfg.dit_config())})
        open_gates(t2v)
        model = AvatarModel(text_cfg, cfg, AudioEncoderConfig(dim=16, layers=1, heads=2))
        model.load_t2v_state_dict(t2v.state_dict())
        assert all(float(g) == init for b in model.dit.blocks for g in b.ref_gate)
        x, t, text, mask, ref = inputs()
        if init == 1.0:
            with torch.no_grad():
                ctx = model.text_encoder(torch.ones(2, 5, dtype=torch.long), mask)
                out = model.dit(x, t, ctx, mask, reference=ref)
                naive = naive_joint_forward(model.dit, x, t, ctx, mask, ref)
            assert torch.allclose(out, naive, atol=1e-5), (out - naive).abs().max()
        model(x, t, torch.ones(2, 5, dtype=torch.long), mask, reference=ref).square().mean().backward()
        grads[init] = float(model.dit.ref_segment.grad.abs().sum())
    assert grads[0.0] == 0.0 and grads[1.0] > 0.0


def test_share_calibration_keeps_the_reference_share_when_its_keys_repeat():
    """A reference shown twice (every key twice) takes more of a joint softmax; calibrated to the
    original's token count it takes exactly the original's share."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 10, 8, generator=g) for _ in range(3))
    once = ReferenceKV.build(k, v, n_summary=0, block=4)
    twice = ReferenceKV.build(torch.cat([k, k], 2), torch.cat([v, v], 2), n_summary=0, block=4)
    _, lse_once = attend_reference(q, once, "dense", 2, 4)
    _, lse_twice = attend_reference(q, twice, "dense", 2, 4)
    assert torch.allclose(lse_twice, lse_once + math.log(2), atol=1e-5)
    assert share_calibration(once, "dense", 2, 10) == 0.0 and share_calibration(twice, "dense", 2, 0) == 0.0
    assert math.isclose(share_calibration(twice, "dense", 2, 10), math.log(2))
    # sparse: a query sees the summary + top_k blocks, whatever the reference's length
    long = ReferenceKV.build(torch.randn(1, 2, 3 + 40, 8), torch.randn(1, 2, 3 + 40, 8), n_summary=3, block=4)
    assert math.isclose(share_calibration(long, "topk", 2, 4), math.log((3 + 8) / (3 + 4)))


def test_ref_share_tokens_leaves_the_training_length_unchanged():
    x, t, text, mask, ref = inputs()  # 7 reference token-frames of 4 x 4 tokens
    plain = _model(ref_pattern="dense")
    open_gates(plain, gate=1.0)
    outs = {}
    for tokens in (7 * 16, 2 * 16):
        model = _model(ref_pattern="dense", ref_share_tokens=tokens)
        model.load_state_dict(plain.state_dict())
        with torch.no_grad():
            outs[tokens] = model(x, t, text, mask, reference=ref)
    with torch.no_grad():
        base = plain(x, t, text, mask, reference=ref)
    assert torch.allclose(outs[7 * 16], base, atol=1e-6)
    assert not torch.allclose(outs[2 * 16], base, atol=1e-4)  # calibrated to a shorter reference: less of it


def test_person_prior_covers_head_and_shoulders_not_the_corners():
    prior = person_prior(16, 16)
    assert prior[7, 8] == 1 and prior[15, 8] == 1 and prior[1, 8] == 1  # face, shoulders, top of the hair
    assert prior[0, 0] == 0 and prior[0, 15] == 0 and prior[9, 0] == 0 and prior[9, 15] == 0  # the room
    assert 0.4 < float(prior.mean()) < 0.8


def test_reference_matte_hides_the_room_not_the_person():
    """With the matte, a reference whose backdrop (outside the prior) changes gives the same output; a change
    inside the prior (the person) still changes it. Without the matte both do."""
    x, t, text, mask, ref = inputs(hw=16)
    outside = 1 - person_prior(16, 16)
    room = ref + 3.0 * outside * torch.randn_like(ref)
    person = ref + 3.0 * (1 - outside) * torch.randn_like(ref)
    out = {}
    for matte in (False, True):
        model = _model(reference_matte=matte)
        open_gates(model)
        with torch.no_grad():
            out[matte] = [model(x, t, text, mask, reference=r) for r in (ref, room, person)]
            ids = [model.encode_reference(r).identity.static for r in (ref, room)]
        assert torch.equal(ids[0], ids[1]) == matte
    assert torch.equal(out[True][0], out[True][1]) and not torch.allclose(out[True][0], out[True][2], atol=1e-4)
    assert not torch.allclose(out[False][0], out[False][1], atol=1e-4)
