"""Distillation: the loss terms against open_clip's DistillClipLoss and hand-computed 4x4 values, 2 real gloo
processes against one process with the double batch, and the teacher wired through the real Trainer and train.py
(frozen and bit-identical, cached features, locked towers, a BERT teacher for a BPE student at another image size)."""
import copy
import math

import open_clip.loss
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from transformers import default_data_collator

from miniclip.apps import train
from miniclip.config import ClipConfig, load_model_config
from miniclip.distillation import DistillationLoss, affinity_loss, feature_loss
from miniclip.loss import ClipLoss
from miniclip.model import MiniClip
from miniclip.tokenizer import get_tokenizer, trim_tokens
from miniclip.training.trainer import ClipTrainer, ClipTrainingArguments
from test_train import _flags, make_caption_set


def _unit(rows: int, dim: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(rows, dim, generator=g, dtype=torch.float64), dim=-1)


# --- the loss terms ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("scale,teacher_scale", [(1.0, 1.0), (14.3, 50.0), (100.0, 3.0)])
def test_kd_matches_open_clip_distill_clip_loss(scale, teacher_scale):
    image, text = _unit(10, 16, 0).requires_grad_(), _unit(10, 16, 1).requires_grad_()
    t_image, t_text = _unit(10, 24, 2), _unit(10, 24, 3)  # another embed dim: only logits are compared
    s, t = torch.tensor(scale, dtype=torch.float64), torch.tensor(teacher_scale, dtype=torch.float64)
    ours = DistillationLoss("kd", 16, 24)(image, text, s, t_image, t_text, t)
    _, ref = open_clip.loss.DistillClipLoss()(image, text, s, t_image, t_text, t)
    assert abs(ours.item() - ref.item()) < 1e-6
    ours_grads = torch.autograd.grad(ours, (image, text))
    ref_grads = torch.autograd.grad(ref, (image, text))
    for a, b in zip(ours_grads, ref_grads):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def test_affinity_and_kd_hand_computed_4x4():
    # Four orthogonal pairs: every logits matrix is logit_scale * I. With multipliers ln 3 (student) and ln 9
    # (teacher) each student row is softmax([ln 3, 0, 0, 0]) = [3, 1, 1, 1] / 6 = [1/2, 1/6, 1/6, 1/6] and each
    # teacher row [9, 1, 1, 1] / 12 = [3/4, 1/12, 1/12, 1/12].
    eye = torch.eye(4, dtype=torch.float64)
    s, t = torch.tensor(math.log(3), dtype=torch.float64), torch.tensor(math.log(9), dtype=torch.float64)
    kl_row = 0.75 * math.log(0.75 / 0.5) + 3 * (1 / 12) * math.log((1 / 12) / (1 / 6))  # = 0.75 ln 1.5 - 0.25 ln 2
    got = DistillationLoss("affinity", 4, 4)(eye, eye, s, eye, eye, t)
    assert abs(got.item() - 2 * kl_row) < 1e-12  # image->text plus text->image (TinyCLIP's L_I2T + L_T2I)
    ce_row = -(0.75 * math.log(0.5) + 3 * (1 / 12) * math.log(1 / 6))
    assert abs(DistillationLoss("kd", 4, 4)(eye, eye, s, eye, eye, t).item() - ce_row) < 1e-12
    # the student that mimics the teacher exactly: affinity 0, kd the teacher's entropy
    assert DistillationLoss("affinity", 4, 4)(eye, eye, t, eye, eye, t).item() == pytest.approx(0, abs=1e-12)


def test_feature_hand_computed_4x4():
    student = torch.eye(4, dtype=torch.float64)
    r = 1 / math.sqrt(2)
    teacher = torch.tensor([[1, 0, 0, 0], [0, r, r, 0], [0, 0, -1, 0], [0, 0, 0, 1]], dtype=torch.float64)
    # cosines 1, 1/sqrt2, -1, 1 -> mean of 1 - cos = (0 + (1 - 1/sqrt2) + 2 + 0) / 4
    expected_cos = (3 - r) / 4
    assert abs(feature_loss(student, teacher, "cosine").item() - expected_cos) < 1e-12
    # squared differences per row: 0, (1 - 1/sqrt2)^2 + 1/2 = 2 - sqrt2, 4, 0; mean over the 16 elements
    expected_mse = (6 - math.sqrt(2)) / 16
    assert abs(feature_loss(student, teacher, "mse").item() - expected_mse) < 1e-12
    # both towers, averaged: images exact, texts as above
    got = DistillationLoss("feature", 4, 4)(student, student, None, student, teacher, None)
    assert abs(got.item() - expected_cos / 2) < 1e-12


def test_feature_projection_when_dims_differ_trains():
    loss_fn = DistillationLoss("feature", 4, 6).double()
    assert loss_fn.projection.weight.shape == (6, 4)
    loss = loss_fn(_unit(5, 4, 0), _unit(5, 4, 1), None, _unit(5, 6, 2), _unit(5, 6, 3), None)
    loss.backward()
    assert loss_fn.projection.weight.grad.abs().max() > 0
    assert DistillationLoss("affinity", 4, 6).projection is None


def test_bad_kind_is_refused():
    with pytest.raises(ValueError, match="distill_loss='mimic' is not one of"):
        DistillationLoss("mimic", 4, 4)


# --- two real gloo processes on CPU -----------------------------------------------------------------------------------
DIM_IN, DIM, TEACHER_DIM, BATCH = 6, 8, 5, 4  # B = 4 per process; the single-process reference has 2B = 8


class _Student(torch.nn.Module):
    """Linear towers, a learnt temperature and the distillation loss module (its projection trains too)."""

    def __init__(self, kind: str, local_loss: bool):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.image = torch.nn.Parameter(torch.randn(DIM_IN, DIM, generator=g, dtype=torch.float64))
        self.text = torch.nn.Parameter(torch.randn(DIM_IN, DIM, generator=g, dtype=torch.float64))
        self.log_scale = torch.nn.Parameter(torch.tensor(math.log(10.0), dtype=torch.float64))
        self.distill = DistillationLoss(kind, DIM, TEACHER_DIM, local_loss=local_loss).double()
        self.contrastive = ClipLoss(local_loss=local_loss)
        if self.distill.projection is not None:
            torch.nn.init.normal_(self.distill.projection.weight, generator=g)

    def forward(self, x, y, teacher_image, teacher_text, teacher_scale):
        image, text = F.normalize(x @ self.image, dim=-1), F.normalize(y @ self.text, dim=-1)
        scale = self.log_scale.exp()
        return self.contrastive(image, text, scale) + self.distill(image, text, scale, teacher_image, teacher_text,
                                                                   teacher_scale)


def _teacher_features(x, y):
    g = torch.Generator().manual_seed(7)
    wi, wt = (torch.randn(DIM_IN, TEACHER_DIM, generator=g, dtype=torch.float64) for _ in range(2))
    return F.normalize(x @ wi, dim=-1), F.normalize(y @ wt, dim=-1), torch.tensor(30.0, dtype=torch.float64)


def _distill_data():
    g = torch.Generator().manual_seed(1)
    return (torch.randn(2 * BATCH, DIM_IN, generator=g, dtype=torch.float64),
            torch.randn(2 * BATCH, DIM_IN, generator=g, dtype=torch.float64))


def _distill_step(model, x, y):
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=0.1)
    loss = model(x, y, *_teacher_features(x, y))
    loss.backward()
    optimizer.step()
    return loss.item(), {n.removeprefix("module."): p.detach().clone() for n, p in model.named_parameters()}


CASES = [("affinity", False), ("affinity", True), ("kd", False), ("feature", False)]


def _distill_worker(rank: int, world: int, init_file: str, out: str):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        x, y = _distill_data()
        shard = slice(rank * BATCH, (rank + 1) * BATCH)
        results = {}
        for kind, local in CASES:
            model = torch.nn.parallel.DistributedDataParallel(_Student(kind, local))
            results[f"{kind}_{local}"] = _distill_step(model, x[shard], y[shard])
        torch.save(results, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_process_distill(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gloo_distill")
    mp.spawn(_distill_worker, args=(2, str(tmp / "init"), str(tmp / "result")), nprocs=2, join=True)
    return [torch.load(tmp / f"result.{r}", weights_only=True) for r in range(2)]


@pytest.mark.parametrize("kind,local", CASES)
def test_two_gloo_processes_match_one_process_with_double_batch(kind, local, two_process_distill):
    x, y = _distill_data()
    single_loss, single_params = _distill_step(_Student(kind, local), x, y)
    results = [r[f"{kind}_{local}"] for r in two_process_distill]
    # per-process losses are shares (local rows, per-sample feature means); their mean is the global batch's loss
    assert abs(sum(loss for loss, _ in results) / 2 - single_loss) < 1e-6
    for _, params in results:
        for name, value in single_params.items():
            torch.testing.assert_close(params[name], value, atol=1e-6, rtol=0, msg=name)
    assert (single_params["image"] - _Student(kind, local).image).abs().max() > 1e-3  # the step moved them


# --- the teacher in the real Trainer ----------------------------------------------------------------------------------
class _Pairs(torch.utils.data.Dataset):
    """n random images and tokenized captions for the student, plus the teacher's own inputs when given."""

    def __init__(self, config, n: int, teacher_config=None, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        captions = [f"a photo of thing number {i}" for i in range(n)]
        self.items = [{} for _ in range(n)]
        for prefix, cfg in (("", config), ("teacher_", teacher_config)):
            if cfg is None:
                continue
            size = cfg.vision_cfg.image_size
            pixels = torch.randn(n, 3, size, size, generator=g)
            tokens = get_tokenizer(cfg)(captions)
            for i, item in enumerate(self.items):
                item[f"{prefix}pixel_values"] = pixels[i]
                item.update({f"{prefix}{k}": v[i] for k, v in tokens.items()})

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def _model(name="tiny-vit", seed=0, **overrides) -> MiniClip:
    torch.manual_seed(seed)
    data = load_model_config(name).to_dict()
    for key, value in overrides.items():
        section, _, field = key.partition("__")
        if field:
            data[section][field] = value
        else:
            data[key] = value
    return MiniClip(ClipConfig.from_dict(data))


def _trainer(student, teacher, tmp_path, n=8, own_teacher_inputs=False, **overrides):
    args = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, max_steps=3, learning_rate=1e-3,
                use_cpu=True, report_to="none", save_strategy="no", logging_steps=1, dataloader_num_workers=0,
                seed=0, disable_tqdm=True, remove_unused_columns=False)
    args.update(overrides)
    data = _Pairs(student.config, n, teacher.config if own_teacher_inputs else None)
    return ClipTrainer(student, ClipTrainingArguments(**args), train_dataset=data, data_collator=default_data_collator,
                       processing_class=get_tokenizer(student.config), teacher=teacher)


@pytest.mark.parametrize("kind", ["affinity", "kd", "feature"])
def test_teacher_gets_no_gradient_and_stays_bit_identical(tmp_path, kind):
    teacher = _model(seed=1, embed_dim=32 if kind == "feature" else 64)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student = _model()
    start = {k: v.clone() for k, v in student.state_dict().items()}
    trainer = _trainer(student, teacher, tmp_path, distill_loss=kind, bf16=True)
    trainer.train()
    assert not teacher.training and all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
    assert any(not torch.equal(start[k], v) for k, v in student.state_dict().items())
    if kind == "feature":  # a learnt 64 -> 32 projection, in the optimizer
        assert trainer.distill_loss.projection.weight.shape == (32, 64)
        assert any(trainer.distill_loss.projection.weight is p for g in trainer.optimizer.param_groups
                   for p in g["params"])


def test_compute_loss_is_the_weighted_sum(tmp_path):
    teacher, student = _model(seed=1), _model()
    trainer = _trainer(student, teacher, tmp_path, contrastive_weight=0.5, distill_weight=2.0)
    batch = default_data_collator([trainer.train_dataset[i] for i in range(4)])
    got = trainer.compute_loss(student, batch)
    s, t = student(**batch), teacher.eval()(**batch)
    expected = 0.5 * ClipLoss()(s.image_embeds, s.text_embeds, s.logit_scale) + 2.0 * affinity_loss(
        *ClipLoss().logits(s.image_embeds, s.text_embeds, s.logit_scale)[:2],
        *ClipLoss().logits(t.image_embeds, t.text_embeds, t.logit_scale)[:2])
    assert abs(got.item() - expected.item()) < 1e-5


@pytest.mark.parametrize("kind", ["affinity", "feature"])
def test_cached_feature_accumulation_with_a_teacher_equals_one_big_batch(tmp_path, kind):
    k, micro = 4, 2
    teacher = _model(seed=1, embed_dim=32 if kind == "feature" else 64)
    student = _model()
    reference = copy.deepcopy(student)
    trainer = _trainer(student, teacher, tmp_path, n=k * micro, per_device_train_batch_size=micro,
                       feature_accum_steps=k, distill_loss=kind)
    reference_head = copy.deepcopy(trainer.distill_loss)
    batch = default_data_collator([trainer.train_dataset[i] for i in range(k * micro)])
    trainer.current_gradient_accumulation_steps = 1
    calls = []
    hook = teacher.image_encoder.register_forward_hook(lambda m, args, out: calls.append(len(args[0])))
    accumulated = trainer.training_step(student, batch)
    hook.remove()
    assert calls == [micro] * k  # the teacher runs once per sample, cached
    reference.train()
    out, t = reference(**batch), teacher(**batch)
    expected = ClipLoss()(out.image_embeds, out.text_embeds, out.logit_scale) + reference_head(
        out.image_embeds, out.text_embeds, out.logit_scale, t.image_embeds, t.text_embeds, t.logit_scale)
    expected.backward()
    assert abs(accumulated.item() - expected.item()) < 1e-5
    grads = {n: p.grad for n, p in reference.named_parameters()}
    for name, p in student.named_parameters():
        torch.testing.assert_close(p.grad, grads[name], atol=1e-5, rtol=1e-4, msg=name)
    if kind == "feature":
        torch.testing.assert_close(trainer.distill_loss.projection.weight.grad, reference_head.projection.weight.grad,
                                   atol=1e-5, rtol=1e-4)


def test_locked_student_tower_with_distillation(tmp_path):
    from miniclip.training.locking import Locks
    teacher, student = _model(seed=1), _model()
    image_before = {k: v.clone() for k, v in student.image_encoder.state_dict().items()}
    text_before = {k: v.clone() for k, v in student.text_encoder.state_dict().items()}
    args = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, max_steps=3, learning_rate=1e-3,
                use_cpu=True, report_to="none", save_strategy="no", dataloader_num_workers=0, disable_tqdm=True,
                remove_unused_columns=False, distill_loss="kd")
    trainer = ClipTrainer(student, ClipTrainingArguments(**args), train_dataset=_Pairs(student.config, 8),
                          data_collator=default_data_collator, teacher=teacher, locks=Locks(image=True),
                          processing_class=get_tokenizer(student.config))
    trainer.train()
    assert all(torch.equal(image_before[k], v) for k, v in student.image_encoder.state_dict().items())
    assert any(not torch.equal(text_before[k], v) for k, v in student.text_encoder.state_dict().items())


# --- train.py: a BERT teacher at 32 px for a BPE student at 64 px ------------------------------------------------------
def test_bpe_student_learns_from_a_bert_teacher_at_another_image_size(tmp_path):
    teacher_config = ClipConfig.from_dict({**load_model_config("tiny-chinese-vit").to_dict(), "embed_dim": 48,
                                           "vision_cfg": {**load_model_config("tiny-chinese-vit").vision_cfg.__dict__,
                                                          "image_size": 32}})
    torch.manual_seed(3)
    teacher = MiniClip(teacher_config)
    teacher.save_pretrained(tmp_path / "teacher", tokenizer=get_tokenizer(teacher_config))
    train_file = make_caption_set(tmp_path)
    flags = _flags(tmp_path / "student", train_file=train_file, distill_from=tmp_path / "teacher", max_steps=3,
                   distill_loss="feature", augment=False)
    result = train.main(flags)
    trainer = result.trainer
    batch = next(iter(trainer.get_train_dataloader()))
    assert batch["pixel_values"].shape[-1] == 64 and batch["teacher_pixel_values"].shape[-1] == 32
    # row by row the same caption, in each model's own tokens: BPE for the student, WordPiece for the teacher
    captions = [c for i in range(8) for c in (f"colour {i % 6} with a square at {i}", f"picture number {i}")]
    bpe, bert = get_tokenizer(result.trainer.model.config), get_tokenizer(teacher_config)

    def ids(tokens, row):
        return tokens["input_ids"][row, :int(tokens["attention_mask"][row].sum())].tolist()
    for row in range(len(batch["input_ids"])):
        caption = next(c for c in captions if ids(trim_tokens(bpe([c])), 0) == ids(batch, row))
        teacher_tokens = {k.removeprefix("teacher_"): v for k, v in batch.items() if k.startswith("teacher_")}
        assert ids(teacher_tokens, row) == ids(trim_tokens(bert([caption])), 0)
    assert trainer.distill_loss.projection.weight.shape == (48, 64)
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e and "train_loss" not in e]
    assert len(losses) == 3 and all(math.isfinite(v) for v in losses)
    # the loss really is the teacher's: recompute it for this batch from the teacher's own inputs
    loaded = MiniClip.from_pretrained(tmp_path / "teacher")
    with torch.no_grad():
        t = loaded(pixel_values=batch["teacher_pixel_values"], input_ids=batch["teacher_input_ids"],
                   attention_mask=batch["teacher_attention_mask"])
        got = trainer._teacher_outputs(batch)
    torch.testing.assert_close(got.image_embeds, t.image_embeds)
    torch.testing.assert_close(got.text_embeds, t.text_embeds)
    assert (result.output_dir / "distill_projection.safetensors").is_file()


def test_two_torchrun_processes_distil_like_one_process_with_double_batch(tmp_path):
    """train.py under torchrun (2 gloo processes, batch B each) vs one process with batch 2B, distilling with the
    feature loss through a learnt projection (teacher embed dim 48): the projection, averaged outside DDP, and the
    student must end equal."""
    import json
    import os
    import subprocess
    import sys
    from safetensors.torch import load_file
    from processes import free_port
    from test_train import REPO
    torch.manual_seed(3)
    teacher = _model(seed=3, embed_dim=48)
    teacher.save_pretrained(tmp_path / "teacher", tokenizer=get_tokenizer(teacher.config))
    batch = 4
    common = dict(train_file=make_caption_set(tmp_path, n=2 * batch), max_steps=2, augment=False, logging_steps=1,
                  adam_epsilon=1e-6, distill_from=tmp_path / "teacher", distill_loss="feature")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
              str(free_port()), "-m", "miniclip.apps.train",
              *_flags(tmp_path / "two", per_device_train_batch_size=batch, **common)]
    two = subprocess.run(launch, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-4000:]
    one = train.main(_flags(tmp_path / "one", per_device_train_batch_size=2 * batch, **common))
    two_history = json.loads((tmp_path / "two" / "trainer_state.json").read_text())["log_history"]
    losses = [e["loss"] for e in two_history if "loss" in e and "train_loss" not in e]
    assert losses == pytest.approx([e["loss"] for e in one.trainer.state.log_history
                                    if "loss" in e and "train_loss" not in e], abs=1e-5)
    for name in ("model.safetensors", "distill_projection.safetensors"):
        expected, got = load_file(tmp_path / "one" / name), load_file(tmp_path / "two" / name)
        worst = max((expected[k].double() - got[k].double()).abs().max().item() for k in expected)
        assert worst <= 1e-5, (name, worst)
