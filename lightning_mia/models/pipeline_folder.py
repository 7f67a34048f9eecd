"""A local diffusers StableDiffusionPipeline folder as the diffusion family reads it.

    folder = check_pipeline_folder("/models/sd-v1-5")     # layout and family, one clear line
    scheduler_config(folder)["prediction_type"]             # "epsilon" | "v_prediction"
    weights_variant(folder / "unet")                        # None, or "fp16" when only those
    native_resolution(folder)                               # 512 for SD 1.5, 768 for SD 2
    pipeline_sha256(folder)                                 # what a checkpoint records of it

The folder is what `StableDiffusionPipeline.save_pretrained` writes (model_index.json, unet/,
vae/, text_encoder/, tokenizer/, scheduler/); nothing is ever downloaded. A folder of another
pipeline class (SDXL, PixArt, Kandinsky, CompVis LDM-BERT...) is refused by name.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from lightning_mia.card import CheckpointError, RunCard
from lightning_mia.data.sources import file_digests
from lightning_mia.errors import UserError

PIPELINE_PARTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
PIPELINE_CLASSES = ("StableDiffusionPipeline",)  # what model_index.json may name
PART_CLASSES = {"unet": "UNet2DConditionModel", "text_encoder": "CLIPTextModel"}
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


def check_pipeline_folder(folder: str | Path) -> Path:
    """The folder, if it holds a StableDiffusionPipeline; else one PipelineError line."""
    if not str(folder):
        raise PipelineError("preset 'pretrained' needs `pretrained: <local diffusers folder>`")
    path = Path(folder)
    if not path.is_dir():
        raise PipelineError(f"pipeline folder {path}: no such folder")
    index = path / "model_index.json"
    if index.is_file():
        name = _json(index, "pipeline index").get("_class_name")
        if name not in PIPELINE_CLASSES:
            raise PipelineError(
                f"pipeline folder {path} holds a {name} (model_index.json), not a "
                f"{' / '.join(PIPELINE_CLASSES)}: the diffusion family runs UNet2DConditionModel "
                "+ AutoencoderKL/VQModel + CLIPTextModel pipelines only"
            )
    needed = ("unet", "vae", "text_encoder")
    missing = [p for p in needed if not (path / p / "config.json").is_file()]
    if missing:
        raise PipelineError(
            f"pipeline folder {path}: no config.json in {missing} (expected the "
            f"StableDiffusionPipeline layout {'/, '.join(PIPELINE_PARTS)}/)"
        )
    for part, expected in PART_CLASSES.items():
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


def native_resolution(folder: str | Path) -> int:
    """The image side the model was made for: `unet.config.sample_size` x the VAE's factor."""
    unet, vae = part_config(folder, "unet"), part_config(folder, "vae")
    factor = 2 ** (len(vae.get("block_out_channels", [0])) - 1)
    return int(unet["sample_size"]) * factor


def files_sha256(root: str | Path, paths: list[Path]) -> str:
    """One sha256 over (path relative to `root`, file sha256) of `paths`, in name order;
    file digests are cached by size and mtime (a 4 GB model is read once)."""
    root, paths = Path(root), sorted(paths)
    digest = hashlib.sha256()
    for path, value in zip(paths, file_digests(paths)):
        digest.update(f"{path.relative_to(root).as_posix()}\t{value}\n".encode())
    return digest.hexdigest()


def pipeline_files(folder: str | Path) -> list[Path]:
    """The files a pipeline is made of: model_index.json and the parts' files, without the
    weights of variants that are not loaded (an fp32 folder that also ships fp16 files)."""
    folder, files = Path(folder), []
    if (folder / "model_index.json").is_file():
        files.append(folder / "model_index.json")
    for part in PIPELINE_PARTS:
        if not (folder / part).is_dir():
            continue
        loaded = weights_variant(folder / part) if part in ("unet", "vae", "text_encoder") else None
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
