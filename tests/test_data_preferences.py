"""Raters and pair labels: oracle utility ordering, the noisy Bradley-Terry oracle rater (limits, flip rate,
determinism), human labels from JSONL (parsing and errors), and the rater registry."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np
import pytest

from avatarforge.data.preferences import (
    JsonlRater,
    OracleRater,
    PairLabel,
    PromptGroup,
    Rater,
    UtilityWeights,
    build_rater,
    label_agreement,
    oracle_utility,
)


def scores(corr=0.5, conf=0.3, ident=0.2, beh=0.3, jit=0.5) -> dict[str, float]:
    return {"lipsync_corr": corr, "lipsync_conf": conf, "identity_error": ident, "behaviour_error": beh,
            "jitter": jit, "lipsync_offset": 0.0, "est_smile": 0.2}


def group(prompt_id: str = "p0", n: int = 4, seed: int = 0) -> PromptGroup:
    rng = np.random.default_rng(seed)
    return PromptGroup(prompt_id, [f"{prompt_id}#v{j}" for j in range(n)],
                       [scores(*rng.uniform(0, 1, 5)) for _ in range(n)])


def test_utility_orders_by_each_score():
    base = oracle_utility(scores())
    assert oracle_utility(scores(corr=0.9)) > base > oracle_utility(scores(corr=-0.2))
    assert oracle_utility(scores(conf=0.6)) > base
    assert oracle_utility(scores(ident=0.05)) > base > oracle_utility(scores(ident=0.8))
    assert oracle_utility(scores(beh=0.1)) > base > oracle_utility(scores(beh=0.9))
    assert oracle_utility(scores(jit=0.1)) > base > oracle_utility(scores(jit=1.5))
    # the explicit formula with the default weights
    w = UtilityWeights()
    expected = w.lipsync_corr * 0.5 + w.lipsync_conf * 0.3 - w.identity_error * 0.2 - w.behaviour_error * 0.3 \
        - w.jitter * 0.5 / w.jitter_scale
    assert base == pytest.approx(expected)


def test_utility_bounds_weights_missing_and_nan():
    # terms are bounded: a huge jitter or confidence cannot dominate
    assert oracle_utility(scores(jit=1e6)) == pytest.approx(oracle_utility(scores(jit=2.0)))
    assert oracle_utility(scores(conf=50.0)) == pytest.approx(oracle_utility(scores(conf=1.0)))
    # a NaN score counts as its worst value
    assert oracle_utility(scores(ident=float("nan"))) == pytest.approx(oracle_utility(scores(ident=1.0)))
    assert oracle_utility(scores(corr=float("nan"))) == pytest.approx(oracle_utility(scores(corr=-1.0)))
    # weights: only lip sync
    only_sync = {"lipsync_corr": 1.0, "lipsync_conf": 0.0, "identity_error": 0.0, "behaviour_error": 0.0,
                 "jitter": 0.0}
    assert oracle_utility(scores(corr=0.3, ident=0.9), only_sync) == pytest.approx(0.3)
    # absent scores are left out (no ground-truth identity); none present is an error
    s = scores()
    del s["identity_error"]
    assert oracle_utility(s) == pytest.approx(oracle_utility(scores()) + UtilityWeights().identity_error * 0.2)
    with pytest.raises(ValueError, match="none of the weighted"):
        oracle_utility({"jitter": 0.1}, only_sync)
    with pytest.raises(ValueError, match="known"):
        oracle_utility(scores(), {"lipsync": 1.0})


def test_oracle_rater_without_noise_picks_the_higher_utility():
    rater = OracleRater(temperature=0.0, disagreement=0.0, seed=3)
    assert isinstance(rater, Rater)
    for k in range(20):
        g = group(f"p{k}", n=5, seed=k)
        labels = rater.rate(g)
        assert len(labels) == 10  # all pairs of 5
        u = dict(zip(g.video_ids, (oracle_utility(s) for s in g.scores), strict=True))
        for lab in labels:
            assert lab.prompt_id == f"p{k}" and lab.rater_id == "oracle"
            assert u[lab.chosen] > u[lab.rejected]
            assert lab.choice == lab.oracle_choice
            assert (lab.utility_a, lab.utility_b) == (u[lab.video_a], u[lab.video_b])
    # a tiny temperature behaves the same, without overflow warnings
    with np.errstate(all="raise"):
        assert all(lab.choice == lab.oracle_choice for lab in OracleRater(temperature=1e-6, disagreement=0.0)
                   .rate(group("q", 6)))


def test_oracle_rater_flip_rate_matches_disagreement():
    rater = OracleRater(temperature=0.0, disagreement=0.2, seed=0)
    labels = [lab for k in range(300) for lab in rater.rate(group(f"p{k}", 5, seed=k))]
    assert len(labels) == 3000
    flips = 1 - label_agreement(labels)
    assert abs(flips - 0.2) < 3 * np.sqrt(0.2 * 0.8 / 3000)  # within 3 standard errors


def test_oracle_rater_bradley_terry_probability():
    rater = OracleRater(temperature=0.1, disagreement=0.0, seed=1)
    # two videos whose utilities differ by 0.1: P(better) = sigmoid(1)
    g = PromptGroup("x", ["good", "bad"], [scores(corr=0.6), scores(corr=0.5)])
    wins = np.mean([rater.rate(PromptGroup(f"x{k}", g.video_ids, g.scores))[0].choice == "a" for k in range(4000)])
    assert abs(wins - 1 / (1 + np.exp(-1.0))) < 0.03
    assert rater.p_a(1.0, 1.0) == 0.5


def test_oracle_rater_is_deterministic_by_seed_and_prompt():
    g = group("p7", 6)
    a = OracleRater(temperature=0.2, disagreement=0.3, seed=5).rate(g)
    b = OracleRater(temperature=0.2, disagreement=0.3, seed=5).rate(g)
    assert a == b
    c = OracleRater(temperature=0.2, disagreement=0.3, seed=6).rate(g)
    assert [x.choice for x in a] != [x.choice for x in c]
    # the same videos under another prompt id get other draws
    d = OracleRater(temperature=0.2, disagreement=0.3, seed=5).rate(PromptGroup("p8", g.video_ids, g.scores))
    assert [x.choice for x in a] != [x.choice for x in d]
    # a subset of pairs, seeded too
    sub = OracleRater(seed=5, pairs_per_group=4)
    assert len(sub.rate(g)) == 4 and sub.rate(g) == sub.rate(g)
    with pytest.raises(ValueError, match="oracle scores"):
        OracleRater().rate(PromptGroup("p", ["a", "b"]))
    with pytest.raises(ValueError, match="disagreement"):
        OracleRater(disagreement=1.5)


def write_lines(path, lines) -> str:
    path.write_text("".join((json.dumps(x) if not isinstance(x, str) else x) + "\n" for x in lines))
    return str(path)


def test_jsonl_rater_reads_labels(tmp_path):
    g = group("p1", 3)
    path = write_lines(tmp_path / "labels.jsonl", [
        {"prompt_id": "p1", "video_a": "p1#v0", "video_b": "p1#v1", "choice": "b", "rater_id": "ann",
         "shard": "ignored.tar"},
        "",
        {"prompt_id": "p1", "video_a": "p1#v0", "video_b": "p1#v1", "choice": "a", "rater_id": "bob"},
        {"prompt_id": "p2", "video_a": "x", "video_b": "y", "choice": "a", "rater_id": "ann"},
        {"prompt_id": 3, "video_a": "p3#v0", "video_b": "p3#v1", "choice": "a", "rater_id": 17},
    ])
    rater = JsonlRater(path)
    assert rater.prompt_ids == {"p1", "p2", "3"}
    labels = rater.rate(g)
    assert [(lab.choice, lab.rater_id) for lab in labels] == [("b", "ann"), ("a", "bob")]
    assert labels[0].chosen == "p1#v1" and labels[0].rejected == "p1#v0"
    u0, u1 = oracle_utility(g.scores[0]), oracle_utility(g.scores[1])
    assert labels[0].oracle_choice == ("a" if u0 > u1 else "b") and labels[0].utility_a == u0
    assert rater.rate(group("nobody", 3)) == []  # an unlabelled prompt gives no pairs
    # ids given as numbers are read as strings; unscored groups give no oracle preference
    (lab,) = rater.rate(PromptGroup(3, ["p3#v0", "p3#v1"]))
    assert lab.prompt_id == "3" and lab.rater_id == "17" and lab.oracle_choice is None
    assert np.isnan(label_agreement([lab]))


@pytest.mark.parametrize("line,message", [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "expected a JSON object"),
    ({"prompt_id": "p1", "video_a": "a", "video_b": "b", "choice": "a"}, r"missing field\(s\) \['rater_id'\]"),
    ({"prompt_id": "p1", "video_a": "a", "video_b": "b", "choice": "left", "rater_id": "r"}, "choice must be"),
    ({"prompt_id": "p1", "video_a": "a", "video_b": "a", "choice": "a", "rater_id": "r"}, "same video"),
    ({"prompt_id": "p1", "video_a": ["a"], "video_b": "b", "choice": "a", "rater_id": "r"}, "must be strings"),
])
def test_jsonl_rater_malformed_lines_name_the_line(tmp_path, line, message):
    good = {"prompt_id": "p1", "video_a": "p1#v0", "video_b": "p1#v1", "choice": "a", "rater_id": "r"}
    path = write_lines(tmp_path / "labels.jsonl", [good, line])
    with pytest.raises(ValueError, match=message) as e:
        JsonlRater(path)
    assert "labels.jsonl:2" in str(e.value)


def test_jsonl_rater_unknown_video_and_missing_file(tmp_path):
    path = write_lines(tmp_path / "labels.jsonl", [
        {"prompt_id": "p1", "video_a": "p1#v0", "video_b": "p1#v1", "choice": "a", "rater_id": "r"},
        {"prompt_id": "p1", "video_a": "p1#v0", "video_b": "p1#v9", "choice": "a", "rater_id": "r"},
    ])
    rater = JsonlRater(path)
    with pytest.raises(ValueError, match=r"labels.jsonl:2: video id\(s\) \['p1#v9'\]"):
        rater.rate(group("p1", 3))
    with pytest.raises(FileNotFoundError, match="not found"):
        JsonlRater(tmp_path / "nope.jsonl")


@dataclass
class RaterOptions:  # the shape of a stage's config block: options of both raters in one place
    name: str = "oracle"
    temperature: float = 0.0
    disagreement: float = 0.0
    path: str = ""
    utility: UtilityWeights = field(default_factory=UtilityWeights)


def test_build_rater_from_config_blocks(tmp_path):
    oracle = build_rater("oracle", RaterOptions(), seed=4)
    assert isinstance(oracle, OracleRater) and oracle.seed == 4 and oracle.temperature == 0.0
    g = group("p1", 3)
    assert all(lab.choice == lab.oracle_choice for lab in oracle.rate(g))
    weighted = build_rater("oracle", {"utility": {"lipsync_corr": 2.0}, "temperature": 0.5})
    assert weighted.weights.lipsync_corr == 2.0 and weighted.temperature == 0.5
    path = write_lines(tmp_path / "h.jsonl", [
        {"prompt_id": "p1", "video_a": "p1#v0", "video_b": "p1#v2", "choice": "b", "rater_id": "r"}])
    human = build_rater("jsonl", RaterOptions(name="jsonl", path=path))
    assert isinstance(human, JsonlRater)
    assert human.rate(g) == [PairLabel("p1", "p1#v0", "p1#v2", "b", "r", human.rate(g)[0].oracle_choice,
                                       oracle_utility(g.scores[0]), oracle_utility(g.scores[2]))]
    with pytest.raises(ValueError, match="unknown rater 'mturk'"):
        build_rater("mturk", {})
    with pytest.raises(ValueError, match=r"unknown rater option\(s\) \['temprature'\]"):
        build_rater("oracle", {"temprature": 0.1})
    with pytest.raises(ValueError, match="needs options.path"):
        build_rater("jsonl", RaterOptions(name="jsonl"))
