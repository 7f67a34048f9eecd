"""Reading a checkpoint's run card: once per version of the file, whatever its format."""

import os

import pytest
import torch

from lightning_mia.card import CheckpointError, RunCard, moved_path, read_card, resumed_card


def _card(**changes) -> RunCard:
    fields = dict(
        family="diffusion", preset="tiny", model_index=0, splits_hash="ab" * 32, experiment="x"
    )
    return RunCard(**{**fields, **changes})


def _save(path, card: RunCard, zip_format: bool = True) -> None:
    checkpoint = {"lightning_mia": card.to_dict(), "state_dict": {"w": torch.randn(64, 64)}}
    torch.save(checkpoint, path, _use_new_zipfile_serialization=zip_format)


def test_a_rewritten_checkpoint_is_read_again(tmp_path):
    path = tmp_path / "last.ckpt"
    _save(path, _card(model_index=1))
    first = read_card(path)
    assert first.model_index == 1 and first.role == "shadow"
    first.experiment = "changed by the caller"  # a copy: the next read is not affected
    assert read_card(path) == _card(model_index=1, role="shadow")
    stat = path.stat()
    _save(path, _card(model_index=2))  # the same file written again (e.g. a resumed run)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    assert read_card(path).model_index == 2


def test_the_old_pickle_format_is_read_whole(tmp_path):
    path = tmp_path / "old.ckpt"
    _save(path, _card(preset="ldm-256"), zip_format=False)
    assert read_card(path).preset == "ldm-256"


@pytest.mark.parametrize(
    "write, needle",
    [
        (None, "no such file"),
        (lambda p: p.write_text("not a checkpoint"), "not a readable checkpoint"),
        (lambda p: torch.save({"state_dict": {}}, p), "not a lightning_mia checkpoint"),
    ],
    ids=["missing", "not a checkpoint", "another program's"],
)
def test_what_is_not_a_card_says_so_in_one_line(tmp_path, write, needle):
    path = tmp_path / "x.ckpt"
    if write is not None:
        write(path)
    with pytest.raises(CheckpointError, match=needle) as err:
        read_card(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_a_resumed_fit_keeps_the_card_of_where_it_now_runs():
    saved = _card(experiment="/old/place")  # the checkpoint, written before the copy
    here = _card(experiment="/new/place")  # the card setup built from this stage's data
    assert resumed_card(saved, here) is here  # what it writes goes to /new/place
    assert resumed_card(saved, None) is saved  # loaded to be queried: the checkpoint's own
    with pytest.raises(CheckpointError, match=r"splits cdcdcdcdcdcd but /new/place/splits.json"):
        resumed_card(_card(splits_hash="cd" * 32), here)
    with pytest.raises(CheckpointError, match="model_index 2 but data.model_index is 0"):
        resumed_card(_card(model_index=2), here)


def test_a_folder_of_a_moved_experiment_moves_with_it_from_any_working_folder(tmp_path):
    # as written at training time: relative to where it ran, or absolute
    assert moved_path("runs/demo/autoencoder", "runs/demo", tmp_path) == str(
        tmp_path / "autoencoder"
    )
    assert moved_path("/old/exp/tok", "/old/exp", "/new/exp") == "/new/exp/tok"
    assert moved_path("/elsewhere/vae", "/old/exp", "/new/exp") == "/elsewhere/vae"  # not inside
    assert moved_path("", "/old/exp", "/new/exp") == ""
