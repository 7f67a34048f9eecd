"""A model queried on another row's samples (a shadow on the target's, for offline LiRA): the
samples of that row, labelled with the queried model's own membership, in their own folder."""

from lightning_mia.data import MembershipDataModule, ShapesSource


def _queried(tmp_path, shadow_pool):
    dm = MembershipDataModule(
        str(tmp_path / "exp"),
        ShapesSource(96),
        model_index=1,
        num_shadows=2,
        target_size=32,
        aux_size=32,
        shadow_pool=shadow_pool,
        query_batch_size=7,
    )
    dm.prepare_data()
    dm.setup("predict")
    dm.query_row = 0
    batches = list(dm.predict_dataloader())
    ids = [int(i) for b in batches for i in b["sample_id"]]
    member = [bool(m) for b in batches for m in b["is_member"]]
    return dm.splits, ids, member


def test_shadow_on_the_target_samples_default_splits_all_out(tmp_path):
    splits, ids, member = _queried(tmp_path, "auxiliary")
    assert ids == splits.rows[0].queries  # the target's samples, in sample-id order
    assert not any(member)  # the shadow trained on the auxiliary pool: all OUT


def test_labels_are_the_queried_models_membership(tmp_path):
    splits, ids, member = _queried(tmp_path, "auxiliary+queries")  # shadows train on target rows
    assert ids == splits.rows[0].queries
    shadow = set(splits.rows[1].members)
    assert member == [i in shadow for i in ids] and any(member) and not all(member)
    target = set(splits.rows[0].members)
    assert member != [i in target for i in ids]  # not the target's labels
