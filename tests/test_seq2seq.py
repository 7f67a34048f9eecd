"""Seq2seq family (BART over VQGAN codes): loss, likelihoods, sampling, tokenizer, errors."""

import dataclasses
import json
import math

import pytest
import torch
from diffusers import AutoencoderKL, VQModel

from lightning_mia.card import CARD_KEY, CheckpointError, RunCard
from lightning_mia.data.shapes import ShapesSource
from lightning_mia.models.bart_tokenizer import (
    SPECIAL_TOKENS,
    check_tokenizer_captions,
    load_caption_tokenizer,
    train_caption_tokenizer,
)
from lightning_mia.models.seq2seq import Seq2SeqError, Seq2SeqModule
from lightning_mia.models.seq2seq_presets import bart_config, get_preset
from lightning_mia.models.seq2seq_sampling import SamplingSettings, sample_from_logits
from lightning_mia.query.execute import done_sample_ids
from lightning_mia.query.shards import ShardError, write_shard
from lightning_mia.registry import UnknownNameError
from lightning_mia.specs.query import QueryRecord

SOURCE = ShapesSource(num_samples=32, resolution=32, seed=0)
CAPTIONS = [SOURCE.caption(i) for i in SOURCE.sample_ids()]


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def tiny_vq(num_codes=512, channels=(8, 16, 16)) -> VQModel:
    """A random VQ autoencoder; (8, 16, 16) = f4: 32x32 -> 8x8 = 64 codes (the tiny preset)."""
    torch.manual_seed(0)
    n = len(channels)
    return VQModel(
        block_out_channels=channels,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        layers_per_block=1,
        latent_channels=4,
        num_vq_embeddings=num_codes,
        vq_embed_dim=4,
        norm_num_groups=8,
        sample_size=32,
        mid_block_add_attention=False,
    )


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    root = tmp_path_factory.mktemp("seq2seq")
    tiny_vq().save_pretrained(root / "autoencoder")
    train_caption_tokenizer(CAPTIONS, 512, root / "tokenizer")
    return root


def make_model(parts, **kwargs) -> Seq2SeqModule:
    torch.manual_seed(0)
    return Seq2SeqModule(
        autoencoder=str(parts / "autoencoder"), tokenizer=str(parts / "tokenizer"), **kwargs
    )


def shapes_batch(ids):
    return {
        "pixel_values": torch.stack([SOURCE.image(i) for i in ids]),
        "caption": [SOURCE.caption(i) for i in ids],
        "sample_id": torch.tensor(ids, dtype=torch.int64),
    }


def test_loss_decreases_on_a_fixed_batch(parts):
    model = make_model(parts, caption_dropout=0.0)
    batch = shapes_batch([0, 1, 2, 3])
    opt = torch.optim.AdamW(model.bart.parameters(), lr=3e-3)
    model.train()
    first = model.per_sample_loss(batch)
    assert first.shape == (4,)
    assert math.isclose(first.mean().item(), math.log(512), rel_tol=0.1)  # untrained: ~uniform
    for _ in range(15):
        loss = model.per_sample_loss(batch).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert model.per_sample_loss(batch).mean() < 0.7 * first.mean()


def test_per_token_nll_is_the_loss_per_code(parts):
    model = make_model(parts).eval()
    batch = shapes_batch([4, 5])
    codes = model.image_codes(batch)
    assert codes.shape == (2, 64) and codes.dtype == torch.int64
    nll = model.per_token_nll(batch["caption"], codes)
    assert nll.shape == (2, 64) and (nll > 0).all()
    # the same passes on the same batch: the default float32 tolerance
    torch.testing.assert_close(nll.mean(1), model.per_sample_loss(batch))
    with pytest.raises(Seq2SeqError, match="codes must be"):
        model.per_token_nll(batch["caption"], codes[:, :10])
    with pytest.raises(Seq2SeqError, match=r"\[0, 512\)"):
        model.per_token_nll(batch["caption"], codes + 512)


def test_codes_are_cached_by_sample_id_and_not_saved(parts):
    model = make_model(parts)
    batch = shapes_batch([6, 7])
    codes = model.image_codes(batch)
    garbage = dict(batch, pixel_values=torch.zeros_like(batch["pixel_values"]))
    assert torch.equal(model.image_codes(garbage), codes)  # served from the cache
    assert not torch.equal(Seq2SeqModule.image_codes(make_model(parts), garbage), codes)
    keys = model.state_dict().keys()
    assert not any(k.startswith("vq.") for k in keys) and any(k.startswith("bart.") for k in keys)


def test_generate_shapes_range_and_seed(parts):
    model = make_model(parts).eval()
    images = model.generate(CAPTIONS[:2], num_images=3, seed=1)
    assert images.shape == (2, 3, 3, 32, 32)
    assert images.min() >= -1 and images.max() <= 1
    codes = model.sample_codes(CAPTIONS[:2], 3, seed=1)
    assert codes.shape == (2, 3, 64) and codes.dtype == torch.int64
    assert codes.min() >= 0 and codes.max() < 512  # only image codes, never caption tokens
    assert torch.equal(codes, model.sample_codes(CAPTIONS[:2], 3, seed=1))
    assert not torch.equal(codes, model.sample_codes(CAPTIONS[:2], 3, seed=2))
    assert not torch.equal(codes[:, 0], codes[:, 1])  # N images differ


@pytest.mark.parametrize(
    "sampler",
    [{}, {"top_k": 20, "top_p": 0.9, "temperature": 0.8, "condition_scale": 3.0}],
    ids=["plain", "topk-topp-superconditioned"],
)
def test_generation_does_not_depend_on_the_batch(parts, sampler):
    model = make_model(parts).eval()
    together = model.sample_codes(CAPTIONS[:3], 2, seed=[5, 6, 7], **sampler)
    alone = [model.sample_codes([CAPTIONS[i]], 2, seed=[5 + i], **sampler) for i in range(3)]
    assert torch.equal(together, torch.cat(alone))
    shifted = model.sample_codes(CAPTIONS[:3], 2, seed=5, **sampler)  # int seed s: caption i s+i
    assert torch.equal(shifted, together)


def test_super_conditioning_and_module_defaults(parts):
    model = make_model(parts, condition_scale=3.0, top_k=10).eval()
    configured = model.sample_codes(CAPTIONS[:2], 2, seed=0)
    explicit = model.sample_codes(CAPTIONS[:2], 2, seed=0, condition_scale=3.0, top_k=10)
    assert torch.equal(configured, explicit)
    plain = model.sample_codes(CAPTIONS[:2], 2, seed=0, condition_scale=1.0, top_k=10)
    assert not torch.equal(configured, plain)  # the unconditional half changes the logits
    with pytest.raises(Seq2SeqError, match="top_p"):
        model.sample_codes(CAPTIONS[:1], 1, top_p=0.0)


def test_sample_from_logits_inverse_cdf():
    logits = torch.tensor([[0.5, 0.3, 0.2]]).log().repeat(4, 1)  # probs 0.5, 0.3, 0.2
    u = torch.tensor([0.1, 0.6, 0.85, 0.999])
    assert sample_from_logits(logits, u, SamplingSettings()).tolist() == [0, 1, 2, 2]
    # top-k 2 renormalises to 0.625, 0.375
    assert sample_from_logits(logits, u, SamplingSettings(top_k=2)).tolist() == [0, 0, 1, 1]
    # nucleus 0.5 keeps the first token only; temperature 0 is greedy
    assert sample_from_logits(logits, u, SamplingSettings(top_p=0.5)).tolist() == [0] * 4
    shuffled = logits[:, [2, 0, 1]]  # probs 0.2, 0.5, 0.3
    assert sample_from_logits(shuffled, u, SamplingSettings(temperature=0)).tolist() == [1] * 4
    # unfiltered: the CDF over the codes in their own order (no sort); filtered: descending
    assert sample_from_logits(shuffled, u, SamplingSettings()).tolist() == [0, 1, 2, 2]
    assert sample_from_logits(shuffled, u, SamplingSettings(top_k=2)).tolist() == [1, 1, 2, 2]
    assert sample_from_logits(shuffled, u, SamplingSettings(top_p=0.99)).tolist() == [1, 2, 0, 0]


def test_a_query_folder_of_the_previous_sampler_is_refused_naming_it(tmp_path):
    """Queries record the family's sampler version: seq2seq's images changed with the unsorted
    draws, so a folder queried before is not resumed into (nor reused)."""
    old = QueryRecord(run_name="seq2seq-target-000", family="seq2seq")  # written before
    write_shard(tmp_path / "shard-000.safetensors", torch.arange(3), torch.ones(3), 0, {}, old)
    new = dataclasses.replace(old, sampler=Seq2SeqModule.sampler_version)
    with pytest.raises(ShardError, match="sampler: '' vs '2'"):
        done_sample_ids(tmp_path, new)
    assert done_sample_ids(tmp_path, old) == {0, 1, 2}


def test_unfiltered_sampling_draws_each_code_with_its_probability():
    logits = torch.randn(1, 50).repeat(20_000, 1)
    u = (torch.arange(20_000) + 0.5) / 20_000  # an even grid of the uniform's quantiles
    codes = sample_from_logits(logits, u, SamplingSettings(temperature=0.7))
    freq = torch.bincount(codes, minlength=50) / 20_000
    torch.testing.assert_close(freq, (logits[0] / 0.7).softmax(-1), rtol=0, atol=1e-4)


def test_tokenizer_save_load_round_trip(tmp_path):
    folder = train_caption_tokenizer(CAPTIONS, 400, tmp_path / "tok")
    tok = load_caption_tokenizer(folder, max_vocab_size=400)
    assert len(tok) <= 400
    assert [tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS] == [0, 1, 2, 3, 4]
    for caption in [*CAPTIONS[:4], "an unseen caption: émoji ✓"]:
        ids = tok(caption)["input_ids"]
        assert ids[0] == 0 and ids[-1] == 2
        assert tok.decode(ids, skip_special_tokens=True) == caption
    # the learnt merges make training captions short
    assert len(tok(CAPTIONS[0])["input_ids"]) < len(CAPTIONS[0]) / 2
    again = load_caption_tokenizer(folder, max_vocab_size=400)
    assert again(CAPTIONS[:2])["input_ids"] == tok(CAPTIONS[:2])["input_ids"]
    check_tokenizer_captions(folder, list(reversed(CAPTIONS)))  # same captions, any order
    with pytest.raises(ValueError, match="other captions"):
        check_tokenizer_captions(folder, CAPTIONS[:5])
    with pytest.raises(ValueError, match="caption_vocab_size"):
        load_caption_tokenizer(folder, max_vocab_size=300)
    with pytest.raises(FileNotFoundError, match="vocab.json"):
        load_caption_tokenizer(tmp_path / "nothing", max_vocab_size=400)


def test_bad_inputs_give_one_clear_error(parts, tmp_path):
    # the autoencoder module's own error (AutoencoderError, a ValueError) naming the folder
    with pytest.raises((FileNotFoundError, ValueError), match="no-such-folder: no config.json"):
        Seq2SeqModule(autoencoder=str(tmp_path / "no-such-folder"))
    tiny_vq(num_codes=256).save_pretrained(tmp_path / "k256")
    with pytest.raises(Seq2SeqError, match="256 codes, preset 'tiny' expects 512"):
        Seq2SeqModule(autoencoder=str(tmp_path / "k256"))
    tiny_vq(channels=(8, 16)).save_pretrained(tmp_path / "f2")  # 16x16 = 256 codes per image
    with pytest.raises(Seq2SeqError, match="16x16 = 256 codes per 32px image"):
        Seq2SeqModule(autoencoder=str(tmp_path / "f2"))
    AutoencoderKL(block_out_channels=(8,), norm_num_groups=8).save_pretrained(tmp_path / "kl")
    with pytest.raises(Seq2SeqError, match="needs a VQModel"):
        Seq2SeqModule(autoencoder=str(tmp_path / "kl"))
    with pytest.raises(UnknownNameError, match="unknown seq2seq preset 'huge'; known"):
        Seq2SeqModule(preset="huge")
    model = make_model(parts)
    with pytest.raises(Seq2SeqError, match="expects 32x32"):
        model.encode_images(torch.zeros(1, 3, 64, 64))
    with pytest.raises(Seq2SeqError, match="no caption tokenizer"):
        Seq2SeqModule(autoencoder=str(parts / "autoencoder")).tokenize(["a caption"])


def test_checkpoint_of_another_family_is_refused(parts, tmp_path):
    model = make_model(parts)
    card = RunCard(
        family="diffusion", preset="tiny", model_index=0, splits_hash="x", experiment="e"
    )
    path = tmp_path / "diffusion.ckpt"
    torch.save(
        {
            "state_dict": model.state_dict(),
            "hyper_parameters": dict(model.hparams),
            CARD_KEY: card.to_dict(),
            "pytorch-lightning_version": "2.6.6",
        },
        path,
    )
    with pytest.raises(CheckpointError, match="family 'diffusion', not 'seq2seq'"):
        Seq2SeqModule.load_from_checkpoint(path, weights_only=True)


def test_dalle_mini_preset_is_bart_large_sized():
    spec = get_preset("dalle-mini")
    config = bart_config(spec)
    assert (config.d_model, config.encoder_layers, config.decoder_layers) == (1024, 12, 12)
    assert config.vocab_size == 50264 + 16384 + 1
    assert config.decoder_start_token_id == 50264 + 16384
    assert config.max_position_embeddings >= 257 and spec.max_caption_length == 64
    from transformers import BartForConditionalGeneration

    with torch.device("meta"):  # sizes only, no memory
        bart = BartForConditionalGeneration(config)
    params = sum(p.numel() for p in bart.parameters())
    assert 400e6 < params < 450e6  # BART-large (406 M) + 16385 code embeddings


BART_VOCAB = 50265  # facebook/bart-large: <s> <pad> </s> <unk> = 0..3, <mask> = 50264


def save_bart_sized_tokenizer(folder):
    """vocab.json + merges.txt laid out like BART's own (made offline): the 4 specials, the 256
    byte-level symbols, 50,004 two-symbol merges, and <mask> last."""
    from lightning_mia.models.tokenizers import bytes_to_unicode

    chars = list(bytes_to_unicode().values())
    pairs = [(a, b) for a in chars for b in chars][: BART_VOCAB - 4 - 256 - 1]
    tokens = ["<s>", "<pad>", "</s>", "<unk>", *chars, *(a + b for a, b in pairs), "<mask>"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in pairs))
    return folder


def save_random_bart(folder, **sizes):
    """A random-init BART with the real vocabulary size and the tiny preset's encoder sizes."""
    from transformers import BartConfig, BartForConditionalGeneration

    torch.manual_seed(3)
    config = dict(
        vocab_size=BART_VOCAB,
        d_model=128,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=512,
        decoder_ffn_dim=512,
        max_position_embeddings=1024,
    )
    model = BartForConditionalGeneration(BartConfig(**{**config, **sizes}))
    model.save_pretrained(folder)
    save_bart_sized_tokenizer(folder)
    return model


def test_a_real_size_bart_folder_initialises_the_text_side(parts, tmp_path):
    pretrained = save_random_bart(tmp_path / "bart").model
    tok = load_caption_tokenizer(tmp_path / "bart", max_vocab_size=BART_VOCAB)  # BART's layout
    assert len(tok) == BART_VOCAB and tok.convert_tokens_to_ids("<mask>") == BART_VOCAB - 1
    torch.manual_seed(0)
    model = Seq2SeqModule(
        autoencoder=str(parts / "autoencoder"), pretrained_text=str(tmp_path / "bart")
    )
    assert model.spec.caption_vocab_size == BART_VOCAB  # the folder's, not the preset's 512
    assert model.hparams.tokenizer == str(tmp_path / "bart")
    ours = model.bart.model
    torch.testing.assert_close(ours.shared.weight[:BART_VOCAB], pretrained.shared.weight)
    for name, value in pretrained.encoder.layers.state_dict().items():
        torch.testing.assert_close(ours.encoder.layers.state_dict()[name], value, msg=name)
    rows = ours.encoder.embed_positions.weight.shape[0]
    torch.testing.assert_close(
        ours.encoder.embed_positions.weight, pretrained.encoder.embed_positions.weight[:rows]
    )
    assert not torch.allclose(
        ours.decoder.layers[0].fc1.weight, pretrained.decoder.layers[0].fc1.weight
    )  # image side: from scratch
    batch = shapes_batch([0, 1])
    ids, _ = model.tokenize(batch["caption"])
    assert ids.max() >= 260  # merged BART tokens, in the unified vocabulary's caption rows
    loss = model.per_sample_loss(batch)
    assert loss.shape == (2,) and torch.isfinite(loss).all()
    trainer_card = {CARD_KEY: RunCard("seq2seq", "tiny", 0, "x", "e").to_dict()}
    model.on_save_checkpoint(trainer_card)
    assert trainer_card[CARD_KEY]["text_init"] == str(tmp_path / "bart")


def test_a_bart_folder_that_does_not_fit_is_refused(parts, tmp_path):
    save_random_bart(tmp_path / "wide", d_model=64, encoder_ffn_dim=256, decoder_ffn_dim=256)
    with pytest.raises(Seq2SeqError, match="does not fit the preset: d_model 64 \\(model: 128\\)"):
        Seq2SeqModule(pretrained_text=str(tmp_path / "wide"))
    with pytest.raises(Seq2SeqError, match="no readable config.json"):
        Seq2SeqModule(pretrained_text=str(tmp_path / "nothing"))
    bad = save_bart_sized_tokenizer(tmp_path / "swapped")
    vocab = json.loads((bad / "vocab.json").read_text())
    vocab["<s>"], vocab["<pad>"] = 1, 0
    (bad / "vocab.json").write_text(json.dumps(vocab))
    with pytest.raises(ValueError, match="<unk> at 0..3 and a <mask> token"):
        load_caption_tokenizer(bad, max_vocab_size=BART_VOCAB)
