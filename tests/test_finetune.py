"""Finetuning without forgetting: zero-shot during `ClipTrainer.evaluate` (against test.py on the same model and
folder), WiSE-FT interpolation (alpha 0 / 1 bit-identical, 0.5 hand-computed), layer-wise lr decay groups (names and
hand-computed lrs) and FLIP patch dropout (against open_clip's own model on the same RNG)."""
import json

import pytest
import torch
from PIL import Image

from miniclip.config import ClipConfig, load_model_config
from miniclip.data.captions import CaptionRecord
from miniclip.evaluation.zeroshot import read_image_folder
from miniclip.model import MiniClip
from miniclip.tokenizer import get_tokenizer
from miniclip.training.trainer import ClipTrainer, ClipTrainingArguments

CLASSES = ("red_thing", "green_thing", "blue_thing", "yellow_thing", "white_thing", "black_thing")
COLOURS = ((220, 30, 30), (30, 170, 50), (30, 70, 220), (235, 210, 20), (250, 250, 250), (10, 10, 10))


def _model(name: str = "tiny-vit", seed: int = 0, **vision) -> MiniClip:
    torch.manual_seed(seed)
    data = load_model_config(name).to_dict()
    data["vision_cfg"].update(vision)
    return MiniClip(ClipConfig.from_dict(data))


def _image_folder(root, per_class: int = 2):
    """root/<class>/<i>.png: a user's class folders, with images different enough (coarse random blocks) that a
    random model's predictions spread over the classes."""
    g = torch.Generator().manual_seed(0)
    for name in CLASSES:
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            blocks = torch.randint(0, 256, (4, 4, 3), generator=g, dtype=torch.uint8)
            pixels = blocks.repeat_interleave(16, 0).repeat_interleave(16, 1).numpy()  # (64, 64, 3)
            Image.fromarray(pixels).save(root / name / f"{i}.png")
    return root


class Pairs(torch.utils.data.Dataset):
    """Random pixel tensors with tokenized captions, as the collator would hand them over."""

    def __init__(self, config, n: int = 8):
        g = torch.Generator().manual_seed(1)
        size = config.vision_cfg.image_size
        self.pixels = torch.randn(n, 3, size, size, generator=g)
        tokens = get_tokenizer(config)([f"a picture of thing number {i}" for i in range(n)])
        length = int(tokens["input_ids"].argmax(1).max()) + 1
        self.tokens = {k: v[:, :length] for k, v in tokens.items()}

    def __len__(self):
        return len(self.pixels)

    def __getitem__(self, i):
        return {"pixel_values": self.pixels[i], **{k: v[i] for k, v in self.tokens.items()}}


def _args(tmp_path, **overrides) -> ClipTrainingArguments:
    base = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, per_device_eval_batch_size=16,
                max_steps=2, learning_rate=1e-2, weight_decay=0.1, use_cpu=True, report_to="none",
                save_strategy="no", logging_steps=1, dataloader_num_workers=0, seed=0, disable_tqdm=True,
                remove_unused_columns=False)
    return ClipTrainingArguments(**{**base, **overrides})


def _trainer(model, tmp_path, **kwargs) -> ClipTrainer:
    from transformers import default_data_collator
    trainer_kwargs = {k: kwargs.pop(k) for k in list(kwargs) if k in ("zeroshot_folder", "eval_dataset",
                                                                          "extra_eval_datasets", "locks")}
    return ClipTrainer(model, _args(tmp_path, **kwargs), train_dataset=Pairs(model.config),
                       data_collator=default_data_collator, processing_class=get_tokenizer(model.config),
                       **trainer_kwargs)


# --- zero-shot during training ----------------------------------------------------------------------------------------
def test_zeroshot_in_evaluate_equals_test_script(tmp_path):
    """After training changed both towers, trainer.evaluate()'s zero-shot numbers are test.py's on the saved model
    and the same folder: the classifier is rebuilt from the current text tower, templates chosen the same way."""
    from miniclip.apps.evaluate import main as test_main
    folder = _image_folder(tmp_path / "classes", per_class=3)
    trainer = _trainer(_model(), tmp_path, zeroshot_folder=read_image_folder(folder))
    before = trainer.evaluate()
    trainer.train()
    trainer.save_model(str(tmp_path / "saved"))
    after = trainer.evaluate()
    reference = test_main(["--checkpoint", str(tmp_path / "saved"), "--zeroshot_dir", str(folder), "--batch_size",
                           "16", "--device", "cpu", "--output_dir", str(tmp_path / "test_out"), "--no_progress"])
    for key in ("zeroshot_top1", "zeroshot_top5", "zeroshot_mean_per_class"):
        assert after[f"eval_{key}"] == pytest.approx(reference["zeroshot"][key], abs=1e-9), key
    assert 0 < after["eval_zeroshot_top5"] < 100 and set(before) == set(after)


def test_zeroshot_and_heldout_tracked_during_training(tmp_path):
    """Target-domain retrieval, a held-out caption set and zero-shot at every evaluation; zero-shot selects the
    best model and has its own curve PNG."""
    folder = read_image_folder(_image_folder(tmp_path / "classes"))
    records = []
    for i, colour in enumerate(COLOURS):
        path = tmp_path / f"r{i}.png"
        Image.new("RGB", (64, 64), colour).save(path)
        records.append(CaptionRecord(image=path, captions=(f"colour number {i}",)))
    trainer = _trainer(_model(), tmp_path, zeroshot_folder=folder, eval_dataset=records[:3],
                       extra_eval_datasets={"heldout": records[3:]}, eval_strategy="steps", eval_steps=1,
                       metric_for_best_model="zeroshot_top1", save_strategy="steps", save_steps=1)
    trainer.train()
    evals = [e for e in trainer.state.log_history if "eval_zeroshot_top1" in e]
    assert [e["step"] for e in evals] == [1, 2]
    assert {"eval_mean_recall", "eval_heldout_mean_recall", "eval_zeroshot_top5"} <= set(evals[0])
    assert trainer.state.best_metric == max(e["eval_zeroshot_top1"] for e in evals)
    assert (tmp_path / "out" / "zeroshot_curves.png").is_file()
    assert (tmp_path / "out" / "recall_curves.png").is_file()
    test_only = trainer.evaluate(records, metric_key_prefix="test")  # an explicit set: retrieval only
    assert "test_mean_recall" in test_only and not any("zeroshot" in k for k in test_only)


def test_train_script_zeroshot_flags(tmp_path):
    """train.py --zeroshot_dir / --zeroshot_per_class / --heldout_file end to end on a JSON caption file."""
    from miniclip.apps.train import main
    folder = _image_folder(tmp_path / "classes", per_class=3)
    entries = []
    for i, colour in enumerate(COLOURS):
        Image.new("RGB", (64, 64), colour).save(tmp_path / f"c{i}.png")
        entries.append({"image": f"c{i}.png", "caption": [f"colour number {i}"]})
    (tmp_path / "caps.json").write_text(json.dumps(entries))
    result = main(["--model_config", "tiny-vit", "--train_file", str(tmp_path / "caps.json"), "--validation_file",
                   str(tmp_path / "caps.json"), "--heldout_file", str(tmp_path / "caps.json"), "--zeroshot_dir",
                   str(folder), "--zeroshot_per_class", "2", "--output_dir", str(tmp_path / "run"), "--max_steps",
                   "1", "--per_device_train_batch_size", "3", "--use_cpu", "true", "--report_to", "none",
                   "--save_strategy", "no", "--disable_tqdm", "true", "--dataloader_num_workers", "0"])
    assert {"eval_zeroshot_top1", "eval_heldout_mean_recall", "eval_mean_recall"} <= set(result.eval_metrics)
    assert result.trainer.zeroshot_folder.labels == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5]


# --- layer-wise learning-rate decay -----------------------------------------------------------------------------------
def test_layer_decay_groups_by_name_with_hand_computed_lr(tmp_path):
    """tiny-vit: 2 image blocks and 2 text blocks, so depth 3 per tower; lr 1e-2, image decay 0.5, text 0.8."""
    trainer = _trainer(_model(), tmp_path, image_layer_decay=0.5, text_layer_decay=0.8)
    groups = {g["name"]: g for g in trainer.create_optimizer().param_groups}
    expected_lr = {
        "image.embeddings": 1e-2 * 0.5 ** 3, "image.block.0": 1e-2 * 0.5 ** 2, "image.block.1": 1e-2 * 0.5,
        "image.head": 1e-2, "text.embeddings": 1e-2 * 0.8 ** 3, "text.block.0": 1e-2 * 0.8 ** 2,
        "text.block.1": 1e-2 * 0.8, "text.head": 1e-2, "other": 1e-2}
    for name, group in groups.items():
        layer, kind = name.split("/")
        assert group["lr"] == pytest.approx(expected_lr[layer], rel=1e-12), name
        assert group["weight_decay"] == (0.1 if kind == "decay" else 0.0), name
    names = {n: g["name"] for g in groups.values() for n in g["param_names"]}
    assert names["image_encoder.visual.conv1.weight"] == "image.embeddings/decay"
    assert names["image_encoder.visual.class_embedding"] == "image.embeddings/no_decay"
    assert names["image_encoder.visual.transformer.resblocks.1.mlp.c_fc.weight"] == "image.block.1/decay"
    assert names["image_encoder.visual.proj"] == "image.head/decay"
    assert names["image_encoder.visual.ln_post.weight"] == "image.head/no_decay"
    assert names["text_encoder.token_embedding.weight"] == "text.embeddings/no_decay"
    assert names["text_encoder.transformer.resblocks.0.attn.in_proj_weight"] == "text.block.0/decay"
    assert names["text_encoder.text_projection"] == "text.head/decay"
    assert names["logit_scale.logit_scale"] == "other/no_decay"
    model = trainer.model
    assert set(names) == {n for n, p in model.named_parameters() if p.requires_grad}  # each exactly once
    # The schedule scales each group's own lr (its base lr is the group's, not the global one).
    trainer.train()
    base = dict(zip((g["name"] for g in trainer.optimizer.param_groups), trainer.lr_scheduler.base_lrs))
    assert base["image.embeddings/decay"] == pytest.approx(1e-2 * 0.125) and base["other/no_decay"] == 1e-2


def test_layer_decay_composes_with_locking_and_other_towers(tmp_path):
    from miniclip.training.layer_decay import layer_id
    from miniclip.training.locking import Locks
    trainer = _trainer(_model(), tmp_path, image_layer_decay=0.5, locks=Locks(image=True))
    names = {g["name"] for g in trainer.create_optimizer().param_groups}
    assert not any(n.startswith("image.") for n in names) and "text.head/decay" in names
    resnet, bert = _model("tiny-resnet"), _model("tiny-chinese-vit")
    assert layer_id(resnet, "image_encoder.visual.bn1.weight").layer == 0
    assert layer_id(resnet, "image_encoder.visual.layer3.0.conv1.weight").name == "image.block.2"
    assert layer_id(resnet, "image_encoder.visual.attnpool.c_proj.weight").name == "image.head"
    assert layer_id(bert, "text_encoder.bert.embeddings.word_embeddings.weight").name == "text.embeddings"
    assert layer_id(bert, "text_encoder.bert.encoder.layer.1.output.dense.weight").name == "text.block.1"
    assert layer_id(bert, "text_encoder.text_projection").name == "text.head"
    with pytest.raises(ValueError, match="image_layer_decay"):
        _args(tmp_path, image_layer_decay=1.5)


# --- patch dropout (FLIP) ---------------------------------------------------------------------------------------------
def _open_clip_twin(model: MiniClip):
    import open_clip
    from tests.conftest import reference_to_miniclip
    reference = open_clip.model.CLIP(**model.config.open_clip_cfg())
    ours = model.state_dict()
    mapping = {reference_to_miniclip({k: None}).popitem()[0]: k for k in reference.state_dict()}
    reference.load_state_dict({k: ours[m] for m, k in mapping.items()})
    return reference


def test_patch_dropout_matches_open_clip_and_keeps_the_class_token():
    model = _model(patch_dropout=0.5)  # tiny-vit: 64 px / 16 = 16 patches -> 8 kept
    reference = _open_clip_twin(model)
    pixel_values = torch.randn(3, 3, 64, 64)
    seen = {}
    model.image_encoder.visual.patch_dropout.register_forward_hook(
        lambda m, args, out: seen.update(x=args[0].detach(), out=out.detach()))
    model.train(), reference.train()
    torch.manual_seed(5)
    ours = model.encode_image(pixel_values)
    torch.manual_seed(5)
    theirs = reference.encode_image(pixel_values)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    x, out = seen["x"], seen["out"]  # (B, 1 + 16, W) -> (B, 1 + 8, W)
    assert x.shape[1] == 17 and out.shape[1] == 1 + int(16 * 0.5)
    assert torch.equal(out[:, 0], x[:, 0])  # the class token, always first
    for b in range(3):  # every kept token is one of the image's own patch tokens, none twice
        matches = (out[b, 1:, None] == x[b, None, 1:]).all(-1)  # (8, 16)
        assert matches.sum(1).eq(1).all() and matches.any(0).sum() == 8
    torch.manual_seed(6)
    assert not torch.allclose(model.encode_image(pixel_values), ours)  # another draw, other patches


def test_patch_dropout_is_identity_in_eval_and_settable():
    plain = _model()
    dropped = _model()
    dropped.set_patch_dropout(0.75)
    assert dropped.config.vision_cfg.patch_dropout == 0.75 and dropped.config.open_clip_cfg()["vision_cfg"][
        "patch_dropout"] == 0.75
    pixel_values = torch.randn(2, 3, 64, 64)
    plain.eval(), dropped.eval()
    assert torch.equal(plain.encode_image(pixel_values), dropped.encode_image(pixel_values))
    dropped.train()
    seen = {}
    dropped.image_encoder.visual.patch_dropout.register_forward_hook(lambda m, a, out: seen.update(n=out.shape[1]))
    dropped.encode_image(pixel_values)
    assert seen["n"] == 1 + int(16 * 0.25)
    with pytest.raises(ValueError, match="ResNet"):
        _model("tiny-resnet").set_patch_dropout(0.5)
    with pytest.raises(ValueError, match="patch_dropout"):
        dropped.set_patch_dropout(1.0)


# --- WiSE-FT ----------------------------------------------------------------------------------------------------------
def test_wise_ft_ends_are_bit_identical_and_the_middle_is_the_average():
    from miniclip.checkpoints.wise_ft import interpolate_state_dicts, wise_ft
    a, b = _model(seed=0), _model(seed=1)
    sa, sb = a.state_dict(), b.state_dict()
    for alpha, same in ((0, sa), (1, sb)):
        mixed = wise_ft(a, b, alpha).state_dict()
        assert all(torch.equal(mixed[k], same[k]) for k in sa)
    half = wise_ft(a, b, 0.5).state_dict()
    key = "image_encoder.visual.transformer.resblocks.0.attn.in_proj_weight"
    hand = [(x + y) / 2 for x, y in zip(sa[key].flatten()[:5].tolist(), sb[key].flatten()[:5].tolist())]
    assert half[key].flatten()[:5].tolist() == pytest.approx(hand, rel=1e-6)
    assert all(torch.equal(half[k], (sa[k] + sb[k]) / 2) for k in sa if sa[k].is_floating_point())
    assert half["logit_scale.logit_scale"].item() == pytest.approx((sa["logit_scale.logit_scale"].item()
                                                                    + sb["logit_scale.logit_scale"].item()) / 2)
    quarter = interpolate_state_dicts({"w": torch.tensor([0.0, 4.0], dtype=torch.bfloat16)},
                                      {"w": torch.tensor([8.0, 0.0], dtype=torch.bfloat16)}, 0.25)
    assert quarter["w"].dtype == torch.bfloat16 and quarter["w"].tolist() == [2.0, 3.0]
    assert torch.equal(sa[key], a.state_dict()[key])  # inputs untouched


def test_wise_ft_refuses_different_architectures():
    from miniclip.checkpoints.wise_ft import wise_ft
    with pytest.raises(ValueError, match="same architecture.*vision width"):
        wise_ft(_model("tiny-vit"), _model(width=128, head_width=32), 0.5)
    with pytest.raises(ValueError, match="patch size"):
        wise_ft(_model("tiny-vit"), _model("tiny-default"), 0.5)


def test_wise_ft_app_writes_models_table_and_plot(tmp_path):
    """Any loadable layout in (an open_clip folder here), miniclip folders out, evaluated; alpha 1 reloads equal to
    the finetuned model."""
    from miniclip.apps.wise_ft import main
    zeroshot, finetuned = _model(seed=0), _model(seed=1)
    zeroshot.save_pretrained(tmp_path / "zs", format="open_clip")
    finetuned.save_pretrained(tmp_path / "ft")
    entries = []
    for i, colour in enumerate(COLOURS):
        Image.new("RGB", (64, 64), colour).save(tmp_path / f"c{i}.png")
        entries.append({"image": f"c{i}.png", "caption": [f"colour number {i}"]})
    (tmp_path / "target.json").write_text(json.dumps(entries[:4]))
    (tmp_path / "heldout.json").write_text(json.dumps(entries[2:]))
    folder = _image_folder(tmp_path / "classes", per_class=1)
    out = tmp_path / "sweep"
    results = main(["--zeroshot", str(tmp_path / "zs"), "--finetuned", str(tmp_path / "ft"), "--alphas", "0", "0.5",
                    "1", "--eval_files", str(tmp_path / "target.json"), str(tmp_path / "heldout.json"),
                    "--zeroshot_dir", str(folder), "--output_dir", str(out), "--no_progress"])
    assert [r["alpha"] for r in results["rows"]] == [0, 0.5, 1]
    assert {"target_mean_recall", "heldout_mean_recall", "zeroshot_top1"} <= set(results["rows"][0])
    assert (out / "wise_ft_tradeoff.png").is_file() and "| 0.5 |" in (out / "results.md").read_text()
    reloaded = MiniClip.from_pretrained(out / "alpha_1")
    assert all(torch.equal(v, finetuned.state_dict()[k]) for k, v in reloaded.state_dict().items())
    reloaded = MiniClip.from_pretrained(out / "alpha_0")
    assert all(torch.equal(v, zeroshot.state_dict()[k]) for k, v in reloaded.state_dict().items())
