"""Config loading: YAML + overrides, typed validation that names the key, DAG checks, hashing."""

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from avatarforge.stages.config import (
    ConfigError,
    _without_defaults,
    cut_curriculum,
    descendants,
    load_config,
    stage_data,
    stage_fingerprint,
    topological_order,
)

TINY = Path(__file__).resolve().parents[1] / "configs" / "curriculum" / "tiny.yaml"


def write(tmp_path, text: str) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def test_tiny_config_loads_and_defaults_merge():
    cfg = load_config(TINY)
    assert list(cfg.stages) == ["autoencoder", "t2v", "a2v", "sft", "distill", "preferences", "reward", "rlhf"]
    assert cfg.stages.rlhf.needs == ["distill", "reward", "preferences", "autoencoder"]
    assert cfg.stages.sft.needs == ["a2v", "autoencoder"]
    # train_defaults reach every stage, the stage's own values win
    assert cfg.stages.t2v.train.batch_size == 4
    assert cfg.stages.t2v.train.optimizer.lr == pytest.approx(1e-3)
    assert cfg.stages.autoencoder.train.optimizer.lr == pytest.approx(2e-3)
    assert cfg.stages.t2v.train.scaling.num_workers == 1


def test_overrides_apply_and_are_typed():
    cfg = load_config(TINY, ["stages.t2v.train.steps=7", "train_defaults.batch_size=2", "seed=3"])
    assert cfg.stages.t2v.train.steps == 7
    assert cfg.stages.autoencoder.train.batch_size == 2
    assert cfg.seed == 3


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("stages.t2v.train.stpes=5", "stages.t2v.train.stpes"),
        ("stages.t2v.train.steps=many", "stages.t2v.train.steps"),
        ("model.dit.depth=deep", "model.dit.depth"),
        ("data.nonsense=1", "data.nonsense"),
        ("train_defaults.optimizer.lr=fast", "train_defaults.optimizer.lr"),
        ("stages.t2v.options.bogus=1", "stages.t2v.options.bogus"),
        ("stages.t2v.train.deepspeed.zero_stage=5", "stages.t2v.train.deepspeed.zero_stage"),
        ("stages.t2v.train.scaling.placement_strategy=RANDOM", "stages.t2v.train.scaling.placement_strategy"),
        ("stages.t2v.kind=t3v", "stages.t2v.kind"),
    ],
)
def test_bad_key_or_type_names_the_full_key(override, key):
    with pytest.raises(ConfigError) as err:
        load_config(TINY, [override])
    assert key in str(err.value)


def test_unknown_parent_and_cycles_are_rejected(tmp_path):
    with pytest.raises(ConfigError, match=r"stages.b.needs: unknown stage 'zzz'"):
        load_config(write(tmp_path, "stages:\n  b: {kind: autoencoder, needs: [zzz]}\n"))
    cyclic = "stages:\n  a: {kind: autoencoder, needs: [b]}\n  b: {kind: autoencoder, needs: [a]}\n"
    with pytest.raises(ConfigError, match="cycle"):
        load_config(write(tmp_path, cyclic))


def test_missing_file_and_malformed_override(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="key=value"):
        load_config(TINY, ["justaword"])


def test_yaml_layers_merge_in_order(tmp_path):
    layer = tmp_path / "cluster.yaml"
    layer.write_text("train_defaults:\n  scaling: {num_workers: 2, placement_strategy: SPREAD}\n")
    cfg = load_config(TINY, [str(layer), "stages.t2v.train.scaling.num_workers=3"])
    assert cfg.stages.autoencoder.train.scaling.num_workers == 2
    assert cfg.stages.t2v.train.scaling.num_workers == 3
    assert cfg.stages.t2v.train.scaling.placement_strategy == "SPREAD"


def test_topology_and_descendants(tmp_path):
    text = (
        "stages:\n  c: {kind: t2v_pretrain, needs: [b]}\n  a: {kind: autoencoder}\n"
        "  b: {kind: t2v_pretrain, needs: [a]}\n  d: {kind: autoencoder}\n"
    )
    cfg = load_config(write(tmp_path, text))
    order = topological_order(cfg)
    assert order.index("a") < order.index("b") < order.index("c")
    assert descendants(cfg, "a") == ["b", "c"]
    assert descendants(cfg, "d") == []


def test_fingerprint_leaves_out_values_at_their_defaults():
    """A field added to a schema later sits at its default in old configs: their hashes must not move,
    or every finished run would refuse to resume after an upgrade."""
    base = load_config(TINY)
    a2v = stage_fingerprint(base, "a2v", {"t2v": "p"})
    at_defaults = ["stages.a2v.options.holdout_personality=false", "data.synth.caption_room=last",
                   "model.dit.ref_share_tokens=0", "stages.a2v.train.optimizer.eps=1e-8"]
    assert a2v == stage_fingerprint(load_config(TINY, at_defaults), "a2v", {"t2v": "p"})
    for changed in ("stages.a2v.options.holdout_personality=true", "data.synth.caption_room=first",
                    "model.dit.ref_share_tokens=80", "stages.a2v.train.optimizer.eps=1e-6"):
        assert a2v != stage_fingerprint(load_config(TINY, [changed]), "a2v", {"t2v": "p"}), changed
    # an emptied mapping is not its non-empty default
    assert _without_defaults({"m": {}, "k": 1}, {"m": {"a": 1}, "k": 1}) == {"m": {}}
    assert _without_defaults({"m": {"a": 1, "b": 2}}, {"m": {"a": 1, "b": 3}}) == {"m": {"b": 2}}


def test_fingerprint_tracks_what_matters():
    base = load_config(TINY)
    h = stage_fingerprint(base, "autoencoder", {})
    assert h == stage_fingerprint(load_config(TINY), "autoencoder", {})
    # the DiT is not part of the autoencoder stage; where data lives is not part of any result
    assert h == stage_fingerprint(load_config(TINY, ["model.dit.depth=2"]), "autoencoder", {})
    moved = ["data.root=/elsewhere", "data.num_workers=2", "data.video_uint8=false"]
    assert h == stage_fingerprint(load_config(TINY, moved), "autoencoder", {})
    assert h != stage_fingerprint(load_config(TINY, ["stages.autoencoder.train.steps=3"]), "autoencoder", {})
    assert h != stage_fingerprint(load_config(TINY, ["seed=1"]), "autoencoder", {})
    t = stage_fingerprint(base, "t2v", {"autoencoder": h})
    assert t != stage_fingerprint(base, "t2v", {"autoencoder": "other"})
    assert t != stage_fingerprint(load_config(TINY, ["model.dit.depth=2"]), "t2v", {"autoencoder": h})
    # avatar-only DiT fields (reference attention) do not touch what t2v trains
    assert t == stage_fingerprint(load_config(TINY, ["model.dit.ref_top_k=2"]), "t2v", {"autoencoder": h})


def test_config_is_read_only():
    cfg = load_config(TINY)
    with pytest.raises(Exception):  # noqa: B017 - omegaconf raises its own ReadonlyConfigError
        cfg.seed = 5
    assert OmegaConf.is_readonly(cfg)


@pytest.mark.parametrize("layer", sorted(p.name for p in TINY.parent.glob("*.yaml") if p != TINY))
def test_every_curriculum_layer_validates_on_tiny(layer):
    # the shipped layers (ablations, DMD2, candidate autoencoder) stay valid as the schema moves
    cfg = load_config(TINY, [str(TINY.parent / layer)])
    assert set(cfg.stages) >= {"autoencoder", "rlhf"}


@pytest.mark.parametrize("overrides, key", [
    (["model.autoencoder.temporal_downsample=[false]"], "model.audio.temporal_factor"),
    (["model.audio.temporal_factor=4"], "model.audio.temporal_factor"),
    (["data.fps=30"], "model.audio.fps"),
    (["stages.reward.options.model.audio.temporal_factor=4"], "stages.reward.options.model.audio.temporal_factor"),
    # the reward model's own audio encoder is checked too, not only model.audio
    (["model.autoencoder.temporal_downsample=[false]", "model.audio.temporal_factor=1"],
     "stages.reward.options.model.audio.temporal_factor"),
])
def test_audio_windows_must_follow_the_autoencoder_and_frame_rate(overrides, key):
    # A mismatch cuts every audio window after the first from the wrong moment: refused before Ray starts.
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(TINY, overrides)
    fixed = load_config(TINY, ["model.autoencoder.temporal_downsample=[false]", "model.audio.temporal_factor=1",
                               "stages.reward.options.model.audio.temporal_factor=1"])
    assert fixed.model.audio.temporal_factor == 1


@pytest.mark.parametrize("stage", ["t2v", "a2v", "sft"])
def test_unknown_timestep_distribution_is_refused(stage):
    with pytest.raises(ConfigError, match=rf"stages\.{stage}\.options\.timesteps: 'cosine'"):
        load_config(TINY, [f"stages.{stage}.options.timesteps=cosine"])
    assert load_config(TINY, [f"stages.{stage}.options.timesteps=uniform"]).stages[stage].options.timesteps == "uniform"
    for bad in ("timestep_shift=0", "loss_weighting=snr"):
        with pytest.raises(ConfigError, match=rf"stages\.{stage}\.options\.{bad.split('=')[0]}: "):
            load_config(TINY, [f"stages.{stage}.options.{bad}"])
    good = load_config(TINY, [f"stages.{stage}.options.timestep_shift=3", f"stages.{stage}.options.loss_weighting=data"])
    assert good.stages[stage].options.timestep_shift == 3 and good.stages[stage].options.loss_weighting == "data"
    if stage != "t2v":
        with pytest.raises(ConfigError, match=rf"stages\.{stage}\.options\.dynamic_weight must be >= 0"):
            load_config(TINY, [f"stages.{stage}.options.dynamic_weight=-1"])


def test_unset_reward_audio_factor_keeps_its_default_and_is_checked(tmp_path):
    # A reward model without options.model.audio is built with AudioEncoderConfig's default factor (4):
    # the check must see that default, not skip the key (tiny's 2x-time autoencoder needs 2).
    cfg = OmegaConf.load(TINY)
    del cfg.stages.reward.options.model["audio"]
    path = tmp_path / "tiny_reward_default_audio.yaml"
    OmegaConf.save(cfg, path)
    with pytest.raises(ConfigError, match=r"stages\.reward\.options\.model\.audio\.temporal_factor: 4"):
        load_config(path)


def test_reward_audio_encoder_source_must_be_a_parent_with_the_same_audio():
    # the reward model's audio encoder starts from a parent avatar model's: refused before Ray starts unless
    # that stage is in `needs` and builds the same audio encoder
    with pytest.raises(ConfigError, match=r"stages\.reward\.options\.audio_encoder_from: 'sft' is not in"):
        load_config(TINY, ["stages.reward.options.audio_encoder_from=sft", "stages.reward.needs=[preferences]"])
    with pytest.raises(ConfigError, match=r"stages\.reward\.options\.model\.audio: must equal model\.audio"):
        load_config(TINY, ["stages.reward.options.audio_encoder_from=distill", "stages.reward.needs=[preferences,distill]",
                           "stages.reward.options.model.audio.dim=64"])
    cfg = load_config(TINY, ["stages.reward.options.audio_encoder_from=distill",
                             "stages.reward.needs=[preferences,distill,autoencoder]"])
    assert cfg.stages.reward.options.audio_encoder_from == "distill"


def test_cut_curriculum_keeps_the_named_stages(tmp_path):
    path = cut_curriculum(TINY, ("autoencoder", "t2v"), tmp_path / "cut.yaml")
    cfg = load_config(path)
    assert list(cfg.stages) == ["autoencoder", "t2v"]
    assert cfg.stages.t2v.train.steps == load_config(TINY).stages.t2v.train.steps
    with pytest.raises(ConfigError, match=r"stages\.t2v\.needs: unknown stage 'autoencoder'"):
        load_config(cut_curriculum(TINY, ("t2v",), tmp_path / "t2v_only.yaml"))


def test_reward_sync_pretraining_is_checked_before_ray_starts():
    with pytest.raises(ConfigError, match=r"stages\.reward\.options\.sync_pretrain_steps: needs model\.sync\.enabled"):
        load_config(TINY, ["stages.reward.options.sync_pretrain_steps=10",
                           "stages.reward.options.model.sync.enabled=false"])
    with pytest.raises(ConfigError, match=r"stages\.reward\.options\.sync_pretrain_steps: needs an autoencoder"):
        load_config(TINY, ["stages.reward.options.sync_pretrain_steps=10", "stages.reward.options.model.sync.enabled=true",
                           "stages.reward.needs=[preferences,distill]"])
    ok = load_config(TINY, ["stages.reward.options.sync_pretrain_steps=10", "stages.reward.options.model.sync.enabled=true",
                            "stages.reward.needs=[preferences,distill,autoencoder]"])
    assert ok.stages.reward.options.sync_pretrain_steps == 10


def test_sync_score_and_sync_only_rlhf_reward_are_checked_before_ray_starts():
    with pytest.raises(ConfigError, match=r"stages\.reward\.options\.model\.sync\.score: must be one of"):
        load_config(TINY, ["stages.reward.options.model.sync.score=cos"])
    with pytest.raises(ConfigError, match=r"stages\.rlhf\.options\.reward_terms: must be one of"):
        load_config(TINY, ["stages.rlhf.options.reward_terms=lips"])
    with pytest.raises(ConfigError, match=r"stages\.rlhf\.options\.reward_terms: 'sync' needs a reward_model parent"):
        load_config(TINY, ["stages.rlhf.options.reward_terms=sync", "stages.reward.options.model.sync.enabled=false",
                           "stages.reward.options.sync_pretrain_steps=0"])
    ok = load_config(TINY, ["stages.rlhf.options.reward_terms=sync", "stages.reward.options.model.sync.score=cosine"])
    assert ok.stages.rlhf.options.reward_terms == "sync"


def test_trainable_patterns_must_name_parameters_of_the_stage_model():
    with pytest.raises(ConfigError, match=r"stages\.rlhf\.train\.trainable: 'dit\.block\.\*' matches no parameter"):
        load_config(TINY, ["stages.rlhf.train.trainable=[dit.blocks.*.audio_attn.*,dit.block.*]"])
    with pytest.raises(ConfigError, match=r"stages\.distill\.train\.trainable: patterns must be non-empty"):
        load_config(TINY, ["stages.distill.train.trainable=['']"])
    ok = load_config(TINY, ["stages.rlhf.train.trainable=[dit.blocks.*.audio_attn.*,audio_encoder.*]"])
    assert list(ok.stages.rlhf.train.trainable) == ["dit.blocks.*.audio_attn.*", "audio_encoder.*"]
    assert list(ok.stages.a2v.train.trainable) == []  # the default: whatever the task trains
    # dmd2's model is a student + critic pair ("student.dit..."): its worker checks the names
    dmd2 = load_config(TINY, ["stages.distill.options.method=dmd2", "stages.distill.train.trainable=[student.*]"])
    assert list(dmd2.stages.distill.train.trainable) == ["student.*"]


def test_scene_captions_rehash_only_the_stages_that_read_captions():
    full, scene = load_config(TINY), load_config(TINY, ["data.captions=scene"])
    hashes = {}
    for name in topological_order(full):
        parents = {p: hashes[p] for p in full.stages[name].needs}
        hashes[name] = stage_fingerprint(full, name, parents) == stage_fingerprint(scene, name, parents)
    assert hashes["autoencoder"] and hashes["t2v"]  # no text / always the whole caption: finished ones are reused
    assert not any(hashes[n] for n in ("a2v", "sft", "distill", "preferences", "reward", "rlhf"))
    with pytest.raises(ConfigError, match=r"data\.captions: 'room' is not one of \['full', 'mixed', 'scene'\]"):
        load_config(TINY, ["data.captions=room"])


def test_a_stage_may_read_the_world_its_own_way():
    """stages.X.data overrides how one stage reads clips (e.g. a longer reference for personality
    fine-tuning): that stage's data section and hash change, the others' do not; the world's own keys
    cannot differ per stage, and types are checked before Ray starts."""
    base, longer = load_config(TINY), load_config(TINY, ["stages.sft.data.reference_frames=25"])
    assert stage_data(base, "sft").reference_frames == 17  # tiny.yaml's own override
    assert stage_data(longer, "sft").reference_frames == 25
    assert stage_data(longer, "a2v").reference_frames == base.data.reference_frames == 9
    assert stage_data(longer, "sft").root == base.data.root
    assert stage_fingerprint(base, "a2v", {"t2v": "p"}) == stage_fingerprint(longer, "a2v", {"t2v": "p"})
    assert stage_fingerprint(base, "sft", {"a2v": "p"}) != stage_fingerprint(longer, "sft", {"a2v": "p"})
    # the same value written globally or for the stage is the same recipe
    assert stage_fingerprint(load_config(TINY, ["data.reference_frames=25"]), "a2v", {"t2v": "p"}) == \
        stage_fingerprint(load_config(TINY, ["stages.a2v.data.reference_frames=25"]), "a2v", {"t2v": "p"})
    with pytest.raises(ConfigError, match=r"stages\.sft\.data: \['size'\] cannot differ per stage"):
        load_config(TINY, ["stages.sft.data.size=32"])
    with pytest.raises(ConfigError, match=r"stages\.sft\.data\.reference_frames"):
        load_config(TINY, ["stages.sft.data.reference_frames=many"])


def test_word_tokenizer_needs_its_vocabulary_and_rehashes_the_text_stages():
    words = ["data.tokenizer=words", "model.text.vocab_size=4096"]
    with pytest.raises(ConfigError, match=r"model\.text\.vocab_size: 257, but data\.tokenizer 'words'.*set it to 4096"):
        load_config(TINY, words[:1])
    with pytest.raises(ConfigError, match=r"data\.tokenizer: 'chars'"):
        load_config(TINY, ["data.tokenizer=chars"])
    base, other = load_config(TINY), load_config(TINY, words)
    assert stage_fingerprint(base, "autoencoder", {}) == stage_fingerprint(other, "autoencoder", {})  # no text
    assert stage_fingerprint(base, "t2v", {"autoencoder": "a"}) != stage_fingerprint(other, "t2v", {"autoencoder": "a"})


def test_cross_scene_layer_is_tiny_with_scene_captions_and_word_tokens_in_its_own_run():
    """configs/curriculum/cross_scene.yaml: tiny.yaml's stages reading scene captions through word tokens,
    written to its own run directory (every stage but the autoencoder hashes differently, so sharing
    runs/tiny would stop at the first changed stage)."""
    layer = TINY.parent / "cross_scene.yaml"
    base, cross = load_config(TINY), load_config(TINY, [str(layer)])
    assert cross.name != base.name
    assert (cross.data.captions, cross.data.tokenizer) == ("scene", "words")
    assert cross.model.text.vocab_size == cross.data.word_ids
    assert list(cross.stages) == list(base.stages)
    assert stage_data(cross, "sft").reference_frames == stage_data(base, "sft").reference_frames
    hashes = {}
    for name in topological_order(base):
        parents = {p: hashes[p] for p in base.stages[name].needs}
        hashes[name] = stage_fingerprint(base, name, parents) == stage_fingerprint(cross, name, parents)
    assert hashes["autoencoder"] and not any(v for k, v in hashes.items() if k != "autoencoder")
