"""The attacker's CLIP encoder: trained on the auxiliary pool, it logs its loss and retrieval
accuracy; its folder round-trips; bad folders fail clearly; the feature extractor runs on it.
Whether 200 steps make it retrieve held-out captions (> 3x chance) is `python
benchmarks/bench_memorisation.py --check encoder`, which trains it with `fit_encoder` below."""

import json
import time

import lightning as L
import pytest
import torch
from transformers import CLIPModel

from lightning_mia.card import read_card
from lightning_mia.data.datamodule import MembershipDataModule
from lightning_mia.data.shapes import ShapesSource
from lightning_mia.features import FEATURE_GROUPS, FeatureExtractor
from lightning_mia.models.encoder import EncoderError, EncoderModule, load_encoder
from lightning_mia.registry import UnknownNameError

HELD_OUT = 32
TRAIN_STEPS = 20  # the tests need trained weights, not good ones (the benchmark trains 200)


def fit_encoder(root, steps: int) -> dict:
    """A tiny encoder fitted `steps` steps on the auxiliary pool of a small shapes experiment,
    and 32 held-out image-caption pairs of the target's pool."""
    dm = MembershipDataModule(
        experiment=str(root / "exp"),
        source=ShapesSource(num_samples=1200, resolution=32),
        train_split="auxiliary",
        num_shadows=1,
        batch_size=32,
    )
    L.seed_everything(0)
    module = EncoderModule(preset="tiny", lr=2e-3, warmup_steps=20)
    trainer = L.Trainer(
        max_steps=steps,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    start = time.perf_counter()
    trainer.fit(module, datamodule=dm)
    seconds = time.perf_counter() - start
    ckpt = root / "last.ckpt"
    trainer.save_checkpoint(ckpt)
    held = dm.splits.target_pool[:HELD_OUT]  # never trained on: the target's pool
    images = torch.stack([dm.source.image(i) for i in held])  # (32, 3, 32, 32)
    captions = [dm.source.caption(i) for i in held]
    return {
        "dm": dm,
        "module": module,
        "folder": dm.layout.encoder,
        "ckpt": ckpt,
        "images": images,
        "captions": captions,
        "seconds": seconds,
        "metrics": dict(trainer.callback_metrics),
    }


def held_out_retrieval(trained: dict) -> float:
    """Top-1 image-to-caption retrieval accuracy on the held-out pairs (chance 1/32)."""
    enc = load_encoder(str(trained["folder"]))
    caps = trained["captions"]
    with torch.no_grad():
        sim = enc.embed_images(trained["images"]) @ enc.embed_texts(caps).T  # (32, 32)
    top = sim.argmax(dim=1).tolist()
    return sum(caps[j] == caps[i] for i, j in enumerate(top)) / HELD_OUT


@pytest.fixture(scope="module")
def trained(tmp_path_factory, one_thread):
    return fit_encoder(tmp_path_factory.mktemp("encoder"), TRAIN_STEPS)


@pytest.mark.slow
def test_training_logs_its_loss_and_retrieval_accuracy(trained):
    assert {"train/loss", "train/retrieval_acc"} <= set(trained["metrics"])


@pytest.mark.slow
def test_encoder_folder_round_trips_and_carries_the_card(trained):
    module, folder = trained["module"], trained["folder"]
    enc = load_encoder(str(folder))
    x, caps = trained["images"][:4], trained["captions"][:4]
    module.encoder.eval()
    with torch.no_grad():  # reloaded float32 weights; unit-norm embeddings: atol 1e-5
        assert torch.allclose(enc.embed_images(x), module.encoder.embed_images(x), atol=1e-5)
        assert torch.allclose(enc.embed_texts(caps), module.encoder.embed_texts(caps), atol=1e-5)
        emb = enc.embed_images(x)
    assert emb.shape == (4, enc.dim)
    assert torch.allclose(emb.norm(dim=-1), torch.ones(4), atol=1e-5)
    assert isinstance(CLIPModel.from_pretrained(str(folder), local_files_only=True), CLIPModel)
    card = json.loads((folder / "card.json").read_text())
    assert card["family"] == "encoder" and card["role"] == "attacker"
    assert card["splits_hash"] == trained["dm"].splits.hash
    ckpt_card = read_card(trained["ckpt"])
    assert (ckpt_card.family, ckpt_card.role) == ("encoder", "attacker")
    # a second save keeps other files in the folder (the CLI's checkpoints live there too)
    (folder / "checkpoints").mkdir(exist_ok=True)
    module.encoder.save(folder)
    assert (folder / "checkpoints").is_dir() and (folder / "config.json").is_file()


def test_non_clip_folders_fail_with_one_clear_error(tmp_path):
    with pytest.raises(EncoderError, match="no config.json"):
        load_encoder(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(EncoderError, match=r"model_type is 'bert'.*CLIPModel"):
        load_encoder(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "clip"}))
    with pytest.raises(EncoderError, match="cannot load the CLIP model"):
        load_encoder(str(tmp_path))
    with pytest.raises(UnknownNameError, match="unknown encoder preset 'huge'; known"):
        EncoderModule(preset="huge")


@pytest.mark.slow
def test_extractor_with_encoder_all_groups_batched(trained):
    enc = load_encoder(str(trained["folder"]))
    x = trained["images"][:3]  # (3, 3, 32, 32)
    gen = torch.stack([x.flip(-1), x.roll(2, dims=-1)], dim=1)  # (3, 2, 3, 32, 32)
    caps = trained["captions"][:3]
    ext = FeatureExtractor(enc, groups=list(FEATURE_GROUPS))
    feats = ext(x, gen, caps)
    groups = {name.split("/")[0] for name in feats}
    assert groups == set(FEATURE_GROUPS)
    assert len([n for n in feats if n.startswith("semantic/")]) == 8
    assert len([n for n in feats if n.startswith("text/")]) == 5
    assert all(v.shape == (3,) and torch.isfinite(v).all() for v in feats.values())
    one = ext(x[1:2], gen[1:2], caps[1:2])  # batching does not change a query's features
    # up to float32 reordering in batches of another size: ~1e-6 relative in the encoder,
    # carried into PSNR (dB), SSIM and BRISQUE: 1e-4
    for name, value in one.items():
        assert torch.allclose(value, feats[name][1:2], atol=1e-4, rtol=1e-4), name


def test_encoder_refuses_to_train_on_a_models_members(tmp_path):
    dm = MembershipDataModule(
        experiment=str(tmp_path / "exp"),
        source=ShapesSource(num_samples=64, resolution=32),
        train_split="members",
        num_shadows=1,
    )
    trainer = L.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False)
    with pytest.raises(EncoderError, match="attacker's own pool only"):
        trainer.fit(EncoderModule(), datamodule=dm)
    assert not (tmp_path / "exp" / "encoder").exists()
