"""Query one model: `run_query` builds the `QueryModule`, its data and a Trainer, and runs it
to completion (`query.execute`); `Devices` says where.

    table = run_query("runs/demo/diffusion-target-000/checkpoints/last.ckpt", QuerySpec())
"""

from __future__ import annotations

from dataclasses import dataclass

from lightning.pytorch import Trainer
from lightning.pytorch.loggers import Logger
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from lightning_mia.query.execute import execute_query
from lightning_mia.query.module import QueryError, QueryModule
from lightning_mia.query.shards import QueryTable
from lightning_mia.specs.query import QuerySpec


@dataclass(frozen=True)
class Devices:
    """Where a query runs (Lightning's Trainer settings; `auto` lets Lightning choose).

    Args:
        accelerator: cpu | gpu | auto.
        devices: devices per node (a number, a list, or auto).
        strategy: auto | ddp | ddp_spawn.
        num_nodes: nodes (a cluster job: srun, torchrun).
        precision: Lightning precision of the generation (None = the default, 32-true).
    """

    accelerator: str = "auto"
    devices: int | str = "auto"
    strategy: str = "auto"
    num_nodes: int = 1
    precision: str | None = None


def query_trainer(
    devices: Devices = Devices(),
    logger: Logger | bool = False,
    enable_progress_bar: bool = False,
    default_root_dir: str | None = None,
) -> Trainer:
    """The Trainer of a query (Lightning resolves `auto`; no distributed sampler: the query
    data shards itself). Settings Lightning refuses become one QueryError line."""
    try:
        return Trainer(
            accelerator=devices.accelerator,
            devices=devices.devices,
            strategy=devices.strategy,
            num_nodes=devices.num_nodes,
            precision=devices.precision,
            logger=logger,
            enable_progress_bar=enable_progress_bar,
            enable_model_summary=False,
            enable_checkpointing=False,
            default_root_dir=default_root_dir,
            use_distributed_sampler=False,
        )
    except (MisconfigurationException, ValueError) as err:
        raise QueryError(f"query devices {devices}: {err}") from None


def run_query(
    ckpt: str,
    query: QuerySpec = QuerySpec(),
    row: int | None = None,
    devices: Devices = Devices(),
    save_images: bool = False,
    batch_size: int | None = None,
    progress: bool = True,
    logger: Logger | bool = False,
) -> QueryTable | None:
    """Query the model of `ckpt` as `query` says, for its row of splits.json or for another
    `row`'s samples (see `execute_query`).

    Several devices: each rank queries its share (`ShardedSampler`: every sample once) and
    writes its own shards; rank 0 merges them. `strategy="ddp"` starts the other ranks by
    re-running this process's command line when the first query runs (they then run the same
    command up to the same query, so call this from a command whose every rank does the same
    work, as `attack.py` does); `"ddp_spawn"` starts workers for each query instead.
    """
    from lightning_mia.data.datamodule import MembershipDataModule

    module = QueryModule(ckpt, query=query, row=row, save_images=save_images)
    datamodule = MembershipDataModule.from_experiment(
        module.card.experiment, model_index=module.card.model_index, query_batch_size=batch_size
    )
    trainer = query_trainer(
        devices, logger=logger, enable_progress_bar=progress, default_root_dir=str(module.folder)
    )
    return execute_query(module, datamodule, trainer)


def leave_process_group() -> None:
    """End a multi-process query run: every rank waits for the others, then leaves the
    process group, so rank 0 goes on as a single process (the attack classifiers train there,
    and nothing it does can wait on a rank that has finished). A no-op in one process."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
