"""Avatar stage helpers: mouth-region weighting, other-audio batches, LoRA merge at export."""

from pathlib import Path

import torch

from avatarforge.model.lora import LoRAConfig, inject_lora
from avatarforge.stages.avatar import A2VOptions, SFTTask, mouth_weight_map, rolled, to_uint8_frames


def test_mouth_weight_peaks_at_the_mouth_prior():
    w = mouth_weight_map((2, 8, 3, 8, 8), A2VOptions(mouth_weight=3.0))
    assert w.shape == (1, 1, 1, 8, 8)
    peak = torch.nonzero(w[0, 0, 0] == w.max())[0].tolist()
    assert peak in ([4, 3], [4, 4])  # lower centre (row 0.6, column 0.5 of 8)
    assert 2.5 < float(w.max()) <= 3.0 and float(w.min()) >= 1.0
    assert torch.equal(mouth_weight_map((1, 8, 3, 8, 8), A2VOptions(mouth_weight=1.0)), torch.ones(1, 1, 1, 8, 8))


def test_rolled_swaps_speech_but_not_identity():
    batch = {"audio": torch.arange(3)[:, None].float(), "phonemes": ["a", "b", "c"], "identity": ["x", "y", "z"]}
    out = rolled(batch)
    assert out["audio"][:, 0].tolist() == [2.0, 0.0, 1.0]
    assert out["phonemes"] == ["c", "a", "b"]
    assert out["identity"] == ["x", "y", "z"]


def test_to_uint8_frames_layout_and_range():
    video = torch.linspace(-1, 1, 3 * 2 * 4 * 4).view(3, 2, 4, 4)
    frames = to_uint8_frames(video)
    assert frames.shape == (2, 4, 4, 3) and frames.dtype.name == "uint8"
    assert frames.min() == 0 and frames.max() == 255


def test_sft_export_merges_lora_into_plain_weights():
    model = torch.nn.Sequential()
    model.add_module("proj", torch.nn.Linear(4, 4))
    inject_lora(model, LoRAConfig(rank=2, alpha=2.0, targets=["proj"]))
    with torch.no_grad():
        model.proj.lora_b.normal_()
    x = torch.randn(3, 4)
    expected = model(x)
    state = SFTTask.export_state(None, model, model.state_dict())
    assert not any(k.endswith(("lora_a", "lora_b")) for k in state)
    plain = torch.nn.Sequential()
    plain.add_module("proj", torch.nn.Linear(4, 4))
    plain.load_state_dict(state)
    assert torch.allclose(plain(x), expected, atol=1e-6)


def test_holdout_personality_leaves_the_sft_identities_out_of_a2v(identity_streams):
    """a2v with holdout_personality streams every training identity but the ones personality_sft will
    fine-tune (new people for sft); without it the whole split (None); sft refuses the option."""
    from avatarforge.data.config import DataConfig
    from avatarforge.stages.avatar import AvatarTask, SFTOptions

    config = {"stages": {"a2v": {"kind": "a2v_pretrain", "options": {}},
                         "sft": {"kind": "personality_sft", "needs": ["a2v"], "options": {"identities": ["b", "d"]}}}}
    task = AvatarTask.__new__(AvatarTask)
    task.args, task.data, task.batch_size, task.seed = {"config": config, "stage": "a2v"}, DataConfig(), 2, 0
    for holdout, streamed in ((True, ["a", "c"]), (False, None)):
        task.options = A2VOptions(holdout_personality=holdout)
        next(task.train_batches(rank=0, world_size=1, start_batch=0))
        assert identity_streams[-1] == streamed
    assert SFTOptions(holdout_personality=True).validate() == [
        "holdout_personality is an a2v option: personality_sft trains on those identities"]


def test_t2v_reads_whole_captions_whatever_data_captions_says(tmp_path):
    """With no reference, the caption is all a t2v model is told: data.captions scene is for the avatar stages."""
    from omegaconf import OmegaConf
    from safetensors.torch import save_file

    from avatarforge.model.autoencoder import AutoencoderConfig, VideoAutoencoder
    from avatarforge.stages.config import load_config
    from avatarforge.stages.t2v import T2VTask

    cfg = OmegaConf.to_container(load_config(Path(__file__).resolve().parents[1] / "configs" / "curriculum" / "tiny.yaml", ["data.captions=scene"]), resolve=True)
    weights = tmp_path / "ae.safetensors"
    save_file(VideoAutoencoder(AutoencoderConfig(**cfg["model"]["autoencoder"])).state_dict(), str(weights))
    task = T2VTask({"config": cfg, "stage": "t2v", "parent_weights": {"autoencoder": str(weights)}})
    assert cfg["data"]["captions"] == "scene" and task.data.captions == "full"
