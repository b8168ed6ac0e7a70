"""torchrun support: process-group setup and gathering negatives across ranks.

Under `torchrun --nproc_per_node N`, every rank embeds its own share of the batch; the loss is
computed over all N shares so each pair sees the whole global batch as negatives.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def setup(device_type: str) -> DistInfo:
    """Join the process group when launched by torchrun; a plain process otherwise."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistInfo()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
    return DistInfo(dist.get_rank(), int(os.environ.get("LOCAL_RANK", "0")), world_size)


def teardown(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()


def gather_with_grad(x: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Concatenate x from all ranks; gradients flow back through this rank's own slice only.

    Each rank then holds the exact gradient of the global loss w.r.t. its own embeddings; DDP
    averages gradients over ranks, so the caller multiplies the loss by world_size.
    """
    if not info.enabled:
        return x
    parts = [torch.empty_like(x) for _ in range(info.world_size)]
    dist.all_gather(parts, x.detach().contiguous())
    parts[info.rank] = x
    return torch.cat(parts)


def broadcast_value(value: float, info: DistInfo, device: torch.device) -> float:
    """Rank 0's number (the validation loss) taken by every rank, so all decide alike."""
    if not info.enabled:
        return value
    tensor = torch.tensor([value], dtype=torch.float64, device=device)
    dist.broadcast(tensor, src=0)
    return float(tensor.item())
