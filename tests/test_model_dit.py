import pytest
import torch
import torch.nn as nn

from avatarforge.model.attention import RoPE3D, masked_sdpa
from avatarforge.model.dit import DiT, DiTConfig
from avatarforge.model.flow import flow_matching_loss
from avatarforge.model.text_encoder import TextEncoder, TextEncoderConfig

CFG = DiTConfig(dim=64, depth=2, heads=4, text_dim=32)


def _randomize_zero_init(model: nn.Module, std: float = 0.05) -> None:
    """Give adaLN-Zero / output layers non-zero weights so the tests can see the network's behaviour."""
    g = torch.Generator().manual_seed(123)
    with torch.no_grad():
        for p in model.parameters():
            if p.abs().sum() == 0:
                p.copy_(torch.randn(p.shape, generator=g) * std)


def _inputs(b=2, t=3, h=4, w=4, L=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, 8, t, h, w, generator=g)
    tt = torch.rand(b, generator=g)
    text = torch.randn(b, L, 32, generator=g)
    mask = torch.ones(b, L, dtype=torch.bool)
    mask[0, 4:] = False
    return x, tt, text, mask


def test_shape_and_zero_init_output():
    torch.manual_seed(0)
    model = DiT(CFG)
    x, t, text, mask = _inputs()
    v = model(x, t, text, mask)
    assert v.shape == x.shape
    assert torch.equal(v, torch.zeros_like(v))  # adaLN-Zero: a fresh DiT predicts exactly zero
    v.sum().backward()  # but gradients reach the output layer
    assert model.final.weight.grad.abs().sum() > 0


def test_data_prediction_returns_the_velocity_of_its_clean_estimate():
    torch.manual_seed(0)
    cfg = DiTConfig(**{**CFG.__dict__, "prediction": "data", "min_t": 0.05})
    model = DiT(cfg)
    x, _, text, mask = _inputs()
    t = torch.tensor([0.5, 0.01])
    # fresh: the head predicts x0 = 0, so v = (x_t - 0) / t, with 1/t capped at 1/min_t
    v = model(x, t, text, mask)
    assert torch.allclose(v[0], x[0] / 0.5) and torch.allclose(v[1], x[1] / 0.05)
    with torch.no_grad():  # a trained head: x0_hat = x_t - t v recovers what the head said
        model.final.bias.normal_()
        model.final_ada[-1].bias.normal_()
        head = DiT(CFG)
        head.load_state_dict(model.state_dict())
        v = model(x, t, text, mask)
        x0_hat = head(x, t, text, mask)
    assert torch.allclose(x[0] - 0.5 * v[0], x0_hat[0], atol=1e-5)
    with pytest.raises(ValueError, match="prediction"):
        DiT(DiTConfig(**{**CFG.__dict__, "prediction": "noise"}))


def test_bad_shapes_raise():
    model = DiT(CFG)
    with pytest.raises(ValueError, match="divisible"):
        model(torch.zeros(1, 8, 3, 5, 4), torch.zeros(1))
    with pytest.raises(ValueError, match="latent_channels|\\[B, 8"):
        model(torch.zeros(1, 4, 3, 4, 4), torch.zeros(1))


def test_patchify_roundtrip():
    model = DiT(DiTConfig(patch_size=[1, 2, 2]))
    x = torch.randn(2, 8, 3, 4, 6)
    assert torch.equal(model.unpatchify(model.patchify(x), model.token_grid(x.shape)), x)


def test_text_mask_respected():
    torch.manual_seed(0)
    model = DiT(CFG)
    _randomize_zero_init(model)
    x, t, text, mask = _inputs()
    v = model(x, t, text, mask)
    text2 = text.clone()
    text2[0, 4:] = torch.randn(2, 32) * 10  # padding tokens of sample 0
    assert torch.allclose(model(x, t, text2, mask), v, atol=1e-5)
    text3 = text.clone()
    text3[0, :4] += 1.0  # real tokens do matter
    assert not torch.allclose(model(x, t, text3, mask)[0], v[0], atol=1e-4)


def test_empty_caption_is_finite_and_equals_no_text_cross_attention():
    torch.manual_seed(0)
    model = DiT(CFG)
    _randomize_zero_init(model)
    x, t, text, _ = _inputs()
    empty = torch.zeros(2, text.shape[1], dtype=torch.bool)
    v = model(x, t, text, empty)
    assert torch.isfinite(v).all()
    assert torch.allclose(v, model(x, t, torch.randn_like(text), empty), atol=1e-6)


def test_rope_relative_property():
    rope = RoPE3D(head_dim=24)
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 1, 1, 24, generator=g), torch.randn(1, 1, 1, 24, generator=g)

    def score(pq, pk):
        aq, ak = (rope.angles(torch.tensor([p], dtype=torch.float32)) for p in (pq, pk))
        return (RoPE3D.rotate(q, aq) * RoPE3D.rotate(k, ak)).sum()

    base = score([1, 2, 3], [0, 1, 1])
    assert torch.allclose(base, score([5, 7, 4], [4, 6, 2]), atol=1e-4)  # same offset
    for other in ([2, 2, 3], [1, 3, 3], [1, 2, 4]):  # each axis is position-sensitive
        assert not torch.allclose(base, score(other, [0, 1, 1]), atol=1e-3)
    # rotation preserves norms
    a = rope.angles(RoPE3D.grid(2, 3, 4))
    x = torch.randn(1, 2, 24, 24)
    assert torch.allclose(RoPE3D.rotate(x, a).norm(dim=-1), x.norm(dim=-1), atol=1e-5)


def test_dit_is_position_sensitive():
    torch.manual_seed(0)
    model = DiT(CFG)
    _randomize_zero_init(model)
    x, t, text, mask = _inputs()
    v = model(x, t, text, mask)
    # Without positions, permuting frames would just permute the output; with RoPE it does not.
    perm = [2, 0, 1]
    assert not torch.allclose(model(x[:, :, perm], t, text, mask), v[:, :, perm], atol=1e-4)


def test_masked_sdpa_matches_dense_on_real_tokens():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, 5, 8, generator=g) for _ in range(3))
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    out = masked_sdpa(q, k, v, mask)
    ref = torch.nn.functional.scaled_dot_product_attention(q[:1], k[:1, :, :3], v[:1, :, :3])
    assert torch.allclose(out[:1], ref, atol=1e-6)


def test_text_encoder_shapes_and_mask():
    enc = TextEncoder(TextEncoderConfig(dim=32, layers=2, heads=4, max_len=16))
    ids = torch.randint(1, 257, (2, 10))
    ids[0, 6:] = 0
    mask = ids != 0
    out = enc(ids, mask)
    assert out.shape == (2, 10, 32)
    assert torch.equal(out[0, 6:], torch.zeros(4, 32))
    ids2 = ids.clone()
    ids2[0, 6:] = 99  # change padded ids only
    assert torch.allclose(enc(ids2, mask), out, atol=1e-6)
    with pytest.raises(ValueError, match="max_len"):
        enc(torch.ones(1, 17, dtype=torch.long))


def test_text_encoder_keeps_tokens_apart_at_init():
    # A fresh encoder whose positions all come out alike gives the DiT's cross-attention identical keys:
    # its queries get no gradient and the caption is never learned.
    torch.manual_seed(0)
    enc = TextEncoder(TextEncoderConfig(dim=128, layers=2, heads=4, max_len=96))
    caps = [b"a round-faced person, speaking slowly, in a purple room", b"a round-faced person, speaking slowly, in a lime room"]
    ids = torch.zeros(2, 96, dtype=torch.long)
    for i, c in enumerate(caps):
        ids[i, : len(c)] = torch.tensor(list(c)) + 1
    with torch.no_grad():
        out = enc(ids, ids != 0)
    n = len(caps[0])
    unit = nn.functional.normalize(out[0, :n], dim=-1)
    assert float((unit @ unit.T).mean()) < 0.5
    word = n - len(b"purple room")  # where the captions differ
    assert (out[0, word] - out[1, word]).norm() > 0.5 * out[0, word].norm()


@pytest.mark.parametrize("prediction", ["velocity", "data"])
def test_few_steps_reduce_flow_loss(prediction):
    torch.manual_seed(0)
    model = DiT(DiTConfig(**{**CFG.__dict__, "prediction": prediction}))
    enc = TextEncoder(TextEncoderConfig(dim=32, layers=1, heads=4, max_len=16))
    x0, _, _, _ = _inputs(b=4)
    ids = torch.randint(1, 257, (4, 8))
    opt = torch.optim.AdamW(list(model.parameters()) + list(enc.parameters()), lr=3e-3)
    # fixed batch and fixed (t, noise) so the loss is comparable across steps
    g = torch.Generator().manual_seed(1)
    t = torch.rand(4, generator=g)
    noise = torch.randn(x0.shape, generator=g)
    losses = []
    for _ in range(20):
        text = enc(ids, ids != 0)
        loss, _ = flow_matching_loss(model, x0, t=t, noise=noise, text=text, text_mask=ids != 0)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses


def test_approx_flops_scales():
    model = DiT(DiTConfig())
    f1 = model.approx_flops((1, 8, 3, 8, 8), text_len=32)
    assert f1 > 0
    assert model.approx_flops((2, 8, 3, 8, 8), text_len=32) == 2 * f1
    # dominated by 2 * params * tokens for short sequences
    n_tokens = 3 * 4 * 4
    n_params = sum(p.numel() for n, p in model.named_parameters() if "blocks" in n)
    assert 0.5 < f1 / (2 * n_params * n_tokens) < 2.0
    assert model.approx_flops((1, 8, 5, 8, 8), 32) > f1


def test_grad_checkpointing_same_output():
    torch.manual_seed(0)
    model = DiT(DiTConfig(dim=64, depth=2, heads=4, text_dim=32, grad_checkpointing=True)).train()
    _randomize_zero_init(model)
    x, t, text, mask = _inputs()
    a = model(x, t, text, mask)
    model.cfg.grad_checkpointing = False
    assert torch.allclose(a, model(x, t, text, mask), atol=1e-6)


def test_models_build_from_omegaconf():
    from omegaconf import OmegaConf

    from avatarforge.model import AutoencoderConfig, VideoAutoencoder

    ae_cfg = OmegaConf.merge(OmegaConf.structured(AutoencoderConfig), {"base_channels": 8, "scale": 0.7})
    ae = VideoAutoencoder(ae_cfg)
    assert ae.latent_shape((1, 3, 5, 16, 16)) == (1, 8, 2, 2, 2)
    assert abs(float(ae.scale) - 0.7) < 1e-6
    dit_cfg = OmegaConf.merge(OmegaConf.structured(DiTConfig), {"dim": 32, "depth": 1, "text_dim": 16})
    te_cfg = OmegaConf.merge(OmegaConf.structured(TextEncoderConfig), {"dim": 16, "layers": 1})
    te, dit = TextEncoder(te_cfg), DiT(dit_cfg)
    ids = torch.randint(1, 257, (1, 5))
    out = dit(torch.randn(1, 8, 2, 2, 2), torch.rand(1), te(ids), ids != 0)
    assert out.shape == (1, 8, 2, 2, 2)
    assert isinstance(OmegaConf.to_object(dit_cfg), DiTConfig)
