"""The curriculum's typed config: loading YAML + `key=value` overrides, validated before Ray starts."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from avatarforge.data.config import CAPTION_KEYS, DataConfig
from avatarforge.data.tokenizer import TOKENIZERS, vocab_size
from avatarforge.model.audio import AudioEncoderConfig
from avatarforge.model.autoencoder import AutoencoderConfig, temporal_factor
from avatarforge.model.avatar import AvatarDiTConfig
from avatarforge.model.dit import DiTConfig
from avatarforge.model.text_encoder import TextEncoderConfig
from avatarforge.train.config import TrainConfig, WandbConfig, check_train_config

DIT_BASE_FIELDS = frozenset(f.name for f in fields(DiTConfig))
# data keys a stage may override (StageConfig.data): how it reads clips, not which clips exist or their geometry
STAGE_DATA_KEYS = ("reference_frames", "reference_stride", "shuffle_buffer", "num_workers", "max_bad_fraction",
                   "video_uint8")


class ConfigError(ValueError):
    """A bad config: the message names the full key path."""


@dataclass
class ModelConfig:
    autoencoder: AutoencoderConfig = field(default_factory=AutoencoderConfig)
    text: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    # The avatar DiT's config; the t2v stage builds its plain DiT from the DiTConfig fields of it.
    dit: AvatarDiTConfig = field(default_factory=AvatarDiTConfig)
    audio: AudioEncoderConfig = field(default_factory=AudioEncoderConfig)


@dataclass
class RayConfig:
    # "" = an embedded local cluster bound to 127.0.0.1; else an address for ray.init (RAY_ADDRESS wins).
    address: str = ""
    num_cpus: int = 0  # CPUs of the embedded cluster; 0 = all of this machine
    namespace: str = "avatarforge"


@dataclass
class StageConfig:
    kind: str = MISSING
    needs: list[str] = field(default_factory=list)
    train: TrainConfig = field(default_factory=TrainConfig)
    options: dict[str, Any] = field(default_factory=dict)  # checked against the kind's Options dataclass
    # overrides of the curriculum's `data` for this stage alone, e.g. {reference_frames: 25} for a stage that
    # should condition on a longer reference; only how a stage reads the world (STAGE_DATA_KEYS), never the
    # world itself, which every stage shares
    data: dict[str, Any] = field(default_factory=dict)


@dataclass
class CurriculumConfig:
    name: str = "tiny"
    output_dir: str = "runs"  # must be shared storage (NFS, cloud mount) for multi-node runs
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    # Merged under every stage's `train` (the stage's own values win).
    train_defaults: dict[str, Any] = field(default_factory=dict)
    stages: dict[str, StageConfig] = field(default_factory=dict)


def _error(exc: OmegaConfBaseException, prefix: str = "") -> ConfigError:
    key = getattr(exc, "full_key", None) or ""
    key = f"{prefix}.{key}" if prefix and key else (key or prefix)
    message = str(exc).splitlines()[0]
    return ConfigError(f"{key}: {message}" if key else message)


def _typed(schema: Any, *layers: Any, prefix: str = "") -> DictConfig:
    try:
        return OmegaConf.merge(OmegaConf.structured(schema), *layers)
    except OmegaConfBaseException as exc:
        raise _error(exc, prefix) from None


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> DictConfig:
    """YAML file + overrides -> a validated, typed config. Raises ConfigError naming the key.

    Overrides are `key=value` pairs or further YAML files (e.g. configs/cluster/*.yaml), applied in order.
    """
    layers = []
    try:
        for item in [str(path), *overrides]:
            if "=" in item:
                layers.append(OmegaConf.from_dotlist([item]))
            elif item.endswith((".yaml", ".yml")):
                if not Path(item).is_file():
                    raise ConfigError(f"config file not found: {item}")
                layers.append(OmegaConf.load(item))
            else:
                raise ConfigError(f"override {item!r} is neither key=value nor a .yaml file")
        raw = OmegaConf.merge(*layers)
    except OmegaConfBaseException as exc:
        raise _error(exc) from None
    return build_config(raw)


def cut_curriculum(source: str | Path, stages: list[str] | tuple[str, ...], dest: str | Path) -> Path:
    """Write `source`'s curriculum YAML with only `stages` (in that order) to `dest`; returns `dest`. For
    tests and benchmarks that need the first stages of a curriculum (validation happens on load)."""
    cfg = OmegaConf.load(source)
    cfg.stages = {name: cfg.stages[name] for name in stages}
    OmegaConf.save(cfg, dest)
    return Path(dest)


def build_config(raw: DictConfig | dict) -> DictConfig:
    raw = OmegaConf.create(raw) if isinstance(raw, dict) else raw
    defaults = raw.get("train_defaults") or {}
    _typed(TrainConfig, defaults, prefix="train_defaults")  # type-check the defaults on their own
    stages = raw.get("stages") or {}
    expanded = {}
    for name, stage in stages.items():
        stage = stage if stage is not None else {}
        if not isinstance(stage, DictConfig):
            raise ConfigError(f"stages.{name}: expected a mapping, got {stage!r}")
        train = _typed(TrainConfig, defaults, stage.get("train") or {}, prefix=f"stages.{name}.train")
        expanded[name] = OmegaConf.merge(stage, {"train": train})
    body = OmegaConf.merge(raw, {"stages": {}})
    body.stages = expanded
    cfg = _typed(CurriculumConfig, body)
    OmegaConf.set_readonly(cfg, True)
    check_config(cfg)
    return cfg


def check_config(cfg: DictConfig) -> None:
    """Cross-field checks: stage kinds, options, the DAG, value ranges."""
    from avatarforge.stages.registry import KINDS

    errors = []
    audios = {"model.audio": OmegaConf.to_object(cfg.model.audio)}  # every audio encoder the stages build
    if not cfg.stages:
        errors.append("stages: the curriculum has no stages")
    if cfg.data.captions not in CAPTION_KEYS:
        errors.append(f"data.captions: {cfg.data.captions!r} is not one of {sorted(CAPTION_KEYS)}")
    if cfg.data.tokenizer not in TOKENIZERS:
        errors.append(f"data.tokenizer: {cfg.data.tokenizer!r} is not one of {list(TOKENIZERS)}")
    elif cfg.model.text.vocab_size != vocab_size(cfg.data):
        errors.append(f"model.text.vocab_size: {cfg.model.text.vocab_size}, but data.tokenizer {cfg.data.tokenizer!r} "
                      f"gives ids below {vocab_size(cfg.data)}; set it to {vocab_size(cfg.data)}")
    for name, stage in cfg.stages.items():
        if stage.kind not in KINDS:
            errors.append(f"stages.{name}.kind: unknown stage kind {stage.kind!r}; known: {sorted(KINDS)}")
        else:
            try:
                options = OmegaConf.to_object(
                    _typed(KINDS[stage.kind].options, stage.options, prefix=f"stages.{name}.options"))
            except ConfigError as exc:
                errors.append(str(exc))
            else:  # cross-field checks of an Options dataclass: validate() -> ["field: message", ...]
                errors += [f"stages.{name}.options.{e}" for e in getattr(options, "validate", list)()]
                audio = getattr(getattr(options, "model", None), "audio", None)  # e.g. the reward model's
                if audio is not None:
                    audios[f"stages.{name}.options.model.audio"] = audio
                source = getattr(options, "audio_encoder_from", "")  # the reward model's pretrained audio
                if source and source not in stage.needs:
                    errors.append(f"stages.{name}.options.audio_encoder_from: {source!r} is not in the stage's "
                                  f"needs {list(stage.needs)}")
                elif source and audio != audios["model.audio"]:
                    errors.append(f"stages.{name}.options.model.audio: must equal model.audio to start from "
                                  f"{source!r}'s audio encoder")
                if getattr(options, "sync_pretrain_steps", 0) and not any(
                        n in cfg.stages and cfg.stages[n].kind == "autoencoder" for n in stage.needs):
                    errors.append(f"stages.{name}.options.sync_pretrain_steps: needs an autoencoder stage in "
                                  f"the stage's needs (it encodes the ground-truth clips)")
                if getattr(options, "reward_terms", "full") == "sync":
                    errors += _check_sync_reward(cfg, name)
        errors += [f"stages.{name}.needs: unknown stage {n!r}" for n in stage.needs if n not in cfg.stages]
        errors += _check_stage_data(cfg, name)
        errors += check_train_config(OmegaConf.to_object(stage.train), f"stages.{name}.train")
        errors += _check_trainable(cfg, name)
    errors += _check_audio_alignment(cfg, audios)
    if not errors:
        try:
            topological_order(cfg)
        except ConfigError as exc:
            errors.append(str(exc))
    if errors:
        raise ConfigError("; ".join(errors))


def _check_stage_data(cfg: DictConfig, name: str) -> list[str]:
    """A stage's data overrides: only STAGE_DATA_KEYS, and typed as DataConfig's fields."""
    overrides = cfg.stages[name].data
    other = sorted(set(overrides) - set(STAGE_DATA_KEYS))
    if other:
        return [f"stages.{name}.data: {other} cannot differ per stage (the world and its geometry are the "
                f"curriculum's data section); a stage may override {list(STAGE_DATA_KEYS)}"]
    try:
        stage_data(cfg, name)
    except ConfigError as exc:
        return [str(exc)]
    return []


def stage_data(cfg: DictConfig, stage: str) -> DictConfig:
    """The data section `stage` reads: the curriculum's, with the stage's own overrides (StageConfig.data)."""
    return _typed(DataConfig, cfg.data, cfg.stages[stage].data, prefix=f"stages.{stage}.data")


def _check_sync_reward(cfg: DictConfig, name: str) -> list[str]:
    """An rlhf stage optimising only the reward's sync head needs a reward_model parent that has one."""
    rewards = [p for p in cfg.stages[name].needs if p in cfg.stages and cfg.stages[p].kind == "reward_model"]
    if not any(OmegaConf.select(cfg.stages[p], "options.model.sync.enabled", default=False) for p in rewards):
        return [f"stages.{name}.options.reward_terms: 'sync' needs a reward_model parent with "
                f"options.model.sync.enabled (found {rewards})"]
    return []


# kinds whose trained model is the AvatarModel of the curriculum's model sections
AVATAR_MODEL_KINDS = ("a2v_pretrain", "personality_sft", "distill", "rlhf")


def _check_trainable(cfg: DictConfig, name: str) -> list[str]:
    """train.trainable patterns must name parameters of the stage's model (built on the meta device: no
    memory, no weights), so a typo fails here rather than in every restarted Ray worker."""
    from fnmatch import fnmatchcase

    import torch

    from avatarforge.stages.policy import build_avatar_model

    stage = cfg.stages[name]
    if (not stage.train.trainable or stage.kind not in AVATAR_MODEL_KINDS
            or OmegaConf.select(stage, "options.method") == "dmd2"):  # dmd2 trains a student + critic pair
        return []  # other models are checked when their worker builds them (train/trainable.py)
    with torch.device("meta"):
        names = [n for n, _ in build_avatar_model(OmegaConf.to_container(cfg, resolve=True)).named_parameters()]
    unmatched = [p for p in stage.train.trainable if not any(fnmatchcase(n, p) for n in names)]
    return [f"stages.{name}.train.trainable: {p!r} matches no parameter of the avatar model (names look like "
            f"{names[0]!r}, 'dit.blocks.0.audio_attn.q.weight')" for p in unmatched]


def _check_audio_alignment(cfg: DictConfig, audios: dict[str, AudioEncoderConfig]) -> list[str]:
    """Audio windows are cut per latent frame from `temporal_factor` and `fps`: if those disagree with the
    autoencoder's time compression or the data's frame rate, every window after the first hears the wrong
    moment (or nothing, past the clip's end) and no error would ever say so. `audios`: typed, by key."""
    factor = temporal_factor(cfg.model.autoencoder.temporal_downsample)
    errors = []
    for key, audio in audios.items():
        if audio.temporal_factor != factor:
            errors.append(f"{key}.temporal_factor: {audio.temporal_factor}, but the autoencoder compresses time "
                          f"{factor}x (model.autoencoder.temporal_downsample); set it to {factor}")
        if float(audio.fps) != float(cfg.data.fps):
            errors.append(f"{key}.fps: {audio.fps}, but data.fps is {cfg.data.fps}; set it to {cfg.data.fps}")
    return errors


def topological_order(cfg: DictConfig) -> list[str]:
    """Stages in dependency order (ties keep the file's order); a cycle is a ConfigError."""
    order: list[str] = []
    state: dict[str, str] = {}

    def visit(name: str, trail: list[str]) -> None:
        if state.get(name) == "done":
            return
        if state.get(name) == "visiting":
            raise ConfigError(f"stages: dependency cycle {' -> '.join([*trail, name])}")
        state[name] = "visiting"
        for parent in cfg.stages[name].needs:
            visit(parent, [*trail, name])
        state[name] = "done"
        order.append(name)

    for name in cfg.stages:
        visit(name, [])
    return order


def descendants(cfg: DictConfig, stage: str) -> list[str]:
    out: list[str] = []
    for name in topological_order(cfg):
        if name != stage and any(p == stage or p in out for p in cfg.stages[name].needs):
            out.append(name)
    return out


def stage_options(cfg: DictConfig, stage: str) -> Any:
    from avatarforge.stages.registry import KINDS

    kind = KINDS[cfg.stages[stage].kind]
    return OmegaConf.to_object(_typed(kind.options, cfg.stages[stage].options, prefix=f"stages.{stage}.options"))


def _without_defaults(values: Any, defaults: Any) -> Any:
    """`values` less every entry equal to its default (recursively), so that a field added to a schema
    later, at its default, leaves existing configs' hashes as they were."""
    if not (isinstance(values, dict) and isinstance(defaults, dict)):
        return values
    return {key: _without_defaults(value, defaults[key]) if key in defaults else value
            for key, value in values.items() if key not in defaults or value != defaults[key]}


def _defaults(schema: Any) -> dict[str, Any]:
    return OmegaConf.to_container(OmegaConf.structured(schema), resolve=False)


def stage_fingerprint(cfg: DictConfig, stage: str, parent_hashes: dict[str, str]) -> str:
    """Hash of everything that determines a stage's result: its own section, the model parts its kind
    uses, the data recipe (not where it lives, how many loader workers read it or whether the float
    conversion runs in the loader or on the trainer's device: the same values), seed, parents.

    Values at their schema defaults are left out, so a new config field (at its default) keeps finished
    runs resumable; the price is that changing a default in the code is not seen as a config change
    (runs that must not follow a default should set it in their YAML)."""
    from avatarforge.stages.registry import KINDS

    kind = KINDS[cfg.stages[stage].kind]
    data = OmegaConf.to_container(stage_data(cfg, stage), resolve=True)
    no_text = () if "text" in kind.model_sections else ("tokenizer", "word_ids")  # e.g. the autoencoder
    for key in ("root", "num_workers", "video_uint8", *(() if kind.reads_captions else ("captions",)), *no_text):
        data.pop(key, None)
    model_defaults = _defaults(ModelConfig)
    model = {}
    for section in kind.model_sections:
        name, _, schema = section.partition(":")  # "dit:base" = only the plain DiTConfig fields
        values = OmegaConf.to_container(cfg.model[name], resolve=True)
        if schema == "base":
            values = {k: v for k, v in values.items() if k in DIT_BASE_FIELDS}
        model[name] = _without_defaults(values, model_defaults[name])
    stage_values = OmegaConf.to_container(cfg.stages[stage], resolve=True)
    stage_values.pop("data")  # in `data` below, merged
    stage_defaults = {"train": _defaults(TrainConfig), "options": _defaults(kind.options)}
    payload = {
        "stage": _without_defaults(stage_values, stage_defaults),
        "model": model,
        "data": _without_defaults(data, _defaults(DataConfig)),
        "seed": cfg.seed,
        "parents": dict(sorted(parent_hashes.items())),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)
