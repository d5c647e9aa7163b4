"""v0 'speech': voiced syllables (harmonic tones at the identity's pitch) with smooth envelopes.

The per-sample loudness envelope is kept as ground truth; the mouth opening is derived from it, so the
rendered mouth moves exactly with the audio.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .identity import IdentityParams

HARMONICS = 8
CONSONANT_SECONDS = 0.03


@dataclass(frozen=True)
class Speech:
    audio: np.ndarray  # float32 [N] in [-1, 1]
    envelope: np.ndarray  # float32 [N], voiced loudness in [0, 1]
    syllables: list[tuple[float, float, float]]  # (start s, duration s, peak amplitude)


def syllable_timeline(
    identity: IdentityParams, seconds: float, rng: np.random.Generator
) -> list[tuple[float, float, float]]:
    """Syllables at the identity's rate, with occasional pauses between 'words'."""
    out: list[tuple[float, float, float]] = []
    t = float(rng.uniform(0.03, 0.15))
    while True:
        dur = float(rng.uniform(0.75, 1.25)) / identity.speech_rate
        if t + dur > seconds:
            break
        out.append((round(t, 4), round(dur, 4), round(float(rng.uniform(0.55, 1.0)), 3)))
        t += dur + (float(rng.uniform(0.12, 0.35)) if rng.random() < 0.2 else float(rng.uniform(0.0, 0.03)))
    return out


def synth_speech(
    identity: IdentityParams, n_samples: int, sample_rate: int, rng: np.random.Generator
) -> Speech:
    seconds = n_samples / sample_rate
    syllables = syllable_timeline(identity, seconds, rng)
    envelope = np.zeros(n_samples)
    f0 = np.full(n_samples, identity.pitch_hz)
    burst = np.zeros(n_samples)
    for start, dur, amp in syllables:
        a, b = int(round(start * sample_rate)), min(n_samples, int(round((start + dur) * sample_rate)))
        x = (np.arange(a, b) - a) / max(1, b - a)
        envelope[a:b] = amp * np.sin(np.pi * x) ** 2  # Hann: smooth onset and release
        f0[a:b] *= float(rng.uniform(0.92, 1.08)) * (1.0 + 0.04 * np.sin(np.pi * x))  # a little intonation
        if rng.random() < 0.6:  # a consonant: short noise burst leading into the vowel
            c = min(b, a + int(CONSONANT_SECONDS * sample_rate))
            burst[a:c] = 0.12 * amp * np.hanning(c - a)
    phase = 2.0 * np.pi * np.cumsum(f0) / sample_rate
    weights = 1.0 / np.arange(1, HARMONICS + 1)
    voiced = sum(w * np.sin(k * phase) for k, w in enumerate(weights, start=1)) / weights.sum()
    noise = np.diff(rng.standard_normal(n_samples + 1))  # differenced: hiss, not rumble
    audio = 0.8 * voiced * envelope + burst * noise + 0.002 * rng.standard_normal(n_samples)
    return Speech(
        audio=np.clip(audio, -1.0, 1.0).astype(np.float32),
        envelope=envelope.astype(np.float32),
        syllables=syllables,
    )


def envelope_at_frames(envelope: np.ndarray, sample_rate: int, fps: float, n_frames: int) -> np.ndarray:
    """Envelope averaged over each frame's time window (what a camera shutter would integrate)."""
    edges = np.round(np.arange(n_frames + 1) * sample_rate / fps).astype(np.int64)
    edges = np.clip(edges, 0, len(envelope))
    csum = np.concatenate([[0.0], np.cumsum(envelope, dtype=np.float64)])
    width = np.maximum(1, edges[1:] - edges[:-1])
    return ((csum[edges[1:]] - csum[edges[:-1]]) / width).astype(np.float32)
