"""The attacker's CLIP encoder: trained on the auxiliary pool, it retrieves held-out captions;
its folder round-trips; bad folders fail clearly; the extractor and BLIP captioner run on it."""

import json
import time

import lightning as L
import pytest
import torch
from transformers import BertTokenizer, BlipConfig, BlipForConditionalGeneration, CLIPModel

from lightning_mia.card import read_card
from lightning_mia.data.datamodule import MembershipDataModule
from lightning_mia.data.shapes import ShapesSource
from lightning_mia.features import FEATURE_GROUPS, FeatureExtractor
from lightning_mia.models.captioner import Captioner, CaptionerError
from lightning_mia.models.encoder import EncoderError, EncoderModule, load_encoder
from lightning_mia.registry import UnknownNameError

HELD_OUT = 32
TRAIN_STEPS = 200


@pytest.fixture(scope="module")
def trained(tmp_path_factory, one_thread):
    """A tiny encoder fitted on the auxiliary pool of a small shapes experiment (~25 s)."""
    root = tmp_path_factory.mktemp("encoder")
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
        max_steps=TRAIN_STEPS,
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


def test_trained_encoder_retrieves_held_out_captions(trained):
    enc = load_encoder(str(trained["folder"]))
    caps = trained["captions"]
    with torch.no_grad():
        sim = enc.embed_images(trained["images"]) @ enc.embed_texts(caps).T  # (32, 32)
    top = sim.argmax(dim=1).tolist()
    acc = sum(caps[j] == caps[i] for i, j in enumerate(top)) / HELD_OUT
    chance = 1 / HELD_OUT
    print(f"held-out retrieval {acc:.3f} (chance {chance:.3f}), fit {trained['seconds']:.1f} s")
    assert acc > 3 * chance
    assert {"train/loss", "train/retrieval_acc"} <= set(trained["metrics"])


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


def tiny_blip_folder(path):
    """A random-init BLIP captioner with a word-level BERT tokenizer, saved like a real one."""
    words = "a an the red blue green circle square star on at top left right of picture".split()
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]
    (path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tok = BertTokenizer.from_pretrained(str(path))  # transformers 5 ignores vocab_file=
    assert len(tok) == len(vocab)
    text = dict(
        vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, encoder_hidden_size=32, max_position_embeddings=32,
        bos_token_id=tok.cls_token_id, sep_token_id=tok.sep_token_id,
        pad_token_id=tok.pad_token_id, eos_token_id=tok.sep_token_id,
    )  # fmt: skip
    vision = dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        image_size=32, patch_size=8,
    )  # fmt: skip
    torch.manual_seed(0)
    model = BlipForConditionalGeneration(BlipConfig(text_config=text, vision_config=vision))
    with torch.no_grad():  # larger random weights: captions then depend on the image
        for p in model.parameters():
            if p.ndim >= 2:
                p.normal_(0, 0.3)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_captioner_loads_a_blip_folder_and_captions_batches(tmp_path, one_thread):
    folder = tiny_blip_folder(tmp_path)
    captioner = Captioner(str(folder), max_new_tokens=6)
    images = torch.rand(3, 3, 48, 48, generator=torch.Generator().manual_seed(0)) * 2 - 1
    captions = captioner.caption(images)
    assert len(captions) == 3 and all(isinstance(c, str) for c in captions)
    assert len(set(captions)) > 1  # image-dependent
    assert all("[CLS]" not in c and "[PAD]" not in c for c in captions)
    assert any(captions)  # a random model still emits words
    assert captioner.caption(images) == captions  # greedy: deterministic
    assert [captioner.caption(images[i : i + 1])[0] for i in range(3)] == captions
    prompted = Captioner(str(folder), max_new_tokens=4, prompt="a picture of").caption(images[:1])
    assert prompted[0].startswith("a picture of")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text(json.dumps({"model_type": "clip"}))
    with pytest.raises(CaptionerError, match="not 'blip'"):
        Captioner(str(tmp_path / "other"))


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
