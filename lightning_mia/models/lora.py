"""LoRA fine-tuning of the latent families (peft adapters), and its diffusers-format export.

    python train.py fit --config configs/diffusion/lora.yaml                     # rank-4 target
    python train.py fit --config configs/diffusion/lora.yaml --data.model_index 1  # shadow 1
    python -m lightning_mia.models.lora runs/x/diffusion-target-000/checkpoints/last.ckpt out/
    pipe = StableDiffusionPipeline.from_pretrained(base); pipe.load_lora_weights("out/")

With `lora_rank > 0`, peft LoRA adapters (`lora_targets`: the attention projections by default,
as diffusers' `train_text_to_image_lora.py` and `train_dreambooth_lora_sd3.py`) go into the
denoiser (the diffusion family's UNet, the flow family's SD3 or FLUX transformer) and, with
`train_text_encoder`, into the CLIP text encoder(s) (SD3's two, FLUX's one; never a T5: the
module's `never_trained`); every base weight stays frozen. On the
`pretrained` preset a checkpoint then holds only the adapters plus a reference (path and sha256,
`base_reference`) to the folder the base weights come from; `stored_elsewhere` says which keys
those are (also the frozen parts of a full fine-tune, every weight of an external target that is
the folder's, and the T5 encoders of SD3 and FLUX folders, never trained here).
`export_lora` writes `pytorch_lora_weights.safetensors` (diffusers' LoRA format, with the peft
config as metadata) that a plain `StableDiffusionPipeline.load_lora_weights` (or the SD3 or
FLUX pipeline's) reads; `load_lora` reads such a file back into a module, refusing an adapter
made for another model, in whole or in part.
"""

from __future__ import annotations

import argparse
import logging
import re
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from lightning_mia.errors import UserError
from lightning_mia.paths import atomic_write_json, write_folder_atomically

# UNet attention (to_*) and CLIP text attention (*_proj) projections: a name matches a module
# whose path ends with it, so one list serves both parts
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "q_proj", "k_proj", "v_proj", "out_proj")
# the MMDiT's joint attention also projects the text stream (add_*_proj, to_add_out)
MMDIT_LORA_TARGETS = (*LORA_TARGETS, "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
ADAPTER = "default"  # peft adapter name: keys read `...to_q.lora_A.default.weight`
# the parts a module may carry adapters in, and the hparam that says whether each is trained
# (None: never trained here, always the pretrained folder's: SD3's T5 encoder)
PART_SWITCHES = {
    "unet": "train_unet",
    "transformer": "train_transformer",
    "text_encoder": "train_text_encoder",
    "text_encoder_2": "train_text_encoder",
    "text_encoder_3": None,
}
LORA_PARTS = tuple(p for p, switch in PART_SWITCHES.items() if switch)
LORA_WEIGHTS = "pytorch_lora_weights.safetensors"  # what diffusers' save_lora_weights writes
BASE_FILE = "base.json"  # beside an export: the base pipeline (path, sha256) it applies to
NO_KEYS_MESSAGE = "No LoRA keys associated to"  # diffusers' warning for a part left alone
# diffusers' warning for adapter weights that fit no layer: the keys, up to the sentence's end
UNFIT_KEYS = re.compile(r"led to unexpected keys found in the model:\s*(.*?)\.(?:\s|$)")


class LoraError(UserError):
    """A LoRA setting or adapter this package cannot use as asked."""


def lora_config(rank: int, alpha: float, targets: tuple[str, ...] | list[str]) -> Any:
    """The peft `LoraConfig`: scale alpha / rank (alpha 0 = rank: diffusers' convention)."""
    from peft import LoraConfig

    return LoraConfig(
        r=rank,
        lora_alpha=alpha or rank,
        init_lora_weights="gaussian",  # A ~ N(0, 1/r), B = 0: training starts at the base model
        target_modules=list(targets),
    )


def add_lora(part: nn.Module, rank: int, alpha: float, targets: tuple[str, ...], name: str) -> None:
    """Put LoRA adapters into `part` (freezing its base weights); one line when nothing matches."""
    from peft import inject_adapter_in_model

    if rank < 1:
        raise LoraError(f"lora_rank must be >= 1 to add adapters, got {rank}")
    try:
        inject_adapter_in_model(lora_config(rank, alpha, targets), part, adapter_name=ADAPTER)
    except ValueError as err:
        what = f"lora_targets {list(targets)} match no layer of the {name}"
        raise LoraError(f"{what} ({err})") from err


def add_adapters(module: nn.Module) -> None:
    """A latent family module's LoRA set-up from its hparams: adapters in each part it has
    whose `train_*` switch is on (the denoiser, the text encoders: `PART_SWITCHES`); and the
    hooks that keep the pretrained folder's weights out of its checkpoints."""
    hp = module.hparams
    for name in LORA_PARTS:
        part = getattr(module, name, None)
        never = name in getattr(module, "never_trained", ())  # a T5 encoder (models.flow)
        if hp.lora_rank and part is not None and hp.get(PART_SWITCHES[name], False) and not never:
            add_lora(part, hp.lora_rank, hp.lora_alpha, tuple(hp.lora_targets), type(part).__name__)
    module.register_state_dict_post_hook(drop_folder_keys)
    module.register_load_state_dict_post_hook(ignore_missing_folder_keys)


def stored_elsewhere(hparams: Any, key: str, never: tuple[str, ...] = ()) -> bool:
    """True for a state-dict key whose tensor is the pretrained folder's, unchanged: the base
    weights under LoRA, a part that is not trained, a part the module never trains (`never`:
    its `never_trained`, a folder's T5). Checkpoints leave them out."""
    if hparams.get("preset") != "pretrained" or ".lora_" in key:
        return False
    part = key.split(".", 1)[0]
    if part not in PART_SWITCHES:
        return False
    switch = PART_SWITCHES[part]
    if switch is None or part in never:
        return True
    return hparams.get("lora_rank", 0) > 0 or not hparams.get(switch, True)


def _never(module: nn.Module) -> tuple[str, ...]:
    return tuple(getattr(module, "never_trained", ()))


def drop_folder_keys(module: nn.Module, state_dict: dict, prefix: str, meta: Any) -> None:
    """State-dict post hook: leave out what `stored_elsewhere` says the folder holds."""
    for key in [k for k in state_dict if k.startswith(prefix)]:
        if stored_elsewhere(module.hparams, key[len(prefix) :], _never(module)):
            del state_dict[key]


def ignore_missing_folder_keys(module: nn.Module, incompatible: Any) -> None:
    """Load post hook: the folder's weights are already in place, not in the checkpoint."""
    missing = incompatible.missing_keys
    missing[:] = [k for k in missing if not stored_elsewhere(module.hparams, k, _never(module))]


def adapter_parts(module: nn.Module) -> dict[str, nn.Module]:
    """The parts of a latent family module that carry a LoRA adapter."""
    parts = {name: getattr(module, name, None) for name in LORA_PARTS}
    return {n: p for n, p in parts.items() if ADAPTER in getattr(p, "peft_config", {})}


def first_line(err: BaseException) -> str:
    """An exception's first line (a library's message may go on for pages; a heading that
    ends in ':' with its first item), or its type."""
    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
    if not lines:
        return type(err).__name__
    return " ".join(lines[:2]) if lines[0].endswith(":") and len(lines) > 1 else lines[0]


@contextmanager
def quiet_lora_loading() -> Iterator[list[str]]:
    """While diffusers loads a LoRA: yield the adapter weights it reports as fitting no layer
    ("unexpected keys": `load_lora` refuses such an adapter in one line), caught by a handler of
    ours with the diffusers logger at WARNING at least, whatever `DIFFUSERS_VERBOSITY` says;
    and drop from its own handlers those reports, errors (a failed load logs the whole
    state-dict report before it raises, and the raise becomes one LoraError line), "No LoRA keys
    associated to <part>" (a part the adapter leaves alone, as most leave the text encoders;
    `load_lora` says when it fits no part) and whatever the user's verbosity hid."""
    logger = logging.getLogger("diffusers")
    shown_from, level = logger.getEffectiveLevel(), logger.level
    unfit: list[str] = []

    class Unfit(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            found = UNFIT_KEYS.search(record.getMessage())
            if found:
                unfit.extend(k.strip() for k in found.group(1).split(","))

    def quiet(record: logging.LogRecord) -> bool:
        message = str(record.msg)
        if UNFIT_KEYS.search(message) or message.startswith(NO_KEYS_MESSAGE):
            return False
        return shown_from <= record.levelno < logging.ERROR

    catcher, handlers = Unfit(logging.WARNING), list(logger.handlers)
    for handler in handlers:
        handler.addFilter(quiet)
    logger.addHandler(catcher)
    logger.setLevel(min(shown_from, logging.WARNING))
    try:
        yield unfit
    finally:
        logger.setLevel(level)
        logger.removeHandler(catcher)
        for handler in handlers:
            handler.removeFilter(quiet)


def load_lora(module: nn.Module, path: str | Path) -> None:
    """Load a diffusers-format LoRA (`pytorch_lora_weights.safetensors`, or a folder holding
    one) into the module's parts through its pipeline's `load_lora_weights`; LoraError, one
    line, when diffusers cannot read it, when some of its weights fit no layer of the module
    (an adapter of another transformer whose first blocks happen to match) or when none does."""
    path = Path(path)
    pipe = module.pipeline()  # shares the module's denoiser and text encoders
    where = (path.parent, path.name) if path.is_file() else (path, None)
    # peft warns of an adapter that fits badly before the load is refused: held back so that
    # a refusal is one line, and issued as they were when the adapter loads
    with warnings.catch_warnings(record=True) as held:
        warnings.simplefilter("default")
        try:
            with quiet_lora_loading() as unfit:
                pipe.load_lora_weights(str(where[0]), weight_name=where[1], adapter_name=ADAPTER)
        except (ValueError, KeyError, RuntimeError, OSError) as err:
            failed: Exception | None = err
        else:
            failed = None
    refuse_unfit(module, path, pipe, unfit, failed)
    for w in held:
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno, source=w.source)


def refuse_unfit(
    module: nn.Module, path: Path, pipe: Any, unfit: list[str], failed: Exception | None
) -> None:
    """`load_lora`'s one-line refusals: a load that failed, weights that fit no layer, an
    adapter of which nothing fits."""
    if failed is not None:
        raise LoraError(
            f"LoRA adapter {path}: diffusers cannot load it ({first_line(failed)}); an adapter "
            "made for another model?"
        ) from failed
    if unfit:
        raise LoraError(
            f"LoRA adapter {path}: {len(unfit)} of its weights fit no layer of this "
            f"{type(pipe).__name__} (e.g. {unfit[0]}): an adapter made for another model?"
        )
    if not adapter_parts(module):
        raise LoraError(
            f"LoRA adapter {path}: no weight of it fits this {type(pipe).__name__}'s parts "
            f"({', '.join(n for n in LORA_PARTS if getattr(module, n, None) is not None)}): "
            "an adapter made for another model?"
        )


def export_lora(module: nn.Module, folder: str | Path) -> Path:
    """Write the module's adapters in diffusers' LoRA format (+ base.json) into `folder`."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import get_peft_model_state_dict

    parts = adapter_parts(module)
    if not parts:
        raise LoraError("this model has no LoRA adapter to export (lora_rank is 0)")
    pipeline_class = type(module.pipeline())  # StableDiffusion(3)Pipeline
    # Stable Diffusion LoRAs are written with diffusers' key names (train_text_to_image_lora.py);
    # SD3's loader reads peft's (train_dreambooth_lora_sd3.py writes them unconverted)
    convert = pipeline_class.__name__ == "StableDiffusionPipeline"
    layers, metadata = {}, {}
    for name, part in parts.items():
        state = get_peft_model_state_dict(part, adapter_name=ADAPTER)
        layers[f"{name}_lora_layers"] = convert_state_dict_to_diffusers(state) if convert else state
        metadata[f"{name}_lora_adapter_metadata"] = part.peft_config[ADAPTER].to_dict()
    base = module.card.base if module.card else {}

    def write(tmp: Path) -> None:
        pipeline_class.save_lora_weights(tmp, **layers, **metadata, weight_name=LORA_WEIGHTS)
        atomic_write_json(tmp / BASE_FILE, {"base": base, "lora_rank": module.hparams.lora_rank})

    return write_folder_atomically(folder, write)


def main(argv: list[str] | None = None) -> None:
    """`python -m lightning_mia.models.lora <checkpoint> <out_folder>`."""
    from lightning_mia.models.registry import load_family_module

    p = argparse.ArgumentParser(
        prog="python -m lightning_mia.models.lora",
        description="Export a LoRA checkpoint's adapters in diffusers' LoRA format.",
    )
    p.add_argument("ckpt", help="a lightning_mia diffusion checkpoint trained with lora_rank > 0")
    p.add_argument("output", help="folder to write (pytorch_lora_weights.safetensors, base.json)")
    args = p.parse_args(argv)
    try:
        folder = export_lora(load_family_module(args.ckpt), args.output)
    except UserError as err:
        raise SystemExit(f"error: {err}") from None
    rank_zero_info(f"wrote {folder / LORA_WEIGHTS}; load with pipe.load_lora_weights('{folder}')")


if __name__ == "__main__":
    main()
