"""A local diffusers pipeline folder as a family reads it (`PipelineLayout`).

    folder = check_pipeline_folder("/models/sd-v1-5")     # layout and family, one clear line
    check_pipeline_folder("/models/sd3", SD3_LAYOUT)       # another family's layout
    pipeline_layout("/models/sd3").family                   # "flow": which family runs it
    scheduler_config(folder)["prediction_type"]             # "epsilon" | "v_prediction"
    weights_variant(folder / "unet")                        # None, or "fp16" when only those
    native_resolution(folder)                               # 512 for SD 1.5, 768 for SD 2
    pipeline_sha256(folder)                                 # what a checkpoint records of it

The diffusion family's folder is what `StableDiffusionPipeline.save_pretrained` writes
(model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/, `SD_LAYOUT`); other
families register their layout in `PIPELINE_LAYOUTS` beside their code (the flow family's
StableDiffusion3Pipeline in `models/flow_presets.py`). Nothing is ever downloaded. A folder of
another pipeline class (SDXL, PixArt, Kandinsky, CompVis LDM-BERT...) is refused by name, naming
the family that runs it when one does.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lightning_mia.card import CheckpointError, RunCard
from lightning_mia.data.sources import file_digests
from lightning_mia.errors import UserError
from lightning_mia.registry import Registry


@dataclass(frozen=True)
class PipelineLayout:
    """What a family reads of a diffusers pipeline folder."""

    family: str  # the family that runs such folders
    pipeline_class: str  # model_index.json's _class_name
    parts: tuple[str, ...]  # the subfolders that make the model (read and hashed)
    required: tuple[str, ...]  # the subfolders that must hold a config.json
    denoiser: str  # the subfolder whose sample_size sets the native resolution
    what: str  # the architecture, for messages
    part_classes: dict[str, str] = field(default_factory=dict)  # subfolder -> its class
    config: str = ""  # the family's config that fine-tunes such a folder (in full)
    lora_config: str = ""  # the family's config that LoRA-fine-tunes such a folder
    sample_size: int = 0  # the latent side when the denoiser's config has none (FLUX: 128)
    never_trained: tuple[str, ...] = ()  # weight parts this package never trains (T5 encoders)

    @property
    def weight_parts(self) -> tuple[str, ...]:
        """The parts with weights (tokenizers and the scheduler have none)."""
        return tuple(p for p in self.parts if not p.startswith(("tokenizer", "scheduler")))


SD_LAYOUT = PipelineLayout(
    family="diffusion",
    pipeline_class="StableDiffusionPipeline",
    parts=("unet", "vae", "text_encoder", "tokenizer", "scheduler"),
    required=("unet", "vae", "text_encoder"),
    denoiser="unet",
    what="UNet2DConditionModel + AutoencoderKL/VQModel + CLIPTextModel",
    part_classes={"unet": "UNet2DConditionModel", "text_encoder": "CLIPTextModel"},
    config="configs/diffusion/pretrained.yaml",
    lora_config="configs/diffusion/lora.yaml",
)
# the layouts by pipeline class: each family registers its own beside its code
PIPELINE_LAYOUTS: Registry[PipelineLayout] = Registry(
    "pipeline class", plugins="lightning_mia.models"
)
PIPELINE_LAYOUTS.register(SD_LAYOUT.pipeline_class, SD_LAYOUT)
PIPELINE_PARTS = SD_LAYOUT.parts
WEIGHT_STEMS = ("diffusion_pytorch_model", "model", "pytorch_model")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".safetensors.index.json", ".bin.index.json")
KNOWN_VARIANTS = ("fp16", "bf16", "fp32", "ema", "non_ema")


class PipelineError(UserError):
    """A pipeline folder that is missing, incomplete, or of a family this package cannot run."""


def _json(path: Path, what: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise PipelineError(f"{what} {path}: not readable JSON ({err})") from err
    if not isinstance(data, dict):
        raise PipelineError(f"{what} {path}: expected a JSON object")
    return data


def pipeline_class(folder: str | Path) -> str | None:
    """model_index.json's `_class_name` of a folder (None without one)."""
    index = Path(folder) / "model_index.json"
    return _json(index, "pipeline index").get("_class_name") if index.is_file() else None


def pipeline_layout(folder: str | Path) -> PipelineLayout:
    """The layout of a folder by its model_index.json (StableDiffusionPipeline without one);
    PipelineError for a pipeline class no family runs."""
    name = pipeline_class(folder)
    layout = SD_LAYOUT if name is None else PIPELINE_LAYOUTS.get(name)
    if layout is None:
        raise PipelineError(
            f"pipeline folder {folder} holds a {name} (model_index.json): no family of this "
            f"package runs it (known: {PIPELINE_LAYOUTS.names()})"
        )
    return layout


def _refuse_other_class(path: Path, layout: PipelineLayout) -> None:
    name = pipeline_class(path)
    if name is None or name == layout.pipeline_class:
        return
    other = PIPELINE_LAYOUTS.get(name)
    hint = f"; a {name} is the {other.family} family's ({other.config})" if other else ""
    raise PipelineError(
        f"pipeline folder {path} holds a {name} (model_index.json), not a "
        f"{layout.pipeline_class}: the {layout.family} family runs {layout.what} pipelines "
        f"only{hint}"
    )


def check_pipeline_folder(folder: str | Path, layout: PipelineLayout = SD_LAYOUT) -> Path:
    """The folder, if it holds a pipeline of `layout`; else one PipelineError line."""
    if not str(folder):
        raise PipelineError("preset 'pretrained' needs `pretrained: <local diffusers folder>`")
    path = Path(folder)
    if not path.is_dir():
        raise PipelineError(f"pipeline folder {path}: no such folder")
    _refuse_other_class(path, layout)
    missing = [p for p in layout.required if not (path / p / "config.json").is_file()]
    if missing:
        raise PipelineError(
            f"pipeline folder {path}: no config.json in {missing} (expected the "
            f"{layout.pipeline_class} layout {'/, '.join(layout.parts)}/)"
        )
    for part, expected in layout.part_classes.items():
        if not (path / part / "config.json").is_file():
            continue  # an optional part (SD3's text_encoder_3)
        config = _json(path / part / "config.json", f"{part} config")
        found = config.get("_class_name") or (config.get("architectures") or [None])[0]
        if found is not None and found != expected:
            raise PipelineError(f"pipeline folder {path}: {part}/ is a {found}, not a {expected}")
    return path


def part_config(folder: str | Path, part: str) -> dict[str, Any]:
    """`<folder>/<part>/config.json` as a dict."""
    return _json(Path(folder) / part / "config.json", f"{part} config")


def scheduler_config(folder: str | Path) -> dict[str, Any]:
    """The folder's `scheduler/scheduler_config.json`: its noise schedule and prediction type."""
    path = Path(folder) / "scheduler" / "scheduler_config.json"
    if not path.is_file():
        raise PipelineError(
            f"pipeline folder {folder}: no scheduler/scheduler_config.json (the model's noise "
            "schedule and prediction type would be guesses)"
        )
    return _json(path, "scheduler config")


def _variant_of(name: str) -> str | None:
    """The variant a weight file belongs to ("fp16" of `model.fp16.safetensors`), else None."""
    parts = name.replace("-", ".").split(".")
    return next((v for v in KNOWN_VARIANTS if v in parts[1:]), None)


def _is_weights(name: str) -> bool:
    return name.startswith(WEIGHT_STEMS) and (name.endswith(WEIGHT_SUFFIXES) or ".index." in name)


def weights_variant(part_folder: str | Path) -> str | None:
    """None when the part has full-precision weights, else the variant it has ("fp16"
    preferred): what `from_pretrained(..., variant=...)` must be told."""
    path = Path(part_folder)
    names = [p.name for p in path.iterdir() if p.is_file()] if path.is_dir() else []
    variants = {_variant_of(n) for n in names if _is_weights(n)}
    if None in variants:
        return None
    if not variants:
        raise PipelineError(f"{path}: no weights (no {WEIGHT_STEMS[0]} / model file)")
    return "fp16" if "fp16" in variants else sorted(variants)[0]


def native_resolution(folder: str | Path, layout: PipelineLayout = SD_LAYOUT) -> int:
    """The image side the model was made for: the denoiser's `sample_size` (unet/,
    transformer/) x the VAE's factor."""
    denoiser, vae = part_config(folder, layout.denoiser), part_config(folder, "vae")
    factor = 2 ** (len(vae.get("block_out_channels", [0])) - 1)
    return int(denoiser.get("sample_size") or layout.sample_size) * factor


def files_sha256(root: str | Path, paths: list[Path]) -> str:
    """One sha256 over (path relative to `root`, file sha256) of `paths`, in name order;
    file digests are cached by size and mtime (a 4 GB model is read once)."""
    root, paths = Path(root), sorted(paths)
    digest = hashlib.sha256()
    for path, value in zip(paths, file_digests(paths)):
        digest.update(f"{path.relative_to(root).as_posix()}\t{value}\n".encode())
    return digest.hexdigest()


def pipeline_files(folder: str | Path) -> list[Path]:
    """The files a pipeline is made of: model_index.json and its layout's parts' files, without
    the weights of variants that are not loaded (an fp32 folder that also ships fp16 files)."""
    folder, files = Path(folder), []
    if (folder / "model_index.json").is_file():
        files.append(folder / "model_index.json")
    layout = pipeline_layout(folder)
    for part in layout.parts:
        if not (folder / part).is_dir():
            continue
        loaded = weights_variant(folder / part) if part in layout.weight_parts else None
        for path in sorted((folder / part).rglob("*")):
            if path.is_file() and not path.name.startswith("."):
                if not (_is_weights(path.name) and _variant_of(path.name) != loaded):
                    files.append(path)
    return files


def pipeline_sha256(folder: str | Path) -> str:
    """The sha256 of a pipeline folder's model files (see `pipeline_files`)."""
    return files_sha256(folder, pipeline_files(folder))


def base_reference(folder: str | Path) -> dict[str, str]:
    """What a checkpoint records of the pretrained folder it was built on."""
    return {"path": str(folder), "sha256": pipeline_sha256(folder)}


def record_references(module: Any, card: dict[str, Any]) -> None:
    """Into a checkpoint's card: the autoencoder's weights hash and, on the pretrained preset,
    the folder whose weights the checkpoint leaves out (`base`: path and sha256)."""
    card["autoencoder_sha256"] = module.vae_fingerprint()
    if module.hparams.preset == "pretrained":
        card["base"] = card.get("base") or base_reference(module.hparams.pretrained)


def check_references(module: Any, card: RunCard) -> None:
    """CheckpointError when the autoencoder or the base folder differs from the recorded one."""
    saved = card.autoencoder_sha256
    if saved and saved != module.vae_fingerprint():
        raise CheckpointError(
            f"checkpoint was trained with a different autoencoder than the one now in "
            f"{module.card_references()['autoencoder']} (weights hash differs)"
        )
    base = card.base
    if base and base_reference(module.hparams.pretrained)["sha256"] != base["sha256"]:
        raise CheckpointError(
            f"checkpoint's base {base['path']} (sha256 {base['sha256'][:12]}) is not the "
            f"folder now at {module.hparams.pretrained}: its files changed"
        )
