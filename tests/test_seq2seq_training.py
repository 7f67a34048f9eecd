"""Seq2seq family under the Trainer: tokenizer at fit start, checkpoints, resume, a few steps
lowering the members' loss (memorisation: benchmarks/bench_memorisation.py)."""

import pytest
import torch
from diffusers import VQModel
from lightning.pytorch import Trainer, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader

from lightning_mia.card import read_card
from lightning_mia.data.datamodule import MembershipDataModule, collate_samples
from lightning_mia.data.shapes import ShapesSource
from lightning_mia.models.bart_tokenizer import train_caption_tokenizer
from lightning_mia.models.registry import load_family_module
from lightning_mia.models.seq2seq import Seq2SeqError, Seq2SeqModule

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def tiny_vq() -> VQModel:
    """A random f4 VQ autoencoder with the tiny preset's grid: 32x32 -> 8x8 codes of 512."""
    torch.manual_seed(0)
    return VQModel(
        block_out_channels=(8, 16, 16),
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        layers_per_block=1,
        latent_channels=4,
        num_vq_embeddings=512,
        vq_embed_dim=4,
        norm_num_groups=8,
        sample_size=32,
        mid_block_add_attention=False,
    )


def trainer(max_steps, callbacks=(), root=None):
    return Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=max_steps,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=list(callbacks),
        default_root_dir=root,
    )


def test_fit_trains_the_tokenizer_saves_and_resumes(tmp_path):
    dm = MembershipDataModule(
        str(tmp_path), ShapesSource(num_samples=32, resolution=32), num_shadows=1, batch_size=4
    )
    tiny_vq().save_pretrained(dm.layout.autoencoder)
    run = dm.layout.run_dir("seq2seq", 0)
    checkpoints = ModelCheckpoint(
        dirpath=run / "checkpoints", save_last=True, every_n_train_steps=1
    )
    seed_everything(0)
    model = Seq2SeqModule(warmup_steps=2)  # autoencoder and tokenizer from the experiment
    trainer(3, [checkpoints], run).fit(model, datamodule=dm)
    vocab = run / "tokenizer" / "vocab.json"
    assert vocab.is_file() and model.hparams.tokenizer == str(run / "tokenizer")
    last = run / "checkpoints" / "last.ckpt"
    card = read_card(last)
    assert (card.family, card.role, card.run_name) == ("seq2seq", "target", "seq2seq-target-000")
    assert card.autoencoder == str(dm.layout.autoencoder)
    assert card.tokenizer == str(run / "tokenizer")
    assert card.train_steps_per_image == pytest.approx(3 * 4 / 8)  # 8 members, batch 4
    saved = torch.load(last, weights_only=True)
    assert not any(k.startswith("vq.") for k in saved["state_dict"])
    mtime = vocab.stat().st_mtime_ns

    resumed = Seq2SeqModule(warmup_steps=2)
    t = trainer(5, [ModelCheckpoint(dirpath=run / "checkpoints", save_last=True)], run)
    t.fit(resumed, datamodule=dm, ckpt_path=str(last))
    assert t.global_step == 5
    assert resumed.train_steps_per_image == pytest.approx(5 * 4 / 8)
    assert vocab.stat().st_mtime_ns == mtime  # reused, not retrained

    loaded = load_family_module(last)  # rebuilt from the checkpoint alone
    assert isinstance(loaded, Seq2SeqModule) and not loaded.training
    images = loaded.generate(["a big red circle in the center"], num_images=2, seed=0)
    assert images.shape == (1, 2, 3, 32, 32)


def test_fit_steps_lower_the_members_loss_and_greedy_codes_ignore_the_seed(tmp_path):
    """The memorisation check's path (benchmarks/bench_memorisation.py --check seq2seq: 300
    steps, then the members' greedy codes match theirs) cut to a few steps: a Trainer fit on
    given autoencoder and tokenizer folders, the members' loss, greedy sampling."""
    source = ShapesSource(num_samples=8, resolution=32, seed=3)
    members = list(range(8))
    tiny_vq().save_pretrained(tmp_path / "autoencoder")
    captions = [source.caption(i) for i in members]
    train_caption_tokenizer(captions, 512, tmp_path / "tokenizer")
    items = [
        {"pixel_values": source.image(i), "caption": source.caption(i), "sample_id": i}
        for i in members
    ]
    loader = DataLoader(items, batch_size=8, shuffle=True, collate_fn=collate_samples)
    seed_everything(0)
    model = Seq2SeqModule(
        autoencoder=str(tmp_path / "autoencoder"),
        tokenizer=str(tmp_path / "tokenizer"),
        caption_dropout=0.0,
        lr=1e-3,
        warmup_steps=5,
    )
    batch = collate_samples(items)

    def members_loss():
        with torch.no_grad():
            return model.eval().per_sample_loss(batch).mean().item()

    before = members_loss()
    trainer(20, root=tmp_path).fit(model, loader)
    after = members_loss()
    assert after < 0.7 * before, (before, after)  # measured 5.89 -> 2.68 (ln 512 = 6.24)
    greedy = model.sample_codes(captions[:2], 2, seed=0, temperature=0)  # (2, 2, 64)
    assert greedy.shape == (2, 2, 64) and 0 <= greedy.min() and greedy.max() < 512
    assert torch.equal(greedy[:, 0], greedy[:, 1])  # the N images of a caption: the same codes
    assert torch.equal(model.sample_codes(captions[:2], 2, seed=1, temperature=0), greedy)


@pytest.mark.slow
def test_ddp_rank_zero_trains_the_tokenizer_and_both_ranks_use_it(tmp_path):
    dm = MembershipDataModule(
        str(tmp_path), ShapesSource(num_samples=32, resolution=32), num_shadows=1, batch_size=2
    )
    tiny_vq().save_pretrained(dm.layout.autoencoder)
    run = dm.layout.run_dir("seq2seq", 0)
    t = Trainer(
        accelerator="cpu",
        strategy="ddp_spawn",
        devices=2,
        max_steps=2,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[ModelCheckpoint(dirpath=run / "checkpoints", save_last=True)],
    )
    t.fit(Seq2SeqModule(), datamodule=dm)
    assert (run / "tokenizer" / "vocab.json").is_file()
    assert not list(run.glob(".tokenizer.tmp-*"))  # no leftovers of a second writer
    card = read_card(run / "checkpoints" / "last.ckpt")
    assert card.tokenizer == str(run / "tokenizer")
    assert card.train_steps_per_image == pytest.approx(2 * 2 * 2 / 8)  # 2 ranks x batch 2


def test_data_of_another_resolution_is_refused_at_fit_start(tmp_path):
    dm = MembershipDataModule(
        str(tmp_path), ShapesSource(num_samples=16, resolution=64), num_shadows=1, batch_size=4
    )
    tiny_vq().save_pretrained(dm.layout.autoencoder)
    with pytest.raises(Seq2SeqError, match="data is 64px but preset 'tiny' expects 32px"):
        trainer(1, root=tmp_path).fit(Seq2SeqModule(), datamodule=dm)
    assert not dm.layout.run_dir("seq2seq", 0).exists()  # nothing half-written
