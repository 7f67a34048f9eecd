"""taming-transformers VQGAN -> diffusers VQModel: checked against taming's own code.

taming-transformers 0.0.1 (PyPI) is installed without its dependencies (it declares torchvision
and Lightning 1.x) into a folder of the virtual environment, by `make setup` or on first use
here; its `taming.main` (torchvision, Lightning 1.x imports) is replaced by a stub providing
`instantiate_from_config`, which is all `taming.models.vqgan` takes from it.
"""

import importlib
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
import yaml

from lightning_mia.models.taming import (
    TamingImportError,
    convert_taming_checkpoint,
    diffusers_vq_kwargs,
    load_taming_state_dict,
    main,
    read_taming_config,
    taming_to_diffusers,
)
from lightning_mia.models.vae import decode_codes, encode_codes, load_autoencoder

TAMING = "taming-transformers==0.0.1"
TAMING_DIR = Path(sys.prefix) / "taming-transformers-0.0.1"  # `make setup` installs it here
PARAMS = {  # taming's model.params: 32x32 -> 8x8 codes, attention at 16 and 8 px
    "embed_dim": 16,
    "n_embed": 64,
    "ddconfig": {
        "double_z": False,
        "z_channels": 16,
        "resolution": 32,
        "in_channels": 3,
        "out_ch": 3,
        "ch": 32,
        "ch_mult": [1, 2, 2],
        "num_res_blocks": 2,
        "attn_resolutions": [16, 8],
        "dropout": 0.0,
    },
}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # the test machine is shared: two threads thrash
    yield
    torch.set_num_threads(n)


def instantiate_from_config(config):
    """taming.main's helper (the only thing taming.models.vqgan imports from it)."""
    module, _, name = config["target"].rpartition(".")
    return getattr(importlib.import_module(module), name)(**config.get("params", {}))


def import_taming_vqgan():
    if importlib.util.find_spec("taming") is None:
        if not (TAMING_DIR / "taming" / "models" / "vqgan.py").is_file():
            cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps"]
            cmd += ["--target", str(TAMING_DIR), TAMING]
            try:
                done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
            except subprocess.TimeoutExpired:
                pytest.skip(f"{TAMING} is not installed and pip timed out fetching it")
            if done.returncode != 0:
                pytest.skip(
                    f"{TAMING} is not installed in {TAMING_DIR} and pip could not fetch it "
                    f"(package registry unreachable?): {done.stderr.strip()[-300:]}"
                )
        sys.path.insert(0, str(TAMING_DIR))
    stub = types.ModuleType("taming.main")
    stub.instantiate_from_config = instantiate_from_config
    sys.modules["taming.main"] = stub
    from taming.models.vqgan import VQModel

    return VQModel


@pytest.fixture(scope="module")
def taming_model():
    """taming's own VQModel with random weights and a codebook spread over its latents."""
    vqgan_cls = import_taming_vqgan()
    torch.manual_seed(0)
    model = vqgan_cls(
        PARAMS["ddconfig"], {"target": "torch.nn.Identity"}, PARAMS["n_embed"], PARAMS["embed_dim"]
    ).eval()
    with torch.no_grad():  # codes from encoder outputs: every image uses many codes
        h = model.quant_conv(model.encoder(torch.rand(4, 3, 32, 32) * 2 - 1))
        flat = h.permute(0, 2, 3, 1).reshape(-1, PARAMS["embed_dim"])
        pick = flat[torch.randperm(flat.shape[0])[: PARAMS["n_embed"]]]
        model.quantize.embedding.weight.copy_(pick + 0.01 * torch.randn_like(pick))
    return model


def taming_codes_and_images(model, x):
    with torch.no_grad():
        _, _, (_, _, indices) = model.encode(x)
        codes = indices.reshape(x.shape[0], -1)  # (B, h*w)
        z_q = model.quantize.get_codebook_entry(indices.flatten(), (x.shape[0], 8, 8, 16))
        return codes, model.decode(z_q)


def test_converted_vqgan_matches_taming(taming_model):
    vq = taming_to_diffusers(taming_model.state_dict(), read_taming_config(PARAMS))
    torch.manual_seed(1)
    x = torch.rand(3, 3, 32, 32) * 2 - 1
    codes, images = taming_codes_and_images(taming_model, x)
    with torch.no_grad():
        ours = encode_codes(vq, x)
        assert torch.equal(ours, codes)
        assert codes.unique().numel() > 20
        z_q = vq.quantize.get_codebook_entry(codes.flatten(), (3, 8, 8, 16))
        decoded = vq.decode(z_q, force_not_quantize=True).sample
        # two implementations of one float32 decoder (taming's bmm attention vs diffusers' SDPA,
        # ~15 layers, sums of <= 10^3 terms): 1e-5 on pixels of [-1, 1]
        torch.testing.assert_close(decoded, images, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(decode_codes(vq, codes, (8, 8)), images.clamp(-1, 1))


def test_command_line_converts_a_taming_checkpoint(taming_model, tmp_path):
    ckpt = tmp_path / "last.ckpt"
    state = dict(taming_model.state_dict())
    state["loss.discriminator.main.0.weight"] = torch.zeros(2, 3, 4, 4)  # dropped
    torch.save({"state_dict": state, "global_step": 7, "epoch": 1}, ckpt)
    config = tmp_path / "model.yaml"
    config.write_text(
        yaml.safe_dump({"model": {"target": "taming.models.vqgan.VQModel", "params": PARAMS}})
    )
    main([str(ckpt), str(config), str(tmp_path / "autoencoder")])
    vq = load_autoencoder(tmp_path / "autoencoder")
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    codes, _ = taming_codes_and_images(taming_model, x)
    with torch.no_grad():
        assert torch.equal(encode_codes(vq, x), codes)


class LightningOneCallback:
    """Stands for what a Lightning 1.x checkpoint pickles besides tensors (callback classes)."""

    def __init__(self):
        self.best_model_score = 0.5


def test_lightning1_objects_are_read_as_placeholders(tmp_path):
    path = tmp_path / "lightning1.ckpt"
    state = {"encoder.conv_in.weight": torch.randn(4, 3, 3, 3)}
    extra = {LightningOneCallback: {"best": 1.0}, "hparams": LightningOneCallback()}
    torch.save({"state_dict": state, "callbacks": extra, "global_step": 3}, path)
    with pytest.raises(Exception, match="weights_only"):
        torch.load(path, weights_only=True)  # plain safe loading refuses it
    loaded = load_taming_state_dict(path)
    assert loaded.keys() == state.keys()
    assert torch.equal(loaded["encoder.conv_in.weight"], state["encoder.conv_in.weight"])
    from safetensors.torch import save_file

    save_file(state, tmp_path / "vqgan.safetensors")
    assert load_taming_state_dict(tmp_path / "vqgan.safetensors").keys() == state.keys()


def test_bad_taming_inputs(taming_model, tmp_path):
    cfg = read_taming_config(PARAMS)
    state = dict(taming_model.state_dict())
    del state["decoder.up.2.attn.0.q.weight"]
    with pytest.raises(TamingImportError, match="1 weights missing"):
        taming_to_diffusers(state, cfg)
    gumbel = tmp_path / "gumbel.yaml"
    gumbel.write_text(
        yaml.safe_dump({"model": {"target": "taming.models.vqgan.GumbelVQ", "params": PARAMS}})
    )
    with pytest.raises(TamingImportError, match="GumbelVQ"):
        read_taming_config(gumbel)
    with pytest.raises(TamingImportError, match="missing n_embed"):
        read_taming_config({"embed_dim": 4, "ddconfig": PARAMS["ddconfig"]})
    with pytest.raises(TamingImportError, match="no such file"):
        convert_taming_checkpoint(tmp_path / "none.ckpt", PARAMS, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_dalle_mini_vqgan_config():
    kwargs = diffusers_vq_kwargs(read_taming_config("dalle-mini"))
    assert kwargs["num_vq_embeddings"] == 16384 and kwargs["vq_embed_dim"] == 256
    assert kwargs["block_out_channels"] == (128, 128, 256, 256, 512)  # f16: 256 px -> 16x16
    assert kwargs["down_block_types"][-1] == "AttnDownEncoderBlock2D"  # attention at 16 px
    assert kwargs["up_block_types"][0] == "AttnUpDecoderBlock2D"
    assert kwargs["down_block_types"].count("AttnDownEncoderBlock2D") == 1
