"""Process layout: one process on CPU or one GPU, or one process per GPU under torchrun with FSDP2.

Under torchrun (WORLD_SIZE > 1) every rank builds the same full model (same seed), then `fully_shard` wraps each
decoder layer (the MTP layers included) and finally the root, so each layer's weights are gathered just in time and
resharded after use. Parameters stay fp32 in FSDP (no MixedPrecisionPolicy): compute precision comes from autocast,
exactly as on one GPU, and A_log / dt_bias never see bf16.

Written for several GPUs and exercised on CPU in one process only; the multi-GPU path has not run in the tests.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass
class Layout:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def setup(device: str = "auto") -> Layout:
    """Pick the device; join the process group when started by torchrun with more than one process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("run.device = 'cuda' but torch sees no CUDA device")
        torch.cuda.set_device(local)
        dev = torch.device("cuda", local)
    else:
        dev = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo", device_id=dev
                                if dev.type == "cuda" else None)
    return Layout(rank, world, local, dev)


def teardown(layout: Layout) -> None:
    if layout.distributed and dist.is_initialized():
        # every rank past its last collective (the main rank may still be saving) before the group goes: a rank
        # tearing gloo down while its peer still talks to it aborted once in CI ("terminate called without an
        # active exception", 2026-11-24)
        try:
            dist.barrier()
        finally:
            dist.destroy_process_group()


def shard(root: nn.Module, layers: list[nn.Module]) -> None:
    """FSDP2: one unit per decoder layer, then the root (embeddings, final norms, lm_head, MTP fc)."""
    from torch.distributed.fsdp import fully_shard
    for layer in layers:
        fully_shard(layer)
    fully_shard(root)


def all_reduce_mean(values: torch.Tensor, layout: Layout) -> torch.Tensor:
    if layout.distributed:
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
        values /= layout.world_size
    return values


def barrier(layout: Layout) -> None:
    if layout.distributed:
        dist.barrier()


# ---- full (unsharded) state for checkpoints ----------------------------------------------------------------------
def full_model_state(root: nn.Module) -> dict[str, torch.Tensor]:
    """Every weight, gathered on CPU (on rank 0; other ranks get an empty dict)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    return get_model_state_dict(root, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def full_optimizer_state(root: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
    return get_optimizer_state_dict(root, optimizer,
                                    options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_full_optimizer_state(root: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Shard a full optimizer state (as saved by full_optimizer_state) back onto every rank."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
    set_optimizer_state_dict(root, optimizer, state, options=StateDictOptions(full_state_dict=True))
