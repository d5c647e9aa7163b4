"""Phonemes -> visemes -> mouth shapes, with coarticulation.

A viseme is a mouth target: `open` (jaw/lip opening, 0 closed .. 1 wide open), `width` (0 rounded and
protruded .. 0.5 neutral .. 1 spread) and `bite` (upper teeth on the lower lip, for f/v). Each phoneme
of eSpeak's English inventory maps to one viseme (diphthongs to two, in sequence).

Coarticulation follows Cohen & Massaro's dominance model: every segment pulls each mouth parameter
toward its target with a dominance that is flat over the segment and decays exponentially outside it;
the parameter is the dominance-weighted mean of the targets. Bilabials dominate `open` (the lips must
close), rounded vowels dominate `width` (rounding spreads over neighbouring consonants), f/v dominate
`bite`, and h/k/g barely dominate anything, so they take their neighbours' shape.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

PARAMS = ("open", "width", "bite")


@dataclass(frozen=True)
class Viseme:
    name: str
    target: tuple[float, float, float]  # open, width, bite
    dominance: tuple[float, float, float]  # per parameter


VISEMES: dict[str, Viseme] = {
    v.name: v
    for v in (
        Viseme("sil", (0.0, 0.5, 0.0), (1.2, 0.6, 1.0)),  # rest between phrases
        Viseme("MBP", (0.0, 0.45, 0.0), (4.0, 0.6, 2.0)),  # lips pressed together
        Viseme("FV", (0.07, 0.55, 1.0), (3.0, 0.6, 5.0)),  # upper teeth on lower lip
        Viseme("TH", (0.16, 0.55, 0.0), (1.2, 0.4, 1.0)),  # tongue between the teeth
        Viseme("DN", (0.2, 0.6, 0.0), (0.6, 0.3, 1.0)),  # alveolars: t d n l s z
        Viseme("KG", (0.28, 0.55, 0.0), (0.25, 0.2, 1.0)),  # velars and h: shape of the neighbours
        Viseme("SH", (0.18, 0.3, 0.0), (1.0, 1.2, 1.0)),  # postalveolars, lips protruded
        Viseme("R", (0.24, 0.34, 0.0), (0.8, 1.2, 1.0)),
        Viseme("W", (0.08, 0.1, 0.0), (1.5, 3.0, 1.0)),  # tight rounding
        Viseme("U", (0.22, 0.18, 0.0), (1.0, 2.5, 1.0)),  # close rounded vowel
        Viseme("O", (0.62, 0.28, 0.0), (1.0, 2.0, 1.0)),  # open rounded vowel
        Viseme("AA", (1.0, 0.62, 0.0), (1.2, 1.0, 1.0)),  # open vowel
        Viseme("E", (0.62, 0.74, 0.0), (1.0, 1.0, 1.0)),  # mid spread vowel
        Viseme("I", (0.28, 0.95, 0.0), (1.0, 1.5, 1.0)),  # close spread vowel
        Viseme("AX", (0.42, 0.55, 0.0), (0.7, 0.6, 1.0)),  # schwa and other reduced vowels
    )
}

# eSpeak English phoneme mnemonics (stress marks stripped) -> viseme(s); diphthongs glide between two
PHONEME_VISEMES: dict[str, tuple[str, ...]] = {
    **dict.fromkeys(("_", "_:", "_!", "_^_", "_|", "||", "|"), ("sil",)),
    **dict.fromkeys(("m", "b", "p", "m-"), ("MBP",)),
    **dict.fromkeys(("f", "v"), ("FV",)),
    **dict.fromkeys(("T", "D"), ("TH",)),
    **dict.fromkeys(("t", "d", "n", "l", "s", "z", "t#", "d#", "t[", "n-", "l-", "l/", "?", "t2", "d2"),
                    ("DN",)),
    **dict.fromkeys(("k", "g", "N", "h", "x", ";", "c", "J"), ("KG",)),
    **dict.fromkeys(("S", "Z", "tS", "dZ"), ("SH",)),
    **dict.fromkeys(("r", "r-", "3", "3:", "VR", "IR", "A@r", "r/"), ("R",)),
    **dict.fromkeys(("w", "w#", "W"), ("W",)),
    **dict.fromkeys(("u:", "U", "u", "U@", "u@"), ("U",)),
    **dict.fromkeys(("O", "O:", "0", "O@", "o@", "O2", "o", "0#"), ("O",)),
    **dict.fromkeys(("a", "A:", "aa", "a#", "V", "A@", "A", "a2", "a3"), ("AA",)),
    **dict.fromkeys(("E", "e", "e@", "E2", "E3"), ("E",)),
    **dict.fromkeys(("I", "I2", "I#", "i", "i:", "j", "I3"), ("I",)),
    **dict.fromkeys(("@", "@2", "@-", "@5", "@L", "@3", "@r"), ("AX",)),
    "oU": ("O", "U"),
    "aI": ("AA", "I"),
    "aI2": ("AA", "I"),
    "aI3": ("AA", "I"),
    "aI@": ("AA", "I"),
    "aU": ("AA", "U"),
    "aU@": ("AA", "U"),
    "eI": ("E", "I"),
    "OI": ("O", "I"),
    "i@": ("I", "AX"),
    "i@3": ("I", "AX"),
    "e@": ("E", "AX"),
}

_VOWEL_START = set("aeiouAEIOUV03@")


def strip_stress(name: str) -> tuple[str, int]:
    """eSpeak mnemonic -> (bare phoneme, stress): 2 primary ("'"), 1 secondary (","), 0 none."""
    stress = 2 if "'" in name else 1 if "," in name else 0
    return name.replace("'", "").replace(",", ""), stress


def visemes_of(phoneme: str) -> tuple[str, ...]:
    """Viseme names for a bare phoneme; unknown mnemonics fall back on their first character's class."""
    found = PHONEME_VISEMES.get(phoneme)
    if found is not None:
        return found
    head = phoneme[:1]
    if not head or head == "_":
        return ("sil",)
    if head in _VOWEL_START:
        return ("AX",)
    for key in (phoneme[:2], head):
        if key in PHONEME_VISEMES:
            return PHONEME_VISEMES[key]
    return ("KG",)  # consonant of no strong shape


def is_vowel(phoneme: str) -> bool:
    return phoneme[:1] in _VOWEL_START


@dataclass(frozen=True)
class Segment:
    start: float
    end: float
    viseme: str


def segments(phones: Sequence[tuple[float, float, str]]) -> list[Segment]:
    """(start s, end s, eSpeak mnemonic) -> viseme segments (a diphthong splits 40/60)."""
    out: list[Segment] = []
    for start, end, name in phones:
        names = visemes_of(strip_stress(name)[0])
        if len(names) == 1:
            out.append(Segment(start, end, names[0]))
        else:
            mid = start + 0.4 * (end - start)
            out.append(Segment(start, mid, names[0]))
            out.append(Segment(mid, end, names[1]))
    return out


def trajectory(segs: Sequence[Segment], times: np.ndarray) -> np.ndarray:
    """Coarticulated mouth parameters at `times` (seconds): float64 [len(times), 3] (open, width, bite).

    Outside all segments (before the first, after the last) the mouth rests (sil).
    """
    times = np.asarray(times, dtype=np.float64)
    rest = VISEMES["sil"]
    if not segs:
        return np.tile(np.asarray(rest.target), (len(times), 1))
    starts = np.array([s.start for s in segs])
    ends = np.array([max(s.end, s.start + 1e-3) for s in segs])
    target = np.array([VISEMES[s.viseme].target for s in segs])  # [S, 3]
    dom = np.array([VISEMES[s.viseme].dominance for s in segs])  # [S, 3]
    dur = ends - starts
    # the target is held over the middle of the segment; outside, dominance decays with a time constant
    # that grows with the segment's length (long vowels reach further), capped for long pauses
    inset = 0.25 * np.minimum(dur, 0.2)
    tau = 0.015 + 0.12 * np.minimum(dur, 0.3)
    lo, hi = starts + inset, ends - inset
    dist = np.maximum(0.0, np.maximum(lo[:, None] - times[None, :], times[None, :] - hi[:, None]))  # [S, T]
    w = np.exp(-dist / tau[:, None])  # [S, T]
    # a weak rest pull everywhere, so silence far from speech relaxes the mouth
    rest_w = 0.02 + (times < starts[0] - 0.05) + (times > ends[-1] + 0.05)
    out = np.empty((len(times), 3))
    for p in range(3):
        weights = dom[:, p : p + 1] * w
        num = (weights * target[:, p : p + 1]).sum(0) + rest_w * rest.target[p]
        out[:, p] = num / (weights.sum(0) + rest_w)
    return out


def frame_trajectory(segs: Sequence[Segment], n_frames: int, fps: float, subsamples: int = 8) -> np.ndarray:
    """Per-frame mouth parameters averaged over each frame's exposure window: [n_frames, 3]."""
    t = (np.arange(n_frames * subsamples) + 0.5) / (fps * subsamples)
    return trajectory(segs, t).reshape(n_frames, subsamples, 3).mean(axis=1)


def stressed_onsets(phones: Sequence[tuple[float, float, str]]) -> list[float]:
    """Start times of primary-stressed vowels (what drives brow raises)."""
    out = []
    for start, _, name in phones:
        bare, stress = strip_stress(name)
        if stress == 2 and is_vowel(bare):
            out.append(float(start))
    return out
