"""What every text-to-image family module shares: the run card, steps-per-image, caption
dropout, learning-rate warm-up, a frozen image autoencoder kept out of checkpoints, sample grids
and per-caption seeding.

Sample grids: the fixed preview captions (`num_preview_images` images each, seed 0) go to W&B
every `sample_every_n_steps` steps (0 = never) and always once at the end of fit, when the grid
is also written as `<run folder>/samples.png` (`num_preview_images=0` turns both off).

Subclasses (`LatentDiffusionModule`, `Seq2SeqModule`) set `family` and `frozen_prefix`, call
`self.save_hyperparameters()` in `__init__` (with `caption_dropout` and `warmup_steps` among
their arguments), and implement `per_sample_loss` and `generate`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import torch

from lightning_mia.card import CARD_KEY, CheckpointError, RunCard, resumed_card
from lightning_mia.data.stage import stage_data
from lightning_mia.models.augment import augment_images
from lightning_mia.paths import ExperimentLayout, atomic_write_bytes
from lightning_mia.registry import Registry
from lightning_mia.stage_module import StageModule

SAMPLES_PNG = "samples.png"  # the end-of-fit sample grid, in the run folder
RNG_KEY = "lightning_mia_rng"  # the global random state at a checkpoint, for exact resumes


def caption_seeds(num_captions: int, seed: int | Sequence[int]) -> list[int]:
    """One seed per caption: a sequence is taken as is; an int `s` gives caption i `s + i`."""
    if isinstance(seed, int):
        return [seed + i for i in range(num_captions)]
    seeds = [int(s) for s in seed]
    if len(seeds) != num_captions:
        raise ValueError(f"got {len(seeds)} seeds for {num_captions} captions")
    return seeds


def per_caption_randn(
    seeds: Sequence[int], shape: Sequence[int], device: torch.device | str = "cpu"
) -> torch.Tensor:
    """Gaussian noise (B, *shape), caption i's slice drawn only from its own generator.

    Drawn on the CPU (bit-identical on every machine and batch size), then moved to `device`.
    """
    out = [torch.randn(*shape, generator=torch.Generator().manual_seed(s)) for s in seeds]
    return torch.stack(out).to(device)


def per_caption_rand(
    seeds: Sequence[int], shape: Sequence[int], device: torch.device | str = "cpu"
) -> torch.Tensor:
    """Uniform [0, 1) numbers (B, *shape), caption i's slice drawn from its own generator."""
    out = [torch.rand(*shape, generator=torch.Generator().manual_seed(s)) for s in seeds]
    return torch.stack(out).to(device)


def cached_by_id(
    cache: dict[int, torch.Tensor],
    ids: Sequence[int],
    compute: Callable[[list[int]], torch.Tensor],
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Rows (B, ...) of a per-sample tensor, computed once per sample id and kept on the CPU.

    `compute(positions)` returns the rows of the batch positions whose ids are not cached yet.
    Used for what a frozen encoder makes of a training image (latents, VQ codes): each image is
    encoded in its first epoch only.
    """
    ids = [int(i) for i in ids]
    missing = [i for i, sid in enumerate(ids) if sid not in cache]
    if missing:
        new = compute(missing).detach().to("cpu", dtype)
        cache.update({ids[i]: row for i, row in zip(missing, new)})
    return torch.stack([cache[sid] for sid in ids])


class TextToImageModule(StageModule, ABC):
    """Base of the text-to-image families: run card, training-length accounting, sample grids."""

    family: ClassVar[str] = ""
    # what the family's frozen image model is, as a report names it ("image autoencoder")
    autoencoder_what: ClassVar[str] = "autoencoder"
    # the frozen image autoencoder's attribute prefix ("vae." / "vq."): it lives in its own
    # folder, so its weights stay out of every checkpoint and are not expected when loading
    frozen_prefix: ClassVar[str] = ""
    # set when the family's `generate` starts drawing other images for the same seeds: each
    # query records it, so a query folder is never resumed or reused across the change
    sampler_version: ClassVar[str] = ""

    def __init__(self, sample_every_n_steps: int = 0, num_preview_images: int = 2) -> None:
        super().__init__()
        self.sample_every_n_steps = sample_every_n_steps
        self.num_preview_images = num_preview_images
        self.card: RunCard | None = None
        # Samples trained on, summed over ranks; saved with the weights so resume keeps counting.
        self.register_buffer("samples_seen", torch.zeros((), dtype=torch.float64))
        self._num_train_samples = 0
        self._preview_captions: list[str] = []
        self.generates_on_every_rank = False  # a model sharded over the ranks (configure_model)
        if self.frozen_prefix:
            self.register_state_dict_post_hook(_drop_frozen_keys)
            self.register_load_state_dict_post_hook(_ignore_missing_frozen_keys)

    # --- what subclasses provide -------------------------------------------------------------
    @abstractmethod
    def per_sample_loss(self, batch: dict[str, Any]) -> torch.Tensor:
        """Training loss of each sample of `batch`, (B,)."""

    @abstractmethod
    def generate(
        self, captions: list[str], num_images: int = 4, seed: int | Sequence[int] = 0
    ) -> torch.Tensor:
        """Images for each caption, (B, N, 3, H, W) in [-1, 1]."""

    @property
    def num_train_timesteps(self) -> int:
        """Length of the training time grid the gray-box signals' timesteps index (0: none)."""
        return 0

    def augmentation_config(self) -> dict[str, Any]:
        """Training augmentation in force (recorded in the card: it changes leakage)."""
        hp = self.hparams
        return {k: hp[k] for k in ("random_crop", "random_flip", "caption_dropout") if k in hp}

    @property
    def augments_images(self) -> bool:
        """Whether training crops or flips the images (then nothing encoded may be cached)."""
        return bool(self.hparams.get("random_crop") or self.hparams.get("random_flip"))

    # --- card ----------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        data = stage_data(self._trainer)
        if data is None:
            return
        card = RunCard(
            family=self.family,
            preset=str(self.hparams.get("preset", "")),
            model_index=data.model_index,
            splits_hash=data.splits_hash,
            experiment=str(data.layout.root),
            augmentation=self.augmentation_config(),
            **self.card_references(),
        )
        if self.card is not None:  # loaded from a checkpoint, then trained
            resumed_card(self.card, card)
        self.card = card
        self._num_train_samples = data.num_train_samples
        self._preview_captions = list(data.preview_captions)

    @property
    def train_steps_per_image(self) -> float:
        """How many times each training image has been seen (samples trained / set size)."""
        if self._num_train_samples <= 0:
            return 0.0
        return float(self.samples_seen.item()) / self._num_train_samples

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.card is not None:
            self.card.train_steps_per_image = self.train_steps_per_image
            checkpoint[CARD_KEY] = self.card.to_dict()
        checkpoint[RNG_KEY] = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            checkpoint[RNG_KEY]["cuda"] = torch.stack(torch.cuda.get_rng_state_all())

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if CARD_KEY not in checkpoint:
            raise CheckpointError("not a lightning_mia checkpoint (no run card)")
        card = RunCard.from_dict(checkpoint[CARD_KEY])
        if card.family != self.family:
            raise CheckpointError(f"checkpoint is of family {card.family!r}, not {self.family!r}")
        # a fit resumed with ckpt_path ran setup first: its card (this experiment) stands
        self.card = resumed_card(card, self.card)
        self._resume_rng = checkpoint.get(RNG_KEY)

    def on_train_start(self) -> None:
        """A resumed run draws on from the random state it was saved with (caption dropout,
        noise, timesteps, the next epochs' shuffles): killed at a checkpoint on an epoch
        boundary and resumed, it trains exactly as one uninterrupted run."""
        state, self._resume_rng = getattr(self, "_resume_rng", None), None
        if state is None:
            return
        torch.set_rng_state(state["torch"])
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(list(state["cuda"]))

    # --- training loop pieces ------------------------------------------------------------------
    def drop_captions(self, captions: Sequence[str]) -> list[str]:
        """In training, replace each caption by "" with probability `caption_dropout` (the
        unconditional path that classifier-free guidance / super-conditioning samples with)."""
        p = float(self.hparams.get("caption_dropout", 0.0))
        if not self.training or p <= 0:
            return list(captions)
        drop = torch.rand(len(captions)).lt(p).tolist()
        return ["" if d else c for c, d in zip(captions, drop)]

    def warmup_schedule(self, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """`configure_optimizers`' answer: `optimizer` with a linear warm-up over
        `warmup_steps` optimizer steps to its configured learning rate, then constant."""
        warmup = max(1, int(self.hparams.get("warmup_steps", 0)))
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: min(1.0, (step + 1) / warmup)
        )
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        if self.augments_images:
            hp = self.hparams
            pixels = augment_images(batch["pixel_values"], hp.random_crop, hp.random_flip)
            batch = {**batch, "pixel_values": pixels}
        loss = self.per_sample_loss(batch).mean()
        batch_size = len(batch["sample_id"])
        self.samples_seen += batch_size * self.trainer.world_size
        self.log("train/loss", loss, prog_bar=True, sync_dist=True, batch_size=batch_size)
        self.log("train/steps_per_image", self.train_steps_per_image, batch_size=batch_size)
        return loss

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        step = self.global_step
        if self.sample_every_n_steps > 0 and step > 0 and step % self.sample_every_n_steps == 0:
            self.log_sample_grid()

    def on_train_end(self) -> None:
        if not self.trainer.interrupted:
            self.log_sample_grid(save=True)

    def log_sample_grid(self, save: bool = False) -> None:
        """Generate for the fixed preview captions and log the grid to W&B; `save` also
        writes it as `samples.png` in the run folder (B captions x N images). Rank 0 alone
        generates, unless the model is sharded over the ranks (`generates_on_every_rank`):
        then every rank takes part in each forward pass and rank 0 writes."""
        if not self._preview_captions or self.num_preview_images <= 0:
            return
        if self.logger is None and not (save and self.card is not None):
            return
        if not (self.trainer.is_global_zero or self.generates_on_every_rank):
            return
        from lightning_mia.reporting import grid_png, log_image_grid

        was_training = self.training
        self.eval()
        with torch.no_grad():
            images = self.generate(self._preview_captions, self.num_preview_images, seed=0)
        self.train(was_training)  # images: (B, N, 3, H, W)
        if not self.trainer.is_global_zero:
            return
        log_image_grid(self.logger, "samples", images, self._preview_captions, self.global_step)
        if save and self.card is not None:
            folder = ExperimentLayout(self.card.experiment).run_dir(
                self.family, self.card.model_index
            )
            atomic_write_bytes(folder / SAMPLES_PNG, grid_png(images))


# the families by name: each family module registers its class (`@register_family("flow")`)
FAMILIES: Registry[type[TextToImageModule]] = Registry(
    "text-to-image family", plugins="lightning_mia.models"
)


DEFAULT_FAMILY = "diffusion"
"""The family an experiment trains when its config names none."""


def register_family(name: str) -> Callable[[type[TextToImageModule]], type[TextToImageModule]]:
    """Class decorator: a text-to-image family, found by `name` (its module is named so)."""

    def wrap(cls: type[TextToImageModule]) -> type[TextToImageModule]:
        cls.family = name
        return FAMILIES.register(name, cls)

    return wrap


def _drop_frozen_keys(module: TextToImageModule, state_dict: dict, prefix: str, meta: Any) -> None:
    """State-dict post hook: leave the frozen autoencoder's weights out."""
    frozen = prefix + module.frozen_prefix
    for key in [k for k in state_dict if k.startswith(frozen)]:
        del state_dict[key]


def _ignore_missing_frozen_keys(module: TextToImageModule, incompatible: Any) -> None:
    """Load post hook: the frozen autoencoder comes from its folder, not the checkpoint."""
    marker = "." + module.frozen_prefix
    incompatible.missing_keys[:] = [k for k in incompatible.missing_keys if marker not in f".{k}"]
