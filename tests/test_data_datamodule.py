"""MembershipDataModule: batches of the contract, rows and pools, each query once under DDP."""

import json

import lightning.pytorch as pl
import pytest
import torch

from lightning_mia.data import MembershipDataModule, ShapesSource, ShardedSampler
from lightning_mia.query.run import leave_process_group


def make_dm(tmp_path, **kw):
    args = {"experiment": str(tmp_path / "exp"), "source": ShapesSource(64), "num_shadows": 2}
    return MembershipDataModule(**{**args, **kw})


def test_train_and_query_batches(tmp_path):
    dm = make_dm(tmp_path, batch_size=8, query_batch_size=5, model_index=1)
    dm.prepare_data()
    dm.setup("fit")
    row = dm.splits.rows[1]
    assert dm.layout.splits.is_file() and dm.num_train_samples == len(row.members) == 16
    batches = list(dm.train_dataloader())
    assert len(batches) == 2  # 16 members, batch 8
    b = batches[0]
    assert set(b) == {"pixel_values", "caption", "sample_id"}
    assert b["pixel_values"].shape == (8, 3, 32, 32) and b["pixel_values"].dtype == torch.float32
    assert b["sample_id"].dtype == torch.int64 and len(b["caption"]) == 8
    seen = torch.cat([b["sample_id"] for b in batches]).tolist()
    assert sorted(seen) == row.members and seen != row.members  # all members, shuffled
    assert b["caption"][0] == dm.source.caption(int(b["sample_id"][0]))

    queries = list(dm.predict_dataloader())
    ids = torch.cat([q["sample_id"] for q in queries]).tolist()
    assert ids == row.queries  # sample-id order
    member = torch.cat([q["is_member"] for q in queries])
    assert member.dtype == torch.bool and member.tolist() == [i in row.members for i in ids]
    dm.exclude_ids = set(ids[:10])
    assert [int(i) for q in dm.predict_dataloader() for i in q["sample_id"]] == ids[10:]
    assert len(dm.query_dataset(row=0)) == len(dm.splits.rows[0].queries)


def test_auxiliary_training_split_previews_and_drop_last(tmp_path):
    dm = make_dm(tmp_path, train_split="auxiliary", batch_size=100, resolution=16)
    dm.setup()  # without a trainer, setup also makes the splits
    assert dm.train_ids == dm.splits.aux_pool and dm.num_train_samples == 32
    (batch,) = list(dm.train_dataloader())  # smaller than a batch: kept, not dropped
    assert batch["pixel_values"].shape == (32, 3, 16, 16)
    members = make_dm(tmp_path, num_preview=4)
    members.setup()
    previews = members.preview_captions
    assert len(previews) == 4 and previews == members.preview_captions
    member_captions = {members.source.caption(i) for i in members.splits.rows[0].members}
    assert set(previews) <= member_captions
    dm = make_dm(tmp_path, batch_size=5)
    dm.setup()
    assert dm.train_dataloader().drop_last and len(dm.train_dataloader()) == 16 // 5


def test_config_mismatch_and_bad_row(tmp_path):
    make_dm(tmp_path).setup()
    with pytest.raises(ValueError, match="num_shadows=2 \\(asked 1\\)"):
        make_dm(tmp_path, num_shadows=1).setup()
    dm = make_dm(tmp_path, model_index=3)
    dm.setup()
    with pytest.raises(ValueError, match="model_index 3 not in splits"):
        dm.train_dataloader()


def test_sharded_sampler_serves_each_index_once():
    data = list(range(11))
    shards = [list(ShardedSampler(data, num_replicas=3, rank=r)) for r in range(3)]
    assert [len(s) for s in shards] == [4, 4, 3]
    assert sorted(sum(shards, [])) == data
    assert list(ShardedSampler(data)) == data  # no process group: everything


class RecordIds(pl.LightningModule):
    """Writes the sample ids (and membership) each rank is served."""

    def __init__(self, out_dir: str) -> None:
        super().__init__()
        self.out_dir = out_dir
        self.layer = torch.nn.Linear(1, 1)
        self.seen = []

    def predict_step(self, batch, batch_idx):
        self.seen += list(zip(batch["sample_id"].tolist(), batch["is_member"].tolist()))
        return None

    def on_predict_end(self):
        path = f"{self.out_dir}/rank{self.global_rank}.json"
        with open(path, "w") as f:
            json.dump(self.seen, f)
        # both workers wait for each other and leave the gloo group before they exit (a worker
        # that exited holding it once aborted in gloo's teardown under the full suite)
        leave_process_group()


@pytest.mark.slow
def test_ddp_predict_serves_each_query_exactly_once(tmp_path):
    # 13 queries over 2 ranks: Lightning's padding would serve one twice
    dm = make_dm(tmp_path, target_size=13, query_batch_size=4)
    trainer = pl.Trainer(
        accelerator="cpu",
        strategy="ddp_spawn",
        devices=2,
        logger=False,
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
    )
    trainer.predict(RecordIds(str(tmp_path)), datamodule=dm, return_predictions=False)
    per_rank = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert sorted(len(s) for s in per_rank) == [6, 7]
    ids = [i for seen in per_rank for i, _ in seen]
    splits = make_dm(tmp_path, target_size=13)
    splits.setup()
    row = splits.splits.rows[0]
    assert len(row.queries) == 13
    assert sorted(ids) == row.queries  # union is everything, nothing twice
    assert all(m == (i in row.members) for seen in per_rank for i, m in seen)
