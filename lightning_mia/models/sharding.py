"""Sharded training (FSDP2) of the parts an optimizer updates, for a full fine-tune whose float32
weights and AdamW states do not fit one GPU (FLUX.1's 12 B transformer: 48 GB of weights, 96 GB
of optimizer states):

    python train.py fit --config configs/flow/flux-pretrained.yaml   # its trainer.strategy:
    #   class_path: lightning.pytorch.strategies.ModelParallelStrategy
    #   init_args: {data_parallel_size: 8, tensor_parallel_size: 1,
    #               save_distributed_checkpoint: false}

Under Lightning's `ModelParallelStrategy` a latent family's `configure_model` checks the settings
(`data_parallel_mesh`) and shards (`shard_trained_parts`): each trained part (the transformer or
UNet; the text encoders a full fine-tune trains) is cut into one FSDP2 unit per block of its
outermost `nn.ModuleList`s (the transformer blocks, a text encoder's layers) and one for the
rest, over the strategy's data-parallel mesh. Weights nothing trains (the autoencoder, frozen
text encoders) stay whole on every rank, in `frozen_dtype`. No family names are needed: the
blocks are found by structure. The strategy must save one full checkpoint
(`save_distributed_checkpoint: false`), which every later stage reads like any other; EMA
weights are not sharded (refused). Generation during training (the preview grid) runs on every
rank, since a sharded forward gathers each block from all of them.

PyTorch's `fully_shard` runs on CPU processes with gloo, which is how the tests train it.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch import nn

from lightning_mia.errors import UserError


class ShardingError(UserError):
    """A setting that sharded training cannot honour."""


def block_lists(part: nn.Module) -> list[nn.ModuleList]:
    """The outermost `nn.ModuleList`s of `part` (its repeated blocks), in module order: a list
    inside another one's block (an attention's `to_out`) is not one of them."""
    chosen: list[str] = []
    for name, module in part.named_modules():
        if isinstance(module, nn.ModuleList) and not any(name.startswith(f"{c}.") for c in chosen):
            chosen.append(name)
    return [part.get_submodule(name) for name in chosen]


def is_sharded(module: nn.Module) -> bool:
    """Whether `fully_shard` has been applied to `module` (its parameters are DTensors)."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in module.parameters())


def data_parallel_mesh(mesh: Any, strategy: object, ema: bool) -> Any:
    """The data-parallel dimension of the strategy's device mesh, or one ShardingError naming
    every setting sharded training cannot honour: EMA weights (`ema`), a distributed checkpoint
    (the later stages read one file), tensor parallelism (the parts are sharded, not split)."""
    problems = []
    if ema:
        problems.append("ema_decay > 0 with a sharded strategy: EMA copies are not sharded")
    # Lightning keeps the setting private: a checkpoint folder of shards is what it would write
    if getattr(strategy, "_save_distributed_checkpoint", False):
        problems.append(
            "ModelParallelStrategy must save one full checkpoint for the later stages: set "
            "save_distributed_checkpoint: false (as configs/flow/flux-pretrained.yaml)"
        )
    names = mesh.mesh_dim_names or ()
    if "tensor_parallel" in names and mesh["tensor_parallel"].size() > 1:
        problems.append(
            f"tensor_parallel_size {mesh['tensor_parallel'].size()}: the parts are sharded, not "
            "split by tensor parallelism; set tensor_parallel_size: 1 and data_parallel_size to "
            "devices x nodes"
        )
    if problems:
        raise ShardingError("; ".join(problems))
    return mesh["data_parallel"] if "data_parallel" in names else mesh


def shard_trained_parts(module: nn.Module, parts: Iterable[nn.Module], mesh: Any) -> None:
    """`fully_shard` each of `parts` (of `module`) over `mesh`: one unit per block of its
    outermost module lists, then the part itself; a part already sharded is left as it is
    (Lightning may call `configure_model` more than once). Then every parameter of `module` that
    requires grad must be sharded: `ModelParallelStrategy` does not wrap the module in DDP, so an
    unsharded trained parameter would not be averaged over the ranks."""
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    for part in parts:
        if is_sharded(part):
            continue
        for blocks in block_lists(part):
            for block in blocks:
                fully_shard(block, mesh=mesh)
        fully_shard(part, mesh=mesh)
    params = module.named_parameters()
    left = [n for n, p in params if p.requires_grad and not isinstance(p, DTensor)]
    if left:
        raise ShardingError(
            f"{len(left)} trained parameters are outside the sharded parts (first: {left[0]}): "
            "their gradients would not be averaged over the ranks"
        )
