import pytest
import torch

from avatarforge.model.autoencoder import AutoencoderConfig, VideoAutoencoder, psnr


def _video(b=2, t=9, s=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, t, s, s, generator=g) * 2 - 1


@pytest.fixture(scope="module")
def ae():
    torch.manual_seed(0)
    return VideoAutoencoder(AutoencoderConfig()).eval()


@pytest.mark.parametrize("t,lt", [(1, 1), (5, 2), (9, 3), (17, 5)])
def test_shapes(ae, t, lt):
    x = _video(t=t, s=32)
    with torch.no_grad():
        recon, z = ae(x)
    assert z.shape == (2, 8, lt, 4, 4)
    assert ae.latent_shape(x.shape) == tuple(z.shape)
    assert recon.shape == x.shape
    assert ae.video_shape(z.shape) == tuple(x.shape)


@pytest.mark.parametrize("shape,msg", [
    ((1, 3, 8, 32, 32), "1 \\+ 4k"),
    ((1, 3, 9, 30, 32), "divisible by 8"),
    ((1, 4, 9, 32, 32), "channels"),
    ((3, 9, 32, 32), r"\[B, C, T, H, W\]"),
])
def test_bad_shapes_raise(ae, shape, msg):
    with pytest.raises(ValueError, match=msg):
        ae.encode(torch.zeros(shape))


def test_bad_latent_raises(ae):
    with pytest.raises(ValueError, match="latent"):
        ae.decode(torch.zeros(1, 4, 2, 4, 4))


def test_encoder_and_decoder_are_causal(ae):
    x = _video(b=1, t=13)
    with torch.no_grad():
        z = ae.encode(x)
        for k in (1, 4, 5, 8, 12):  # change frame k: latent frames i with 4i < k must not move
            y = x.clone()
            y[:, :, k] = -y[:, :, k]
            zy = ae.encode(y)
            first_affected = (k + 3) // 4
            assert torch.equal(zy[:, :, :first_affected], z[:, :, :first_affected]), k
            assert not torch.allclose(zy[:, :, first_affected], z[:, :, first_affected])
        # decoder: latent frame i only shapes frames >= 4i - 3
        v = ae.decode(z)
        z2 = z.clone()
        z2[:, :, 2] += 1.0
        v2 = ae.decode(z2)
        assert torch.equal(v2[:, :, :5], v[:, :, :5])
        assert not torch.allclose(v2[:, :, 5], v[:, :, 5])


def test_temporal_kernel_1_mixes_time_only_where_it_is_compressed():
    # no temporal compression: every frame is encoded and decoded on its own (no lag, no smear)
    torch.manual_seed(0)
    per_frame = VideoAutoencoder(AutoencoderConfig(channel_mult=[1, 2], num_res_blocks=[1, 1],
                                                   temporal_downsample=[False], temporal_kernel=1)).eval()
    x = _video(b=1, t=5)
    y = x.clone()
    y[:, :, 2] = -y[:, :, 2]
    with torch.no_grad():
        changed = (per_frame(y)[0] - per_frame(x)[0]).abs().amax(dim=(0, 1, 3, 4))
    assert changed[2] > 0 and torch.all(changed[[0, 1, 3, 4]] == 0)
    # 2x temporal compression (4x space): latent i depends on frames 2i-1 and 2i through the strided conv only
    torch.manual_seed(0)
    ae2 = VideoAutoencoder(AutoencoderConfig(channel_mult=[1, 2], num_res_blocks=[0, 1],
                                             temporal_downsample=[True], temporal_kernel=1)).eval()
    x = _video(b=1, t=9)
    with torch.no_grad():
        z = ae2.encode(x)
        assert z.shape == (1, 8, 5, 8, 8)
        y = x.clone()
        y[:, :, 5] = -y[:, :, 5]  # frames (2i-2, 2i-1, 2i) of latent i: frame 5 feeds latents 3 only
        moved = (ae2.encode(y) - z).abs().amax(dim=(0, 1, 3, 4))
    assert moved[3] > 0 and torch.all(moved[[0, 1, 2, 4]] == 0)
    with pytest.raises(ValueError, match="temporal_kernel"):
        VideoAutoencoder(AutoencoderConfig(temporal_kernel=0))


def test_first_frame_encoded_alone(ae):
    x = _video(b=1, t=9)
    with torch.no_grad():
        assert torch.equal(ae.encode(x)[:, :, :1], ae.encode(x[:, :, :1]))


def test_scale_roundtrip_and_calibration():
    ae = VideoAutoencoder(AutoencoderConfig(scale=0.5))
    z = torch.randn(2, 8, 3, 4, 4) * 3
    assert torch.allclose(ae.unscale_latent(ae.scale_latent(z)), z)
    s = ae.calibrate_scale(z)
    assert abs(ae.scale_latent(z).std().item() - 1.0) < 1e-4
    assert "scale" in ae.state_dict() and abs(float(ae.state_dict()["scale"]) - s) < 1e-6


def test_psnr():
    x = torch.zeros(1, 3, 1, 8, 8)
    assert psnr(x + 0.1, x).item() == pytest.approx(10 * torch.log10(torch.tensor(4 / 0.01)).item(), rel=1e-5)


def test_few_steps_reduce_loss():
    torch.manual_seed(0)
    ae = VideoAutoencoder(AutoencoderConfig())
    # smooth structured clip: gradients in space, drifting over time
    t = torch.linspace(0, 1, 5).view(1, 1, 5, 1, 1)
    yy = torch.linspace(-1, 1, 32).view(1, 1, 1, 32, 1)
    xx = torch.linspace(-1, 1, 32).view(1, 1, 1, 1, 32)
    phase = torch.tensor([0.0, 1.0, 2.0]).view(1, 3, 1, 1, 1)
    x = torch.sin(3 * xx + 2 * yy + phase + 2 * t).expand(2, 3, 5, 32, 32).contiguous() * 0.8
    opt = torch.optim.Adam(ae.parameters(), lr=2e-3)
    losses = []
    for _ in range(15):
        loss, metrics = ae.reconstruction_loss(x)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert set(metrics) >= {"loss", "l1", "mse", "psnr", "latent_std"}
    assert losses[-1] < 0.6 * losses[0], losses


def test_state_dict_saves_with_safetensors_and_carries_scale(tmp_path):
    from safetensors.torch import load_file, save_file

    ae = VideoAutoencoder(AutoencoderConfig())
    ae.calibrate_scale(torch.randn(2, 8, 3, 4, 4) * 4)
    save_file(ae.state_dict(), tmp_path / "ae.safetensors")
    fresh = VideoAutoencoder(AutoencoderConfig())
    fresh.load_state_dict(load_file(tmp_path / "ae.safetensors"))
    assert float(fresh.scale) == pytest.approx(float(ae.scale))
    x = _video(b=1, t=5)
    with torch.no_grad():
        assert torch.equal(fresh.encode(x), ae.encode(x))
