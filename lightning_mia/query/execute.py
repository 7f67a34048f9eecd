"""Run a query to completion with a given trainer: resume from complete shards, refuse
foreign ones, mark done.

    table = execute_query(module, datamodule, trainer)   # what `run_query` and train.py call

Re-running a complete query does nothing; a killed one is completed by querying only the
sample ids that no shard holds yet (per-sample seeds make the result equal to one run). The
first `EXAMPLES_PER_CLASS` members and non-members (by sample id) keep their pictures for the
report's examples.png; the query declares its W&B lineage (model, splits, encoder -> shards).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Trainer
from lightning.pytorch.utilities import rank_zero_info

from lightning_mia.errors import UserError
from lightning_mia.graybox.encodings import CAPTION_MEMO, MEMO
from lightning_mia.query.shards import (
    QueryTable,
    ShardError,
    load_query_table,
    mark_complete,
    read_complete,
    read_shard,
    record_difference,
    shard_paths,
)
from lightning_mia.query.writer import ShardWriter
from lightning_mia.specs.query import QueryRecord

EXAMPLES_PER_CLASS = 8  # members and as many non-members keep their images (examples.png)


def batches(n: int) -> str:
    return f"{n} batch's" if n == 1 else f"{n} batches'"


def reused_line(images: int, captions: int) -> str:
    """What the query took from earlier models or batches (graybox/encodings.py), for its
    done-line."""
    parts = [f"{batches(images)} image encodings"] if images else []
    parts += [f"{batches(captions)} word importances (CLiD)"] if captions else []
    return f"; {' and '.join(parts)} reused, made before on the same inputs" if parts else ""


def done_sample_ids(folder: Path, record: QueryRecord) -> set[int]:
    """Sample ids already in `folder`'s shards; ShardError if a shard is of another query."""
    done: set[int] = set()
    for path in shard_paths(folder):
        tensors, theirs = read_shard(path)
        if theirs != record:
            raise ShardError(
                f"query folder {folder} holds shards of another query ({path.name}: "
                f"{record_difference(theirs, record)}). Nothing was overwritten: remove the "
                "folder or query into another one."
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


def swapped_captions(datamodule: object, sample_ids: list[int], seed: int) -> dict[int, str]:
    """The swapped-caption control: each sample gets another sample's caption, a seeded
    derangement of the queried samples (a random cyclic order, each taking the next one's)."""
    ids = sorted(sample_ids)
    order = torch.randperm(len(ids), generator=torch.Generator().manual_seed(seed)).tolist()
    cycle = [ids[i] for i in order]
    source = datamodule.source
    return {s: source.caption(cycle[(k + 1) % len(cycle)]) for k, s in enumerate(cycle)}


def execute_query(module: Any, datamodule: object, trainer: Trainer) -> QueryTable | None:
    """Query what is missing with `trainer`, then merge, check and mark the folder complete.

    Returns the merged table on global rank 0 (None elsewhere).
    """
    folder = module.folder
    record = module.record()
    if datamodule.model_index != module.card.model_index:
        raise UserError(
            f"data.model_index is {datamodule.model_index} but {module.hparams.ckpt} is model "
            f"{module.card.model_index}"
        )
    datamodule.prepare_data()
    datamodule.setup("predict")
    if datamodule.splits.hash != module.card.splits_hash:
        raise UserError(
            f"{module.hparams.ckpt} was trained on splits {module.card.splits_hash[:12]}, but "
            f"{datamodule.layout.splits} has hash {datamodule.splits.hash[:12]}: the checkpoint "
            "belongs to another experiment"
        )
    if read_complete(folder) == record:
        rank_zero_info(f"query {folder} is complete; nothing to do")
        if not trainer.is_global_zero:
            return None
        _log_lineage(trainer, module, folder, queried_now=False)
        return load_query_table(folder)
    done = done_sample_ids(folder, record)
    row = module.hparams.row
    expected = expected_sample_ids(datamodule, module.card.model_index if row is None else row)
    datamodule.exclude_ids, datamodule.query_row = done, row
    if module.spec.captions == "swapped-caption":
        module.caption_of = swapped_captions(datamodule, expected, module.spec.seed)
    missing = len(set(expected) - done)
    what = module.run_name + ("" if row is None else f" on row {row}'s samples (for LiRA)")
    what += "" if module.spec.captions == "ground-truth" else f" ({module.spec.captions})"
    rank_zero_info(f"querying {what}: {missing} of {len(expected)} samples to go")
    start, hits = time.perf_counter(), (MEMO.hits, CAPTION_MEMO.hits)
    writer = ShardWriter(folder, record, example_sample_ids(datamodule, module.card.model_index))
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
    mark_complete(folder, len(table), record)
    again = reused_line(MEMO.hits - hits[0], CAPTION_MEMO.hits - hits[1])
    rank_zero_info(f"query {what}: done in {time.perf_counter() - start:.0f} s{again}")
    _log_query(trainer, table, writer.examples)
    _log_lineage(trainer, module, folder, queried_now=True)
    return table


def _log_lineage(trainer: Trainer, module: Any, folder: Path, queried_now: bool) -> None:
    """W&B: the query used the model, the splits and the encoder; made (or read) the shards."""
    from lightning_mia.lineage import query_lineage, splits_summary
    from lightning_mia.reporting import has_wandb_run, log_config, log_lineage

    if not has_wandb_run(trainer.logger):
        return
    used, made = query_lineage(module.hparams.ckpt, folder, module.folders.encoder, queried_now)
    log_config(
        trainer.logger,
        {"splits": splits_summary(module.layout), "query": module.spec.to_dict()},
    )
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
