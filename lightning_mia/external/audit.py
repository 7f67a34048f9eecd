"""Prepare the experiment folder of an external target: splits, target checkpoint, shadows.

    python attack.py --external.pipeline /models/sd3 --external.lora my_lora/ \
        --external.members members.jsonl --external.non_members non_members.jsonl \
        --experiment runs/audit --query.encoder /models/clip-vit-b32

The pipeline folder's class (model_index.json, `pipeline_layout`) says which family audits it:
a StableDiffusionPipeline is the diffusion family's, a StableDiffusion3Pipeline the flow
family's. `prepare_external(options)` checks every input first (folders of one pipeline class,
an adapter that fits the denoiser, readable lists, a shadow config of that family), then writes
`splits.json` (`external.splits`), the target's checkpoint (`external.target`) as row 0, then
trains what is missing — the attacker's encoder (unless `--query.encoder`) and shadows 1..K
fine-tuned from the same base the same way (LoRA of the adapter's rank, alpha, layers and parts;
or in full, the text encoders too where they changed) — each as its own
`python -m lightning_mia.cli fit` process from a config written to `<experiment>/external/` (the
shadows' config file — by default the family's LoRA or full fine-tune config of the layout —
with the data of this experiment, the base and the LoRA settings put in). Finished stages are
skipped and killed ones resume, so a second command reuses everything. It returns the options
with `ckpt` set to the target's checkpoint: the attack then runs as for any checkpoint.
"""

from __future__ import annotations

import dataclasses
import importlib
import shlex
from pathlib import Path
from typing import Any

import yaml
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from lightning_mia.card import RunCard, load_checkpoint, read_card
from lightning_mia.data.member_lists import MemberListSource
from lightning_mia.data.sources import ImageCaptionSource
from lightning_mia.errors import UserError
from lightning_mia.external.splits import external_splits, keep_external_splits
from lightning_mia.external.target import (
    adapter_kind,
    part_switches,
    target_class,
    target_module,
    write_target_checkpoint,
)
from lightning_mia.models.latent import LatentTextToImageModule
from lightning_mia.models.pipeline_folder import (
    PipelineLayout,
    base_reference,
    check_pipeline_folder,
    files_sha256,
    native_resolution,
    pipeline_layout,
    pipeline_sha256,
)
from lightning_mia.paths import ExperimentLayout, atomic_write_bytes
from lightning_mia.stages import fit_arguments, run_fit_process

FOLDER = "external"  # <experiment>/external/: the configs the stages were trained from
MEMBER_LIST_SOURCE = f"{MemberListSource.__module__}.{MemberListSource.__qualname__}"
# what the audit sets in the shadows' model config besides the family's `train_*` switches
# (`target.part_switches`); the rest is the config's own recipe
LORA_FIELDS = ("lora_rank", "lora_alpha", "lora_targets")


class ExternalError(UserError):
    """An external target that cannot be audited as given."""


def check_options(options: Any) -> list[str]:
    """Every problem with the external-target options, for one error."""
    external = options.external
    problems = [
        f"--external.{name} is needed with --external.pipeline"
        for name in ("members", "non_members")
        if not getattr(external, name)
    ]
    if not options.experiment:
        problems.append("--experiment is needed with --external.pipeline")
    if options.ckpt:
        problems.append("give --ckpt (a checkpoint of this package) or --external.pipeline")
    if external.lora and external.base:
        problems.append(
            "--external.base is for a fully fine-tuned pipeline; with --external.lora the "
            "pipeline is the base"
        )
    if not external.lora and not external.base:
        problems.append(
            "a fully fine-tuned --external.pipeline needs --external.base <the pipeline it "
            "started from> (shadows are fine-tuned from it); a LoRA fine-tune needs "
            "--external.lora"
        )
    return problems


def read_yaml(path: str | Path, what: str) -> dict[str, Any]:
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as err:
        raise ExternalError(f"{what} {path}: not a readable YAML file ({err})") from err
    if not isinstance(data, dict):
        raise ExternalError(f"{what} {path}: expected a YAML mapping")
    return data


def data_description(path: str) -> dict[str, Any] | None:
    """The base source of `--data`: a YAML with `class_path` + `init_args` (as `data.source` in
    a training config, which is read too), as `{"name", "init_args"}`; None without --data."""
    if not path:
        return None
    spec = read_yaml(path, "data source config")
    spec = spec.get("data", {}).get("source", spec) if "data" in spec else spec
    module, _, name = str(spec.get("class_path", "")).rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError) as err:
        raise ExternalError(f"data source config {path}: no source class_path ({err})") from err
    if not (isinstance(cls, type) and issubclass(cls, ImageCaptionSource)):
        raise ExternalError(f"data source config {path}: {cls} is not an ImageCaptionSource")
    return cls(**spec.get("init_args", {})).describe()


def folder_or_file_sha256(path: Path) -> str:
    """sha256 of one file, or of every file of a folder (`files_sha256`)."""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return files_sha256(path.parent if path.is_file() else path, files)


def facts_of(options: Any, base: str) -> dict[str, Any]:
    """What the report says was given: paths and sha256 of the pipeline, adapter and base."""
    lora = Path(options.lora) if options.lora else None
    return {
        "pipeline": str(options.pipeline),
        "pipeline_sha256": pipeline_sha256(options.pipeline),
        "lora": str(lora) if lora else None,
        "lora_sha256": folder_or_file_sha256(lora) if lora else None,
        "base": str(base),
        "base_sha256": pipeline_sha256(base),
        "members": str(options.members),
        "non_members": str(options.non_members),
        "data": str(options.data) or None,
    }


def check_target(ckpt: Path, splits: Any, facts: dict) -> Path:
    """The target's checkpoint (row 0) an earlier command wrote: of the same inputs?"""
    card = read_card(ckpt)
    before = card.external
    digests = [k for k in facts if k.endswith("sha256")]  # paths may be spelt otherwise
    if any(before.get(k) != facts[k] for k in digests) or card.splits_hash != splits.hash:
        raise ExternalError(
            f"{ckpt} is another target (other pipeline, adapter, lists or splits): use "
            "another --experiment folder"
        )
    return ckpt


def write_target(
    layout: ExperimentLayout, splits: Any, module: LatentTextToImageModule, facts: dict
) -> Path:
    """Write the target's checkpoint (row 0 of its family) and its card."""
    card = RunCard(
        family=module.family,
        preset="pretrained",
        model_index=0,
        splits_hash=splits.hash,
        experiment=str(layout.root),
        **module.card_references(),
        external=facts,
        base=base_reference(facts["pipeline"]),
    )
    ckpt = write_target_checkpoint(module, card, layout.checkpoint(module.family, 0))
    rank_zero_info(f"external target: wrote {ckpt}")
    return ckpt


def stage_config(
    config: dict,
    layout: ExperimentLayout,
    splits: Any,
    init_args: dict,
    train_split: str = "members",
) -> dict:
    """`config` with this experiment's data (the member-list source of splits.json) and
    `init_args` put into its model."""
    kept = {
        k: v
        for k, v in (config.get("data") or {}).items()
        if k in ("batch_size", "num_workers", "query_batch_size")
    }
    source = splits.dataset["source"]
    data = {
        "experiment": str(layout.root),
        "train_split": train_split,
        **splits.config,
        **kept,
        "source": {"class_path": MEMBER_LIST_SOURCE, "init_args": source["init_args"]},
    }
    model = dict(config.get("model") or {})
    model["init_args"] = {**(model.get("init_args") or {}), **init_args}
    return {**config, "model": model, "data": data}


def fit_stage(folder: Path, config: dict, name: str, args: list[str]) -> None:
    """Train one stage in its own process from `config` (written beside the audit's other
    files) unless `folder` is done; resume its last.ckpt."""
    path = folder.parent / FOLDER / f"{name}.yaml"
    atomic_write_bytes(path, yaml.safe_dump(config, sort_keys=False).encode("utf-8"))
    argv = fit_arguments(folder, str(path), args)
    if argv is not None:
        run_fit_process(folder, argv)


def part_changed(pipeline: str, base: str, part: str) -> bool:
    """Whether the files of `<folder>/<part>/` differ between the two folders."""
    digests = {
        files_sha256(f, sorted(p for p in (Path(f) / part).rglob("*") if p.is_file()))
        for f in (pipeline, base)
    }
    return len(digests) > 1


def fine_tuned_switches(pipeline: str, base: str, folder: PipelineLayout) -> dict[str, bool]:
    """The `train_*` switches of shadows fine-tuned in full like `pipeline` from `base`: the
    denoiser's on; a text encoder's where the target's differs from the base's."""
    return {
        switch: folder.denoiser in parts or any(part_changed(pipeline, base, p) for p in parts)
        for switch, parts in part_switches(folder).items()
    }


def shadow_trained_parts(options: Any, base: str, folder: PipelineLayout) -> tuple[str, ...]:
    """The folder parts the shadows train in full (none under LoRA, whose base stays frozen):
    the target reads them in float32 as the shadows hold them (its `float32_parts`)."""
    if options.lora:
        return ()
    on = fine_tuned_switches(options.pipeline, base, folder)
    return tuple(p for switch, parts in part_switches(folder).items() if on[switch] for p in parts)


def shadow_settings(
    target: dict[str, Any], options: Any, base: str, folder: PipelineLayout
) -> dict[str, Any]:
    """The shadows' model arguments that make them fine-tuned like the target (its
    checkpoint's hyper-parameters `target`), from `base`."""
    switches = part_switches(folder)
    fields = {k: target[k] for k in (*LORA_FIELDS, *switches)}
    fields["lora_targets"] = list(fields["lora_targets"])
    if not options.lora:  # a full fine-tune: the denoiser trains; the text encoders if changed
        fields.update(fine_tuned_switches(options.pipeline, base, folder))
        never = [p for p in folder.weight_parts if p in folder.never_trained]
        changed = [p for p in never if part_changed(options.pipeline, base, p)]
        if changed:
            rank_zero_warn(
                f"{options.pipeline}: {changed} differ from the base {base}, and this package "
                "never trains them (a T5 encoder): the shadows keep the base's"
            )
    return {
        **fields,
        "preset": "pretrained",
        "pretrained": str(base),
        "autoencoder": "",
        "tokenizer": "",
        "resolution": target["resolution"],
    }


def audited_layout(pipeline: str, base: str) -> PipelineLayout:
    """The layout of the target's folder (its family audits it), checked, and the base's: a
    folder of the same pipeline class."""
    folder = pipeline_layout(pipeline)
    check_pipeline_folder(pipeline, folder)
    if base != pipeline:
        other = pipeline_layout(base)
        if other.pipeline_class != folder.pipeline_class:
            raise ExternalError(
                f"--external.base {base} holds a {other.pipeline_class}, --external.pipeline "
                f"{pipeline} a {folder.pipeline_class}: give the pipeline the target was "
                "fine-tuned from (a fine-tune keeps its architecture)"
            )
        check_pipeline_folder(base, folder)
    return folder


def shadow_recipe(ext: Any, folder: PipelineLayout) -> tuple[dict[str, Any], dict[str, Any]]:
    """The shadows' training config (`--external.shadow_config`, else the family's LoRA or
    full fine-tune config of the folder's layout) and its model arguments; its model must be
    the module of the folder's family."""
    path = ext.shadow_config or (folder.lora_config if ext.lora else folder.config)
    config = read_yaml(path, "shadow config")
    model = config.get("model") or {}
    cls, name = target_class(folder), str(model.get("class_path", ""))
    module, _, attr = name.rpartition(".")
    try:
        found = getattr(importlib.import_module(module), attr) if module else None
    except (ImportError, AttributeError, ValueError):
        found = None
    if not (isinstance(found, type) and issubclass(found, cls)) and name != cls.__name__:
        raise ExternalError(
            f"shadow config {path}: its model is {name or 'not given'}, not a "
            f"{cls.__module__}.{cls.__qualname__} (the {folder.family} family, which runs "
            f"the {folder.pipeline_class} folder {ext.pipeline})"
        )
    return config, dict(model.get("init_args") or {})


def prepare_external(options: Any) -> Any:
    """Write or check splits and target, train the missing stages; the options to attack with
    (`ckpt` = the target's checkpoint, `experiment` = its folder). Bad input (folders, adapter,
    lists, shadow config) is one error before anything is written."""
    problems = check_options(options)
    if problems:
        raise ExternalError("cannot audit the external target:\n  - " + "\n  - ".join(problems))
    ext = options.external
    base = ext.pipeline if ext.lora else ext.base
    folder = audited_layout(ext.pipeline, base)
    if ext.lora:
        adapter_kind(ext.lora)  # a path that holds no adapter: said now, not after the splits
    layout = ExperimentLayout(options.experiment)
    config, settings = shadow_recipe(ext, folder)
    settings["resolution"] = settings.get("resolution") or native_resolution(ext.pipeline, folder)
    source = MemberListSource(
        ext.members, ext.non_members, data_description(ext.data), settings["resolution"]
    )
    splits = external_splits(  # every listed sample checked; nothing written yet
        source,
        num_shadows=ext.num_shadows,
        seed=options.attack.seed,
        query_fraction=ext.query_fraction,
        public_size=ext.public_size,
    )
    ckpt, facts = layout.checkpoint(folder.family, 0), facts_of(ext, base)
    # built before the splits are saved: an adapter made for another model writes nothing
    kept = shadow_trained_parts(ext, base, folder)
    module = None if ckpt.is_file() else target_module(ext.pipeline, ext.lora, settings, kept)
    splits = keep_external_splits(layout, splits)
    if module is None:
        check_target(ckpt, splits, facts)
    else:
        write_target(layout, splits, module, facts)
        del module  # the shadows train in processes of their own
    hparams = load_checkpoint(ckpt)["hyper_parameters"]
    shadow = stage_config(config, layout, splits, shadow_settings(hparams, ext, base, folder))
    train_stages(layout, splits, options, shadow, folder.family)
    return dataclasses.replace(options, ckpt=str(ckpt), experiment=str(layout.root))


def train_stages(
    layout: ExperimentLayout, splits: Any, options: Any, shadow: dict, family: str
) -> None:
    """Train what is missing: the attacker's encoder (unless `--query.encoder`) and shadows
    1..K of `family` from the config `shadow`."""
    ext = options.external
    if not options.query.encoder:
        encoder = read_yaml(ext.encoder_config, "encoder config")
        split = "public" if splits.public_pool is not None else "auxiliary"
        fit_stage(layout.encoder, stage_config(encoder, layout, splits, {}, split), "encoder", [])
    extra = shlex.split(ext.shadow_args)
    for k in range(1, ext.num_shadows + 1):
        args = [f"--data.model_index={k}", *extra]
        fit_stage(layout.run_dir(family, k), shadow, "shadow", args)
