"""Multi-condition classifier-free guidance and condition dropout."""

import pytest
import torch

from avatarforge.model.audio import AudioEncoderConfig
from avatarforge.model.avatar import AvatarDiTConfig, AvatarModel
from avatarforge.model.flow import euler_sample, flow_matching_loss
from avatarforge.model.guidance import guidance_terms, guided_model_fn, guided_velocity, sample_condition_drop
from avatarforge.model.text_encoder import TextEncoderConfig

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model = AvatarModel(TextEncoderConfig(dim=16, layers=1, heads=2, max_len=16),
                        AvatarDiTConfig(dim=32, depth=2, heads=2, text_dim=16, audio_dim=16, identity_dim=32,
                                        ref_block=8, query_block=8, ref_top_k=2),
                        AudioEncoderConfig(dim=16, layers=1, heads=2)).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.abs().sum() == 0:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    g = torch.Generator().manual_seed(2)
    x, t = torch.randn(2, 8, 3, 4, 4, generator=g), torch.rand(2, generator=g)
    ids = torch.randint(1, 257, (2, 6), generator=g)
    with torch.no_grad():
        cond = dict(text=ids, text_mask=ids != 0, audio=model.encode_audio(torch.randn(2, 5760, generator=g), 3),
                    reference=model.encode_reference(torch.randn(2, 8, 5, 4, 4, generator=g)))
    return model, x, t, cond


def test_guidance_terms():
    assert guidance_terms({}, ["text", "audio", "reference"]) == [(1.0, ("reference", "audio", "text"))]
    terms = guidance_terms({"reference": 2.0, "audio": 3.0, "text": 1.5}, ["reference", "audio", "text"])
    assert terms == [(-1.0, ()), (-1.0, ("reference",)), (1.5, ("reference", "audio")),
                     (1.5, ("reference", "audio", "text"))]
    assert sum(w for w, _ in terms) == 1.0
    assert guidance_terms({"text": 0.0}, ["text"]) == [(1.0, ())]


def test_scale_one_is_conditional_and_zero_is_unconditional(setup):
    model, x, t, cond = setup
    with torch.no_grad():
        conditional = model(x, t, **cond)
        assert torch.equal(guided_velocity(model, x, t, cond, {"text": 1, "audio": 1, "reference": 1}), conditional)
        empty = {"text": torch.ones(2, dtype=torch.bool)}
        unconditional = model(x, t, cond["text"], cond["text_mask"], drop=empty)
        zero = guided_velocity(model, x, t, cond, {"text": 0, "audio": 0, "reference": 0})
        assert torch.allclose(zero, unconditional, atol=1e-6)
        assert not torch.allclose(conditional, unconditional, atol=1e-4)


def test_compositional_guidance_matches_the_formula(setup):
    model, x, t, cond = setup
    s = {"reference": 2.0, "audio": 3.5, "text": 1.5}
    text_off = {"text": torch.ones(2, dtype=torch.bool)}
    with torch.no_grad():
        v0 = model(x, t, cond["text"], cond["text_mask"], drop=text_off)
        v_r = model(x, t, cond["text"], cond["text_mask"], reference=cond["reference"], drop=text_off)
        v_ra = model(x, t, cond["text"], cond["text_mask"], audio=cond["audio"], reference=cond["reference"],
                     drop=text_off)
        v_rat = model(x, t, **cond)
        expected = v0 + s["reference"] * (v_r - v0) + s["audio"] * (v_ra - v_r) + s["text"] * (v_rat - v_ra)
        got = guided_velocity(model, x, t, cond, s)
    assert torch.allclose(got, expected, atol=1e-5)
    with pytest.raises(ValueError, match="scales"):
        guided_velocity(model, x, t, cond, {"style": 2.0})


def test_drop_masks_equal_leaving_conditions_out(setup):
    model, x, t, cond = setup
    drop = {"text": torch.tensor([True, False]), "audio": torch.tensor([True, False]),
            "reference": torch.tensor([True, False])}
    with torch.no_grad():
        mixed = model(x, t, **cond, drop=drop)
        bare = model(x, t, cond["text"], cond["text_mask"], drop={"text": torch.ones(2, dtype=torch.bool)})
        full = model(x, t, **cond)
    assert torch.allclose(mixed[0], bare[0], atol=1e-6) and torch.allclose(mixed[1], full[1], atol=1e-6)
    with pytest.raises(ValueError, match="drop keys"):
        model(x, t, **cond, drop={"style": torch.ones(2, dtype=torch.bool)})


def test_sample_condition_drop_rates_and_independence():
    g = torch.Generator().manual_seed(0)
    d = sample_condition_drop(20000, {"text": 0.1, "audio": 0.3, "reference": 0.5}, generator=g)
    assert set(d) == {"text", "audio", "reference"} and d["audio"].dtype == torch.bool
    for name, p in (("text", 0.1), ("audio", 0.3), ("reference", 0.5)):
        assert abs(d[name].float().mean().item() - p) < 0.02
    both = (d["audio"] & d["reference"]).float().mean().item()
    assert abs(both - 0.15) < 0.02  # independent
    d = sample_condition_drop(20000, 0.0, p_all=0.2, generator=g)
    assert torch.equal(d["text"], d["audio"]) and abs(d["text"].float().mean().item() - 0.2) < 0.02
    with pytest.raises(ValueError, match="conditions"):
        sample_condition_drop(4, {"style": 0.1})


def test_training_step_with_dropout_and_guided_sampling(setup):
    model, x, t, cond = setup
    model.train()
    ref = torch.randn(2, 8, 5, 4, 4)
    drop = sample_condition_drop(2, 0.5, generator=torch.Generator().manual_seed(3))
    loss, metrics = flow_matching_loss(model, x, generator=torch.Generator().manual_seed(0), text=cond["text"],
                                       text_mask=cond["text_mask"], audio=torch.randn(2, 5760), reference=ref,
                                       drop=drop)
    loss.backward()
    assert torch.isfinite(loss) and model.dit.blocks[0].ref_gate.grad is not None
    model.eval()
    out = euler_sample(guided_model_fn(model, {"audio": 2.0, "reference": 1.5}), x.shape, 3,
                       torch.Generator().manual_seed(0), **cond)
    assert out.shape == x.shape and torch.isfinite(out).all()
