"""Import a taming-transformers VQGAN (DALL-E mini's image tokenizer) as a diffusers `VQModel`.

    python -m lightning_mia.models.taming last.ckpt model.yaml runs/demo/autoencoder
    python -m lightning_mia.models.taming vqgan.safetensors dalle-mini runs/demo/autoencoder

The checkpoint is taming's (`{"state_dict": ...}` with its key names; `loss.*` is dropped) or a
bare state dict, as `.ckpt`/`.pt` or `.safetensors`; the config is taming's YAML
(`model.params`: `ddconfig`, `n_embed`, `embed_dim`) or a name in `TAMING_VQGAN_CONFIGS`.
The result is a diffusers folder that `autoencoder.load_autoencoder` reads: the same codes and
the same images (up to float rounding) as taming's own model.

Loading stays `torch.load(..., weights_only=True)`. A Lightning-1.x checkpoint also pickles
objects that are not tensors (callback classes, hyper-parameter containers); those are read as
inert placeholders, never executed, and only the tensors of its `state_dict` are kept.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import VQModel
from lightning.pytorch.utilities import rank_zero_info

from lightning_mia.errors import UserError
from lightning_mia.models.seq2seq_presets import TAMING_VQGAN_CONFIGS

log = logging.getLogger("lightning_mia.taming")
TAMING_VQ_TARGETS = ("taming.models.vqgan.VQModel",)
IGNORED_PREFIXES = ("loss.",)  # taming's LPIPS + discriminator: training only


class TamingImportError(UserError):
    """A taming checkpoint or config that cannot be converted (names the file and the problem)."""


@dataclass(frozen=True)
class TamingVQConfig:
    """The parts of taming's `model.params` that define a VQGAN (Encoder/Decoder `ddconfig`)."""

    ch: int
    ch_mult: tuple[int, ...]
    num_res_blocks: int
    attn_resolutions: tuple[int, ...]
    z_channels: int
    resolution: int
    in_channels: int
    out_ch: int
    n_embed: int
    embed_dim: int

    @property
    def num_levels(self) -> int:
        return len(self.ch_mult)

    def attention_levels(self) -> list[bool]:
        """Per resolution level (encoder order): whether its blocks have attention."""
        return [self.resolution // 2**i in self.attn_resolutions for i in range(self.num_levels)]


def read_taming_config(config: str | os.PathLike | dict[str, Any]) -> TamingVQConfig:
    """Parse a taming YAML file, a preset name, or a `model.params`-style dict."""
    where = str(config) if not isinstance(config, dict) else "config"
    if isinstance(config, str) and config in TAMING_VQGAN_CONFIGS:
        params = TAMING_VQGAN_CONFIGS[config]
    elif isinstance(config, dict):
        params = config.get("model", {}).get("params", config)
    else:
        import yaml

        path = Path(config)
        if not path.is_file():
            raise TamingImportError(
                f"taming config {path}: no such file (nor a preset: {sorted(TAMING_VQGAN_CONFIGS)})"
            )
        doc = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        model = doc.get("model", {})
        target = model.get("target", TAMING_VQ_TARGETS[0])
        if target not in TAMING_VQ_TARGETS:
            raise TamingImportError(
                f"taming config {path}: model.target {target!r} is not a plain VQGAN "
                f"({', '.join(TAMING_VQ_TARGETS)}); Gumbel/EMA quantizers are not supported"
            )
        params = model.get("params", {})
    dd = params.get("ddconfig")
    missing = [k for k in ("n_embed", "embed_dim") if k not in params]
    if dd is None:
        missing.append("ddconfig")
    else:
        keys = ("ch", "ch_mult", "num_res_blocks", "attn_resolutions", "z_channels", "resolution")
        missing += [f"ddconfig.{k}" for k in keys if k not in dd]
    if missing:
        raise TamingImportError(f"taming config {where}: missing {', '.join(missing)}")
    if dd.get("double_z", False):
        raise TamingImportError(
            f"taming config {where}: double_z=true is a KL encoder, not a VQGAN"
        )
    if not dd.get("resamp_with_conv", True):
        raise TamingImportError(f"taming config {where}: resamp_with_conv=false is not supported")
    return TamingVQConfig(
        ch=int(dd["ch"]),
        ch_mult=tuple(int(m) for m in dd["ch_mult"]),
        num_res_blocks=int(dd["num_res_blocks"]),
        attn_resolutions=tuple(int(r) for r in dd["attn_resolutions"]),
        z_channels=int(dd["z_channels"]),
        resolution=int(dd["resolution"]),
        in_channels=int(dd.get("in_channels", 3)),
        out_ch=int(dd.get("out_ch", 3)),
        n_embed=int(params["n_embed"]),
        embed_dim=int(params["embed_dim"]),
    )


def diffusers_vq_kwargs(cfg: TamingVQConfig) -> dict[str, Any]:
    """`VQModel(**kwargs)` with taming's architecture (GroupNorm(32), single-head attention)."""
    attn = cfg.attention_levels()
    return dict(
        in_channels=cfg.in_channels,
        out_channels=cfg.out_ch,
        down_block_types=tuple(
            "AttnDownEncoderBlock2D" if a else "DownEncoderBlock2D" for a in attn
        ),
        up_block_types=tuple(
            "AttnUpDecoderBlock2D" if a else "UpDecoderBlock2D" for a in reversed(attn)
        ),
        block_out_channels=tuple(cfg.ch * m for m in cfg.ch_mult),
        layers_per_block=cfg.num_res_blocks,
        act_fn="silu",
        latent_channels=cfg.z_channels,
        sample_size=cfg.resolution,
        num_vq_embeddings=cfg.n_embed,
        norm_num_groups=32,  # taming's Normalize
        vq_embed_dim=cfg.embed_dim,
        scaling_factor=1.0,
        mid_block_add_attention=True,
    )


_ATTN_LEAVES = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}


def diffusers_key(key: str, num_levels: int) -> str:
    """The diffusers `VQModel` name of a taming VQModel parameter."""

    def up(m: re.Match) -> str:  # taming's up[i] is diffusers' up_blocks[n-1-i]
        part = {"block": "resnets", "attn": "attentions", "upsample": "upsamplers.0"}[m[2]]
        return f"decoder.up_blocks.{num_levels - 1 - int(m[1])}.{part}."

    def mid(m: re.Match) -> str:  # block_1, block_2 -> resnets.0, resnets.1
        return f"{m[1]}.mid_block.resnets.{int(m[2]) - 1}."

    rules: list[tuple[str, Any]] = [
        (r"^(encoder|decoder)\.mid\.block_(\d)\.", mid),
        (r"^(encoder|decoder)\.mid\.attn_1\.", r"\1.mid_block.attentions.0."),
        (r"^encoder\.down\.(\d+)\.block\.", r"encoder.down_blocks.\1.resnets."),
        (r"^encoder\.down\.(\d+)\.attn\.", r"encoder.down_blocks.\1.attentions."),
        (r"^encoder\.down\.(\d+)\.downsample\.", r"encoder.down_blocks.\1.downsamplers.0."),
        (r"^decoder\.up\.(\d+)\.(block|attn|upsample)\.", up),
        (r"^(encoder|decoder)\.norm_out\.", r"\1.conv_norm_out."),
    ]
    for pattern, repl in rules:
        new, hits = re.subn(pattern, repl, key)
        if hits:
            key = new
            break
    key = key.replace(".nin_shortcut.", ".conv_shortcut.")
    if ".attentions." in key:
        head, leaf, param = key.rsplit(".", 2)
        key = f"{head}.{_ATTN_LEAVES.get(leaf, leaf)}.{param}"
    return key


def convert_state_dict(
    state_dict: dict[str, torch.Tensor], cfg: TamingVQConfig
) -> dict[str, torch.Tensor]:
    """Rename taming's keys to diffusers'; 1x1 attention convs (C, C, 1, 1) become linears."""
    out = {}
    for key, value in state_dict.items():
        if key.startswith(IGNORED_PREFIXES):
            continue
        new = diffusers_key(key, cfg.num_levels)
        if ".attentions." in new and new.endswith(".weight") and value.ndim == 4:
            value = value[:, :, 0, 0]  # 1x1 conv == linear over channels
        out[new] = value
    return out


def taming_to_diffusers(
    state_dict: dict[str, torch.Tensor], cfg: TamingVQConfig, where: str = "checkpoint"
) -> VQModel:
    """A diffusers `VQModel` holding the weights of a taming VQGAN state dict."""
    vq = VQModel(**diffusers_vq_kwargs(cfg))
    converted = convert_state_dict(state_dict, cfg)
    result = vq.load_state_dict(converted, strict=False)
    problems = []
    if result.missing_keys:
        problems.append(
            f"{len(result.missing_keys)} weights missing (e.g. {result.missing_keys[:3]})"
        )
    if result.unexpected_keys:
        problems.append(
            f"{len(result.unexpected_keys)} unknown weights (e.g. {result.unexpected_keys[:3]})"
        )
    if problems:
        raise TamingImportError(f"{where} does not match the taming config: {'; '.join(problems)}")
    return vq.eval()


def _placeholder(name: str) -> type:
    """An inert stand-in for a pickled global that weights_only loading does not allow."""

    def setstate(self: Any, state: Any) -> None:
        self.state = state

    def init(self: Any, *args: Any, **kwargs: Any) -> None:
        self.args, self.kwargs = args, kwargs

    module, _, qualname = name.rpartition(".")
    attrs = {"__init__": init, "__setstate__": setstate, "__module__": module}
    return type(qualname or name, (), attrs)


def load_taming_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of a taming checkpoint (`.ckpt`/`.pt`: `{"state_dict": ...}` or a bare state
    dict; `.safetensors`), loaded without running any code from the file."""
    path = Path(path)
    if not path.is_file():
        raise TamingImportError(f"taming checkpoint {path}: no such file")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - retried below with placeholders for its non-tensor objects
        ckpt = _load_with_placeholders(path)
    state = ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(state, dict):
        raise TamingImportError(f"taming checkpoint {path}: holds no state dict")
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise TamingImportError(f"taming checkpoint {path}: its state dict holds no tensors")
    return tensors


def _load_with_placeholders(path: Path) -> Any:
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except Exception as err:  # noqa: BLE001 - legacy (non-zip) or corrupt file
        raise TamingImportError(
            f"taming checkpoint {path}: not readable with weights_only=True ({err}); export its "
            "state_dict to .safetensors with the taming code you trust and convert that"
        ) from err
    log.info("%s: reading non-tensor objects %s as placeholders", path, names)
    with torch.serialization.safe_globals([(_placeholder(n), n) for n in names]):
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001
            raise TamingImportError(f"taming checkpoint {path}: cannot be read ({err})") from err


def convert_taming_checkpoint(
    ckpt: str | os.PathLike,
    config: str | os.PathLike | dict[str, Any],
    output: str | os.PathLike,
) -> Path:
    """Convert a taming VQGAN checkpoint into a diffusers `VQModel` folder at `output`."""
    from lightning_mia.models.vae import save_autoencoder

    cfg = read_taming_config(config)
    vq = taming_to_diffusers(load_taming_state_dict(ckpt), cfg, where=f"taming checkpoint {ckpt}")
    return save_autoencoder(vq, output)


def main(argv: list[str] | None = None) -> None:
    """`python -m lightning_mia.models.taming <ckpt> <config.yaml | preset> <out_folder>`."""
    p = argparse.ArgumentParser(
        prog="python -m lightning_mia.models.taming",
        description="Convert a taming-transformers VQGAN checkpoint to a diffusers VQModel folder.",
    )
    p.add_argument("ckpt", help="taming checkpoint (.ckpt / .pt / .safetensors)")
    p.add_argument("config", help=f"taming YAML config, or one of {sorted(TAMING_VQGAN_CONFIGS)}")
    p.add_argument("output", help="diffusers folder to write (e.g. runs/demo/autoencoder)")
    args = p.parse_args(argv)
    try:
        folder = convert_taming_checkpoint(args.ckpt, args.config, args.output)
    except TamingImportError as err:
        raise SystemExit(f"error: {err}") from None
    rank_zero_info(f"wrote {folder}")


if __name__ == "__main__":
    main()
