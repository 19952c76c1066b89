"""attention.py: the batch-first attention block must compute open_clip's function (outputs and gradients), in fp32
exactly up to rounding and under bf16 autocast no worse than open_clip's own bf16 path."""
import copy

import open_clip
import pytest
import torch
from open_clip.transformer import ResidualAttentionBlock

from miniclip.config import load_model_config
from miniclip.attention import FastResidualAttentionBlock, use_fast_attention
from miniclip.model import MiniClip
from conftest import open_clip_reference, reference_to_miniclip


def _blocks(width=64, heads=4, seed=0):
    torch.manual_seed(seed)
    reference = ResidualAttentionBlock(width, heads)
    fast = copy.deepcopy(reference)
    assert use_fast_attention(fast) == 1
    return reference, fast


def _causal(length):
    return torch.full((length, length), float("-inf")).triu(1)  # open_clip's text mask


@pytest.mark.parametrize("causal", [False, True])
def test_block_matches_open_clip_forward_and_backward(causal):
    reference, fast = _blocks()
    x = torch.randn(3, 11, 64)
    mask = _causal(11) if causal else None
    outputs, grads = [], []
    for block in (reference, fast):
        block.zero_grad()
        xi = x.clone().requires_grad_(True)
        y = block(xi, attn_mask=mask)
        (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        outputs.append(y)
        grads.append([xi.grad] + [p.grad for p in block.parameters()])
    torch.testing.assert_close(outputs[1], outputs[0], atol=1e-5, rtol=0)
    for g_fast, g_ref in zip(grads[1], grads[0]):
        torch.testing.assert_close(g_fast, g_ref, atol=1e-5, rtol=1e-5)


def test_block_under_bf16_autocast_is_as_accurate_as_open_clip():
    reference, fast = _blocks(width=128, heads=2)
    x = torch.randn(4, 50, 128)
    with torch.no_grad():
        exact = reference(x.double().float())  # fp32 reference
        with torch.autocast("cpu", dtype=torch.bfloat16):
            err_ref = (reference(x).float() - exact).abs().max()
            err_fast = (fast(x).float() - exact).abs().max()
    assert err_ref > 0  # autocast really ran in bf16
    assert err_fast <= 1.5 * err_ref, (err_fast, err_ref)


def test_switch_keeps_state_dict_and_is_reversible():
    model = MiniClip("tiny-vit")
    blocks = [m for m in model.modules() if isinstance(m, ResidualAttentionBlock)]
    assert blocks and all(type(m) is FastResidualAttentionBlock for m in blocks)  # MiniClip installs it
    keys = list(model.state_dict())
    assert use_fast_attention(model, enable=False) == len(blocks) == 4  # 2 image + 2 text layers
    assert all(type(m) is ResidualAttentionBlock for m in blocks)
    assert list(model.state_dict()) == keys
    assert use_fast_attention(model) == 4


def test_cross_attention_blocks_are_left_alone():
    block = ResidualAttentionBlock(64, 4, is_cross_attention=True)
    assert use_fast_attention(block) == 0 and type(block) is ResidualAttentionBlock


def test_training_step_matches_open_clip():
    """Loss and every parameter gradient of a MiniClip training step equal open_clip's with the same weights."""
    config = load_model_config("tiny-vit")
    reference = open_clip_reference(config).train()
    model = MiniClip(config).train()
    model.load_state_dict(reference_to_miniclip(reference.state_dict()), strict=True)
    g = torch.Generator().manual_seed(3)
    pixel_values = torch.randn(4, 3, 64, 64, generator=g)
    input_ids = torch.zeros(4, 77, dtype=torch.long)
    for i, n in enumerate([5, 9, 3, 12]):
        input_ids[i, :n] = torch.randint(1, 49000, (n,), generator=g)
        input_ids[i, n - 1] = 49407  # EOT, the highest id
    loss_fn = open_clip.loss.ClipLoss()
    ref_loss = loss_fn(*reference(pixel_values, input_ids))
    ref_loss.backward()
    out = model(pixel_values=pixel_values, input_ids=input_ids[:, :12])  # trimmed, as the collator does
    loss = loss_fn(out.image_embeds, out.text_embeds, out.logit_scale)
    loss.backward()
    torch.testing.assert_close(loss, ref_loss, atol=1e-6, rtol=0)
    ref_grads = reference_to_miniclip({k: p.grad for k, p in reference.named_parameters()})
    for name, p in model.named_parameters():  # the logit scale is a (1,) parameter here, a 0-d one in open_clip
        torch.testing.assert_close(p.grad.reshape(ref_grads[name].shape), ref_grads[name], atol=1e-5, rtol=1e-4,
                                   msg=name)
