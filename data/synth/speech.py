"""A clip's speech: eSpeak NG sentences in the identity's voice, with a phoneme timeline.

Sentences are spoken one after another with short pauses, resampled from eSpeak's 22050 Hz to the
dataset rate, and a window of exactly the clip's duration is cut from that stream (sometimes from the
start of a sentence, sometimes mid-sentence, as real talking-head clips are). Phoneme and word times
come from eSpeak's events, shifted into the window, so they are exact for the audio in the clip.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .espeak import Utterance, engine, resample
from .identity import IdentityParams
from .sentences import sentence

PEAK = 0.8  # output peak level: eSpeak's full-volume peaks scaled to this
FADE_SECONDS = 0.005


@dataclass(frozen=True)
class Speech:
    audio: np.ndarray  # float32 [N] in [-1, 1] at sample_rate
    sample_rate: int
    phones: list[tuple[float, float, str]]  # (start s, end s, eSpeak mnemonic with stress marks)
    words: list[tuple[float, float, str]]  # (start s, end s, word)
    text: str  # the sentences spoken (the window may hold only part of them)


def _utterance_timeline(utt: Utterance, text: str) -> tuple[list[tuple[float, float, str]],
                                                              list[tuple[float, float, str]]]:
    """Phones and words of one utterance, in seconds from its start."""
    rate = float(utt.sample_rate)
    total = len(utt.audio) / rate
    phones = []
    for i, ph in enumerate(utt.phones):
        end = utt.phones[i + 1].sample / rate if i + 1 < len(utt.phones) else total
        phones.append((ph.sample / rate, max(end, ph.sample / rate), ph.name))
    words = []
    for i, w in enumerate(utt.words):
        end = utt.words[i + 1].sample / rate if i + 1 < len(utt.words) else total
        # the word ends where its last phoneme ends, not where the next word (after a pause) starts
        inside = [p for p in phones if w.sample / rate <= p[0] < end and not p[2].startswith("_")]
        if inside:
            end = inside[-1][1]
        token = text[max(0, w.text_position - 1) : max(0, w.text_position - 1) + max(0, w.length)]
        words.append((w.sample / rate, end, token.strip(".,?!;:'\" ")))
    return phones, words


def speak(identity: IdentityParams, seconds: float, sample_rate: int, rng: np.random.Generator) -> Speech:
    """Exactly round(seconds * sample_rate) samples of this identity talking (deterministic in rng)."""
    n_out = int(round(seconds * sample_rate))
    lead = float(rng.uniform(0.0, 0.25))
    pieces: list[np.ndarray] = [np.zeros(int(round(lead * sample_rate)))]
    # silences we insert are pause phonemes in the timeline too (eSpeak marks its own with "_")
    phones: list[tuple[float, float, str]] = [(0.0, len(pieces[0]) / sample_rate, "_")] if lead > 0 else []
    words: list[tuple[float, float, str]] = []
    texts: list[str] = []
    t = lead
    first_len = None
    # a start offset into the stream: half of the clips begin mid-sentence
    offset = 0.0
    tts = engine()
    while True:
        text = sentence(rng)
        utt = tts.synth(text, voice=identity.voice, rate=identity.speech_rate, pitch=identity.pitch,
                        pitch_range=identity.pitch_range)
        audio = resample(utt.audio.astype(np.float64) / 32768.0, utt.sample_rate, sample_rate) * (PEAK / 0.92)
        u_phones, u_words = _utterance_timeline(utt, text)
        end = len(audio) / sample_rate  # the resampled length can differ from eSpeak's by a sample
        phones += [(t + min(a, end), t + min(b, end), name) for a, b, name in u_phones]
        words += [(t + min(a, end), t + min(b, end), w) for a, b, w in u_words]
        texts.append(text)
        pieces.append(audio)
        t += len(audio) / sample_rate
        if first_len is None:
            first_len = len(audio) / sample_rate
            if rng.random() < 0.5:
                offset = float(rng.uniform(0.0, 0.5 * first_len))
        if t >= offset + seconds:
            break
        pause = float(rng.uniform(0.1, 0.4))
        pieces.append(np.zeros(int(round(pause * sample_rate))))
        phones.append((t, t + len(pieces[-1]) / sample_rate, "_"))
        t += len(pieces[-1]) / sample_rate
    stream = np.concatenate(pieces)
    a0 = int(round(offset * sample_rate))
    window = np.zeros(n_out)
    chunk = stream[a0 : a0 + n_out]
    window[: len(chunk)] = chunk
    fade = max(1, int(FADE_SECONDS * sample_rate))
    ramp = np.linspace(0.0, 1.0, fade)
    window[:fade] *= ramp  # no click where the window cuts into a sound
    window[-fade:] *= ramp[::-1]
    t0 = a0 / sample_rate
    duration = n_out / sample_rate

    def clip(items: list[tuple[float, float, str]]) -> list[tuple[float, float, str]]:
        out = []
        for a, b, name in items:
            a, b = a - t0, b - t0
            if b <= 0.0 or a >= duration:
                continue
            out.append((round(max(a, 0.0), 5), round(min(b, duration), 5), name))
        return out

    return Speech(
        audio=np.clip(window, -1.0, 1.0).astype(np.float32),
        sample_rate=sample_rate,
        phones=clip(phones),
        words=clip(words),
        text=" ".join(texts),
    )
