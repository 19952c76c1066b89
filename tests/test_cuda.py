"""The CUDA path on a real GPU: MiniClip and the batch-first attention against open_clip (fp32 to rounding, bf16
within stated bounds), ClipTrainer in bf16 with fused AdamW and no host sync per step, cached-feature accumulation
against the big batch, and pinned-memory loading. Every test is marked `cuda` and skipped without a GPU.

    python -m pytest -q -m cuda tests/test_cuda.py          # bench/gpu_check.sh runs this
    MINICLIP_CUDA_TEST_DEVICE=cpu python -m pytest -q -m cuda tests/test_cuda.py   # the tests' own logic, on CPU

On CPU the GPU-only assertions (fused optimizer, pinned batches, sync debug mode) are skipped; the comparisons run.
"""
import copy
import math
import os

import pytest
import torch
from open_clip.transformer import ResidualAttentionBlock
from transformers import TrainerCallback, default_data_collator

from conftest import open_clip_reference, reference_to_miniclip
from miniclip.attention import use_fast_attention
from miniclip.config import load_model_config
from miniclip.data.dataset import ClipCollator, build_dataset
from miniclip.loss import ClipLoss
from miniclip.model import MiniClip
from miniclip.tokenizer import get_tokenizer
from miniclip.training.trainer import ClipTrainer, ClipTrainingArguments, NonFiniteLossError

DEVICE = torch.device(os.environ.get("MINICLIP_CUDA_TEST_DEVICE", "cuda"))
ON_GPU = DEVICE.type == "cuda"
pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(ON_GPU and not torch.cuda.is_available(), reason="needs a CUDA GPU")]
gpu_only = pytest.mark.skipif(not ON_GPU, reason="asserts a CUDA-only property")


@pytest.fixture(autouse=True)
def exact_fp32():
    """fp32 means fp32: TF32 tensor cores (cuDNN's default for convolutions) round inputs to 10 mantissa bits."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _pair(name: str):
    """(open_clip CLIP, MiniClip with the same weights), both on DEVICE in eval mode."""
    config = load_model_config(name)
    reference = open_clip_reference(config)
    model = MiniClip(config).eval()
    model.load_state_dict(reference_to_miniclip(reference.state_dict()), strict=True)
    return reference.to(DEVICE), model.to(DEVICE), config


def _inputs(config, batch: int = 4, seed: int = 1):
    """Random images and captions of different lengths, EOT (the highest id) last; ids padded to 77."""
    g = torch.Generator().manual_seed(seed)
    size, t = config.vision_cfg.image_size, config.text_cfg
    pixel_values = torch.randn(batch, 3, size, size, generator=g)
    input_ids = torch.zeros(batch, t.context_length, dtype=torch.long)
    for i in range(batch):
        n = int(torch.randint(3, 24, (), generator=g))
        input_ids[i, :n] = torch.randint(1, t.vocab_size - 2, (n,), generator=g)
        input_ids[i, n - 1] = t.vocab_size - 1
    return pixel_values.to(DEVICE), input_ids.to(DEVICE)


def _embeds(encoder, pixel_values, input_ids, bf16: bool = False):
    with torch.no_grad(), torch.autocast(DEVICE.type, dtype=torch.bfloat16, enabled=bf16):
        return (encoder.encode_image(pixel_values, normalize=True).float(),
                encoder.encode_text(input_ids, normalize=True).float())


# --- the model against open_clip ----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["OpenAI-ViT-B-16", "TinyCLIP-ViT-40M-32-Text-19M", "OpenAI-RN50"])
def test_model_equals_open_clip_fp32(name):
    reference, model, config = _pair(name)
    pixel_values, input_ids = _inputs(config)
    length = int(input_ids.argmax(1).max()) + 1  # the collator trims to the longest caption; open_clip runs 77
    ours = _embeds(model, pixel_values, input_ids[:, :length])
    theirs = _embeds(reference, pixel_values, input_ids)
    for a, b, what in zip(ours, theirs, ("image", "text")):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0, msg=f"{name} {what} embeddings")


@pytest.mark.parametrize("name", ["OpenAI-ViT-B-16", "TinyCLIP-ViT-40M-32-Text-19M"])
def test_model_under_bf16_autocast_is_as_accurate_as_open_clip(name):
    """bf16 (8 mantissa bits) cannot match fp32 to 1e-5. The bound: miniclip's largest error on the unit-norm
    embeddings, against open_clip in fp32, is at most 1.5x open_clip's own bf16 error plus 2e-3, and every
    embedding keeps a cosine >= 0.99 with its fp32 value."""
    reference, model, config = _pair(name)
    pixel_values, input_ids = _inputs(config, batch=8)
    length = int(input_ids.argmax(1).max()) + 1
    exact = _embeds(reference, pixel_values, input_ids)
    ours = _embeds(model, pixel_values, input_ids[:, :length], bf16=True)
    theirs = _embeds(reference, pixel_values, input_ids, bf16=True)
    for e, a, b, what in zip(exact, ours, theirs, ("image", "text")):
        err_ours, err_theirs = (a - e).abs().max().item(), (b - e).abs().max().item()
        assert err_theirs > 0, "autocast did not run in bf16"
        assert err_ours <= 1.5 * err_theirs + 2e-3, (what, err_ours, err_theirs)
        assert (a * e).sum(-1).min().item() >= 0.99, what


# --- the batch-first attention block against open_clip's -----------------------------------------------------------
def _block_pair(width: int, heads: int):
    torch.manual_seed(0)
    reference = ResidualAttentionBlock(width, heads).to(DEVICE)
    fast = copy.deepcopy(reference)
    assert use_fast_attention(fast) == 1
    return reference, fast


def _run_block(block, x, mask, bf16: bool):
    """Output and the gradients of the input and every parameter for a fixed non-uniform upstream gradient."""
    block.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16, enabled=bf16):
        y = block(x, attn_mask=mask)
    (y.float() * torch.linspace(-1, 1, y.numel(), device=DEVICE).view_as(y)).sum().backward()
    return y.detach().float(), {"input": x.grad, **{n: p.grad for n, p in block.named_parameters()}}


def _masks(length: int):
    # None (image tower); a causal (L, L) mask; and the text tower's view: the top-left corner of the 77 x 77
    # causal buffer, not contiguous, with a row stride (77) no fused kernel's alignment rule likes.
    full = torch.full((77, 77), float("-inf"), device=DEVICE).triu(1)
    return {"none": None, "causal": full[:length, :length].contiguous(), "causal-slice-of-77": full[:length, :length]}


@pytest.mark.parametrize("length", [11, 50, 77])
@pytest.mark.parametrize("mask_kind", ["none", "causal", "causal-slice-of-77"])
def test_attention_block_equals_open_clip_forward_and_gradients(length, mask_kind):
    """fp32: the output to 1e-5; each gradient to 5e-5 of its largest entry (on 2 CPU threads the worst is 7e-6)."""
    reference, fast = _block_pair(width=256, heads=4)
    x = torch.randn(6, length, 256, device=DEVICE)
    mask = _masks(length)[mask_kind]
    y_ref, g_ref = _run_block(reference, x, mask, bf16=False)
    y_fast, g_fast = _run_block(fast, x, mask, bf16=False)
    torch.testing.assert_close(y_fast, y_ref, atol=1e-5, rtol=0)
    assert g_fast.keys() == g_ref.keys()
    for name in g_ref:  # a bias gradient sums B*L rows: fp32 rounding grows with its size, so the bound scales
        scale = g_ref[name].abs().max().item()
        assert (g_fast[name] - g_ref[name]).abs().max().item() <= 5e-5 * scale, name


@pytest.mark.parametrize("mask_kind", ["none", "causal-slice-of-77"])
def test_attention_block_bf16_is_as_accurate_as_open_clip(mask_kind):
    """Against the fp32 block: output and every gradient at most 2x open_clip's own bf16 error (plus 1e-3 of the
    reference's largest value; bf16 kernels differ in where they round)."""
    reference, fast = _block_pair(width=512, heads=8)
    x = torch.randn(8, 50, 512, device=DEVICE)
    mask = _masks(50)[mask_kind]
    y_exact, g_exact = _run_block(reference, x, mask, bf16=False)
    y_ref, g_ref = _run_block(reference, x, mask, bf16=True)
    y_fast, g_fast = _run_block(fast, x, mask, bf16=True)
    for name, exact, theirs, ours in [("output", y_exact, y_ref, y_fast)] + [
            (n, g_exact[n], g_ref[n], g_fast[n]) for n in g_exact]:
        err_theirs, err_ours = (theirs - exact).abs().max().item(), (ours.float() - exact).abs().max().item()
        assert err_ours <= 2 * err_theirs + 1e-3 * exact.abs().max().item(), (name, err_ours, err_theirs)


# --- ClipTrainer on the GPU ----------------------------------------------------------------------------------------
class TensorPairs(torch.utils.data.Dataset):
    """n random images with n distinct captions, tokenized and trimmed as the collator would (one row each)."""

    def __init__(self, config, n: int):
        g = torch.Generator().manual_seed(0)
        size = config.vision_cfg.image_size
        self.pixels = torch.randn(n, 3, size, size, generator=g)  # (n, 3, S, S)
        tokens = get_tokenizer(config)([f"a picture of thing number {i}" for i in range(n)])
        length = int(tokens["input_ids"].argmax(1).max()) + 1
        self.input_ids = tokens["input_ids"][:, :length]  # (n, L)

    def __len__(self):
        return len(self.pixels)

    def __getitem__(self, i):
        return {"pixel_values": self.pixels[i], "input_ids": self.input_ids[i]}


def _trainer(model, tmp_path, n: int, callbacks=(), **overrides) -> ClipTrainer:
    base = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=8, max_steps=30, learning_rate=1e-3,
                weight_decay=0.1, use_cpu=not ON_GPU, bf16=True, report_to="none", save_strategy="no",
                logging_steps=5, dataloader_num_workers=0, seed=0, disable_tqdm=True, remove_unused_columns=False)
    args = ClipTrainingArguments(**{**base, **overrides})
    return ClipTrainer(model, args, train_dataset=TensorPairs(model.config, n), data_collator=default_data_collator,
                       processing_class=get_tokenizer(model.config), callbacks=list(callbacks))


def _tiny(**config_overrides) -> MiniClip:
    from miniclip.config import ClipConfig
    torch.manual_seed(0)
    return MiniClip(ClipConfig.from_dict({**load_model_config("tiny-vit").to_dict(), **config_overrides}))


class Watch(TrainerCallback):
    """After every optimizer step: the logit scale; and the dtype a Linear layer computes in."""

    def __init__(self):
        self.scales, self.dtypes = [], set()

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        layer = model.image_encoder.visual.transformer.resblocks[0].mlp.c_fc
        layer.register_forward_hook(lambda m, i, out: self.dtypes.add(out.dtype))

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.scales.append(model.logit_scale.logit_scale.item())


def test_trainer_bf16_30_steps_learns_clamps_and_reloads_bit_exact(tmp_path):
    model = _tiny(init_logit_scale=math.log(100) + 1.0)  # starts above the clamp
    watch = Watch()
    trainer = _trainer(model, tmp_path, n=16, callbacks=[watch])
    trainer.train()
    assert next(model.parameters()).device.type == DEVICE.type
    assert watch.dtypes == {torch.bfloat16}  # autocast ran in bf16
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert len(losses) == 6 and all(math.isfinite(v) for v in losses)
    assert losses[-1] < 0.5 * losses[0], losses  # 16 pairs memorised: the loss falls
    assert len(watch.scales) == 30 and max(watch.scales) <= math.log(100) + 1e-6  # the clamp holds
    if ON_GPU:
        assert trainer.optimizer.optimizer.defaults.get("fused") is True  # adamw_torch_fused: the HF default
    trainer.save_model()
    reloaded = MiniClip.from_pretrained(tmp_path / "out")
    state = model.state_dict()
    assert reloaded.state_dict().keys() == state.keys()
    for key, value in reloaded.state_dict().items():
        assert torch.equal(value, state[key].cpu()), key


class NoSyncWindow(TrainerCallback):
    """Turns torch's CUDA sync debug mode to "error" from the end of step `start` until the step whose end logs,
    saves or stops: any host sync in between (reading the loss, a blocking batch copy) raises."""

    def __init__(self, start: int):
        self.start, self.steps_checked = start, 0

    def on_step_end(self, args, state, control, **kwargs):
        if control.should_log or control.should_save or control.should_evaluate or control.should_training_stop:
            torch.cuda.set_sync_debug_mode("default")
        elif state.global_step >= self.start:
            self.steps_checked += torch.cuda.get_sync_debug_mode() != 0
            torch.cuda.set_sync_debug_mode("error")


@gpu_only
@pytest.mark.parametrize("overrides,syncs", [
    ({}, False),
    ({"non_blocking_transfers": False}, True),  # the controls: each stock default alone makes the check fire
    ({"logging_nan_inf_filter": True}, True),
], ids=["defaults", "control-blocking-copies", "control-nan-filter"])
def test_training_steps_make_no_host_sync(tmp_path, overrides, syncs):
    """The steady-state step (batch copy, forward, loss, NaN bookkeeping, backward, clipping, fused AdamW, clamp,
    schedule) never waits for the GPU with ClipTrainingArguments' defaults: pinned memory + non-blocking copies, no
    NaN filter in the Trainer's loop. Switching either back syncs every step, which the debug mode turns into an
    error: the check can fail."""
    window = NoSyncWindow(start=3)
    trainer = _trainer(_tiny(), tmp_path, n=8 * 12, max_steps=12, logging_steps=100, callbacks=[window], **overrides)
    assert trainer.args.dataloader_pin_memory
    try:
        if syncs:
            with pytest.raises(RuntimeError, match="synchronizing CUDA operation"):
                trainer.train()
        else:
            trainer.train()
            assert window.steps_checked == 8  # steps 4..11 ran with the debug mode on
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_nan_loss_stops_a_bf16_gpu_run_naming_the_step(tmp_path):
    class PoisonAfter(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            if state.global_step == 2:
                with torch.no_grad():
                    model.logit_scale.logit_scale.fill_(float("nan"))

    trainer = _trainer(_tiny(), tmp_path, n=40, max_steps=5, logging_steps=1, callbacks=[PoisonAfter()])
    with pytest.raises(NonFiniteLossError, match="loss is nan at step 3"):
        trainer.train()


def test_cached_feature_accumulation_equals_one_big_batch(tmp_path):
    k, micro = 4, 4
    model = _tiny()
    reference = copy.deepcopy(model).to(DEVICE)
    trainer = _trainer(model, tmp_path, n=k * micro, per_device_train_batch_size=micro, feature_accum_steps=k,
                       bf16=False)
    batch = default_data_collator([trainer.train_dataset[i] for i in range(k * micro)])  # (k*micro, ...) on CPU
    trainer.current_gradient_accumulation_steps = 1  # set by the Trainer's epoch loop
    accumulated = trainer.training_step(trainer.model, batch)
    assert next(model.parameters()).device.type == DEVICE.type
    reference.train()
    out = reference(**{key: value.to(DEVICE) for key, value in batch.items()})
    expected = ClipLoss()(out.image_embeds, out.text_embeds, out.logit_scale)
    expected.backward()
    assert abs(accumulated.item() - expected.item()) < 1e-5
    grads = {n: p.grad for n, p in reference.named_parameters()}
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads[name], atol=1e-5, rtol=1e-4, msg=name)


# --- data loading with pinned memory -------------------------------------------------------------------------------
def _jpeg_records(tmp_path, n: int):
    import numpy as np
    from PIL import Image

    from miniclip.data.captions import CaptionRecord
    rng = np.random.default_rng(0)
    records = []
    for i in range(n):
        path = tmp_path / f"{i}.jpg"
        Image.fromarray(rng.integers(0, 256, (96, 128, 3), dtype=np.uint8)).save(path, quality=90)
        records.append(CaptionRecord(image=path, captions=(f"photo number {i}" + " again" * i,)))
    return records


def test_trainer_dataloader_pins_and_delivers_the_collated_batches(tmp_path):
    """ClipDataset + ClipCollator through the Trainer's dataloader (2 worker processes, pinned memory, non-blocking
    copies): every batch arrives on the device holding exactly the rows the collator makes in this process."""
    config = load_model_config("tiny-vit")
    records = _jpeg_records(tmp_path, 12)
    dataset = build_dataset(records, config, train=False)  # the eval transform: deterministic pixels
    collator = ClipCollator(get_tokenizer(config))
    expected = collator([dataset[i] for i in range(len(dataset))])  # (12, ...) on CPU, in this process
    args = ClipTrainingArguments(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4,
                                 dataloader_num_workers=2, use_cpu=not ON_GPU, report_to="none",
                                 remove_unused_columns=False)
    trainer = ClipTrainer(MiniClip(config), args, train_dataset=dataset, data_collator=collator)
    loader = trainer.get_train_dataloader()
    if ON_GPU:
        assert loader.base_dataloader.pin_memory and loader._non_blocking
    seen = []
    for batch in loader:
        assert batch["pixel_values"].device.type == DEVICE.type
        assert batch["pixel_values"].shape == (4, 3, 64, 64) and batch["pixel_values"].dtype == torch.float32
        assert batch["input_ids"].shape[1] == batch["attention_mask"].shape[1] <= expected["input_ids"].shape[1]
        for row in range(4):
            pixels = batch["pixel_values"][row].cpu()
            match = [i for i in range(12) if torch.equal(pixels, expected["pixel_values"][i])]
            assert len(match) == 1
            ids = batch["input_ids"][row].cpu()
            assert torch.equal(ids, expected["input_ids"][match[0], :len(ids)])
            seen += match
    assert sorted(seen) == list(range(12))


@gpu_only
def test_plain_dataloader_batches_are_pinned(tmp_path):
    config = load_model_config("tiny-vit")
    dataset = build_dataset(_jpeg_records(tmp_path, 8), config, train=True)
    loader = torch.utils.data.DataLoader(dataset, batch_size=4, num_workers=2, pin_memory=True,
                                         collate_fn=ClipCollator(get_tokenizer(config)))
    for batch in loader:
        assert all(value.is_pinned() for value in batch.values())
        on_gpu = {key: value.to(DEVICE, non_blocking=True) for key, value in batch.items()}
        torch.cuda.synchronize()
        assert all(torch.equal(on_gpu[key].cpu(), batch[key]) for key in batch)
