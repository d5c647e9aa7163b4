"""How open the mouth should be, from the audio alone: a small bundled regressor for the oracle.

For a generated video the oracle has the driving audio but maybe not its phoneme timeline. This model
maps log-mel features (per video frame, with +-3 frames of context, normalised per clip) to the viseme
openness the phonemes imply (visemes.py, before an identity's articulation scale). It is a 2-layer MLP
fitted on eSpeak speech of this world (voices, rates and sentences drawn like the dataset's, on seeds
the dataset generator never uses) and stored as numpy weights next to this file; inference is numpy.

Refit (deterministic; a few minutes on 2 cores): `python -m avatarforge.data.synth.audio_openness`.
"""

from __future__ import annotations

import argparse
from functools import lru_cache
from pathlib import Path

import numpy as np

from .espeak import resample

WEIGHTS = Path(__file__).with_name("audio_openness.npz")
SAMPLE_RATE = 16000
N_MELS = 32
N_FFT = 512
WINDOW = 400  # 25 ms
SUBFRAMES = 4  # spectra per video frame (10 ms hops at 25 fps)
CONTEXT = 3  # video frames each side
FIT_SEED = 987_654  # identities and clips for fitting come from this seed, never a dataset's


def _mel_filterbank(n_fft: int, sample_rate: int, n_mels: int, fmin: float = 60.0,
                    fmax: float = 7600.0) -> np.ndarray:
    def hz_to_mel(f: np.ndarray | float) -> np.ndarray:
        return 2595.0 * np.log10(1.0 + np.asarray(f) / 700.0)

    def mel_to_hz(m: np.ndarray) -> np.ndarray:
        return 700.0 * (10.0 ** (m / 2595.0) - 1.0)

    hz = mel_to_hz(np.linspace(hz_to_mel(fmin), hz_to_mel(fmax), n_mels + 2))
    bins = np.fft.rfftfreq(n_fft, 1.0 / sample_rate)
    fb = np.zeros((n_mels, len(bins)))
    for i in range(n_mels):
        lo, mid, hi = hz[i], hz[i + 1], hz[i + 2]
        fb[i] = np.clip(np.minimum((bins - lo) / (mid - lo), (hi - bins) / (hi - mid)), 0.0, None)
    return fb


_FB = _mel_filterbank(N_FFT, SAMPLE_RATE, N_MELS)


def features(audio: np.ndarray, sample_rate: int, n_frames: int, fps: float) -> np.ndarray:
    """float32 [n_frames, N_MELS * (2 * CONTEXT + 1)]: per-frame log-mel with context, clip-normalised."""
    x = np.asarray(audio, dtype=np.float64).reshape(-1)
    if sample_rate != SAMPLE_RATE:
        x = resample(x, sample_rate, SAMPLE_RATE)
    n = n_frames * SUBFRAMES
    hop = SAMPLE_RATE / fps / SUBFRAMES
    padded = np.concatenate([np.zeros(WINDOW // 2), x, np.zeros(WINDOW + int(hop) + 1)])
    starts = np.round(np.arange(n) * hop).astype(np.int64)
    starts = np.clip(starts, 0, max(0, len(padded) - WINDOW))
    frames = padded[starts[:, None] + np.arange(WINDOW)[None, :]] * np.hanning(WINDOW)
    power = np.abs(np.fft.rfft(frames, N_FFT)) ** 2
    logmel = np.log(power @ _FB.T + 1e-6).reshape(n_frames, SUBFRAMES, N_MELS).mean(axis=1)
    # per-clip normalisation over the louder frames: removes voice, level and channel differences
    energy = logmel.mean(axis=1)
    voiced = energy >= np.percentile(energy, 40) if n_frames > 1 else np.ones(n_frames, bool)
    logmel = logmel - logmel[voiced].mean(axis=0)
    pad = np.pad(logmel, ((CONTEXT, CONTEXT), (0, 0)), mode="edge")
    return np.concatenate([pad[i : i + n_frames] for i in range(2 * CONTEXT + 1)], axis=1).astype(np.float32)


@lru_cache(maxsize=1)
def _weights() -> dict[str, np.ndarray]:
    if not WEIGHTS.is_file():
        raise FileNotFoundError(
            f"{WEIGHTS} is missing: run `python -m avatarforge.data.synth.audio_openness` to fit it"
        )
    with np.load(WEIGHTS) as data:
        return {k: data[k].astype(np.float32) for k in data.files}


def _gelu(x: np.ndarray) -> np.ndarray:
    return 0.5 * x * (1.0 + np.tanh(0.7978845608 * (x + 0.044715 * x**3)))


def predict(audio: np.ndarray, sample_rate: int, n_frames: int, fps: float) -> np.ndarray:
    """Expected mouth openness per video frame (float64 [n_frames], about 0..1) from audio alone."""
    if n_frames <= 0:
        return np.zeros(0)
    w = _weights()
    x = (features(audio, sample_rate, n_frames, fps) - w["mu"]) / w["sd"]
    h = _gelu(x @ w["w1"] + w["b1"])
    h = _gelu(h @ w["w2"] + w["b2"])
    return np.clip((h @ w["w3"] + w["b3"])[:, 0], -0.2, 1.2).astype(np.float64)


def _training_data(n_clips: int, seconds: float, fps: float) -> tuple[list[np.ndarray], list[np.ndarray]]:
    from ..seeding import rng_for
    from .identity import sample_identity
    from .motion import viseme_openness
    from .speech import speak

    xs, ys = [], []
    n_frames = int(round(seconds * fps))
    for i in range(n_clips):
        rng = rng_for("audio-openness", FIT_SEED, i)
        speech = speak(sample_identity(FIT_SEED, i), n_frames / fps, SAMPLE_RATE, rng)
        audio = speech.audio.astype(np.float64) * 10 ** rng.uniform(-0.5, 0.1)  # level: -10..+2 dB
        audio = audio + rng.normal(0.0, 10 ** rng.uniform(-4.0, -2.3), len(audio))  # a little noise
        xs.append(features(audio, SAMPLE_RATE, n_frames, fps))
        ys.append(viseme_openness(speech.phones, n_frames, fps))
    return xs, ys


def fit(out: Path = WEIGHTS, *, n_clips: int = 480, seconds: float = 6.0, epochs: int = 40,
        hidden: tuple[int, int] = (96, 48), verbose: bool = True) -> dict[str, float]:
    """Fit the regressor (deterministic) and write its weights; returns held-out correlations."""
    import torch

    fps = 25.0
    xs, ys = _training_data(n_clips, seconds, fps)
    n_val = max(1, n_clips // 10)
    x_tr, y_tr = np.concatenate(xs[n_val:]), np.concatenate(ys[n_val:])
    mu, sd = x_tr.mean(axis=0), x_tr.std(axis=0) + 1e-4
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Linear(x_tr.shape[1], hidden[0]), torch.nn.GELU(approximate="tanh"), torch.nn.Dropout(0.1),
        torch.nn.Linear(hidden[0], hidden[1]), torch.nn.GELU(approximate="tanh"),
        torch.nn.Linear(hidden[1], 1),
    )
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=1e-2)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs)
    xt = torch.tensor((x_tr - mu) / sd, dtype=torch.float32)
    yt = torch.tensor(y_tr, dtype=torch.float32)
    for epoch in range(epochs):
        net.train()
        perm = torch.randperm(len(xt), generator=g)
        total = 0.0
        for i in range(0, len(xt), 256):
            idx = perm[i : i + 256]
            loss = ((net(xt[idx]).squeeze(1) - yt[idx]) ** 2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(idx)
        sched.step()
        if verbose and (epoch % 10 == 9 or epoch == epochs - 1):
            print(f"epoch {epoch + 1}: train mse {total / len(xt):.4f}", flush=True)
    net.eval()
    layers = [m for m in net if isinstance(m, torch.nn.Linear)]
    weights = {"mu": mu.astype(np.float32), "sd": sd.astype(np.float32)}
    for k, layer in enumerate(layers, start=1):
        weights[f"w{k}"] = layer.weight.detach().numpy().T.astype(np.float32)
        weights[f"b{k}"] = layer.bias.detach().numpy().astype(np.float32)
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out, **weights)
    _weights.cache_clear()
    corrs = []
    for x, y in zip(xs[:n_val], ys[:n_val], strict=True):
        with torch.no_grad():
            p = net(torch.tensor((x - mu) / sd, dtype=torch.float32)).squeeze(1).numpy()
        corrs.append(float(np.corrcoef(p, y)[0, 1]))
    report = {"val_corr_mean": float(np.mean(corrs)), "val_corr_min": float(np.min(corrs))}
    if verbose:
        print(f"held-out clips: correlation mean {report['val_corr_mean']:.3f} min {report['val_corr_min']:.3f}")
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=WEIGHTS)
    parser.add_argument("--clips", type=int, default=480)
    parser.add_argument("--epochs", type=int, default=40)
    args = parser.parse_args()
    fit(args.out, n_clips=args.clips, epochs=args.epochs)


if __name__ == "__main__":
    main()
