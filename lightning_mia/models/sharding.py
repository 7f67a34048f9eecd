"""Sharded training (FSDP2) of the parts an optimizer updates, for a full fine-tune whose float32
weights and AdamW states do not fit one GPU (FLUX.1's 12 B transformer: 48 GB of weights, 96 GB
of optimizer states):

    python train.py fit --config configs/flow/flux-pretrained.yaml   # its trainer.strategy:
    #   class_path: lightning.pytorch.strategies.ModelParallelStrategy
    #   init_args: {data_parallel_size: 8, tensor_parallel_size: 1,
    #               save_distributed_checkpoint: false}

Under Lightning's `ModelParallelStrategy` a latent family's `configure_model` calls
`shard_trained_parts`: each trained part (the transformer or UNet; the text encoders a full
fine-tune trains; under LoRA the part that holds the adapters) is cut into one FSDP2 unit per
block of its outermost `nn.ModuleList`s (the transformer blocks, a text encoder's layers) and one
for the rest, over the strategy's data-parallel mesh. Weights nothing trains (the autoencoder,
frozen text encoders) stay whole on every rank, in `frozen_dtype`. No family names are needed:
the blocks are found by structure. The strategy must save one full checkpoint
(`save_distributed_checkpoint: false`), which every later stage reads like any other; EMA
weights are not sharded (refused). Generation during training (the preview grid) runs on every
rank, since a sharded forward gathers each block from all of them.

PyTorch's `fully_shard` runs on CPU processes with gloo, which is how the tests train it.
"""

from __future__ import annotations

from collections.abc import Iterable

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


def shard_trained_parts(parts: Iterable[nn.Module], mesh: object) -> None:
    """`fully_shard` each of `parts` over `mesh`: one unit per block of its outermost module
    lists, then the part itself. A part already sharded is left as it is (Lightning may call
    `configure_model` more than once)."""
    from torch.distributed.fsdp import fully_shard

    for part in parts:
        if is_sharded(part):
            continue
        for blocks in block_lists(part):
            for block in blocks:
                fully_shard(block, mesh=mesh)
        fully_shard(part, mesh=mesh)


def check_all_trained_sharded(module: nn.Module) -> None:
    """Every parameter that requires grad is sharded: `ModelParallelStrategy` does not wrap the
    module in DDP, so an unsharded trained parameter would not be averaged over the ranks."""
    from torch.distributed.tensor import DTensor

    params = module.named_parameters()
    left = [n for n, p in params if p.requires_grad and not isinstance(p, DTensor)]
    if left:
        raise ShardingError(
            f"{len(left)} trained parameters are outside the sharded parts (first: {left[0]}): "
            "their gradients would not be averaged over the ranks"
        )
