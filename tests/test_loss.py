"""miniclip.loss against open_clip's own losses, a hand-computed value, and real 2-process gloo runs on CPU."""
import math

import open_clip.loss
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from miniclip.loss import ClipLoss, SigLipLoss, build_loss


def _features(batch: int, dim: int = 16, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    image = F.normalize(torch.randn(batch, dim, generator=g, dtype=torch.float64), dim=-1)
    text = F.normalize(torch.randn(batch, dim, generator=g, dtype=torch.float64), dim=-1)
    return image, text


@pytest.mark.parametrize("logit_scale", [1.0, 14.3, 100.0])
@pytest.mark.parametrize("logit_bias", [None, -2.5])
def test_clip_loss_matches_open_clip(logit_scale, logit_bias):
    image, text = _features(12)
    ours_inputs = [t.clone().requires_grad_() for t in (image, text, torch.tensor(logit_scale, dtype=torch.float64))]
    ref_inputs = [t.clone().requires_grad_() for t in (image, text, torch.tensor(logit_scale, dtype=torch.float64))]
    bias = None if logit_bias is None else torch.tensor(logit_bias, dtype=torch.float64)
    ours = ClipLoss()(*ours_inputs, bias)
    ref = open_clip.loss.ClipLoss()(*ref_inputs, logit_bias=bias)
    assert abs(ours.item() - ref.item()) < 1e-6
    ours.backward()
    ref.backward()
    for a, b in zip(ours_inputs, ref_inputs):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-6, rtol=0)


@pytest.mark.parametrize("logit_scale,logit_bias", [(10.0, -10.0), (2.0, 0.5), (57.0, None)])
def test_siglip_loss_matches_open_clip(logit_scale, logit_bias):
    image, text = _features(10, seed=1)
    scale = torch.tensor(logit_scale, dtype=torch.float64)
    bias = None if logit_bias is None else torch.tensor(logit_bias, dtype=torch.float64)
    ours = SigLipLoss()(image, text, scale, bias)
    ref = open_clip.loss.SigLipLoss()(image, text, scale, bias)
    assert abs(ours.item() - ref.item()) < 1e-6


def test_clip_loss_hand_computed_uses_the_logit_scale():
    # Two orthogonal pairs: logits = s * I, so each row's cross-entropy is log(1 + exp(-s)).
    eye = torch.eye(2, dtype=torch.float64)
    for s in (1.0, 10.0):
        expected = math.log(1 + math.exp(-s))
        assert abs(ClipLoss()(eye, eye, torch.tensor(s, dtype=torch.float64)).item() - expected) < 1e-12


def test_siglip_hand_computed():
    # Two orthogonal pairs, scale t, bias b: 2 positives with logit t+b, 2 negatives with logit b; sum / B.
    eye = torch.eye(2, dtype=torch.float64)
    t, b = 5.0, -1.0
    sig = lambda x: 1 / (1 + math.exp(-x))
    expected = -(2 * math.log(sig(t + b)) + 2 * math.log(sig(-b))) / 2
    got = SigLipLoss()(eye, eye, torch.tensor(t, dtype=torch.float64), torch.tensor(b, dtype=torch.float64))
    assert abs(got.item() - expected) < 1e-12


def test_build_loss_rejects_unknown():
    with pytest.raises(ValueError, match="siglip"):
        build_loss("triplet")


# --- two real gloo processes on CPU ---------------------------------------------------------------------------------

DIM_IN, DIM, BATCH = 6, 8, 4  # per-process batch B = 4, single-process reference batch 2B = 8


class _TwoTowers(torch.nn.Module):
    """The smallest CLIP: a linear image tower, a linear text tower and a learnt log-temperature."""

    def __init__(self, with_bias: bool = False):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.image = torch.nn.Parameter(torch.randn(DIM_IN, DIM, generator=g, dtype=torch.float64))
        self.text = torch.nn.Parameter(torch.randn(DIM_IN, DIM, generator=g, dtype=torch.float64))
        self.log_scale = torch.nn.Parameter(torch.tensor(math.log(1 / 0.07), dtype=torch.float64))
        # Only when the loss uses it: DDP (find_unused_parameters=False) never reduces a bucket with an unused one.
        self.bias = torch.nn.Parameter(torch.tensor(-3.0, dtype=torch.float64)) if with_bias else None

    def forward(self, x, y):
        return F.normalize(x @ self.image, dim=-1), F.normalize(y @ self.text, dim=-1), self.log_scale.exp(), self.bias


def _data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(2 * BATCH, DIM_IN, generator=g, dtype=torch.float64), \
        torch.randn(2 * BATCH, DIM_IN, generator=g, dtype=torch.float64)


def _make_loss(kind: str):
    return {"clip": ClipLoss(), "clip_local": ClipLoss(local_loss=True), "siglip": SigLipLoss()}[kind]


def _one_step(model, loss_fn, x, y):
    """Loss, one AdamW step; returns the loss value and the updated parameters."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=0.1)
    image, text, scale, bias = model(x, y)
    loss = loss_fn(image, text, scale, bias)
    loss.backward()
    optimizer.step()
    return loss.item(), {n: p.detach().clone() for n, p in model.named_parameters()}


KINDS = ("clip", "clip_local", "siglip")


def _worker(rank: int, world: int, init_file: str, out: str):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        x, y = _data()
        shard = slice(rank * BATCH, (rank + 1) * BATCH)
        results = {}
        for kind in KINDS:
            model = torch.nn.parallel.DistributedDataParallel(_TwoTowers(with_bias=kind == "siglip"))
            loss, params = _one_step(model, _make_loss(kind), x[shard], y[shard])
            # open_clip's distributed losses in the same processes, for comparison
            image, text, scale, bias = _TwoTowers(with_bias=kind == "siglip")(x[shard], y[shard])
            if kind == "siglip":
                ref = open_clip.loss.SigLipLoss(rank=rank, world_size=world, dist_impl="gather")(image, text, scale,
                                                                                                  bias)
            else:
                ref = open_clip.loss.ClipLoss(local_loss=kind == "clip_local", gather_with_grad=True, rank=rank,
                                              world_size=world)(image, text, scale)
            results[kind] = {"loss": loss, "params": {k.removeprefix("module."): v for k, v in params.items()},
                             "open_clip": ref.item()}
        torch.save(results, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_process_results(tmp_path_factory):
    """One 2-process gloo run (B per process) of every loss kind; the spawn is the slow part, so it runs once."""
    tmp = tmp_path_factory.mktemp("gloo")
    mp.spawn(_worker, args=(2, str(tmp / "init"), str(tmp / "result")), nprocs=2, join=True)
    return [torch.load(tmp / f"result.{r}", weights_only=True) for r in range(2)]


@pytest.mark.parametrize("kind", KINDS)
def test_two_gloo_processes_match_one_process_with_double_batch(kind, two_process_results):
    results = [r[kind] for r in two_process_results]
    x, y = _data()
    single_loss, single_params = _one_step(_TwoTowers(with_bias=kind == "siglip"), _make_loss(kind), x, y)
    losses = [r["loss"] for r in results]
    if kind == "clip":  # every process computes the full global loss
        assert all(abs(v - single_loss) < 1e-6 for v in losses), (losses, single_loss)
    else:  # each process has its share; the mean over processes is the global loss
        assert abs(sum(losses) / 2 - single_loss) < 1e-6, (losses, single_loss)
    for r in results:
        assert abs(r["open_clip"] - r["loss"]) < 1e-6
        for name, value in single_params.items():
            torch.testing.assert_close(r["params"][name], value, atol=1e-5, rtol=0)
    # and the step really moved the parameters (the comparison is not vacuous)
    assert (single_params["image"] - _TwoTowers().image).abs().max() > 1e-3
