"""ClipTrainer through the real Hugging Face Trainer on tiny configs and in-memory tensors (image files only where
evaluation decodes them): decay groups, logit-scale clamp, locking, BatchNorm, two-stage, cached-feature
accumulation, NaN stop, checkpoints, retrieval evaluation."""
import copy
import math

import pytest
import torch
from PIL import Image
from transformers import TrainerCallback, default_data_collator

from miniclip.data.captions import CaptionRecord
from miniclip.checkpoints.io import CheckpointError
from miniclip.loss import ClipLoss, SigLipLoss
from miniclip.model import MiniClip
from miniclip.tokenizer import get_tokenizer
from miniclip.training.locking import Locks
from miniclip.training.trainer import ClipTrainer, ClipTrainingArguments, NonFiniteLossError, decay_parameter_names


class TensorPairs(torch.utils.data.Dataset):
    """n random images and n distinct tokenized captions, as the collator would produce them (one row each)."""

    def __init__(self, config, n: int = 8, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        size = config.vision_cfg.image_size
        self.pixels = torch.randn(n, 3, size, size, generator=g)  # (n, 3, S, S)
        tokens = get_tokenizer(config)([f"a picture of thing number {i}" for i in range(n)])
        length = int(tokens["input_ids"].argmax(1).max()) + 1 if "attention_mask" not in tokens else \
            int(tokens["attention_mask"].sum(1).max())
        self.tokens = {k: v[:, :length] for k, v in tokens.items()}  # (n, L)

    def __len__(self):
        return len(self.pixels)

    def __getitem__(self, i):
        return {"pixel_values": self.pixels[i], **{k: v[i] for k, v in self.tokens.items()}}


def _args(tmp_path, **overrides) -> ClipTrainingArguments:
    base = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, max_steps=3, learning_rate=1e-3,
                weight_decay=0.1, use_cpu=True, report_to="none", save_strategy="no", logging_steps=1,
                dataloader_num_workers=0, seed=0, disable_tqdm=True, remove_unused_columns=False)
    return ClipTrainingArguments(**{**base, **overrides})


def _trainer(model, tmp_path, n: int = 8, callbacks=(), trainer_kwargs=None, **overrides) -> ClipTrainer:
    return ClipTrainer(model, _args(tmp_path, **overrides), train_dataset=TensorPairs(model.config, n),
                       data_collator=default_data_collator, processing_class=get_tokenizer(model.config),
                       callbacks=list(callbacks), **(trainer_kwargs or {}))


def _model(name: str = "tiny-vit", **config_overrides) -> MiniClip:
    from miniclip.config import ClipConfig, load_model_config
    torch.manual_seed(0)
    data = {**load_model_config(name).to_dict(), **config_overrides}
    return MiniClip(ClipConfig.from_dict(data))


def _snapshot(module: torch.nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --- weight decay -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("config,decay,no_decay", [
    ("tiny-vit",
     ["image_encoder.visual.conv1.weight", "image_encoder.visual.proj", "text_encoder.text_projection",
      "image_encoder.visual.transformer.resblocks.0.attn.in_proj_weight",
      "text_encoder.transformer.resblocks.1.mlp.c_fc.weight"],
     ["logit_scale.logit_scale", "image_encoder.visual.class_embedding", "image_encoder.visual.positional_embedding",
      "text_encoder.token_embedding.weight", "text_encoder.positional_embedding", "image_encoder.visual.ln_pre.weight",
      "image_encoder.visual.transformer.resblocks.0.attn.in_proj_bias", "text_encoder.ln_final.bias"]),
    ("tiny-chinese-vit",
     ["text_encoder.bert.encoder.layer.0.attention.self.query.weight", "text_encoder.text_projection"],
     ["text_encoder.bert.embeddings.word_embeddings.weight", "text_encoder.bert.embeddings.position_embeddings.weight",
      "text_encoder.bert.embeddings.token_type_embeddings.weight", "text_encoder.bert.embeddings.LayerNorm.weight",
      "text_encoder.bert.encoder.layer.0.attention.self.query.bias"]),
])
def test_weight_decay_groups_by_name(tmp_path, config, decay, no_decay):
    model = _model(config)
    trainer = _trainer(model, tmp_path)
    optimizer = trainer.create_optimizer()
    name_of = {id(p): n for n, p in model.named_parameters()}
    groups = {g["weight_decay"]: {name_of[id(p)] for p in g["params"]} for g in optimizer.param_groups}
    assert set(groups) == {0.1, 0.0}
    assert groups[0.1] | groups[0.0] == set(name_of.values()) and not groups[0.1] & groups[0.0]
    assert set(decay) <= groups[0.1], set(decay) - groups[0.1]
    assert set(no_decay) <= groups[0.0], set(no_decay) & groups[0.1]
    assert groups[0.1] == set(decay_parameter_names(model))


# --- logit scale ------------------------------------------------------------------------------------------------------
class Record(TrainerCallback):
    """Calls fn(model, state) at the start and end of every optimizer step."""

    def __init__(self, fn, when=("on_step_begin", "on_step_end")):
        self.fn, self.when, self.seen = fn, when, []
        for event in when:
            setattr(self, event, self._record)

    def _record(self, args, state, control, model=None, **kwargs):
        self.seen.append((state.global_step, self.fn(model, state)))


def test_logit_scale_never_exceeds_100(tmp_path):
    model = _model(init_logit_scale=math.log(100) + 1.5)  # starts above the bound
    record = Record(lambda m, s: m.logit_scale.logit_scale.item())
    _trainer(model, tmp_path, callbacks=[record], learning_rate=0.5, max_steps=4).train()
    values = [v for _, v in record.seen]
    assert len(values) == 8 and max(values) <= math.log(100) + 1e-6
    assert abs(values[0] - math.log(100)) < 1e-6  # clamped before the first forward pass
    assert model.logit_scale().item() <= 100 + 1e-4


# --- locking, BatchNorm, two-stage ------------------------------------------------------------------------------------
@pytest.mark.parametrize("freeze_bn_stats", [True, False])
def test_locked_resnet_tower_and_batchnorm_statistics(tmp_path, freeze_bn_stats):
    model = _model("tiny-resnet")
    model.lock_image_tower(freeze_bn_stats=False)  # the trainer, not FrozenBatchNorm2d, keeps the statistics
    image_before, text_before = _snapshot(model.image_encoder), _snapshot(model.text_encoder)
    _trainer(model, tmp_path, trainer_kwargs={"locks": Locks(freeze_bn_stats=freeze_bn_stats)}).train()
    image_after = _snapshot(model.image_encoder)
    params = {n for n, _ in model.image_encoder.named_parameters()}
    assert _same({k: v for k, v in image_after.items() if k in params},
                 {k: v for k, v in image_before.items() if k in params})  # locked weights bit-identical
    assert _same(image_after, image_before) == freeze_bn_stats  # running statistics: frozen or updated
    assert not _same(_snapshot(model.text_encoder), text_before)


def test_locked_text_tower_bit_identical(tmp_path):
    model = _model("tiny-vit")
    model.lock_text_tower()
    image_before, text_before = _snapshot(model.image_encoder), _snapshot(model.text_encoder)
    _trainer(model, tmp_path).train()
    assert _same(_snapshot(model.text_encoder), text_before)
    assert not _same(_snapshot(model.image_encoder), image_before)


def test_two_stage_unlocks_at_the_right_step(tmp_path):
    model = _model("tiny-vit")
    model.lock_image_tower()
    initial = _snapshot(model.image_encoder)
    record = Record(lambda m, s: _same(_snapshot(m.image_encoder), initial), when=("on_step_end",))
    _trainer(model, tmp_path, callbacks=[record], max_steps=4, trainer_kwargs={"locks": Locks(unlock_image_step=2)}).train()
    # steps 1 and 2 run locked; the step that starts at global_step 2 (the third) is the first to train it
    assert record.seen == [(1, True), (2, True), (3, False), (4, False)]


def test_two_stage_needs_a_locked_tower(tmp_path):
    with pytest.raises(ValueError, match="lock_image_tower"):
        _trainer(_model("tiny-vit"), tmp_path, trainer_kwargs={"locks": Locks(unlock_image_step=2)})


# --- cached-feature accumulation --------------------------------------------------------------------------------------
@pytest.mark.parametrize("loss,loss_fn", [("clip", ClipLoss()), ("siglip", SigLipLoss())])
def test_cached_feature_accumulation_equals_one_big_batch(tmp_path, loss, loss_fn):
    k, micro = 4, 2
    model = _model("tiny-vit", init_logit_bias=-10.0 if loss == "siglip" else None)
    reference = copy.deepcopy(model)
    trainer = _trainer(model, tmp_path, n=k * micro, per_device_train_batch_size=micro, feature_accum_steps=k,
                       trainer_kwargs={"loss": loss})
    batch = default_data_collator([trainer.train_dataset[i] for i in range(k * micro)])  # (k*micro, ...)
    assert len(next(iter(trainer.get_train_dataloader()))["pixel_values"]) == k * micro
    trainer.current_gradient_accumulation_steps = 1  # set by the Trainer's epoch loop
    sizes = []
    hook = model.image_encoder.register_forward_hook(lambda m, args, out: sizes.append(len(args[0])))
    accumulated = trainer.training_step(model, batch)
    hook.remove()
    assert sizes == [micro] * (2 * k)  # really k micro-batches, twice (cached features, then with gradients)
    reference.train()
    out = reference(**batch)
    expected = loss_fn(out.image_embeds, out.text_embeds, out.logit_scale, out.logit_bias)
    expected.backward()
    assert abs(accumulated.item() - expected.item()) < 1e-5
    grads = {n: p.grad for n, p in reference.named_parameters()}
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads[name], atol=1e-5, rtol=1e-4, msg=name)
    assert model.logit_scale.logit_scale.grad.abs() > 1e-6  # the temperature's gradient is there, once


def test_plain_gradient_accumulation_still_available(tmp_path):
    trainer = _trainer(_model("tiny-vit"), tmp_path, gradient_accumulation_steps=2, max_steps=2)
    trainer.train()
    assert trainer.state.global_step == 2
    assert all(math.isfinite(e["loss"]) for e in trainer.state.log_history if "loss" in e)


# --- failure modes and checkpoints ------------------------------------------------------------------------------------
class PoisonAfter(TrainerCallback):
    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step == self.step:
            with torch.no_grad():
                model.logit_scale.logit_scale.fill_(float("nan"))


def test_nan_loss_stops_the_run_naming_the_step(tmp_path):
    trainer = _trainer(_model("tiny-vit"), tmp_path, callbacks=[PoisonAfter(2)], max_steps=5)
    with pytest.raises(NonFiniteLossError, match="loss is nan at step 3"):
        trainer.train()


def test_checkpoints_are_miniclip_folders(tmp_path):
    model = _model("tiny-vit")
    trainer = _trainer(model, tmp_path, max_steps=2, save_strategy="steps", save_steps=1)
    trainer.train()
    trainer.save_model()
    out = tmp_path / "out"
    final = MiniClip.from_pretrained(out)
    assert _same(_snapshot(final), _snapshot(model))
    step2, step1 = MiniClip.from_pretrained(out / "checkpoint-2"), MiniClip.from_pretrained(out / "checkpoint-1")
    assert _same(_snapshot(step2), _snapshot(model)) and not _same(_snapshot(step1), _snapshot(model))
    assert (out / "loss_curve.png").stat().st_size > 1000
    # resuming into another architecture is refused, naming the checkpoint
    other = _trainer(_model("tiny-resnet"), tmp_path / "other")
    with pytest.raises(CheckpointError, match="checkpoint-1"):
        other._load_from_checkpoint(str(out / "checkpoint-1"))


def _eval_records(tmp_path, n: int = 6) -> list[CaptionRecord]:
    records = []
    for i in range(n):
        path = tmp_path / f"eval_{i}.png"
        Image.new("RGB", (64, 64), (40 * i, 255 - 40 * i, 128)).save(path)
        records.append(CaptionRecord(image=path, captions=(f"colour number {i}", f"shade {i}")))
    return records


def test_evaluate_reports_retrieval_and_keeps_the_best(tmp_path):
    from miniclip.evaluation.encode import Encoder, evaluate_retrieval
    from miniclip.transforms import image_transform
    model = _model("tiny-vit")
    records = _eval_records(tmp_path)
    trainer = _trainer(model, tmp_path, max_steps=2, eval_strategy="steps", eval_steps=1, save_strategy="steps",
                       save_steps=1, metric_for_best_model="eval_mean_recall", load_best_model_at_end=True,
                       trainer_kwargs={"eval_dataset": records})
    trainer.train()
    evals = [e for e in trainer.state.log_history if "eval_mean_recall" in e]
    assert [e["step"] for e in evals] == [1, 2]
    assert {"eval_t2i_R@1", "eval_t2i_R@5", "eval_i2t_R@10", "eval_t2i_median_rank"} <= set(evals[0])
    assert trainer.state.best_metric == max(e["eval_mean_recall"] for e in evals)
    metrics = trainer.evaluate()
    direct = evaluate_retrieval(Encoder(model, image_transform(model.config, train=False), get_tokenizer(model.config),
                                        progress=False), records)
    assert metrics["eval_mean_recall"] == pytest.approx(direct["mean_recall"])
    assert (tmp_path / "out" / "recall_curves.png").is_file()


def test_evaluate_needs_records(tmp_path):
    with pytest.raises(ValueError, match="CaptionRecord"):
        _trainer(_model("tiny-vit"), tmp_path, trainer_kwargs={"eval_dataset": TensorPairs(_model().config)})


def test_siglip_needs_a_bias(tmp_path):
    with pytest.raises(ValueError, match="logit_bias"):
        _trainer(_model("tiny-vit"), tmp_path, trainer_kwargs={"loss": "siglip"})


# --- GPU-step defaults ------------------------------------------------------------------------------------------------
def test_defaults_keep_host_syncs_out_of_the_step(tmp_path):
    """Two stock defaults each make the host wait for the GPU once per step; ClipTrainingArguments changes them:
    no NaN filter in the Trainer's loop (ClipTrainer stops on a NaN loss instead), and non-blocking batch copies
    from pinned memory. tests/test_cuda.py proves the step sync-free on a GPU."""
    args = ClipTrainingArguments(output_dir=str(tmp_path / "a"), report_to="none")  # no use_cpu: pinned memory
    assert args.logging_nan_inf_filter is False
    assert args.dataloader_pin_memory and args.accelerator_config.non_blocking
    trainer = ClipTrainer(_model("tiny-vit"), args, train_dataset=TensorPairs(_model("tiny-vit").config),
                          data_collator=default_data_collator)
    assert trainer.get_train_dataloader()._non_blocking  # what accelerate's DataLoaderShard copies with
    blocking = ClipTrainingArguments(output_dir=str(tmp_path / "b"), report_to="none", non_blocking_transfers=False)
    assert not blocking.accelerator_config.non_blocking
    assert ClipTrainingArguments(output_dir=str(tmp_path / "c"), report_to="none",
                                 logging_nan_inf_filter=True).logging_nan_inf_filter
