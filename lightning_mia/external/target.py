"""A model trained elsewhere as a lightning_mia checkpoint: the target row of an audit.

    module = target_module("/models/sd-v1-5", lora="my_lora/", settings={...})
    write_target_checkpoint(module, card, layout.checkpoint(module.family, 0))

The target is the module of the family that runs the folder's pipeline class (its
`PipelineLayout`: a StableDiffusionPipeline is a diffusion model, a StableDiffusion3Pipeline a
flow model) on the `pretrained` preset over the folder. A LoRA adapter (diffusers'
`pytorch_lora_weights.safetensors`, kohya/A1111 files as diffusers reads them, or a peft folder
with adapter_config.json, made for the denoiser: the UNet or the SD3 transformer) is loaded into
it and its rank, alpha and layers become the module's `lora_*` settings, so the checkpoint holds
the adapter alone and shadows can be trained the same way; a full fine-tune is the folder as it
is (no weight is stored: every `train_*` switch off). Every later stage reads the checkpoint as
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
from lightning_mia.models.latent import LatentTextToImageModule
from lightning_mia.models.lora import (
    ADAPTER,
    MMDIT_LORA_TARGETS,
    PART_SWITCHES,
    LoraError,
    adapter_parts,
    first_line,
    load_lora,
)
from lightning_mia.models.pipeline_folder import PipelineLayout, pipeline_layout
from lightning_mia.models.registry import family_class
from lightning_mia.paths import atomic_write_bytes, atomic_write_json, done_marker

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


def target_class(layout: PipelineLayout) -> type[LatentTextToImageModule]:
    """The module class of the family that runs the layout's folders (`models.registry`)."""
    return family_class(layout.family)


def part_switches(layout: PipelineLayout) -> dict[str, tuple[str, ...]]:
    """{train switch: the folder parts it trains}, the denoiser's first: the parts a fine-tune
    may change (`PART_SWITCHES`; the layout's `never_trained`, a T5 encoder, has none)."""
    parts = (layout.denoiser, *(p for p in layout.weight_parts if p != layout.denoiser))
    switches: dict[str, tuple[str, ...]] = {}
    for part in parts:
        if PART_SWITCHES.get(part) and part not in layout.never_trained:
            switches[PART_SWITCHES[part]] = (*switches.get(PART_SWITCHES[part], ()), part)
    return switches


def _load_peft_folder(module: LatentTextToImageModule, folder: Path, part_name: str) -> None:
    """A peft adapter of the denoiser (`PeftModel.save_pretrained` of the UNet/transformer)."""
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict
    from safetensors.torch import load_file

    part = getattr(module, part_name)
    what = type(part).__name__
    config = LoraConfig.from_pretrained(str(folder))
    state = {k.removeprefix(PEFT_PREFIX): v for k, v in load_file(folder / PEFT_WEIGHTS).items()}
    try:
        inject_adapter_in_model(config, part, adapter_name=ADAPTER)
        result = set_peft_model_state_dict(part, state, adapter_name=ADAPTER)
    except (ValueError, KeyError, RuntimeError) as err:  # no such layer, other shapes
        raise LoraError(
            f"LoRA adapter {folder}: it does not fit this {what} ({first_line(err)}); an "
            "adapter made for another model?"
        ) from err
    unexpected = [k for k in result.unexpected_keys if ".lora_" in k]
    if unexpected:
        raise LoraError(
            f"LoRA adapter {folder}: {len(unexpected)} weights fit no {what} layer "
            f"(e.g. {unexpected[0]}); is it an adapter of this {what}?"
        )


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
    used = tuple(t for t in MMDIT_LORA_TARGETS if any(n.endswith("." + t) for n in adapted))
    matched = {n for n in plain if any(n.endswith("." + t) for t in used)}
    return used if matched == adapted else tuple(sorted(adapted))


def adapted_switches(
    parts: dict[str, nn.Module], layout: PipelineLayout, path: Path
) -> dict[str, bool]:
    """The `train_*` switches that rebuild the adapter's parts: on where it adapts the parts
    of a switch, off where none; LoraError where it adapts only some of them (one of SD3's two
    CLIP encoders: shadows adapt both or neither)."""
    switches = {}
    for switch, names in part_switches(layout).items():
        adapted = [n for n in names if n in parts]
        if adapted and len(adapted) < len(names):
            raise LoraError(
                f"LoRA adapter {path}: adapts {adapted} but not {sorted(set(names) - set(adapted))}"
                f" ({switch} trains them together): shadows could not be trained the same way"
            )
        switches[switch] = bool(adapted)
    return switches


def attach_adapter(
    module: LatentTextToImageModule, path: str | Path, layout: PipelineLayout
) -> None:
    """Load an external LoRA adapter into a module built without one, and record its rank,
    alpha, layers and adapted parts in the module's hparams (what a checkpoint rebuilds it
    from). A peft folder adapts the layout's denoiser; a diffusers file goes through the
    module's pipeline (`load_lora`: every part it has weights for)."""
    path = Path(path)
    if adapter_kind(path) == "peft":
        _load_peft_folder(module, path, layout.denoiser)
    else:
        load_lora(module, path)
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
    hp.update(adapted_switches(parts, layout, path))


def target_module(
    pipeline: str, lora: str, settings: dict[str, Any], float32_parts: tuple[str, ...] = ()
) -> LatentTextToImageModule:
    """The external target: the module of the folder's family with `settings` (sampler,
    resolution... of the shadows' config) over the pipeline folder, with the LoRA adapter if
    any; frozen, in eval mode. With a reduced `frozen_dtype` in `settings`, the parts in
    `float32_parts` (those the shadows train in full) are read in float32, as the shadows hold
    them: target and shadows are then scored in the same precision."""
    layout = pipeline_layout(pipeline)
    fixed = dict(
        preset="pretrained",
        pretrained=str(pipeline),
        autoencoder="",
        tokenizer="",
        lora_rank=0,
        ema_decay=0.0,
        **dict.fromkeys(part_switches(layout), False),  # the folder's weights, as they are
    )
    if float32_parts and settings.get("frozen_dtype", "float32") != "float32":
        fixed["float32_parts"] = tuple(float32_parts)
    module = target_class(layout)(**{**settings, **fixed})
    if lora:
        attach_adapter(module, lora, layout)
    return module.requires_grad_(False).eval()


def write_target_checkpoint(module: LatentTextToImageModule, card: RunCard, path: Path) -> Path:
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
