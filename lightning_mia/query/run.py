"""Run a query to completion: resume from complete shards, refuse foreign ones, mark done.

    table = run_query("runs/demo/diffusion-target-000/checkpoints/last.ckpt")

Re-running a complete query does nothing; a killed one is completed by querying only the
sample ids that no shard holds yet (per-sample seeds make the result equal to one run). The
first `EXAMPLES_PER_CLASS` members and non-members (by sample id) keep their pictures for the
report's examples.png; the query declares its W&B lineage (model, splits, encoder -> shards).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from lightning.pytorch import Trainer
from lightning.pytorch.loggers import Logger
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from lightning_mia.paths import ExperimentLayout
from lightning_mia.query.module import QueryError, QueryModule
from lightning_mia.query.shards import (
    QueryTable,
    ShardError,
    load_query_table,
    mark_complete,
    read_complete,
    read_shard,
    shard_paths,
)
from lightning_mia.query.writer import ShardWriter

EXAMPLES_PER_CLASS = 8  # members and as many non-members keep their images (examples.png)


def query_folder(module: QueryModule) -> Path:
    """`<experiment>/queries/<run-name>/` of the queried model (`<run-name>@<captioner>/` with
    a captioner's captions); `.../row-<r>/` when it is queried on another row's samples
    (`QueryModule(row=r)`)."""
    folder = ExperimentLayout(module.card.experiment).queries(
        module.run_name, module.hparams.captioner
    )
    row = module.hparams.row
    return folder if row is None else folder / f"row-{row:03d}"


def done_sample_ids(folder: Path, metadata: dict[str, str]) -> set[int]:
    """Sample ids already in `folder`'s shards; ShardError if a shard is of another query."""
    done: set[int] = set()
    for path in shard_paths(folder):
        tensors, meta = read_shard(path)
        diff = {k: (meta.get(k), v) for k, v in metadata.items() if meta.get(k) != v}
        if diff:
            detail = "; ".join(
                f"{k}: shard has {a!r}, this query {b!r}" for k, (a, b) in diff.items()
            )
            raise ShardError(
                f"query folder {folder} holds shards of another query ({path.name}: {detail}). "
                "Nothing was overwritten: remove the folder or query into another one."
            )
        done.update(tensors["sample_id"].tolist())
    return done


def expected_sample_ids(datamodule: object, model_index: int) -> list[int]:
    """Members and non-members of a row of splits.json (the model's, or the one it queries)."""
    row = datamodule.splits.row(model_index)
    return sorted([*row.members, *row.nonmembers])


def example_sample_ids(datamodule: object, model_index: int, k: int = EXAMPLES_PER_CLASS) -> set:
    """The samples whose pictures the query keeps: the first `k` members and `k` non-members
    by sample id (the same whatever the ranks, batches or interruptions)."""
    row = datamodule.splits.rows[model_index]
    return {*sorted(row.members)[:k], *sorted(row.nonmembers)[:k]}


def execute_query(module: QueryModule, datamodule: object, trainer: Trainer) -> QueryTable | None:
    """Query what is missing with `trainer`, then merge, check and mark the folder complete.

    Returns the merged table on global rank 0 (None elsewhere).
    """
    folder = query_folder(module)
    meta = module.shard_metadata()
    if datamodule.model_index != module.card.model_index:
        raise QueryError(
            f"data.model_index is {datamodule.model_index} but {module.hparams.ckpt} is model "
            f"{module.card.model_index}"
        )
    datamodule.prepare_data()
    datamodule.setup("predict")
    if datamodule.splits.hash != module.card.splits_hash:
        raise QueryError(
            f"{module.hparams.ckpt} was trained on splits {module.card.splits_hash[:12]}, but "
            f"{datamodule.layout.splits} has hash {datamodule.splits.hash[:12]}: the checkpoint "
            "belongs to another experiment"
        )
    complete = read_complete(folder)
    if complete is not None and all(complete.get(k) == v for k, v in meta.items()):
        rank_zero_info(f"query {folder} is complete; nothing to do")
        if not trainer.is_global_zero:
            return None
        _log_lineage(trainer, module, folder, queried_now=False)
        return load_query_table(folder)
    done = done_sample_ids(folder, meta)
    row = module.hparams.row
    expected = expected_sample_ids(datamodule, module.card.model_index if row is None else row)
    datamodule.exclude_ids, datamodule.query_row = done, row
    missing = len(set(expected) - done)
    what = module.run_name + ("" if row is None else f" on row {row}'s samples (for LiRA)")
    rank_zero_info(f"querying {what}: {missing} of {len(expected)} samples to go")
    start = time.perf_counter()
    writer = ShardWriter(folder, meta, example_sample_ids(datamodule, module.card.model_index))
    if missing:
        trainer.callbacks.append(writer)
        trainer.predict(module, datamodule=datamodule, return_predictions=False)
        trainer.callbacks.remove(writer)
    trainer.strategy.barrier()
    if not trainer.is_global_zero:
        return None
    table = load_query_table(folder)
    got = set(table.sample_id.tolist())
    if got != set(expected):
        raise ShardError(
            f"query folder {folder}: holds {len(got)} samples, expected {len(expected)} "
            f"({len(set(expected) - got)} missing, {len(got - set(expected))} foreign)"
        )
    mark_complete(folder, len(table), meta)
    rank_zero_info(f"query {what}: done in {time.perf_counter() - start:.0f} s")
    _log_query(trainer, table, writer.examples)
    _log_lineage(trainer, module, folder, queried_now=True)
    return table


def _log_lineage(trainer: Trainer, module: QueryModule, folder: Path, queried_now: bool) -> None:
    """W&B: the query used the model, the splits and the encoder; made (or read) the shards."""
    from lightning_mia.lineage import query_lineage, splits_summary
    from lightning_mia.reporting import has_wandb_run, log_config, log_lineage

    if not has_wandb_run(trainer.logger):
        return
    used, made = query_lineage(module.hparams.ckpt, folder, module.encoder_folder, queried_now)
    log_config(trainer.logger, {"splits": splits_summary(ExperimentLayout(module.card.experiment))})
    log_lineage(trainer.logger, used, made)


def _log_query(trainer: Trainer, table: QueryTable, examples: list[dict]) -> None:
    """W&B: feature histograms by membership, and a few query images beside their generations
    (those this process saw; none under ddp_spawn, whose workers hold them)."""
    from lightning_mia.reporting import log_feature_histograms, log_query_table

    log_feature_histograms(trainer.logger, table.features, table.is_member)
    if examples:
        log_query_table(
            trainer.logger,
            torch.cat([e["query"] for e in examples]),
            torch.cat([e["generated"] for e in examples]),
            [c for e in examples for c in e["caption"]],
            torch.cat([e["is_member"].cpu() for e in examples]),
        )


def query_trainer(
    accelerator: str = "auto",
    devices: int | str = "auto",
    strategy: str = "auto",
    num_nodes: int = 1,
    precision: str | None = None,
    logger: Logger | bool = False,
    enable_progress_bar: bool = False,
    default_root_dir: str | None = None,
) -> Trainer:
    """The Trainer of a query (Lightning resolves `auto`; no distributed sampler: the query
    data shards itself). Settings Lightning refuses become one QueryError line."""
    try:
        return Trainer(
            accelerator=accelerator,
            devices=devices,
            strategy=strategy,
            num_nodes=num_nodes,
            precision=precision,
            logger=logger,
            enable_progress_bar=enable_progress_bar,
            enable_model_summary=False,
            enable_checkpointing=False,
            default_root_dir=default_root_dir,
            use_distributed_sampler=False,
        )
    except (MisconfigurationException, ValueError) as err:
        raise QueryError(
            f"query devices: accelerator={accelerator!r}, devices={devices!r}, "
            f"strategy={strategy!r}, num_nodes={num_nodes}: {err}"
        ) from None


def run_query(
    ckpt: str,
    num_images: int = 4,
    seed: int = 0,
    feature_groups: list[str] | None = None,
    encoder: str = "",
    captioner: str = "",
    save_images: bool = False,
    signals: list[str] | None = None,
    signal_timesteps: list[int] | None = None,
    batch_size: int | None = None,
    row: int | None = None,
    accelerator: str = "auto",
    devices: int | str = "auto",
    strategy: str = "auto",
    num_nodes: int = 1,
    precision: str | None = None,
    progress: bool = True,
    logger: Logger | bool = False,
) -> QueryTable | None:
    """Query the model of `ckpt` for its row of splits.json, or for another `row`'s samples
    (see `execute_query`).

    Several devices: each rank queries its share (`ShardedSampler`: every sample once) and
    writes its own shards; rank 0 merges them. `strategy="ddp"` starts the other ranks by
    re-running this process's command line when the first query runs (they then run the same
    command up to the same query, so call this from a command whose every rank does the same
    work, as `attack.py` does); `"ddp_spawn"` starts workers for each query instead.
    """
    from lightning_mia.data.datamodule import MembershipDataModule

    module = QueryModule(
        ckpt,
        num_images=num_images,
        seed=seed,
        feature_groups=feature_groups,
        encoder=encoder,
        captioner=captioner,
        save_images=save_images,
        signals=signals,
        signal_timesteps=signal_timesteps,
        row=row,
    )
    datamodule = MembershipDataModule.from_experiment(
        module.card.experiment, model_index=module.card.model_index, query_batch_size=batch_size
    )
    trainer = query_trainer(
        accelerator,
        devices,
        strategy,
        num_nodes,
        precision=precision,
        logger=logger,
        enable_progress_bar=progress,
        default_root_dir=str(query_folder(module)),
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
