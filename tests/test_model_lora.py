"""LoRA: injection by name pattern, only adapters trainable, identity at init, merged == unmerged."""

import pytest
import torch
import torch.nn as nn

from avatarforge.model.audio import AudioEncoderConfig
from avatarforge.model.avatar import AvatarDiTConfig, AvatarModel
from avatarforge.model.lora import (
    LoRAConfig,
    LoRALinear,
    inject_lora,
    lora_parameters,
    lora_state_dict,
    merge_lora,
)
from avatarforge.model.text_encoder import TextEncoderConfig

pytestmark = pytest.mark.usefixtures("one_thread")


def build():
    torch.manual_seed(0)
    model = AvatarModel(TextEncoderConfig(dim=16, layers=1, heads=2, max_len=16),
                        AvatarDiTConfig(dim=32, depth=2, heads=2, text_dim=16, audio_dim=16, identity_dim=32,
                                        ref_block=8, query_block=8, ref_top_k=2),
                        AudioEncoderConfig(dim=16, layers=1, heads=2))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # a "trained" model: nothing zero
        for p in model.parameters():
            if p.abs().sum() == 0:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    g = torch.Generator().manual_seed(2)
    batch = dict(x=torch.randn(2, 8, 3, 4, 4, generator=g), t=torch.rand(2, generator=g),
                 text=torch.randint(1, 257, (2, 6), generator=g), audio=torch.randn(2, 5760, generator=g),
                 reference=torch.randn(2, 8, 5, 4, 4, generator=g))
    return model, batch


def test_inject_by_pattern_freezes_base_and_starts_as_identity():
    model, batch = build()
    before = model(**batch)
    keys_before = set(model.state_dict())
    names = inject_lora(model, LoRAConfig(rank=4, alpha=8.0))
    assert len(names) == 2 * (9 + 2)  # per block: q/kv/out of attn, cross, audio_attn + 2 MLP linears
    assert all(n.startswith("dit.blocks.") for n in names)
    assert isinstance(model.dit.blocks[0].attn.q, LoRALinear)
    assert not isinstance(model.text_encoder.blocks[0].attn.q, LoRALinear)  # not a target
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(("lora_a", "lora_b")) for n in trainable)
    assert len(lora_parameters(model)) == len(trainable) == 2 * len(names)
    assert torch.allclose(model(**batch), before, atol=1e-6)  # B = 0: nothing changes yet
    assert keys_before <= set(model.state_dict())  # base weights keep their keys
    assert set(lora_state_dict(model)) == set(model.state_dict()) - keys_before
    with pytest.raises(ValueError, match="no nn.Linear"):
        inject_lora(model, LoRAConfig(targets=["nothing.*"]))


def test_training_changes_only_adapters_and_merge_equals_unmerged():
    model, batch = build()
    inject_lora(model, LoRAConfig(rank=4, alpha=4.0, targets=["dit.blocks.*.attn.*", "dit.blocks.*.mlp.*"]))
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    opt = torch.optim.Adam(lora_parameters(model), lr=1e-2)  # moves every adapter whatever its gradient scale
    for _ in range(3):
        loss = model(**batch).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    with torch.no_grad():
        unmerged = model(**batch)
        assert merge_lora(model) == 2 * 5
        merged = model(**batch)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert type(model.dit.blocks[0].attn.q) is nn.Linear
    assert not any(k.endswith(("lora_a", "lora_b")) for k in model.state_dict())
    assert torch.allclose(merged, unmerged, atol=1e-5), (merged - unmerged).abs().max()
    fresh, _ = build()
    # the adapters did learn something, and the merge carried it into the base weights
    learned = (model.dit.blocks[0].attn.q.weight - fresh.dit.blocks[0].attn.q.weight).abs().max()
    assert learned > 1e-3, learned
    with torch.no_grad():
        assert not torch.allclose(fresh(**batch), merged, atol=1e-4)  # and it shows in the output
