"""Any towers: tiny randomly initialised timm image models and a tiny BERT, saved as local folders the way timm
(`save_for_hf`) and transformers (`save_pretrained`) write them, against transformers' VisionTextDualEncoderModel,
open_clip's TimmModel / HFTextEncoder (and its CustomTextCLIP folders), and through train.py."""
import json
import shutil
from pathlib import Path

import open_clip
import pytest
import timm
import torch
from safetensors.torch import save_file
from timm.models import save_for_hf
from transformers import BertConfig, BertModel, BertTokenizer, VisionTextDualEncoderModel

from miniclip.apps import train
from miniclip.config import ClipConfig, load_model_config
from miniclip.model import MiniClip
from miniclip.tokenizer import get_tokenizer
from miniclip.training.locking import frozen_batchnorms
from tests.test_train import _flags, make_caption_set

WORDS = ("colour with a square at picture number photo of the " + " ".join(map(str, range(10)))).split()
EMBED = 16


@pytest.fixture(scope="module")
def towers(tmp_path_factory) -> dict[str, Path]:
    """Local folders: a 2-block ViT at 32px, a 2-stage ResNet (BatchNorm), and a 2-layer BERT with its tokenizer."""
    root = tmp_path_factory.mktemp("towers")
    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", img_size=32, depth=2, embed_dim=48, num_heads=2, num_classes=0)
    save_for_hf(vit, root / "vit", safe_serialization=True)
    resnet = timm.create_model("resnet18", layers=[1, 1, 1, 1], num_classes=0)
    save_for_hf(resnet, root / "resnet", safe_serialization=True)
    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS])}
    tokenizer = BertTokenizer(vocab=vocab, model_max_length=24)
    bert = BertModel(BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                intermediate_size=64, max_position_embeddings=64))
    bert.save_pretrained(root / "bert")
    tokenizer.save_pretrained(root / "bert")
    return {"vit": root / "vit", "resnet": root / "resnet", "bert": root / "bert"}


def dual_config(towers, vision="vit", **text) -> dict:
    """The dual encoder's pooling / projection (run_clip's): the timm head's own pool, BERT's pooler, Linear."""
    return {"embed_dim": EMBED,
            "vision_cfg": {"timm_model_name": "vit_tiny_patch16_224" if vision == "vit" else "resnet18",
                           "pretrained": str(towers[vision]), "timm_pool": "", "timm_proj": "linear"},
            "text_cfg": {"hf_model_name": str(towers["bert"]), "hf_pooler_type": "cls_pooler",
                         "hf_proj_type": "linear", **text}}


def _inputs(model):
    tokens = get_tokenizer(model.config)(["a photo of colour 3", "picture number 7 with a square"])
    size = model.config.vision_cfg.image_size
    return torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1)), tokens


# --- config -----------------------------------------------------------------------------------------------------------
def test_tower_defaults_come_from_the_towers(towers):
    config = ClipConfig.from_dict(dual_config(towers))
    assert config.vision_cfg.image_size == 32  # the timm folder's pretrained_cfg input size
    assert config.preprocess_cfg.mean == tuple(timm.models.get_pretrained_cfg("vit_tiny_patch16_224").mean)
    assert config.text_cfg.context_length == 24 and config.text_cfg.tower == "hf"  # the tokenizer's max length
    resnet = ClipConfig.from_dict(dual_config(towers, "resnet"))
    assert resnet.preprocess_cfg.mean == (0.485, 0.456, 0.406) and resnet.vision_cfg.image_size == 224


@pytest.mark.parametrize("where,key,value,message", [
    ("vision_cfg", "timm_pool", "mean", "timm_pool='mean' is not one of"),
    ("vision_cfg", "timm_projection", "linear", r"unknown key\(s\) \['timm_projection'\]"),
    ("text_cfg", "hf_pooler_type", "cls", "hf_pooler_type='cls' is not one of"),
    ("text_cfg", "hf_proj_type", "none", "hf_proj_type='none' is not one of"),
])
def test_config_is_strict(towers, where, key, value, message):
    data = dual_config(towers)
    data[where][key] = value
    with pytest.raises(ValueError, match=message):
        ClipConfig.from_dict(data)


def test_missing_local_folders_fail_with_the_path_and_the_fix(towers, tmp_path):
    data = dual_config(towers)
    data["vision_cfg"]["pretrained"] = str(tmp_path / "no-vit")
    with pytest.raises(ValueError, match=rf"vision_cfg.pretrained: timm folder {tmp_path / 'no-vit'} not found.*Fix: download"):
        ClipConfig.from_dict(data)
    data = dual_config(towers, hf_model_name=str(tmp_path / "no-bert"), context_length=16)
    with pytest.raises(ValueError, match=rf"{tmp_path / 'no-bert'}.*Fix: point it at a local folder"):
        MiniClip(data)


# --- equivalence --------------------------------------------------------------------------------------------------
def test_export_equals_vision_text_dual_encoder(towers, tmp_path):
    """format='hf' writes a folder transformers loads; its get_image/text_features are MiniClip's embeddings."""
    model = MiniClip(dual_config(towers)).eval()
    pixel_values, tokens = _inputs(model)
    model.save_pretrained(tmp_path / "hf", format="hf")
    reference = VisionTextDualEncoderModel.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        image = reference.get_image_features(pixel_values=pixel_values).pooler_output
        text = reference.get_text_features(**tokens).pooler_output
        torch.testing.assert_close(model.encode_image(pixel_values), image, atol=1e-5, rtol=0)
        torch.testing.assert_close(model.encode_text(**tokens), text, atol=1e-5, rtol=0)
    assert model.encode_image(pixel_values).abs().max() > 1e-3  # not vacuous


def test_dual_encoder_folder_written_by_transformers_loads_strictly(towers, tmp_path):
    """A VisionTextDualEncoderModel made by transformers itself (as run_clip saves it) loads through the layout
    table and gives its embeddings; a file with one tensor missing is refused, naming it."""
    from transformers import AutoModel, TimmWrapperConfig, VisionTextDualEncoderConfig
    vision = TimmWrapperConfig(architecture="vit_tiny_patch16_224", hidden_size=48,
                               model_args={"img_size": 32, "depth": 2, "embed_dim": 48, "num_heads": 2})
    text = AutoModel.from_pretrained(towers["bert"])
    config = VisionTextDualEncoderConfig.from_vision_text_configs(vision, text.config, projection_dim=EMBED)
    torch.manual_seed(3)
    reference = VisionTextDualEncoderModel(config).eval()
    reference.save_pretrained(tmp_path / "run_clip")
    BertTokenizer.from_pretrained(towers["bert"]).save_pretrained(tmp_path / "run_clip")
    model = MiniClip.from_pretrained(tmp_path / "run_clip")
    assert model.load_info.layout == "hf_dual_encoder" and model.load_info.ignored == []
    pixel_values, tokens = _inputs(model)
    with torch.no_grad():
        torch.testing.assert_close(model.encode_image(pixel_values),
                                   reference.get_image_features(pixel_values=pixel_values).pooler_output,
                                   atol=1e-5, rtol=0)
        torch.testing.assert_close(model.encode_text(**tokens), reference.get_text_features(**tokens).pooler_output,
                                   atol=1e-5, rtol=0)
    state = {k: v for k, v in reference.state_dict().items() if k != "visual_projection.weight"}
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "run_clip" / "model.safetensors")
    with pytest.raises(ValueError, match=r"missing from the checkpoint \(1\): image_encoder.visual.head.proj.weight"):
        MiniClip.from_pretrained(tmp_path / "run_clip")


@pytest.mark.parametrize("vision,pool,pooler,proj", [("vit", "avg", "mean_pooler", "mlp"),
                                                     ("resnet", "avg", "cls_last_hidden_state_pooler", "linear"),
                                                     ("vit", "", "cls_pooler", "linear")])
def test_open_clip_folder_with_timm_and_hf_towers(towers, tmp_path, vision, pool, pooler, proj):
    """open_clip's CustomTextCLIP built from the same model_cfg (TimmModel + HFTextEncoder), saved as an open_clip
    hub folder, loads into MiniClip with equal embeddings."""
    name = "local-dir:" + str(towers[vision])
    model_cfg = {"embed_dim": EMBED,
                 "vision_cfg": {"timm_model_name": name, "timm_model_pretrained": False, "timm_pool": pool,
                                "timm_proj": "linear", "image_size": 32 if vision == "vit" else 64},
                 "text_cfg": {"hf_model_name": str(towers["bert"]), "hf_tokenizer_name": str(towers["bert"]),
                              "hf_proj_type": proj, "hf_pooler_type": pooler, "hf_model_pretrained": False,
                              "context_length": 24},
                 "custom_text": True}
    torch.manual_seed(0)
    reference = open_clip.model.CustomTextCLIP(**{k: v for k, v in model_cfg.items() if k != "custom_text"}).eval()
    folder = tmp_path / "open_clip"
    folder.mkdir()
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, folder / "open_clip_model.safetensors")
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": model_cfg}))
    model = MiniClip.from_pretrained(folder)
    assert model.load_info.layout == "open_clip" and model.config.preprocess_cfg.mean[0] == 0.48145466
    pixel_values, tokens = _inputs(model)
    with torch.no_grad():
        torch.testing.assert_close(model.encode_image(pixel_values), reference.encode_image(pixel_values),
                                   atol=1e-5, rtol=0)
        # open_clip's tokenizer pads with [PAD]=0, so HFTextEncoder's pad-id mask is the tokenizer's attention mask
        torch.testing.assert_close(model.encode_text(**tokens), reference.encode_text(tokens["input_ids"]),
                                   atol=1e-5, rtol=0)


def test_towers_are_open_clips_modules(towers):
    """The towers are TimmModel / HFTextEncoder themselves, with their state-dict keys under MiniClip's prefixes."""
    from open_clip.hf_model import HFTextEncoder
    from open_clip.timm_model import TimmModel
    model = MiniClip(dual_config(towers, hf_pooler_type="mean_pooler"))
    assert isinstance(model.image_encoder.visual, TimmModel) and isinstance(model.text_encoder, HFTextEncoder)
    keys = set(model.state_dict())
    assert "image_encoder.visual.trunk.pos_embed" in keys and "text_encoder.transformer.embeddings.word_embeddings.weight" in keys
    assert not any("pooler" in k for k in keys)  # no BERT pooler unless cls_pooler uses it (as open_clip)
    vit = timm.create_model("local-dir:" + str(towers["vit"]), pretrained=True)
    assert torch.equal(model.image_encoder.visual.trunk.pos_embed, vit.pos_embed)
    bert = BertModel.from_pretrained(towers["bert"])
    assert torch.equal(model.text_encoder.transformer.embeddings.word_embeddings.weight,
                       bert.embeddings.word_embeddings.weight)


def test_eot_pooler_reads_the_last_real_token(towers):
    model = MiniClip(dual_config(towers, hf_pooler_type="eot_pooler", hf_proj_type=None, context_length=16) |
                     {"embed_dim": 32}).eval()
    _, tokens = _inputs(model)
    with torch.no_grad():
        hidden = model.text_encoder.transformer(**tokens).last_hidden_state  # (B, L, W)
        last = tokens["attention_mask"].sum(dim=1) - 1  # the [SEP] of each row
        torch.testing.assert_close(model.encode_text(**tokens), hidden[torch.arange(2), last])
    assert last.tolist() == [6, 7]


def test_weight_decay_skips_timm_position_and_class_tokens(towers):
    from miniclip.training.trainer import decay_parameter_names
    model = MiniClip(dual_config(towers))
    trunk = model.image_encoder.visual.trunk
    decayed = {n.removeprefix("image_encoder.visual.trunk.") for n in decay_parameter_names(model)}
    exempt = trunk.no_weight_decay() & {n for n, _ in trunk.named_parameters()}  # timm's own list: pos_embed, cls_token
    assert exempt == {"pos_embed", "cls_token"} and not exempt & decayed
    assert "text_encoder.transformer.embeddings.word_embeddings.weight" not in decay_parameter_names(model)


# --- checkpoints --------------------------------------------------------------------------------------------------
def test_miniclip_folder_round_trips_bit_exactly_without_the_tower_folders(towers, tmp_path):
    moved = {k: tmp_path / k for k in towers}
    for k in towers:
        shutil.copytree(towers[k], moved[k])
    model = MiniClip(dual_config(moved, "resnet"))
    model.save_pretrained(tmp_path / "ckpt")
    for folder in moved.values():
        shutil.rmtree(folder)  # the checkpoint needs neither the timm nor the transformers folder
    loaded = MiniClip.from_pretrained(tmp_path / "ckpt")
    assert loaded.state_dict().keys() == model.state_dict().keys()
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in loaded.state_dict().items())
    saved = json.loads((tmp_path / "ckpt" / "model_config.json").read_text())
    assert saved["vision_cfg"]["timm_model_name"] == "resnet18" and saved["vision_cfg"]["pretrained"] is None
    tokenizer = get_tokenizer(loaded.config, checkpoint_dir=loaded.checkpoint_dir)  # from ckpt/text_tower
    ids = [2, *(5 + WORDS.index(w) for w in ("picture", "number", "7")), 3]  # [CLS] ... [SEP] after 5 specials
    assert tokenizer("picture number 7")["input_ids"][0, :5].tolist() == ids


def test_locking_freezes_the_trunk_and_batchnorm_and_checkpointing_works(towers, tmp_path):
    from miniclip.training.locking import Locks, apply_locks
    model = MiniClip(dual_config(towers, "resnet"))
    apply_locks(model, Locks(image=True, text=True, text_unlocked_layers=1))
    trunk = model.image_encoder.visual.trunk
    assert not any(p.requires_grad for p in trunk.parameters())
    assert model.image_encoder.visual.head.proj.weight.requires_grad  # LiT: the projection still learns
    assert len(frozen_batchnorms(trunk)) == len([m for m in trunk.modules() if isinstance(m, torch.nn.BatchNorm2d)])
    model.train()
    assert all(not m.training for m in frozen_batchnorms(trunk))
    bert = model.text_encoder.transformer
    assert not bert.embeddings.word_embeddings.weight.requires_grad and bert.encoder.layer[-1].output.dense.weight.requires_grad
    vit = MiniClip(dual_config(towers))
    apply_locks(vit, Locks(image=True, image_unlocked_groups=1))  # timm's group matcher: the last block trains
    blocks = vit.image_encoder.visual.trunk.blocks
    assert blocks[-1].mlp.fc1.weight.requires_grad and not blocks[0].mlp.fc1.weight.requires_grad
    vit.gradient_checkpointing_enable()
    pixel_values, tokens = _inputs(vit)
    out = vit(pixel_values=pixel_values, **tokens)
    (out.image_embeds @ out.text_embeds.T).sum().backward()
    assert vit.image_encoder.visual.trunk.grad_checkpointing and getattr(vit.text_encoder.transformer, "is_activation_checkpointing",
                                                                     vit.text_encoder.transformer.is_gradient_checkpointing)


# --- train.py -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("vision,flags", [("vit", {"lock_image": True, "unlock_image_step": 2}),
                                          ("resnet", {"lock_image": True, "image_size": 64})])
def test_train_lit_then_unlock_saves_reloads_and_evaluates(towers, tmp_path, vision, flags):
    train_file = make_caption_set(tmp_path)
    config = tmp_path / "model.json"
    data = dual_config(towers, vision)
    if vision == "resnet":  # a timm image tower with open_clip's own text tower
        data["text_cfg"] = {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}
    config.write_text(json.dumps(data))
    result = train.main(_flags(tmp_path / "out", model_config=str(config), train_file=train_file,
                               validation_file=train_file, max_steps=3, **flags))
    model = result.trainer.model
    assert {"eval_t2i_R@1", "eval_mean_recall"} <= set(result.eval_metrics)
    loaded = MiniClip.from_pretrained(result.output_dir)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in loaded.state_dict().items())
    start = MiniClip(load_model_config(str(config))).state_dict()
    moved = [k for k in start if k.startswith("image_encoder.visual.trunk.") and k.endswith("weight")
             and not torch.equal(start[k], loaded.state_dict()[k])]
    if vision == "vit":  # unlocked at step 2: the trunk trained in the last step
        assert moved
    else:  # locked throughout, BatchNorm statistics included
        assert moved == [] and all(torch.equal(start[k], loaded.state_dict()[k]) for k in start
                                   if "running_" in k)
