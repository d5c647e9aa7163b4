"""Optional pretrained parts, loaded from local paths only (nothing is ever downloaded).

Each is switched on by a config field whose default is empty (the default trains everything here):

    AudioEncoderConfig.wav2vec2 = "/models/wav2vec2-base"    -> load_wav2vec2 (frozen; replaces log-mel)
    PretrainedConfig.t5 = "/models/t5-base"                   -> load_t5_encoder (needs T5 token ids)
    PretrainedConfig.autoencoder = "/models/vae.safetensors"  -> load_autoencoder (our VideoAutoencoder
                                                                 layout, or a TorchScript module)

A missing path raises FileNotFoundError naming the field; T5 / wav2vec2 need the `transformers` package.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn


@dataclass
class PretrainedConfig:
    autoencoder: str = ""
    t5: str = ""
    wav2vec2: str = ""


def require_local(path: str, what: str) -> Path:
    """The path, or FileNotFoundError with a clear message (pretrained weights are local-only)."""
    p = Path(path).expanduser()
    if not path or not p.exists():
        raise FileNotFoundError(
            f"pretrained {what} not found at {path!r}: pretrained parts are loaded from local paths only "
            f"(nothing is downloaded); put the weights there or leave the field empty to train it here"
        )
    return p


def _transformers(what: str):
    try:
        import transformers
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(f"loading a pretrained {what} needs the `transformers` package") from e
    return transformers


def _frozen(module: nn.Module) -> nn.Module:
    return module.requires_grad_(False).eval()


def load_wav2vec2(path: str) -> nn.Module:
    p = require_local(path, "wav2vec2")
    return _frozen(_transformers("wav2vec2").Wav2Vec2Model.from_pretrained(str(p), local_files_only=True))


def load_t5_encoder(path: str) -> nn.Module:
    p = require_local(path, "T5 encoder")
    return _frozen(_transformers("T5 encoder").T5EncoderModel.from_pretrained(str(p), local_files_only=True))


def load_autoencoder(path: str, cfg=None) -> nn.Module:
    """A frozen video autoencoder: a TorchScript file, or safetensors weights for our VideoAutoencoder(cfg)."""
    p = require_local(path, "video autoencoder")
    if p.suffix in (".pt", ".ts", ".jit"):
        return _frozen(torch.jit.load(str(p), map_location="cpu"))
    from safetensors.torch import load_file

    from .autoencoder import VideoAutoencoder

    ae = VideoAutoencoder(cfg)
    ae.load_state_dict(load_file(str(p)))
    return _frozen(ae)


__all__ = ["PretrainedConfig", "require_local", "load_wav2vec2", "load_t5_encoder", "load_autoencoder"]
