"""Speech of the synthetic world: eSpeak NG via ctypes, resampling, phonemes -> visemes -> mouth shapes,
and the audio-only openness estimate the oracle uses for generated videos."""

from __future__ import annotations

import numpy as np
import pytest

from avatarforge.data.synth import audio_openness
from avatarforge.data.synth.espeak import ESpeakError, engine, resample
from avatarforge.data.synth.identity import VOICE_BASES, VOICE_VARIANTS, sample_identity
from avatarforge.data.synth.motion import viseme_openness
from avatarforge.data.synth.sentences import HARVARD, grammar_sentence, sentence
from avatarforge.data.synth.speech import speak
from avatarforge.data.synth.visemes import (
    PHONEME_VISEMES,
    VISEMES,
    frame_trajectory,
    segments,
    stressed_onsets,
    strip_stress,
    trajectory,
    visemes_of,
)

SR, FPS = 16000, 25.0


def test_espeak_gives_audio_with_phoneme_and_word_events() -> None:
    utt = engine().synth("Hello world, my name is Bob.", voice="en-us")
    assert utt.sample_rate == 22050 and utt.audio.dtype == np.int16
    assert 1.0 < len(utt.audio) / utt.sample_rate < 4.0
    assert np.abs(utt.audio).max() > 5000  # real speech, not silence
    names = [p.name for p in utt.phones]
    bare = [strip_stress(n)[0] for n in names]
    assert bare[:4] == ["h", "@", "l", "oU"] and "b" in bare and "m" in bare
    assert any(n.startswith("'") for n in names)  # stress marks come with the events
    starts = [p.sample for p in utt.phones]
    assert starts == sorted(starts) and 0 <= starts[0] and starts[-1] <= len(utt.audio)
    assert [(w.text_position, w.length) for w in utt.words][:2] == [(1, 5), (7, 5)]  # "Hello", "world"


def test_espeak_is_a_pure_function_of_its_arguments() -> None:
    tts = engine()
    first = tts.synth("Five quick boats.", voice="en+f3", rate=190, pitch=60)
    tts.synth("Something else in between, to disturb the state.", voice="en-us+m1", rate=250)
    again = tts.synth("Five quick boats.", voice="en+f3", rate=190, pitch=60)
    assert np.array_equal(first.audio, again.audio) and first.phones == again.phones
    faster = tts.synth("Five quick boats.", voice="en+f3", rate=300, pitch=60)
    assert len(faster.audio) < 0.85 * len(first.audio)


def test_every_identity_voice_exists() -> None:
    tts = engine()
    for base in VOICE_BASES:
        for variant in VOICE_VARIANTS:
            assert len(tts.synth("Yes.", voice=f"{base}+{variant}").audio) > 1000
    with pytest.raises(ESpeakError, match="unknown eSpeak voice"):
        tts.synth("Yes.", voice="no-such-voice")


def test_resample_keeps_tones_and_drops_what_cannot_be_represented() -> None:
    t = np.arange(22050) / 22050
    low, high = np.sin(2 * np.pi * 1000 * t), np.sin(2 * np.pi * 10000 * t)  # 10 kHz > 8 kHz Nyquist
    y = resample(low + high, 22050, SR)
    assert len(y) == SR
    spec = np.abs(np.fft.rfft(y[1000:-1000] * np.hanning(len(y) - 2000)))
    freqs = np.fft.rfftfreq(len(y) - 2000, 1 / SR)
    assert abs(freqs[np.argmax(spec)] - 1000) < 5
    assert spec[np.abs(freqs - 6000) < 100].max() < 0.01 * spec.max()  # no alias of 10 kHz at 6 kHz


def test_sentences_are_deterministic_and_varied() -> None:
    assert len(HARVARD) == 60
    assert sentence(np.random.default_rng(3)) == sentence(np.random.default_rng(3))
    rng = np.random.default_rng(0)
    made = {grammar_sentence(rng) for _ in range(50)}
    assert len(made) > 40 and all(s[0].isupper() and s[-1] in ".?" for s in made)


def test_speech_window_is_exact_and_its_timeline_matches_the_audio() -> None:
    ident = sample_identity(0, 3)
    speech = speak(ident, 5.0, SR, np.random.default_rng(5))
    assert speech.audio.dtype == np.float32 and len(speech.audio) == 5 * SR
    assert np.abs(speech.audio).max() <= 1.0
    starts = [a for a, _, _ in speech.phones]
    assert starts == sorted(starts) and all(0 <= a <= b <= 5.0 for a, b, _ in speech.phones)
    assert speech.words and speech.text
    hop = SR // 100  # 10 ms RMS
    rms = np.sqrt((speech.audio[: len(speech.audio) // hop * hop].reshape(-1, hop) ** 2).mean(axis=1))

    def level(kind: str) -> float:
        """RMS inside segments of this viseme (their middle, away from transitions)."""
        vals = [rms[int(a * 100) + 1 : int(b * 100) - 1] for a, b, name in speech.phones
                if b - a >= 0.05 and visemes_of(strip_stress(name)[0])[0] == kind]
        return float(np.concatenate(vals).mean())

    assert level("AA") > 5 * level("sil")  # vowels are loud, pauses quiet: the times line up with the sound
    # the same identity, clip and seed: identical speech
    again = speak(ident, 5.0, SR, np.random.default_rng(5))
    assert np.array_equal(again.audio, speech.audio) and again.phones == speech.phones


def test_phonemes_map_to_the_right_visemes() -> None:
    assert visemes_of("m") == visemes_of("b") == visemes_of("p") == ("MBP",)
    assert visemes_of("f") == visemes_of("v") == ("FV",)
    assert visemes_of("u:") == ("U",) and visemes_of("w") == ("W",) and visemes_of("O:") == ("O",)
    assert visemes_of("a") == ("AA",) and visemes_of("i:") == ("I",) and visemes_of("E") == ("E",)
    assert visemes_of("aI") == ("AA", "I") and visemes_of("oU") == ("O", "U")  # diphthongs glide
    assert visemes_of("_:") == ("sil",) and visemes_of("Q9") == ("KG",)  # unknown consonant: neutral
    assert VISEMES["MBP"].target[0] == 0.0 and VISEMES["AA"].target[0] == 1.0
    assert VISEMES["FV"].target[2] == 1.0 and VISEMES["I"].target[1] > 0.9 > 0.2 > VISEMES["W"].target[1]
    assert strip_stress("'oU") == ("oU", 2) and strip_stress(",a") == ("a", 1)
    # eSpeak's English inventory, as spoken by the world's voices, is covered by the table
    tts, seen = engine(), set()
    for text in HARVARD[:20]:
        for voice in ("en-us", "en"):
            seen |= {strip_stress(p.name)[0] for p in tts.synth(text, voice=voice).phones}
    assert not seen - set(PHONEME_VISEMES)


def test_coarticulation_closes_lips_and_anticipates_rounding() -> None:
    mama = segments([(0.0, 0.15, "m"), (0.15, 0.3, "'a"), (0.3, 0.36, "m"), (0.36, 0.5, "a")])
    shape = trajectory(mama, np.array([0.075, 0.225, 0.33, 0.43]))
    assert shape[0, 0] < 0.05 and shape[2, 0] < 0.15  # both m's close, even the short one between vowels
    assert shape[1, 0] > 0.75 and shape[3, 0] > 0.75  # the a's open wide
    see = trajectory(segments([(0, 0.1, "s"), (0.1, 0.3, "'i:")]), np.array([0.05]))
    sue = trajectory(segments([(0, 0.1, "s"), (0.1, 0.3, "'u:")]), np.array([0.05]))
    assert see[0, 1] > sue[0, 1] + 0.15  # the s of "sue" is already rounded
    fa = trajectory(segments([(0, 0.12, "'a"), (0.12, 0.2, "f"), (0.2, 0.32, "a")]), np.array([0.16]))
    assert fa[0, 2] > 0.8 and fa[0, 0] < 0.25  # teeth on the lip for f
    # per-frame values average the exposure window and stay in range
    frames = frame_trajectory(mama, 13, FPS)
    assert frames.shape == (13, 3) and frames.min() >= 0.0 and frames.max() <= 1.0
    assert stressed_onsets([(0.0, 0.1, "h"), (0.1, 0.2, "'oU"), (0.2, 0.3, "@")]) == [0.1]


def test_audio_alone_predicts_the_phoneme_openness() -> None:
    """The bundled regressor, on speech it was not fitted on (seed 11, not its fitting seed)."""
    corrs = []
    for i in range(3):
        speech = speak(sample_identity(11, i), 4.0, SR, np.random.default_rng(100 + i))
        truth = viseme_openness(speech.phones, 100, FPS)
        pred = audio_openness.predict(speech.audio, SR, 100, FPS)
        assert pred.shape == (100,)
        corrs.append(np.corrcoef(pred, truth)[0, 1])
        # other sample rates are resampled first
        pred22 = audio_openness.predict(resample(speech.audio, SR, 22050), 22050, 100, FPS)
        assert np.corrcoef(pred, pred22)[0, 1] > 0.95
    assert np.mean(corrs) > 0.7 and min(corrs) > 0.5, corrs
    silence = audio_openness.predict(np.zeros(SR), SR, 25, FPS)
    assert silence.shape == (25,) and np.all(np.isfinite(silence))
