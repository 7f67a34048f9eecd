"""The autoencoder's encodings of query images, made once for every model that shares it
(`graybox/encodings.py`): the same features as without it, bit for bit, and never a stale one."""

from pathlib import Path

import pytest
import torch
from tiny_pipeline import tiny_vae

from lightning_mia.data.shapes import ShapesSource
from lightning_mia.graybox import SignalError, compute_signals
from lightning_mia.graybox.encodings import (
    CAPTION_MEMO,
    MEMO,
    EncodingMemo,
    fingerprint,
    inputs_fingerprint,
    tokenizer_fingerprint,
)
from lightning_mia.models.diffusion import LatentDiffusionModule
from lightning_mia.models.flow import FlowMatchingModule
from lightning_mia.models.vae import save_autoencoder

SOURCE = ShapesSource(num_samples=16, resolution=16, seed=1)


def batch(ids):
    return {
        "pixel_values": torch.stack([SOURCE.image(i) for i in ids]),
        "caption": [SOURCE.caption(i) for i in ids],
        "sample_id": torch.tensor(ids, dtype=torch.int64),
    }


@pytest.fixture
def models(tmp_path):
    """Two models (a target and a shadow) over one autoencoder folder, as in an experiment."""
    torch.manual_seed(0)
    save_autoencoder(tiny_vae(), tmp_path / "autoencoder")
    out = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        m = LatentDiffusionModule(
            autoencoder=str(tmp_path / "autoencoder"), resolution=16, max_caption_length=77
        )
        out.append(m.eval())
    return out


def encoder_calls(model):
    """A list that grows by the batch size at each pass of the model's image encoder."""
    calls = []
    encoder = model.image_autoencoder().encoder
    encoder.register_forward_hook(lambda _m, args, _out: calls.append(args[0].shape[0]))
    return calls


def signals(model, ids):
    return compute_signals(model, batch(ids), ["loss", "pia"], seed=0)


def test_models_sharing_the_autoencoder_encode_each_batch_once_with_the_same_features(models):
    target, shadow = models
    MEMO.max_bytes = 0  # off: what each model computes alone
    try:
        alone = [signals(m, [0, 1, 2]) for m in models]
    finally:
        MEMO.max_bytes = None  # LIGHTNING_MIA_ENCODING_MEMO_MB again
    MEMO.clear()
    calls = encoder_calls(target), encoder_calls(shadow)
    shared = [signals(m, [0, 1, 2]) for m in models]
    assert calls == ([3], [])  # the shadow's own autoencoder (equal weights) did not run
    for got, want in zip(shared, alone):
        assert got.keys() == want.keys()
        assert all(torch.equal(got[k], want[k]) for k in want)
    assert shared[0]["loss/t100"].ne(shared[1]["loss/t100"]).all()  # two models, two scores
    signals(shadow, [0, 1, 3])  # another batch (one image differs): encoded
    signals(shadow, [0, 1])  # a batch that is part of an encoded one: encoded (floats of an
    assert calls == ([3], [3, 2])  # encoder depend on the batch it ran in)


def test_an_autoencoder_changed_in_place_or_in_its_config_is_encoded_again(models):
    target, shadow = models
    MEMO.clear()
    before = signals(target, [4, 5])
    ae = shadow.image_autoencoder()
    key = fingerprint(ae)
    with torch.no_grad():
        ae.encoder.conv_in.weight.mul_(1.5)  # in place: the version counter moves
    assert fingerprint(ae) != key
    calls = encoder_calls(shadow)
    after = signals(target, [4, 5]), signals(shadow, [4, 5])
    assert calls == [2]
    assert not torch.equal(after[1]["loss/t100"], before["loss/t100"])
    ae.register_to_config(scaling_factor=0.5)  # a config the latents are scaled by
    assert fingerprint(ae) != key
    signals(shadow, [4, 5])
    assert calls == [2, 2]


def test_a_cast_moved_or_replaced_autoencoder_is_hashed_again(models):
    ae = models[0].image_autoencoder()
    first = fingerprint(ae)
    ae.half()  # new tensors, version counters as they were
    half = fingerprint(ae)
    assert half != first
    state = {k: v.clone() for k, v in ae.state_dict().items()}
    state["encoder.conv_in.bias"] += 1
    ae.load_state_dict(state, assign=True)  # replaced, counters reset
    assert fingerprint(ae) not in (first, half)


def test_a_hit_still_checks_the_images_against_the_model(models, tmp_path):
    """A model for 32 px over the same autoencoder refuses 16 px images, although their
    latents are kept from a 16 px model."""
    target = models[0]
    signals(target, [6, 7])
    torch.manual_seed(2)
    other = LatentDiffusionModule(
        autoencoder=str(tmp_path / "autoencoder"), resolution=32, max_caption_length=77
    ).eval()
    with pytest.raises(ValueError, match="configured for resolution 32"):
        signals(other, [6, 7])


def test_a_bad_size_is_one_error_naming_the_variable(monkeypatch):
    monkeypatch.setenv("LIGHTNING_MIA_ENCODING_MEMO_MB", "lots")
    memo, ae = EncodingMemo(), torch.nn.Linear(2, 2)
    with pytest.raises(SignalError, match="LIGHTNING_MIA_ENCODING_MEMO_MB='lots'"):
        memo.encode(ae, torch.zeros(1, 2), lambda x: x)
    monkeypatch.setenv("LIGHTNING_MIA_ENCODING_MEMO_MB", "0.5")
    assert EncodingMemo().encode(ae, torch.zeros(1, 2), lambda x: x).shape == (1, 2)


def test_the_first_batches_are_kept_up_to_the_size_and_another_autoencoders_make_room():
    """A memo smaller than one model's query still serves every later model its first
    batches (keeping the latest ones, it would serve none)."""
    memo = EncodingMemo(max_bytes=2 * 4 * 8)  # two (1, 8) float32 encodings
    ae, other, runs = torch.nn.Linear(8, 8), torch.nn.Linear(8, 8), []

    def encode(x):
        runs.append(x[0, 0].item())
        return x.float()

    images = [torch.full((1, 8), float(i)) for i in range(3)]
    for _model in range(2):  # two models read the same three batches in order
        for image in images:
            out = memo.encode(ae, image, encode)
            assert torch.equal(out, image)
    assert runs == [0.0, 1.0, 2.0, 2.0]  # 0 and 1 kept; 2 did not fit
    assert (memo.hits, memo.misses) == (2, 4)
    memo.encode(other, images[2], encode)  # another autoencoder: the oldest batch leaves
    memo.encode(other, images[2], encode)
    assert runs == [0.0, 1.0, 2.0, 2.0, 2.0]
    memo.encode(ae, images[0], encode)
    assert runs[-1] == 0.0  # pushed out
    hit = memo.encode(ae, images[0], encode)  # kept again (the other's batch made room)
    hit.add_(1)  # a caller's change to what it got is not the memo's
    assert torch.equal(memo.encode(ae, images[0], encode), images[0])
    assert runs[-1] == 0.0 and memo.hits == 5


# --- CLiD's word importances, made once for every model that conditions alike ----------------
def text_rows(model):
    """A list that grows by the rows of each pass of the model's (released) text encoder."""
    rows = []
    encoder = model.denoiser()[1]
    encoder.register_forward_hook(lambda _m, args, _out: rows.append(args[0].shape[0]))
    return rows


def clid(model, ids):
    return compute_signals(model, batch(ids), ["clid"], seed=0)


def test_models_with_one_text_encoder_derive_clids_reduced_captions_once(models, monkeypatch):
    """Two LoRA-like models (the shadow's UNet differs, its text encoder does not) get CLiD's
    word importances from the first: the same features as each alone, bit for bit."""
    target, _ = models
    torch.manual_seed(0)  # the target's seed: equal text encoder (and UNet, changed below)
    shadow = type(target)(
        autoencoder=target.hparams.autoencoder, resolution=16, max_caption_length=77
    ).eval()
    with torch.no_grad():
        shadow.unet.conv_in.weight.mul_(1.1)
    assert inputs_fingerprint(shadow.conditioning_inputs()) == inputs_fingerprint(
        target.conditioning_inputs()
    )
    monkeypatch.setenv("LIGHTNING_MIA_ENCODING_MEMO_MB", "0")  # off: each model alone
    alone = [clid(m, [0, 1, 2]) for m in (target, shadow)]
    monkeypatch.delenv("LIGHTNING_MIA_ENCODING_MEMO_MB")
    hits, rows = CAPTION_MEMO.hits, (text_rows(target), text_rows(shadow))
    shared = [clid(m, [0, 1, 2]) for m in (target, shadow)]
    words = sum(len(SOURCE.caption(i).split()) for i in range(3))
    # caption, word variants (chunked), reduced captions (3 rates), null caption
    assert sum(rows[0]) == 3 + words + 3 * 3 + 1
    assert sum(rows[1]) == 3 + 3 * 3 + 1 and CAPTION_MEMO.hits == hits + 1
    for got, want in zip(shared, alone):
        assert got.keys() == want.keys()
        assert all(torch.equal(got[k], want[k]) for k in want)
    assert not torch.equal(shared[0]["clid/score"], shared[1]["clid/score"])


def test_models_that_condition_differently_do_not_share_word_importances(models):
    target, shadow = models  # trained text encoders: each its own
    assert inputs_fingerprint(target.conditioning_inputs()) != inputs_fingerprint(
        shadow.conditioning_inputs()
    )
    hits, rows = CAPTION_MEMO.hits, text_rows(shadow)
    clid(target, [0, 1])
    clid(shadow, [0, 1])
    assert CAPTION_MEMO.hits == hits and sum(rows) > 2 + 3 * 2 + 1
    key = inputs_fingerprint(target.conditioning_inputs())
    target.tokenizer.add_tokens(["circle"])  # the tokenizer's vocabulary
    assert inputs_fingerprint(target.conditioning_inputs()) != key
    key = inputs_fingerprint(target.conditioning_inputs())
    target.tokenizer.model_max_length = 40  # a tokenizer setting
    assert inputs_fingerprint(target.conditioning_inputs()) != key


def flow_model(folder, transformer_scale=1.0):
    torch.manual_seed(0)  # one text side for every model built here
    model = FlowMatchingModule(autoencoder=str(folder), resolution=16, max_caption_length=77)
    with torch.no_grad():
        model.transformer.proj_out.weight.mul_(transformer_scale)
    return model.eval()


def test_flow_models_with_one_text_side_share_clids_importances_bit_for_bit(tmp_path, monkeypatch):
    torch.manual_seed(0)
    save_autoencoder(tiny_vae(), tmp_path / "ae")
    target, shadow = flow_model(tmp_path / "ae"), flow_model(tmp_path / "ae", 1.1)
    run = lambda m: compute_signals(m, batch([0, 1]), ["flow_clid"], seed=0)  # noqa: E731
    monkeypatch.setenv("LIGHTNING_MIA_ENCODING_MEMO_MB", "0")
    alone = [run(m) for m in (target, shadow)]
    monkeypatch.delenv("LIGHTNING_MIA_ENCODING_MEMO_MB")
    hits = CAPTION_MEMO.hits
    shared = [run(m) for m in (target, shadow)]
    assert CAPTION_MEMO.hits == hits + 1
    for got, want in zip(shared, alone):
        assert all(torch.equal(got[k], want[k]) for k in want)
    assert not torch.equal(shared[0]["flow_clid/score"], shared[1]["flow_clid/score"])


def test_a_flow_models_conditioning_inputs_cover_its_lengths_and_widths(tmp_path):
    torch.manual_seed(0)
    save_autoencoder(tiny_vae(), tmp_path / "ae")
    model = flow_model(tmp_path / "ae")
    key = inputs_fingerprint(model.conditioning_inputs())
    assert inputs_fingerprint(model.conditioning_inputs()) == key
    model.t5_length += 1  # SD3 pads the conditioning with that many rows
    assert inputs_fingerprint(model.conditioning_inputs()) != key
    model.t5_length -= 1
    model.tokenizer_2.model_max_length = 40  # the second CLIP's tokenizer
    assert inputs_fingerprint(model.conditioning_inputs()) != key
    model.tokenizer_2.model_max_length = 77
    assert inputs_fingerprint(model.conditioning_inputs()) == key
    with torch.no_grad():
        model.text_encoder_2.text_model.final_layer_norm.weight.add_(1)
    assert inputs_fingerprint(model.conditioning_inputs()) != key


def test_a_module_that_computes_otherwise_is_hashed_otherwise(models):
    """The key covers what a module computes with besides its tensors: train mode (dropout),
    the attention implementation, a diffusers processor, LoRA's scale and state."""
    from diffusers.models.attention_processor import AttnProcessor
    from peft import LoraConfig, inject_adapter_in_model

    target, _ = models
    text, ae = target.denoiser()[1], target.image_autoencoder()
    key, ae_key = fingerprint(text), fingerprint(ae)
    text.train()
    assert fingerprint(text) != key
    text.eval()
    assert fingerprint(text) == key
    text.set_attn_implementation("eager" if text.config._attn_implementation != "eager" else "sdpa")
    assert fingerprint(text) != key
    ae.set_attn_processor(AttnProcessor())  # the tiny VAE's mid-block attention
    assert fingerprint(ae) != ae_key
    inject_adapter_in_model(LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"]), text)
    lora, layer = (
        fingerprint(text),
        next(m for m in text.modules() if hasattr(m, "merged_adapters")),
    )
    layer.scaling["default"] = 1.0  # another alpha, the same tensors
    assert fingerprint(text) != lora
    layer.scaling["default"] = 2.0
    assert fingerprint(text) == lora
    layer.enable_adapters(False)  # the adapter switched off
    assert fingerprint(text) != lora


class SlowTokenizer:
    """A tokenizer without a fast backend: what `save_pretrained` writes is all it is."""

    def __init__(self, merges: str) -> None:
        self.merges = merges

    def __len__(self) -> int:
        return 10

    def get_vocab(self) -> dict:
        return {}

    def save_pretrained(self, folder) -> None:
        (Path(folder) / "merges.txt").write_text(self.merges)


def test_a_tokenizer_without_a_fast_backend_is_hashed_by_what_it_saves():
    a, b, c = SlowTokenizer("a b"), SlowTokenizer("a b"), SlowTokenizer("b a")
    assert tokenizer_fingerprint(a) == tokenizer_fingerprint(b) != tokenizer_fingerprint(c)
