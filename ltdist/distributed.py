"""The one place where models and losses touch ``torch.distributed``: a gather with gradient.

Losses that compare samples across the batch (GCL, QCL, COA over batch columns) call
:func:`gather_with_grad` to see the global batch; per-image losses (COA over the queries)
gather only their item counts, to normalise by the global count. Rank and world size come
from ``torch.distributed`` itself (never from environment variables); without an initialised
process group, or with one process, the gather is the identity and the rank is 0.

Gradient convention (the one of ``torch.distributed.nn.functional.all_gather`` and open_clip):
the backward of the gather sums the gradient of the global tensor over ranks (all-reduce) and
returns each rank its own slice. If every rank's loss is its share of the global loss
(``mean over ranks of L_r == L``), the gradient a rank receives for its local input is
``world * dL/dx_local``, and DDP's averaging over ranks turns the parameter gradients into
exactly ``dL/dtheta`` of the 1-process run on the global batch.

Every rank must make the same sequence of gathers (forward) and run backward through them
(the backward is a collective too), or the processes wait for each other forever.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["gather_with_grad", "rank_and_world"]


def rank_and_world(group: dist.ProcessGroup | None = None) -> tuple[int, int]:
    """(rank, world size) from ``torch.distributed``; (0, 1) when no process group is up."""
    if not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


class _AllGather(torch.autograd.Function):
    """all_gather along dim 0; backward: all-reduce (sum) the global gradient, keep my slice."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group, rank: int, world: int) -> torch.Tensor:
        ctx.group, ctx.rank, ctx.local = group, rank, x.shape[0]
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x, group=group)
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        start = ctx.rank * ctx.local
        return grad[start : start + ctx.local], None, None, None


_MAX_DIMS = 8


def _check_shapes(x: torch.Tensor, group, world: int) -> None:
    if x.dim() > _MAX_DIMS:
        raise ValueError(f"gather_with_grad supports up to {_MAX_DIMS} dims, got {x.dim()}")
    # A fixed-length record (ndim, shape..., -1 padding), so ranks with other ndims compare too.
    shape = torch.full((_MAX_DIMS + 1,), -1, dtype=torch.int64, device=x.device)
    shape[: x.dim() + 1] = torch.tensor([x.dim(), *x.shape], dtype=torch.int64)
    shapes = [torch.empty_like(shape) for _ in range(world)]
    dist.all_gather(shapes, shape, group=group)
    if any(not torch.equal(s, shapes[0]) for s in shapes):
        seen = [tuple(int(v) for v in s[1 : 1 + int(s[0])]) for s in shapes]
        raise ValueError(
            f"gather_with_grad needs the same tensor shape on every rank, got {seen} by rank: "
            "use the same per-process batch size on every rank (drop or pad the last batch) "
            "and pad text to a fixed length (tokenizer padding='max_length')"
        )


def gather_with_grad(
    x: torch.Tensor, group: dist.ProcessGroup | None = None, check_shapes: bool = True
) -> tuple[torch.Tensor, int, int]:
    """Concatenate ``x`` (b, ...) from all ranks into (world * b, ...), keeping the gradient.

    Returns ``(global_x, rank, world)``; rank r's rows are ``global_x[r * b:(r + 1) * b]``
    (they are ``x`` itself in value). Identity when ``torch.distributed`` is not initialised
    or the world has one process. All ranks must pass the same shape; ``check_shapes`` verifies
    it with one small extra collective and raises a clear error otherwise (without it a
    mismatch hangs or fails inside the backend).
    """
    rank, world = rank_and_world(group)
    if world == 1:
        return x, 0, 1
    if check_shapes:
        _check_shapes(x, group, world)
    if x.dtype == torch.bool:  # some backends do not gather bool tensors
        return _AllGather.apply(x.to(torch.uint8), group, rank, world).bool(), rank, world
    return _AllGather.apply(x, group, rank, world), rank, world
