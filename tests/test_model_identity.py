"""Static vs dynamic identity: shapes, invariances by construction, the losses, the swap API."""

import math

import pytest
import torch

from avatarforge.model.avatar import AvatarDiT, AvatarDiTConfig
from avatarforge.model.identity import (
    IdentityEncoder,
    IdentityTokens,
    color_jitter,
    identity_losses,
    info_nce,
    latent_jitter,
    pair_similarity,
    swap_identity,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def encoder(seed=0) -> IdentityEncoder:
    torch.manual_seed(seed)
    return IdentityEncoder(latent_channels=8, dim=32, out_dim=24, n_static=3, n_dynamic=2, heads=2)


def synthetic_clips(ids: list[int], seed: int, t: int = 9) -> torch.Tensor:
    """Latent clips [len(ids), 8, t, 8, 8]: identity k = a fixed appearance map + a motion pattern moving
    at its own rhythm; each clip has a random phase, amplitude and noise."""
    world = torch.Generator().manual_seed(1234)
    appearance = torch.randn(8, 8, 8, 8, generator=world)
    motion = torch.randn(8, 8, 8, 8, generator=world)
    g = torch.Generator().manual_seed(seed)
    frames = torch.arange(t, dtype=torch.float32)
    out = []
    for k in ids:
        freq = 0.4 + 0.5 * k
        phase, amp = torch.rand(1, generator=g) * 2 * math.pi, 0.6 + 0.4 * torch.rand(1, generator=g)
        wave = amp * torch.sin(freq * frames + phase)  # [t]
        clip = appearance[k][:, None] + wave[None, :, None, None] * motion[k][:, None]
        out.append(clip + 0.1 * torch.randn(clip.shape, generator=g))
    return torch.stack(out)


def test_shapes_and_single_frame_reference():
    enc = encoder()
    ids = enc(torch.randn(2, 8, 5, 8, 8))
    assert ids.static.shape == (2, 3, 24) and ids.dynamic.shape == (2, 2, 24)
    assert ids.pooled().shape == (2, 48)
    still = enc(torch.randn(2, 8, 1, 8, 8))  # an image reference: no motion, finite dynamic tokens
    assert torch.isfinite(still.dynamic).all()
    with pytest.raises(ValueError, match="C, T, H, W"):
        enc(torch.randn(2, 8, 8, 8))


def test_invariances_by_construction():
    enc = encoder()
    ref = torch.randn(2, 8, 7, 8, 8)
    ids = enc(ref)
    # static: pooled over time -> frame order does not matter
    perm = torch.randperm(7, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(enc.static(ref[:, :, perm]), ids.static, atol=1e-5)
    # dynamic: a new appearance (per-channel gain / offset, a static per-pixel offset) changes nothing
    jittered = latent_jitter(ref, torch.Generator().manual_seed(1), strength=0.5)
    assert not torch.allclose(jittered, ref, atol=1e-2)
    assert torch.allclose(enc.dynamic(jittered), ids.dynamic, atol=1e-5)
    assert torch.allclose(enc.dynamic(ref + torch.randn(2, 8, 1, 8, 8)), ids.dynamic, atol=1e-5)
    assert not torch.allclose(enc.static(jittered), ids.static, atol=1e-3)  # appearance is static's job
    # ... while motion changes the dynamic tokens
    assert not torch.allclose(enc.dynamic(ref[:, :, perm]), ids.dynamic, atol=1e-3)


def test_color_jitter_is_an_appearance_change():
    g = torch.Generator().manual_seed(0)
    frame = torch.rand(2, 3, 1, 16, 16, generator=g) * 2 - 1
    video = frame.expand(-1, -1, 5, -1, -1)
    out = color_jitter(video, torch.Generator().manual_seed(1), 0.3, 0.3, 0.3)
    assert out.shape == video.shape and out.min() >= -1 and out.max() <= 1
    assert not torch.allclose(out, video, atol=1e-2)
    assert torch.allclose(out, out[:, :, :1].expand_as(out))  # the same change in every frame


def test_info_nce_prefers_matching_pairs():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(4, 3, 8, generator=g)
    assert info_nce(a, a + 0.01 * torch.randn(a.shape, generator=g)) < info_nce(a, a.roll(1, 0))
    labels = torch.tensor([0, 0, 1, 1])
    b = torch.stack([a[0], a[0], a[2], a[2]])
    assert info_nce(b, b, labels) < info_nce(b, b)  # rows of one identity are positives, not negatives


def test_losses_separate_identities_after_a_few_steps():
    enc = encoder(seed=1)
    opt = torch.optim.Adam(enc.parameters(), lr=3e-3)
    ids = [0, 1, 2, 3]
    for step in range(12):
        a, b = synthetic_clips(ids, seed=2 * step), synthetic_clips(ids, seed=2 * step + 1)
        aug = latent_jitter(a, torch.Generator().manual_seed(step))
        loss, metrics = identity_losses(enc, a, b, aug)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():  # held-out clips of the same people
        a, b = synthetic_clips(ids, seed=999), synthetic_clips(ids, seed=1000)
        ia, ib = enc(a), enc(b)
        s_same, s_diff = pair_similarity(ia.static, ib.static)
        d_same, d_diff = pair_similarity(ia.dynamic, ib.dynamic)
        assert s_same > s_diff + 0.1 and d_same > d_diff + 0.1, (s_same, s_diff, d_same, d_diff)
        # same identity -> low loss; pairing clips of different people -> higher
        assert info_nce(ia.static, ib.static) < info_nce(ia.static, ib.static.roll(1, 0))
        assert info_nce(ia.dynamic, ib.dynamic) < info_nce(ia.dynamic, ib.dynamic.roll(1, 0))
        _, m = identity_losses(enc, a, b, latent_jitter(a, torch.Generator().manual_seed(5)))
        assert m["identity/dynamic_augment_mse"] < 1e-6
        assert set(m) >= {"identity/static_nce", "identity/static_sim_same", "identity/dynamic_sim_diff"}


def test_swap_static_of_a_with_dynamic_of_b():
    torch.manual_seed(0)
    model = AvatarDiT(AvatarDiTConfig(dim=32, depth=2, heads=2, text_dim=16, audio_dim=16, identity_dim=32,
                                      n_summary=2, n_static=2, n_dynamic=2)).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.abs().sum() == 0:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05 + (1.0 if name.endswith("ref_gate") else 0.0))
    ref_a, ref_b = synthetic_clips([0], seed=1, t=5), synthetic_clips([3], seed=2, t=5)
    x, t = torch.randn(1, 8, 3, 8, 8), torch.rand(1)
    with torch.no_grad():
        id_a, id_b = model.identity(ref_a), model.identity(ref_b)
        swapped = swap_identity(id_a, id_b)
        assert isinstance(swapped, IdentityTokens)
        assert swapped.static is id_a.static and swapped.dynamic is id_b.dynamic
        cache = model.encode_reference(ref_a, identity=swapped)
        assert torch.equal(cache.identity.static, id_a.static) and torch.equal(cache.identity.dynamic, id_b.dynamic)
        # A's own tokens reproduce the default; the swap changes the generation
        plain = model(x, t, reference=model.encode_reference(ref_a))
        assert torch.allclose(model(x, t, reference=model.encode_reference(ref_a, identity=id_a)), plain)
        out = model(x, t, reference=cache)
        assert not torch.allclose(out, plain, atol=1e-4)
        assert not torch.allclose(out, model(x, t, reference=model.encode_reference(ref_b)), atol=1e-4)
