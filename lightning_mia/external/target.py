"""A model trained elsewhere as a lightning_mia checkpoint: the target row of an audit.

    module = target_module("/models/sd-v1-5", lora="my_lora/", sampling={...})
    write_target_checkpoint(module, card, layout.checkpoint(module.family, 0))

The target is a `LatentDiffusionModule` on the `pretrained` preset over the pipeline folder. A
LoRA adapter (diffusers' `pytorch_lora_weights.safetensors`, kohya/A1111 files as diffusers
reads them, or a peft folder with adapter_config.json) is loaded into it and its rank, alpha and
layers become the module's `lora_*` settings, so the checkpoint holds the adapter alone and
shadows can be trained the same way; a full fine-tune is the folder as it is (no weight is
stored: `train_unet` and `train_text_encoder` off). Every later stage reads the checkpoint as
it reads one this package trained.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import lightning
import torch
from torch import nn

from lightning_mia.card import RunCard
from lightning_mia.models.diffusion import LatentDiffusionModule
from lightning_mia.models.lora import ADAPTER, LORA_TARGETS, LoraError, adapter_parts
from lightning_mia.paths import atomic_write_bytes, atomic_write_json, done_marker

TARGET_CLASS = LatentDiffusionModule  # the module an external pipeline folder becomes
PEFT_CONFIG, PEFT_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."  # what PeftModel.save_pretrained puts before module names


def adapter_kind(path: str | Path) -> str:
    """ "peft" (a PeftModel folder) or "diffusers" (a LoRA .safetensors file or its folder)."""
    path = Path(path)
    if path.is_file() and path.suffix == ".safetensors":
        return "diffusers"
    if (path / PEFT_CONFIG).is_file() and (path / PEFT_WEIGHTS).is_file():
        return "peft"
    if path.is_dir() and any(path.glob("*.safetensors")):
        return "diffusers"
    raise LoraError(
        f"LoRA adapter {path}: not a .safetensors file, a folder holding one "
        f"(pytorch_lora_weights.safetensors), or a peft folder ({PEFT_CONFIG} + {PEFT_WEIGHTS})"
    )


def _load_peft_folder(module: LatentDiffusionModule, folder: Path) -> None:
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict
    from safetensors.torch import load_file

    config = LoraConfig.from_pretrained(str(folder))
    state = {k.removeprefix(PEFT_PREFIX): v for k, v in load_file(folder / PEFT_WEIGHTS).items()}
    inject_adapter_in_model(config, module.unet, adapter_name=ADAPTER)
    result = set_peft_model_state_dict(module.unet, state, adapter_name=ADAPTER)
    unexpected = [k for k in result.unexpected_keys if ".lora_" in k]
    if unexpected:
        raise LoraError(
            f"LoRA adapter {folder}: {len(unexpected)} weights fit no UNet layer "
            f"(e.g. {unexpected[0]}); is it an adapter of this UNet?"
        )


def _load_diffusers_lora(module: LatentDiffusionModule, path: Path) -> None:
    pipe = module.pipeline()  # shares the module's unet and text encoder
    where = (path.parent, path.name) if path.is_file() else (path, None)
    try:
        pipe.load_lora_weights(str(where[0]), weight_name=where[1], adapter_name=ADAPTER)
    except (ValueError, KeyError, RuntimeError, OSError) as err:
        raise LoraError(f"LoRA adapter {path}: diffusers cannot load it ({err})") from err
    if not adapter_parts(module):
        raise LoraError(f"LoRA adapter {path}: no LoRA weight for the UNet or the text encoder")


def compact_targets(parts: dict[str, nn.Module]) -> tuple[str, ...]:
    """The adapted layers as `lora_targets`: the default name endings when those match exactly
    the layers the adapter has, else their full names (an adapter of only some blocks)."""
    adapted, plain = set(), set()
    for part in parts.values():
        for layer, m in part.named_modules():
            if ".lora_" in layer or "base_layer" in layer:
                continue
            plain.add(layer)
            if hasattr(m, "lora_A") and ADAPTER in getattr(m, "lora_A", {}):
                adapted.add(layer)
    used = tuple(t for t in LORA_TARGETS if any(n.endswith("." + t) for n in adapted))
    matched = {n for n in plain if any(n.endswith("." + t) for t in used)}
    return used if matched == adapted else tuple(sorted(adapted))


def attach_adapter(module: LatentDiffusionModule, path: str | Path) -> None:
    """Load an external LoRA adapter into a module built without one, and record its rank,
    alpha and layers in the module's hparams (what a checkpoint rebuilds it from)."""
    path = Path(path)
    if adapter_kind(path) == "peft":
        _load_peft_folder(module, path)
    else:
        _load_diffusers_lora(module, path)
    parts = adapter_parts(module)
    configs = [part.peft_config[ADAPTER] for part in parts.values()]
    shapes = {(c.r, float(c.lora_alpha)) for c in configs}
    patterned = any(c.rank_pattern or c.alpha_pattern or c.use_dora for c in configs)
    if len(shapes) > 1 or patterned:
        raise LoraError(
            f"LoRA adapter {path}: layers of different ranks or alphas (or DoRA) — shadows "
            "could not be trained the same way; only uniform LoRA adapters are supported"
        )
    (rank, alpha), hp = shapes.pop(), module.hparams
    hp.lora_rank, hp.lora_alpha, hp.lora_targets = rank, alpha, compact_targets(parts)
    hp.train_unet, hp.train_text_encoder = "unet" in parts, "text_encoder" in parts


def target_module(pipeline: str, lora: str, settings: dict[str, Any]) -> LatentDiffusionModule:
    """The external target: `settings` (sampler, resolution... of the shadows' config) over
    the pipeline folder, with the LoRA adapter if any; frozen, in eval mode."""
    fixed = dict(
        preset="pretrained",
        pretrained=str(pipeline),
        autoencoder="",
        tokenizer="",
        lora_rank=0,
        train_unet=False,
        train_text_encoder=False,
        ema_decay=0.0,
    )
    module = LatentDiffusionModule(**{**settings, **fixed})
    if lora:
        attach_adapter(module, lora)
    return module.requires_grad_(False).eval()


def write_target_checkpoint(module: LatentDiffusionModule, card: RunCard, path: Path) -> Path:
    """A Lightning checkpoint of the module (what `load_from_checkpoint` reads, the card and
    the folder references in it) and the run's DONE marker; written atomically."""
    module.card = card
    checkpoint = {
        "state_dict": module.state_dict(),  # the adapters only: the rest is the folder's
        "hyper_parameters": dict(module.hparams),
        "pytorch-lightning_version": lightning.__version__,
        "epoch": 0,
        "global_step": 0,
    }
    module.on_save_checkpoint(checkpoint)
    buffer = io.BytesIO()
    torch.save(checkpoint, buffer)
    atomic_write_bytes(path, buffer.getvalue())
    atomic_write_json(done_marker(path.parent.parent), {"external": card.external})
    return path
