"""Preference labels for the reward model: raters that compare the videos of one prompt in pairs.

    group = PromptGroup(prompt_id, video_ids, scores)       # one prompt's G generated videos
    rater = build_rater("oracle" | "jsonl", options)         # options: a mapping or dataclass
    labels = rater.rate(group)                               # [PairLabel]

- `oracle`: the synthetic world's oracle scores (data/synth/oracle.py `score` / `score_batch`) become
  one utility per video (`oracle_utility`), and each pair a noisy Bradley-Terry choice,
  P(a) = sigmoid((u_a - u_b) / temperature), flipped with probability `disagreement` (a stand-in for
  human raters who disagree). Deterministic by (seed, prompt id).
- `jsonl`: human labels, one JSON object a line: prompt_id, video_a, video_b, choice ("a" | "b"),
  rater_id (other fields, e.g. where the videos are, are ignored).

Every label also carries the noiseless oracle preference (`oracle_choice`, from the group's scores when it
has them; None for a tie or without scores), so label noise and reward-model accuracy can be measured
against the truth of the synthetic world.
"""

from __future__ import annotations

import dataclasses
import json
import math
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import combinations
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

CHOICES = ("a", "b")


# ----------------------------------------------------------------------------------------------- utility


@dataclass
class UtilityWeights:
    """Weights of the oracle's scores in one utility (higher = better). Each term is bounded so no single
    score can dominate: lipsync_corr in [-1, 1]; lipsync_conf clipped to [0, 1]; identity_error and
    behaviour_error in [0, 1] (penalties); jitter / jitter_scale clipped to [0, 1] (a penalty)."""

    lipsync_corr: float = 1.0
    lipsync_conf: float = 0.5
    identity_error: float = 1.0
    behaviour_error: float = 0.5
    jitter: float = 0.25
    jitter_scale: float = 2.0  # jitter at which the penalty saturates (ground-truth renders: well under 1)


# per score: (sign, lower, upper); a missing-but-weighted score is skipped, a non-finite one counts as its
# worst value (a video the oracle cannot measure is a bad video)
_TERMS: dict[str, tuple[float, float, float]] = {
    "lipsync_corr": (1.0, -1.0, 1.0),
    "lipsync_conf": (1.0, 0.0, 1.0),
    "identity_error": (-1.0, 0.0, 1.0),
    "behaviour_error": (-1.0, 0.0, 1.0),
    "jitter": (-1.0, 0.0, 1.0),
}


def _weights(weights: UtilityWeights | Mapping[str, float] | None) -> UtilityWeights:
    if weights is None:
        return UtilityWeights()
    if isinstance(weights, UtilityWeights):
        return weights
    try:
        return UtilityWeights(**dict(weights))
    except TypeError as e:
        known = [f.name for f in dataclasses.fields(UtilityWeights)]
        raise ValueError(f"utility weights {dict(weights)}: {e}; known: {known}") from None


def oracle_utility(scores: Mapping[str, float], weights: UtilityWeights | Mapping[str, float] | None = None
                   ) -> float:
    """One scalar from a video's oracle scores: sum of weight * bounded term, errors counted negatively.

    Scores absent from `scores` are left out (e.g. identity_error without a ground-truth identity); a
    NaN/inf score counts as its worst value. ValueError if no weighted score is present at all."""
    w = _weights(weights)
    total, used = 0.0, 0
    for key, (sign, lo, hi) in _TERMS.items():
        weight = getattr(w, key)
        if weight == 0 or key not in scores:
            continue
        value = float(scores[key])
        if key == "jitter":
            value = value / w.jitter_scale
        if not math.isfinite(value):
            value = lo if sign > 0 else hi
        total += weight * sign * min(max(value, lo), hi)
        used += 1
    if not used:
        raise ValueError(f"none of the weighted oracle scores {[k for k in _TERMS if getattr(w, k)]} "
                         f"is in {sorted(scores)}")
    return total


# ----------------------------------------------------------------------------------------- groups, labels


@dataclass
class PromptGroup:
    """One prompt's generated videos: ids [G] and, when the oracle measured them, their scores [G]."""

    prompt_id: str
    video_ids: list[str]
    scores: list[dict[str, float]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.prompt_id = str(self.prompt_id)
        self.video_ids = [str(v) for v in self.video_ids]
        if len(set(self.video_ids)) != len(self.video_ids):
            raise ValueError(f"prompt {self.prompt_id!r}: duplicate video ids in {self.video_ids}")
        if self.scores and len(self.scores) != len(self.video_ids):
            raise ValueError(f"prompt {self.prompt_id!r}: {len(self.scores)} scores for "
                             f"{len(self.video_ids)} videos")


@dataclass
class PairLabel:
    """One judgement: `choice` "a" = video_a is preferred. oracle_choice: the noiseless oracle's
    preference ("a" | "b", None for a tie or unscored videos); utility_a/b: the oracle utilities."""

    prompt_id: str
    video_a: str
    video_b: str
    choice: str
    rater_id: str
    oracle_choice: str | None = None
    utility_a: float | None = None
    utility_b: float | None = None

    @property
    def chosen(self) -> str:
        return self.video_a if self.choice == "a" else self.video_b

    @property
    def rejected(self) -> str:
        return self.video_b if self.choice == "a" else self.video_a

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _oracle_view(group: PromptGroup, weights: UtilityWeights) -> dict[str, float]:
    """Utility per video id ({} when the group has no scores)."""
    if not group.scores:
        return {}
    return {vid: oracle_utility(s, weights) for vid, s in zip(group.video_ids, group.scores, strict=True)}


def _oracle_choice(u_a: float | None, u_b: float | None) -> str | None:
    if u_a is None or u_b is None or u_a == u_b:
        return None
    return "a" if u_a > u_b else "b"


@runtime_checkable
class Rater(Protocol):
    def rate(self, group: PromptGroup) -> list[PairLabel]: ...


# ------------------------------------------------------------------------------------------------ raters


def _prompt_rng(seed: int, prompt_id: str) -> np.random.Generator:
    """A generator that depends only on (seed, prompt id): labels do not depend on batch order or rank."""
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, zlib.crc32(prompt_id.encode())])


class OracleRater:
    """Noisy Bradley-Terry choices from oracle utilities, then flipped with probability `disagreement`.

    temperature 0 picks the higher utility (a coin for exact ties). pairs_per_group 0 labels every pair
    of the group; otherwise a seeded subset of that many pairs."""

    def __init__(self, weights: UtilityWeights | Mapping[str, float] | None = None, temperature: float = 0.05,
                 disagreement: float = 0.1, seed: int = 0, pairs_per_group: int = 0, rater_id: str = "oracle"):
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        if not 0 <= disagreement <= 1:
            raise ValueError(f"disagreement must be in [0, 1], got {disagreement}")
        if pairs_per_group < 0:
            raise ValueError(f"pairs_per_group must be >= 0, got {pairs_per_group}")
        self.weights = _weights(weights)
        self.temperature, self.disagreement = float(temperature), float(disagreement)
        self.seed, self.pairs_per_group, self.rater_id = int(seed), int(pairs_per_group), rater_id

    def p_a(self, u_a: float, u_b: float) -> float:
        """Bradley-Terry probability that a is preferred (before the disagreement flip)."""
        if self.temperature == 0:
            return 1.0 if u_a > u_b else 0.0 if u_a < u_b else 0.5
        z = (u_a - u_b) / self.temperature
        return 1.0 / (1.0 + math.exp(-z)) if z >= 0 else math.exp(z) / (1.0 + math.exp(z))  # no overflow

    def rate(self, group: PromptGroup) -> list[PairLabel]:
        if not group.scores:
            raise ValueError(f"prompt {group.prompt_id!r}: the oracle rater needs the videos' oracle scores")
        utility = _oracle_view(group, self.weights)
        rng = _prompt_rng(self.seed, group.prompt_id)
        pairs = list(combinations(group.video_ids, 2))
        if self.pairs_per_group and self.pairs_per_group < len(pairs):
            keep = np.sort(rng.choice(len(pairs), self.pairs_per_group, replace=False))
            pairs = [pairs[i] for i in keep]
        labels = []
        for a, b in pairs:
            u_a, u_b = utility[a], utility[b]
            draw, flip = rng.random(2)  # two draws per pair whatever the options: same noise across settings
            choice = "a" if draw < self.p_a(u_a, u_b) else "b"
            if flip < self.disagreement:
                choice = "b" if choice == "a" else "a"
            labels.append(PairLabel(group.prompt_id, a, b, choice, self.rater_id, _oracle_choice(u_a, u_b),
                                    u_a, u_b))
        return labels


class JsonlRater:
    """Human labels from a JSONL file, read and validated once; `rate` returns a group's labels (none for
    a prompt nobody labelled). Errors name the file and line."""

    REQUIRED = ("prompt_id", "video_a", "video_b", "choice", "rater_id")

    def __init__(self, path: str | Path, weights: UtilityWeights | Mapping[str, float] | None = None):
        self.path = Path(path)
        self.weights = _weights(weights)
        if not self.path.is_file():
            raise FileNotFoundError(f"human labels file {self.path} not found")
        self._labels: dict[str, list[tuple[int, PairLabel]]] = {}
        with self.path.open(encoding="utf-8") as f:
            for lineno, line in enumerate(f, start=1):
                if line.strip():
                    label = self._parse(line, lineno)
                    self._labels.setdefault(label.prompt_id, []).append((lineno, label))

    def _parse(self, line: str, lineno: int) -> PairLabel:
        where = f"{self.path}:{lineno}"
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: not valid JSON ({e.msg})") from None
        if not isinstance(rec, dict):
            raise ValueError(f"{where}: expected a JSON object, got {type(rec).__name__}")
        missing = [k for k in self.REQUIRED if rec.get(k) in (None, "")]
        if missing:
            raise ValueError(f"{where}: missing field(s) {missing}")
        bad = [k for k in self.REQUIRED if not isinstance(rec[k], (str, int)) or isinstance(rec[k], bool)]
        if bad:
            raise ValueError(f"{where}: field(s) {bad} must be strings")
        if rec["choice"] not in CHOICES:
            raise ValueError(f"{where}: choice must be 'a' or 'b', got {rec['choice']!r}")
        if str(rec["video_a"]) == str(rec["video_b"]):
            raise ValueError(f"{where}: video_a and video_b are the same video {rec['video_a']!r}")
        return PairLabel(*(str(rec[k]) for k in self.REQUIRED))

    @property
    def prompt_ids(self) -> set[str]:
        """The prompts the file has labels for."""
        return set(self._labels)

    def rate(self, group: PromptGroup) -> list[PairLabel]:
        utility = _oracle_view(group, self.weights)
        known = set(group.video_ids)
        out = []
        for lineno, label in self._labels.get(group.prompt_id, []):
            unknown = [v for v in (label.video_a, label.video_b) if v not in known]
            if unknown:
                raise ValueError(f"{self.path}:{lineno}: video id(s) {unknown} are not among prompt "
                                 f"{group.prompt_id!r}'s videos {group.video_ids}")
            u_a, u_b = utility.get(label.video_a), utility.get(label.video_b)
            out.append(dataclasses.replace(label, oracle_choice=_oracle_choice(u_a, u_b), utility_a=u_a,
                                           utility_b=u_b))
        return out


# ---------------------------------------------------------------------------------------------- registry


def _oracle(o: dict[str, Any]) -> OracleRater:
    return OracleRater(weights=o.get("weights"), **{k: o[k] for k in
                       ("temperature", "disagreement", "seed", "pairs_per_group", "rater_id") if k in o})


def _jsonl(o: dict[str, Any]) -> JsonlRater:
    if not o.get("path"):
        raise ValueError("the jsonl rater needs options.path (the human labels file)")
    return JsonlRater(o["path"], weights=o.get("weights"))


# name -> (factory, the options it reads); "utility" is accepted as another name for "weights"
RATERS: dict[str, tuple[Callable[[dict[str, Any]], Rater], tuple[str, ...]]] = {
    "oracle": (_oracle, ("weights", "temperature", "disagreement", "seed", "pairs_per_group", "rater_id")),
    "jsonl": (_jsonl, ("weights", "path")),
}


def _as_dict(options: Any) -> dict[str, Any]:
    if options is None:
        return {}
    if dataclasses.is_dataclass(options) and not isinstance(options, type):
        return {f.name: getattr(options, f.name) for f in dataclasses.fields(options)}  # shallow
    if isinstance(options, Mapping):
        return dict(options)
    raise TypeError(f"rater options must be a mapping or a dataclass, got {type(options).__name__}")


def build_rater(name: str, options: Mapping[str, Any] | Any = None, **overrides: Any) -> Rater:
    """The rater `name` ("oracle" | "jsonl") from a config block (mapping or dataclass) plus overrides.

    One block may carry options for several raters (e.g. temperature and path): each rater reads its
    own; a key no rater knows is an error (a typo must not be silently ignored)."""
    if name not in RATERS:
        raise ValueError(f"unknown rater {name!r}; known: {sorted(RATERS)}")
    opts = {**_as_dict(options), **overrides}
    opts.pop("name", None)
    if "utility" in opts:
        opts.setdefault("weights", opts.pop("utility"))
    known = {k for _, keys in RATERS.values() for k in keys}
    unknown = sorted(set(opts) - known)
    if unknown:
        raise ValueError(f"unknown rater option(s) {unknown}; known: {sorted(known | {'utility'})}")
    factory, keys = RATERS[name]
    return factory({k: v for k, v in opts.items() if k in keys})


def label_agreement(labels: Sequence[PairLabel]) -> float:
    """Share of labels that agree with the noiseless oracle, over labels where the oracle has a preference
    (NaN when none has)."""
    judged = [lab for lab in labels if lab.oracle_choice is not None]
    return float(np.mean([lab.choice == lab.oracle_choice for lab in judged])) if judged else float("nan")


__all__ = [
    "CHOICES",
    "UtilityWeights",
    "oracle_utility",
    "PromptGroup",
    "PairLabel",
    "Rater",
    "OracleRater",
    "JsonlRater",
    "RATERS",
    "build_rater",
    "label_agreement",
]
