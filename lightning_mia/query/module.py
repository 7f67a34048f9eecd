"""`QueryModule`: query one trained text-to-image model with its members and non-members.

    python train.py predict --config configs/query/default.yaml \
        --model.ckpt runs/demo/diffusion-shadow-001/checkpoints/last.ckpt --model.query.num_images 8

For every sample of the model's row of splits.json, the caption the `QuerySpec` asks for (the
ground truth, the attacker's captioner's, a fixed one or another sample's) goes to `generate`
with N images and a seed derived from (seed, sample_id) — so the result does not depend on
batching, ranks or interruptions — and the features of the spec's groups and gray-box signals
are computed from (query image, generated images, caption). `ShardWriter` writes them as shards
that record the portable spec (`QueryRecord`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Trainer

from lightning_mia.card import read_card
from lightning_mia.errors import UserError
from lightning_mia.features import FEATURE_GROUPS, FeatureExtractor, encoder_groups
from lightning_mia.graybox import check_signals, compute_signals, signal_queries, signals_for
from lightning_mia.models.registry import family_class, load_family_module
from lightning_mia.paths import ExperimentLayout, StagePaths
from lightning_mia.query.writer import to_uint8
from lightning_mia.specs.attacks import query_feature_groups
from lightning_mia.specs.query import QueryRecord, QuerySpec
from lightning_mia.stage_module import StageModule

SEED_STRIDE = 2**32
ANY_TIMESTEP = 2**62  # before the model is loaded its time range is unknown: checked later


class QueryError(UserError):
    """A query that cannot run as configured (missing encoder, unknown feature group...)."""


def sample_seeds(seed: int, sample_ids: torch.Tensor) -> list[int]:
    """One generation seed per sample, a function of (seed, sample_id) only."""
    return [(seed * SEED_STRIDE + int(s)) % 2**63 for s in sample_ids.tolist()]


def completed_spec(spec: QuerySpec, family: str) -> QuerySpec:
    """`spec` with its defaults filled in for `family`: the feature groups (None = every
    black-box group) and the signals (`all` = every signal of the family)."""
    groups = query_feature_groups() if spec.feature_groups is None else spec.feature_groups
    signals = signals_for(family) if "all" in spec.signals else spec.signals
    return spec.with_updates(feature_groups=tuple(groups), signals=tuple(signals))


class QueryModule(StageModule):
    """Generate and extract features for one model's members and non-members (predict only)."""

    def __init__(
        self,
        ckpt: str,
        query: QuerySpec = QuerySpec(),
        row: int | None = None,
        save_images: bool = False,
    ) -> None:
        """
        Args:
            ckpt: checkpoint of the target or shadow model to query.
            query: what the query is (N, seeds, captions, encoder, features, signals).
            row: query the samples of another row of splits.json instead of the model's own
                (labelled with this model's membership), into `queries/<run>/row-<row>/`: a
                shadow queried on the target's samples (row 0) calibrates LiRA.
            save_images: also write the generated images as PNG under the query folder.
        """
        super().__init__()
        self.save_hyperparameters()
        # the run card is read now; the model and encoders are built in configure_model, so a
        # LightningCLI instantiating this module does not also instantiate the loaded model
        self.card = read_card(ckpt)
        self.layout = ExperimentLayout(self.card.experiment)
        spec = completed_spec(query, self.card.family)
        problems = FEATURE_GROUPS.check(list(spec.feature_groups))
        if problems:
            raise QueryError(problems[0])
        self.spec = spec.portable(self.layout.root, bool(encoder_groups(spec.feature_groups)))
        self.folders = self.spec.resolved(self.layout.root)  # encoder and captioner to open
        if self.spec.signals:  # names and family now; timesteps once the model is known
            check_signals(
                self.card.family, self.spec.signals, self.spec.signal_options, ANY_TIMESTEP
            )
        self._check_encoder()
        if self.spec.captioner:  # refused now, before a trainer or a query folder exists
            from lightning_mia.models.captioner import check_captioner

            check_captioner(self.folders.captioner, self.card.splits_hash)
        self.seconds: dict[str, float] = {}  # measured cost per stage, this rank
        self.num_queried = 0
        self.caption_of: dict[int, str] = {}  # swapped-caption: sample id -> caption used
        self.model: torch.nn.Module | None = None

    def _check_encoder(self) -> None:
        needs = sorted(encoder_groups(self.spec.feature_groups))
        if needs and not Path(self.folders.encoder).is_dir():
            raise QueryError(
                f"encoder folder {self.folders.encoder} does not exist: feature groups "
                f"{needs} need an image-text encoder. Train the attacker's encoder (python "
                "train.py fit --config configs/encoder/tiny.yaml) or pass --query.encoder "
                "<local CLIP folder>."
            )

    @property
    def run_name(self) -> str:
        return self.card.run_name

    @property
    def folder(self) -> Path:
        """`queries/<run><tag>/` (`.../row-<r>/` when it queries another row's samples)."""
        return self.layout.queries(self.run_name, self.spec.tag, self.hparams.row)

    def stage_paths(self, layout: ExperimentLayout, model_index: int = 0) -> StagePaths:
        """Where this stage writes: its query folder, run name and role (W&B)."""
        return self.layout.query_stage(self.run_name, self.spec.tag)

    @classmethod
    def complete_data_config(cls, model_args: Any, data: Any) -> None:
        """A query reads its data from the checkpoint's experiment: the row from the run card,
        the source and the split settings from splits.json (no data config is needed)."""
        from jsonargparse import Namespace

        from lightning_mia.data.sources import SOURCES
        from lightning_mia.data.splits import load_splits

        card = read_card(model_args.ckpt)
        data.experiment, data.model_index = card.experiment, card.model_index
        splits = load_splits(ExperimentLayout(card.experiment).splits)
        for key, value in splits.config.items():
            data[key] = value
        source = splits.dataset["source"]
        source_class = SOURCES[source["name"]]
        class_path = f"{source_class.__module__}.{source_class.__qualname__}"
        data.source = Namespace(class_path=class_path, init_args=Namespace(**source["init_args"]))

    def run_predict(self, trainer: Trainer, datamodule: Any) -> Any:
        """`train.py predict`: query what is missing, then merge and mark the folder complete."""
        from lightning_mia.query.execute import execute_query

        return execute_query(self, datamodule, trainer)

    def record(self) -> QueryRecord:
        """What every shard of this query records (compared before resuming into a folder)."""
        return QueryRecord(
            splits_hash=self.card.splits_hash,
            run_name=self.card.run_name,
            family=self.card.family,
            preset=self.card.preset,
            model_index=self.card.model_index,
            train_steps_per_image=round(self.card.train_steps_per_image, 4),
            row=self.hparams.row,
            spec=self.spec,
            signal_queries=signal_queries(self.spec.signals, self.spec.signal_options),
            sampler=family_class(self.card.family).sampler_version,  # before the model loads
        )

    def configure_model(self) -> None:
        """Load the queried model, the feature extractor and the captioner (once)."""
        if self.model is not None:
            return
        self.model = load_family_module(self.hparams.ckpt).requires_grad_(False)
        self.card = self.model.card
        if self.spec.signals:
            check_signals(
                self.card.family,
                self.spec.signals,
                self.spec.signal_options,
                self.model.num_train_timesteps,
            )
        clip = None
        if encoder_groups(self.spec.feature_groups):
            from lightning_mia.models.encoder import load_encoder

            clip = load_encoder(self.folders.encoder)
        self.extractor = FeatureExtractor(clip, groups=list(self.spec.feature_groups))
        self.captioner = None
        if self.spec.captions == "captioner":
            from lightning_mia.models.captioner import Captioner

            self.captioner = Captioner(self.folders.captioner)

    def _timed(self, name: str, fn: Callable[[], Any]) -> Any:
        start = time.perf_counter()
        out = fn()
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start
        return out

    def query_captions(self, batch: dict[str, Any]) -> list[str]:
        """The captions the model is queried with, by the spec's caption mode."""
        mode = self.spec.captions
        if mode == "captioner":
            return self.captioner.caption(batch["pixel_values"])
        if mode == "fixed-caption":
            return [self.spec.fixed_caption] * len(batch["caption"])
        if mode == "swapped-caption":
            return [self.caption_of[int(s)] for s in batch["sample_id"].tolist()]
        return list(batch["caption"])

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        query = batch["pixel_values"]  # (B, 3, H, W) in [-1, 1]
        captions = self.query_captions(batch)
        # the attacker's view of the pair: every signal, black-box and gray-box, reads its captions
        attacker_batch = {**batch, "caption": captions}
        seeds = sample_seeds(self.spec.seed, batch["sample_id"])
        n = self.spec.num_images
        generated = self._timed(
            "generate", lambda: self.model.generate(captions, n, seed=seeds)
        )  # (B, N, 3, H, W)
        features = self._timed("features", lambda: self.extractor(query, generated, captions))
        shared: dict[str, Any] = {}  # latents or codes, conditioning: once per batch
        for name in self.spec.signals:  # gray-box: same fixed noise per sample for every model
            features.update(
                self._timed(
                    name,
                    lambda name=name: compute_signals(
                        self.model,
                        attacker_batch,
                        [name],
                        self.spec.seed,
                        options=self.spec.signal_options,
                        cache=shared,
                    ),
                )
            )
        self.num_queried += len(captions)
        out = {
            "sample_id": batch["sample_id"],
            "is_member": batch["is_member"],
            "model_index": self.card.model_index,
            "features": features,
            "query": query,  # (B, 3, H, W): the writer keeps a few (examples, W&B)
            "generated": generated,  # (B, N, 3, H, W)
            "caption": captions,
        }
        if self.hparams.save_images:
            out["images"] = to_uint8(generated)  # (B, N, H, W, 3)
        return out
