"""The attack classifier: an MLP over standardised features, trained on shadow rows.

    model = AttackModule(num_features=X.shape[1], feature_names=names)
    best = fit_attack(model, AttackDataModule(train, val), "runs/demo/attack/combined")
    logits = best.score(X_target)  # (S,), higher = more likely a member

The feature mean/std are fitted on the training rows only and stored as buffers, so a saved
attack (`AttackModule.load_from_checkpoint(path, weights_only=True)`) standardises new shards
the same way. Early stopping watches the held-out part of the training (shadow) data, never
the target's labels.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning
import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import Callback, EarlyStopping
from lightning.pytorch.loggers import Logger
from torch import nn
from torch.nn import functional as F

from lightning_mia.attack.data import AttackDataModule
from lightning_mia.metrics import roc_auc

_MIN_STD = 1e-6  # a constant feature is centred, not divided by ~0


class AttackModule(LightningModule):
    """Binary member / non-member classifier over a fixed list of scalar features."""

    def __init__(
        self,
        num_features: int,
        hidden: Sequence[int] = (64, 64),
        dropout: float = 0.1,
        lr: float = 1e-3,
        weight_decay: float = 1e-2,
        feature_names: Sequence[str] = (),
        metric_prefix: str = "attack",
    ) -> None:
        """
        Args:
            num_features: width F of the feature rows.
            hidden: widths of the hidden layers (empty = logistic regression).
            dropout: dropout after each hidden layer.
            lr: AdamW learning rate.
            weight_decay: AdamW weight decay.
            feature_names: names of the F features, in column order (kept with the weights).
            metric_prefix: logged keys are `<prefix>/train_loss`, `/val_loss`, `/val_auc`.
        """
        super().__init__()
        if feature_names and len(feature_names) != num_features:
            raise ValueError(f"{len(feature_names)} feature names for {num_features} features")
        self.save_hyperparameters()
        layers: list[nn.Module] = []
        width = num_features
        for size in hidden:
            layers += [nn.Linear(width, size), nn.GELU(), nn.Dropout(dropout)]
            width = size
        layers.append(nn.Linear(width, 1))
        self.net = nn.Sequential(*layers)
        self.register_buffer("mean", torch.zeros(num_features))
        self.register_buffer("std", torch.ones(num_features))
        # weight of a member row in the loss: non-members / members of the training rows, so
        # both classes weigh the same and p = 0.5 is the balanced decision (what balanced
        # accuracy reads) however unequal the classes are (e.g. 32 members, 128 non-members)
        self.register_buffer("pos_weight", torch.ones(()))
        self._val_logits: list[torch.Tensor] = []
        self._val_labels: list[torch.Tensor] = []
        self._epoch_loss: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # (sum, rows)

    def fit_standardizer(self, x: torch.Tensor, y: torch.Tensor | None = None) -> None:
        """Set the feature mean/std from training rows x (S, F), and the member weight from
        their labels y (S,) when given."""
        std = x.float().std(0, unbiased=False)
        self.mean.copy_(x.float().mean(0))
        self.std.copy_(torch.where(std > _MIN_STD, std, torch.ones_like(std)))
        if y is not None:
            members = float(y.float().sum())
            non_members = float(y.numel()) - members
            self.pos_weight.fill_(non_members / members if members and non_members else 1.0)

    def _loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.binary_cross_entropy_with_logits(logits, y.float(), pos_weight=self.pos_weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Member logits (B,) of raw feature rows x (B, F)."""
        return self.net((x - self.mean) / self.std).squeeze(-1)

    @torch.no_grad()
    def score(self, x: torch.Tensor, batch_size: int = 65536) -> torch.Tensor:
        """Member logits (S,) of x (S, F) in eval mode (logits, not probabilities: no ties)."""
        was_training = self.training
        self.eval()
        x = x.to(self.device, torch.float32)
        out = torch.cat([self(x[i : i + batch_size]) for i in range(0, x.shape[0], batch_size)])
        self.train(was_training)
        return out.cpu()

    def _prefix(self, name: str) -> str:
        return f"{self.hparams.metric_prefix}/{name}"

    def _add_loss(self, name: str, loss: torch.Tensor, rows: int) -> None:
        total, count = self._epoch_loss.get(name, (torch.tensor(0.0), torch.tensor(0.0)))
        self._epoch_loss[name] = (total + loss.detach() * rows, count + rows)

    def _log_epoch_loss(self, name: str, **kwargs: Any) -> None:
        """Log the epoch's mean of `name` (each batch's loss times its rows, summed in order,
        over the rows), as `self.log(on_epoch=True)` averages it, but one `log` an epoch
        instead of one a batch (Lightning's `log` moves its state to the device on every call,
        most of a small classifier's step)."""
        if name in self._epoch_loss:
            total, count = self._epoch_loss.pop(name)
            self.log(self._prefix(name), total / count, on_epoch=True, **kwargs)

    def training_step(self, batch: Sequence[torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch  # (B, F), (B,)
        loss = self._loss(self(x), y)
        self._add_loss("train_loss", loss, len(y))
        return loss

    def on_train_epoch_end(self) -> None:
        self._log_epoch_loss("train_loss")

    def on_validation_epoch_start(self) -> None:
        self._val_logits.clear()
        self._val_labels.clear()
        self._epoch_loss.pop("val_loss", None)

    def validation_step(self, batch: Sequence[torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        logits = self(x)
        loss = self._loss(logits, y)
        self._add_loss("val_loss", loss, len(y))
        self._val_logits.append(logits.detach().cpu())
        self._val_labels.append(y.detach().cpu())
        return loss

    def on_validation_epoch_end(self) -> None:
        self._log_epoch_loss("val_loss", prog_bar=True)
        if not self._val_labels:
            return
        labels = torch.cat(self._val_labels).bool()
        if labels.all() or not labels.any():
            return  # AUC undefined with one class
        auc = roc_auc(torch.cat(self._val_logits), labels)
        self.log(self._prefix("val_auc"), auc.float(), prog_bar=True)

    def predict_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        """Member probability (B,) of the feature rows in `batch` ((X,), (X, y) or X)."""
        x = batch[0] if isinstance(batch, (list, tuple)) else batch
        return torch.sigmoid(self(x))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(
            self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay
        )


class KeepBest(Callback):
    """The weights of the validation with the lowest `monitor`, kept in memory while the fit
    runs; `restore` puts them back in the module. What `ModelCheckpoint(save_top_k=1)` keeps,
    without writing a checkpoint at every improvement (15% of a small classifier's fit):
    `_fit` writes the best once, at the end."""

    def __init__(self, monitor: str) -> None:
        self.monitor = monitor
        self.best: float | None = None
        self.state: dict[str, torch.Tensor] | None = None

    def on_validation_end(self, trainer: Trainer, module: LightningModule) -> None:
        value = trainer.callback_metrics.get(self.monitor)
        if trainer.sanity_checking or value is None or not torch.isfinite(value):
            return
        if self.best is None or float(value) < self.best:
            self.best = float(value)
            self.state = {k: v.detach().clone() for k, v in module.state_dict().items()}

    def restore(self, module: LightningModule) -> bool:
        """Load the best weights into `module`; False when no validation ran."""
        if self.state is None:
            return False
        module.load_state_dict(self.state)
        return True


def fit_attack(
    module: AttackModule,
    datamodule: AttackDataModule,
    folder: str | os.PathLike,
    max_epochs: int = 200,
    patience: int = 10,
    logger: Logger | None = None,
    progress: bool = True,
    seed: int = 0,
    filename: str = "best",
    num_threads: int | None = 1,
) -> AttackModule:
    """Train on `datamodule.train`, early-stop on `.val`; return the module with the weights of
    its best validation, which are also written once, as `<folder>/<filename>.ckpt` (a Lightning
    checkpoint: `load_module(AttackModule, path)`). The standardiser is fitted on the train rows.
    `num_threads` caps torch's intra-op threads while training (restored after): a small MLP
    gains nothing from more, and on a busy machine thread contention made it 10x slower.
    """
    previous = torch.get_num_threads()
    if num_threads:
        torch.set_num_threads(num_threads)
    try:
        return _fit(
            module, datamodule, folder, max_epochs, patience, logger, progress, seed, filename
        )
    finally:
        torch.set_num_threads(previous)


def _fit(
    module: AttackModule,
    datamodule: AttackDataModule,
    folder: str | os.PathLike,
    max_epochs: int,
    patience: int,
    logger: Logger | None,
    progress: bool,
    seed: int,
    filename: str,
) -> AttackModule:
    lightning.seed_everything(seed, verbose=False)
    module.fit_standardizer(*datamodule.train)
    folder = Path(folder)
    path = folder / f"{filename}.ckpt"
    if path.exists():
        path.unlink()  # a previous run's attack of the same name: replaced, never mixed
    monitor = module._prefix("val_loss")
    best = KeepBest(monitor)
    trainer = Trainer(
        accelerator="cpu",
        devices=1,
        deterministic=True,
        max_epochs=max_epochs,
        logger=logger if logger is not None else False,
        enable_progress_bar=progress,
        enable_model_summary=False,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
        log_every_n_steps=1,
        default_root_dir=str(folder),
        callbacks=[EarlyStopping(monitor=monitor, mode="min", patience=patience), best],
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*does not have many workers.*")
        trainer.fit(module, datamodule=datamodule)
    if best.restore(module):
        folder.mkdir(parents=True, exist_ok=True)
        # the best epoch's weights, as a Lightning checkpoint (the optimizer's and the callbacks'
        # states are the last epoch's, not the best one's, and nothing resumes from them)
        trainer.save_checkpoint(path, weights_only=True)
    return module.eval()
