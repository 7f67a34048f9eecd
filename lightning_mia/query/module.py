"""`QueryModule`: query one trained text-to-image model with its members and non-members.

    python train.py predict --config configs/query/default.yaml \
        --model.ckpt runs/demo/diffusion-shadow-001/checkpoints/last.ckpt

For every sample of the model's row of splits.json, the caption goes to `generate` with
`num_images` images and a seed derived from (seed, sample_id) — so the result does not depend
on batching, ranks or interruptions — and the features of the requested groups are computed
from (query image, generated images, caption). `ShardWriter` writes them as shards.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningModule

from lightning_mia.card import read_card
from lightning_mia.errors import UserError
from lightning_mia.features import FEATURE_GROUPS, FeatureExtractor, encoder_groups
from lightning_mia.graybox import SignalOptions, check_signals, compute_signals, signal_queries
from lightning_mia.models.registry import load_family_module
from lightning_mia.paths import ExperimentLayout
from lightning_mia.query.writer import to_uint8
from lightning_mia.specs.attacks import query_feature_groups

SEED_STRIDE = 2**32


class QueryError(UserError):
    """A query that cannot run as configured (missing encoder, unknown feature group...)."""


def sample_seeds(seed: int, sample_ids: torch.Tensor) -> list[int]:
    """One generation seed per sample, a function of (seed, sample_id) only."""
    return [(seed * SEED_STRIDE + int(s)) % 2**63 for s in sample_ids.tolist()]


class QueryModule(LightningModule):
    """Generate and extract features for one model's members and non-members (predict only)."""

    def __init__(
        self,
        ckpt: str,
        num_images: int = 4,
        seed: int = 0,
        feature_groups: list[str] | None = None,
        encoder: str = "",
        captioner: str = "",
        save_images: bool = False,
        signals: list[str] | None = None,
        signal_timesteps: list[int] | None = None,
        row: int | None = None,
    ) -> None:
        """
        Args:
            ckpt: checkpoint of the target or shadow model to query.
            num_images: images generated per caption (N, the queries per sample).
            seed: base seed; sample i is generated with a seed derived from (seed, sample_id).
            feature_groups: feature groups to compute; None = every group a black-box attack or
                the blind baseline reads (`specs.attacks.query_feature_groups`).
            encoder: folder of a CLIP model (transformers format); "" = the experiment's
                trained attacker encoder (`<experiment>/encoder`).
            captioner: folder of a BLIP captioner: query with its captions of the image
                instead of the ground-truth caption (the attacker holds only the image); the
                gray-box signals read them too. Its queries go to `queries/<run>@<name>/`.
            save_images: also write the generated images as PNG under the query folder.
            signals: gray-box signals to compute beside the features (loss, secmi, pia, clid
                for diffusion; nll, nll_gap for seq2seq); they read the model's weights.
            signal_timesteps: diffusion timesteps of loss and pia (None = defaults; CLiD has
                its own).
            row: query the samples of another row of splits.json instead of the model's own
                (labelled with this model's membership), into `queries/<run>/row-<row>/`: a
                shadow queried on the target's samples (row 0) calibrates LiRA.
        """
        super().__init__()
        if feature_groups is None:
            feature_groups = query_feature_groups()
        feature_groups = list(feature_groups)
        self.save_hyperparameters()
        self.hparams.feature_groups = feature_groups
        if num_images < 1:
            raise QueryError(f"num_images must be >= 1, got {num_images}")
        # the run card is read now; the model and encoders are built in configure_model, so a
        # LightningCLI instantiating this module does not also instantiate the loaded model
        self.card = read_card(ckpt)
        self.signals = list(signals or [])
        self.signal_options = SignalOptions()
        if signal_timesteps is not None:
            self.signal_options = replace(
                self.signal_options, timesteps=tuple(int(t) for t in signal_timesteps)
            )
        if self.signals:  # names and family now; timesteps once the scheduler is known
            check_signals(self.card.family, self.signals, self.signal_options, 10**9)
        self.seconds: dict[str, float] = {}  # measured cost per stage, this rank
        self.num_queried = 0
        self.encoder_folder = self._encoder_folder(feature_groups, encoder)
        if captioner:  # refused now, before a trainer or a query folder exists
            from lightning_mia.models.captioner import check_captioner

            check_captioner(captioner, self.card.splits_hash)
        self.model: torch.nn.Module | None = None

    def configure_model(self) -> None:
        """Load the queried model, the feature extractor and the captioner (once)."""
        if self.model is not None:
            return
        self.model = load_family_module(self.hparams.ckpt).requires_grad_(False)
        self.card = self.model.card
        if self.signals and self.card.family == "diffusion":
            n_train = int(self.model.noise_scheduler.config.num_train_timesteps)
            check_signals(self.card.family, self.signals, self.signal_options, n_train)
        clip = None
        if self.encoder_folder is not None:
            from lightning_mia.models.encoder import load_encoder

            clip = load_encoder(str(self.encoder_folder))
        self.extractor = FeatureExtractor(clip, groups=list(self.hparams.feature_groups))
        self.captioner = None
        if self.hparams.captioner:
            from lightning_mia.models.captioner import Captioner

            self.captioner = Captioner(self.hparams.captioner)

    def _encoder_folder(self, groups: list[str], encoder: str) -> Path | None:
        problems = FEATURE_GROUPS.check(groups)
        if problems:
            raise QueryError(problems[0])
        needs = sorted(encoder_groups(groups))
        if not needs:
            return None
        folder = Path(encoder) if encoder else ExperimentLayout(self.card.experiment).encoder
        if not folder.is_dir():
            raise QueryError(
                f"encoder folder {folder} does not exist: feature groups "
                f"{needs} need an image-text encoder. "
                "Train the attacker's encoder (python train.py fit --config "
                "configs/encoder/tiny.yaml) or pass --model.encoder <local CLIP folder>."
            )
        return folder

    @property
    def run_name(self) -> str:
        return self.card.run_name

    def shard_metadata(self) -> dict[str, str]:
        """What every shard of this query records (checked before resuming into a folder)."""
        hp = self.hparams
        return {
            "splits_hash": self.card.splits_hash,
            "run_name": self.card.run_name,
            "family": self.card.family,
            "preset": self.card.preset,
            "experiment": str(Path(self.card.experiment)),
            "model_index": str(self.card.model_index),
            "num_images": str(hp.num_images),
            "seed": str(hp.seed),
            "feature_groups": ",".join(sorted(hp.feature_groups)),
            "captions": "captioner" if hp.captioner else "ground-truth",
            "train_steps_per_image": f"{self.card.train_steps_per_image:.4f}",
            "signals": ",".join(self.signals),
            "signal_queries": json.dumps(signal_queries(self.signals, self.signal_options)),
            "signal_options": json.dumps(asdict(self.signal_options)) if self.signals else "",
            "encoder": str(self.encoder_folder.resolve()) if self.encoder_folder else "",
            **({"captioner": str(Path(hp.captioner).resolve())} if hp.captioner else {}),
            **({"row": str(hp.row)} if hp.row is not None else {}),
        }

    def _timed(self, name: str, fn: Callable[[], Any]) -> Any:
        start = time.perf_counter()
        out = fn()
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start
        return out

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        query = batch["pixel_values"]  # (B, 3, H, W) in [-1, 1]
        captions = list(batch["caption"])
        if self.captioner is not None:
            captions = self.captioner.caption(query)
        # the attacker's view of the pair: every signal, black-box and gray-box, reads its captions
        attacker_batch = {**batch, "caption": captions}
        seeds = sample_seeds(self.hparams.seed, batch["sample_id"])
        n = self.hparams.num_images
        generated = self._timed(
            "generate", lambda: self.model.generate(captions, n, seed=seeds)
        )  # (B, N, 3, H, W)
        features = self._timed("features", lambda: self.extractor(query, generated, captions))
        for name in self.signals:  # gray-box: same fixed noise per sample for every model
            features.update(
                self._timed(
                    name,
                    lambda name=name: compute_signals(
                        self.model,
                        attacker_batch,
                        [name],
                        self.hparams.seed,
                        options=self.signal_options,
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
