"""Process-group helpers for contrastive losses: who am I, how many are we, and an all-gather of features that
keeps (or drops) autograd so negatives from every process enter the loss.

Leaves out on purpose: launching processes (torchrun / `accelerate launch` / the HF Trainer do that) and horovod.
"""
from __future__ import annotations

import torch
import torch.distributed as dist


def world_size() -> int:
    """Number of processes in the default group; 1 when torch.distributed is not initialised."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


class _AllGatherWithGrad(torch.autograd.Function):
    """all_gather forward; backward: the sum over processes of the gradient of every gathered copy, sliced to this
    process's rows (each process's loss sends gradient to every process's features)."""

    @staticmethod
    def forward(ctx, features: torch.Tensor) -> torch.Tensor:  # (B, D) -> (W*B, D)
        gathered = [torch.empty_like(features) for _ in range(world_size())]
        dist.all_gather(gathered, features.contiguous())
        ctx.rows = slice(rank() * features.shape[0], (rank() + 1) * features.shape[0])
        return torch.cat(gathered)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # (W*B, D) -> (B, D)
        grad = grad.contiguous()
        dist.all_reduce(grad)  # works on gloo too (gloo has no reduce_scatter)
        return grad[ctx.rows]


def all_gather_features(features: torch.Tensor, with_grad: bool = True) -> torch.Tensor:
    """Every process's (B, D) features concatenated in rank order (W*B, D); all processes pass the same shape.

    with_grad=True keeps autograd through the gather (see `_AllGatherWithGrad`), which a loss computed from the
    gathered features needs for an exact gradient. with_grad=False gathers plain values and puts this process's
    own tensor back in its slot, so at least the local features keep their gradient (open_clip's
    `gather_with_grad=False`).
    """
    if world_size() == 1:
        return features
    if with_grad:
        return _AllGatherWithGrad.apply(features)
    gathered = [torch.empty_like(features) for _ in range(world_size())]
    dist.all_gather(gathered, features.detach().contiguous())
    gathered[rank()] = features
    return torch.cat(gathered)


def from_main_process(compute):
    """`compute()` run on rank 0 only, its result (any picklable value) sent to every process. An exception on
    rank 0 is raised on every process too, so none is left waiting in the broadcast."""
    if world_size() == 1:
        return compute()
    box = [None]
    if rank() == 0:
        try:
            box = [("ok", compute())]
        except Exception as e:  # re-raised below, on every process
            box = [("error", e)]
    dist.broadcast_object_list(box, src=0)
    status, value = box[0]
    if status == "error":
        raise value
    return value
