"""LoRA adapters: low-rank updates W + (alpha / rank) * B A on chosen nn.Linear layers.

    names = inject_lora(model, LoRAConfig(rank=8, alpha=8, targets=["dit.blocks.*.attn.*", "dit.blocks.*.mlp.*"]))
    ... train: only lora_a / lora_b require grad ...
    merge_lora(model)   # folds B A into the base weights: plain nn.Linear again, same outputs

Targets are fnmatch patterns over module names (`dit.blocks.3.attn.q`, ...). A LoRALinear is an
nn.Linear (its `weight` / `bias` keep their state-dict keys), so full checkpoints still load into it;
`lora_state_dict` holds just the adapters. B starts at zero: an injected model computes what it did.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from fnmatch import fnmatchcase

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class LoRAConfig:
    rank: int = 8
    alpha: float = 8.0
    dropout: float = 0.0
    # fnmatch patterns over module names of the model given to inject_lora (an AvatarModel here): the
    # self / text / audio attention (q, kv, out) and MLP linears of every DiT block
    targets: list[str] = field(default_factory=lambda: [
        f"dit.blocks.*.{m}.{p}" for m in ("attn", "cross", "audio_attn") for p in ("q", "kv", "out")
    ] + ["dit.blocks.*.mlp.0", "dit.blocks.*.mlp.2"])


class LoRALinear(nn.Linear):
    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__(base.in_features, base.out_features, bias=base.bias is not None,
                         device=base.weight.device, dtype=base.weight.dtype)
        self.weight = base.weight
        self.bias = base.bias
        self.scale = alpha / rank
        self.lora_a = nn.Parameter(torch.empty(rank, base.in_features, device=base.weight.device,
                                               dtype=base.weight.dtype))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank, device=base.weight.device,
                                               dtype=base.weight.dtype))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias) + self.scale * F.linear(
            F.linear(self.dropout(x), self.lora_a), self.lora_b
        )

    @torch.no_grad()
    def merged(self) -> nn.Linear:
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                        device=self.weight.device, dtype=self.weight.dtype)
        lin.weight.copy_(self.weight + self.scale * (self.lora_b @ self.lora_a))
        if self.bias is not None:
            lin.bias.copy_(self.bias)
        lin.weight.requires_grad_(self.weight.requires_grad)
        if lin.bias is not None:
            lin.bias.requires_grad_(self.bias.requires_grad)
        return lin


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def inject_lora(model: nn.Module, cfg: LoRAConfig | None = None, freeze_base: bool = True) -> list[str]:
    """Wrap every nn.Linear whose name matches cfg.targets; with freeze_base, only LoRA params train.
    Returns the wrapped module names; ValueError if nothing matched."""
    cfg = cfg or LoRAConfig()
    names = [n for n, m in model.named_modules()
             if type(m) is nn.Linear and any(fnmatchcase(n, p) for p in cfg.targets)]
    if not names:
        raise ValueError(f"no nn.Linear matches LoRA targets {list(cfg.targets)}")
    if freeze_base:
        model.requires_grad_(False)
    for n in names:
        _set_module(model, n, LoRALinear(model.get_submodule(n), cfg.rank, cfg.alpha, cfg.dropout))
    return names


def merge_lora(model: nn.Module) -> int:
    """Replace every LoRALinear by an nn.Linear with the update folded in; returns how many."""
    names = [n for n, m in model.named_modules() if isinstance(m, LoRALinear)]
    for n in names:
        _set_module(model, n, model.get_submodule(n).merged())
    return len(names)


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for n, p in model.named_parameters() if n.endswith(("lora_a", "lora_b"))]


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if k.endswith(("lora_a", "lora_b"))}


__all__ = ["LoRAConfig", "LoRALinear", "inject_lora", "merge_lora", "lora_parameters", "lora_state_dict"]
