"""train.trainable: which parameters a stage optimises."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from avatarforge.train.config import TrainConfig, check_train_config
from avatarforge.train.trainable import restrict_trainable


def two_towers() -> nn.Module:
    return nn.ModuleDict({"audio": nn.Linear(3, 4), "video": nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))})


def trainable_names(model: nn.Module) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def test_only_matching_parameters_stay_trainable():
    model = two_towers()
    kept = restrict_trainable(model, ["audio.*", "video.1.bias"])
    assert trainable_names(model) == {"audio.weight", "audio.bias", "video.1.bias"}
    assert kept == 3 * 4 + 4 + 2


def test_no_patterns_leave_the_task_choice_alone_and_frozen_stays_frozen():
    model = two_towers()
    model["video"][0].requires_grad_(False)  # the task froze it (as LoRA freezes the base)
    before = trainable_names(model)
    assert restrict_trainable(model, []) == sum(p.numel() for n, p in model.named_parameters() if n in before)
    assert trainable_names(model) == before
    restrict_trainable(model, ["video.*"])
    assert trainable_names(model) == {"video.1.weight", "video.1.bias"}


def test_a_pattern_that_matches_nothing_trainable_is_an_error():
    model = two_towers()
    with pytest.raises(ValueError, match="matches no trainable parameter"):
        restrict_trainable(model, ["dit.blocks.*"])


def test_frozen_parameters_get_no_update():
    model = two_towers()
    restrict_trainable(model, ["audio.*"])
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model["video"](model["audio"](torch.randn(5, 3))).square().sum().backward()
    opt.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == {"audio.weight", "audio.bias"}


def test_empty_pattern_is_refused_by_config_validation():
    cfg = TrainConfig(trainable=["audio.*", " "])
    assert any("stages.rlhf.train.trainable" in e for e in check_train_config(cfg, "stages.rlhf.train"))
    assert check_train_config(TrainConfig(trainable=["audio.*"]), "x") == []
