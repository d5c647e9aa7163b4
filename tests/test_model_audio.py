"""Audio: log-mel, encoder shapes, per-latent-frame windows, audio cross-attention locality, pretrained paths."""

import math

import pytest
import torch

from avatarforge.model.audio import AudioEncoder, AudioEncoderConfig, AudioWindows, log_mel, mel_filterbank
from avatarforge.model.avatar import AvatarDiT, AvatarDiTConfig, AvatarModel
from avatarforge.model.pretrained import PretrainedConfig, load_autoencoder, load_t5_encoder, require_local
from avatarforge.model.text_encoder import TextEncoderConfig

SR = 16000
ACFG = AudioEncoderConfig(dim=16, layers=1, heads=2)


pytestmark = pytest.mark.usefixtures("one_thread")


def tone(freq: float, seconds: float = 0.36, b: int = 1) -> torch.Tensor:
    t = torch.arange(int(SR * seconds)) / SR
    return torch.sin(2 * math.pi * freq * t).expand(b, -1).clone()


def test_mel_filterbank_and_log_mel():
    fb = mel_filterbank(201, 80, SR)
    assert fb.shape == (201, 80) and (fb >= 0).all() and (fb.sum(0) > 0).all()
    cfg = AudioEncoderConfig()
    low, high = log_mel(tone(300), cfg), log_mel(tone(3000), cfg)
    assert low.shape == (1, 80, int(SR * 0.36) // 160 + 1)
    assert low.mean(-1).argmax() < high.mean(-1).argmax()  # higher pitch -> higher mel bin
    silent = log_mel(torch.zeros(2, 5760), cfg)
    assert torch.isfinite(silent).all()
    assert high.max() <= 1.5 and high.min() >= -1.6  # Whisper-style range
    with pytest.raises(ValueError, match="samples"):
        log_mel(torch.zeros(5760), cfg)


def test_encoder_shapes_and_frame_rate():
    enc = AudioEncoder(ACFG)
    wave = torch.randn(2, 5760)  # 9 frames at 25 fps
    feats = enc(wave)
    assert enc.frame_rate == 50.0
    assert feats.shape == (2, math.ceil((5760 // 160 + 1) / 2), 16)


def test_windows_cover_each_latent_frame_plus_context():
    enc = AudioEncoder(ACFG)  # 2 features per video frame, core 8, context 2 -> width 12
    feats = torch.arange(19.0)[None, :, None].expand(2, -1, 16)  # feature value = its index
    win = enc.windows(feats, n_latent_frames=3)
    assert win.tokens.shape == (2, 3, 12, 16) and win.mask.shape == (2, 3, 12)
    for i in range(3):
        # latent frame i ends with video frame 4i, i.e. feature 2 * (4i + 1); 2 features of context after
        expected = [j for j in range(8 * i - 8, 8 * i + 4) if 0 <= j < 19]
        assert win.tokens[0, i, win.mask[0, i], 0].tolist() == expected
    assert not win.mask[0, 0, :8].any()  # frame 0 is a single video frame: the rest is before t=0
    grouped = enc.windows(feats, n_latent_frames=2, group=2)  # temporal patch 2 -> 2 latent frames/token
    assert grouped.tokens.shape == (2, 1, 20, 16)
    with pytest.raises(ValueError, match="temporal patches"):
        enc.windows(feats, 3, group=2)


def _dit(depth=1):
    torch.manual_seed(0)
    cfg = AvatarDiTConfig(dim=32, depth=depth, heads=2, text_dim=16, audio_dim=16, identity_dim=32)
    model = AvatarDiT(cfg).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.abs().sum() == 0:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model


def test_audio_cross_attention_is_per_latent_frame():
    """With one block, audio seen only by latent frame 2's window changes only frame 2's output."""
    model = _dit(depth=1)
    x, t = torch.randn(1, 8, 3, 4, 4), torch.rand(1)
    feats = torch.randn(1, 19, 16)
    enc = AudioEncoder(ACFG)
    with torch.no_grad():
        base = model(x, t, audio=enc.windows(feats, 3))
        feats2 = feats.clone()
        feats2[:, 17:] += 5.0  # after frame 1's window (ends at feature 11), inside frame 2's
        moved = model(x, t, audio=enc.windows(feats2, 3))
    diff = (moved - base).abs().amax(dim=(0, 1, 3, 4))
    assert diff[:2].max() == 0 and diff[2] > 1e-4
    assert not torch.allclose(base, model(x, t), atol=1e-4)  # audio matters once its path is open


def test_dropped_audio_is_exactly_no_audio_and_masked_keys_ignored():
    model = _dit(depth=2)
    x, t = torch.randn(2, 8, 3, 4, 4), torch.rand(2)
    win = AudioWindows(torch.randn(2, 3, 12, 16), torch.rand(2, 3, 12) > 0.3)
    with torch.no_grad():
        out = model(x, t, audio=win, drop={"audio": torch.tensor([True, False])})
        assert torch.allclose(out[0], model(x[:1], t[:1])[0], atol=1e-6)
        assert torch.allclose(out[1], model(x[1:], t[1:], audio=AudioWindows(win.tokens[1:], win.mask[1:]))[0],
                              atol=1e-6)
        tokens = win.tokens.clone()
        tokens[~win.mask] = 100.0  # masked features are not attended to
        assert torch.allclose(model(x, t, audio=AudioWindows(tokens, win.mask)), model(x, t, audio=win), atol=1e-6)
    with pytest.raises(ValueError, match="token-frames"):
        model(x, t, audio=AudioWindows(torch.randn(2, 2, 12, 16), torch.ones(2, 2, 12, dtype=torch.bool)))


def test_avatar_model_encodes_waveform_once_for_sampling():
    torch.manual_seed(0)
    model = AvatarModel(TextEncoderConfig(dim=16, layers=1, heads=2, max_len=16),
                        AvatarDiTConfig(dim=32, depth=1, heads=2, text_dim=16, audio_dim=16, identity_dim=32),
                        ACFG).eval()
    wave = torch.randn(1, 5760)
    x, t = torch.randn(1, 8, 3, 4, 4), torch.rand(1)
    with torch.no_grad():
        win = model.encode_audio(wave, n_latent_frames=3)
        assert torch.equal(model(x, t, audio=wave), model(x, t, audio=win))
    with torch.no_grad():  # as after t2v: the output layers and adaLN are no longer zero
        for name, p in model.dit.named_parameters():
            if p.abs().sum() == 0 and "audio" not in name:
                p.normal_(0, 0.05)
    model(x, t, audio=wave).square().sum().backward()
    # the zero-initialised audio output layer gets a gradient, so the audio path opens in training
    assert model.dit.blocks[0].audio_attn.out.weight.grad.abs().sum() > 0


def test_pretrained_parts_are_local_only_with_clear_errors(tmp_path):
    assert PretrainedConfig() == PretrainedConfig(autoencoder="", t5="", wav2vec2="")
    with pytest.raises(FileNotFoundError, match="local paths only"):
        require_local("", "T5 encoder")
    with pytest.raises(FileNotFoundError, match=r"wav2vec2.*/nonexistent/w2v"):
        AudioEncoder(AudioEncoderConfig(wav2vec2="/nonexistent/w2v"))
    with pytest.raises(FileNotFoundError, match="T5"):
        load_t5_encoder(str(tmp_path / "missing"))
    from safetensors.torch import save_file

    from avatarforge.model.autoencoder import AutoencoderConfig, VideoAutoencoder

    ae_cfg = AutoencoderConfig(base_channels=4)
    save_file(VideoAutoencoder(ae_cfg).state_dict(), str(tmp_path / "ae.safetensors"))
    ae = load_autoencoder(str(tmp_path / "ae.safetensors"), ae_cfg)
    assert not any(p.requires_grad for p in ae.parameters())
