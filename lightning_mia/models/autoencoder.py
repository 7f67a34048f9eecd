"""The image autoencoder stage: the diffusion family's latent space, the seq2seq family's tokenizer.

    python train.py fit --config configs/autoencoder/tiny.yaml      # VQ (both families)
    python train.py fit --config configs/autoencoder/tiny-kl.yaml   # KL (diffusion)

`AutoencoderModule` trains a diffusers `VQModel` (or `AutoencoderKL`) on the attacker's pool with
an L1 (+ L2) reconstruction loss, the codebook/commitment loss (or a KL term) and, optionally,
a hinge PatchGAN loss switched on after `disc_start_step`. Each step is one backward over one
graph (`_adversarial_losses`), so every parameter takes part in it and plain `ddp` trains it
(`configs/autoencoder/kl-f8-256.yaml`, `vqgan-f16-256.yaml`). At the end of `fit`, rank 0
writes the diffusers folder (`save_pretrained`) into the experiment's `autoencoder/`; the
diffusion family loads it as its frozen latent space, the seq2seq family as its image
tokenizer. The helpers `encode_latents` / `decode_latents` / `encode_codes` / `decode_codes`
are the only way the other modules talk to it.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

import torch
from diffusers import AutoencoderKL, VQModel
from lightning.pytorch.utilities import rank_zero_info
from torch.func import functional_call
from torchmetrics.functional.image import peak_signal_noise_ratio

from lightning_mia.card import CARD_KEY, RunCard
from lightning_mia.data.stage import stage_data
from lightning_mia.models.patchgan import PatchDiscriminator, adaptive_weight, hinge_d_loss
from lightning_mia.models.vae import (
    Autoencoder,
    AutoencoderError,
    check_resolution,
    save_autoencoder,
)
from lightning_mia.stage_module import StageModule

RECONSTRUCTIONS_PNG = "reconstructions.png"  # end-of-fit grid (original | reconstruction)


# --- the training module -----------------------------------------------------------------------
class AutoencoderModule(StageModule):
    """Train a VQGAN-style image autoencoder (diffusers `VQModel` by default)."""

    family = "autoencoder"

    def __init__(
        self,
        kind: Literal["vq", "kl"] = "vq",
        preset: str = "tiny",
        resolution: int = 32,
        block_out_channels: tuple[int, ...] = (16, 32, 64),  # downsampling f = 2^(len - 1)
        layers_per_block: int = 1,
        norm_num_groups: int = 8,
        latent_channels: int = 8,
        num_vq_embeddings: int = 512,
        vq_embed_dim: int = 8,
        mid_block_add_attention: bool = False,
        scaling_factor: float = 0.0,  # 0: 1 / std of the latents, measured while training
        lr: float = 1e-3,
        final_lr_fraction: float = 0.05,  # cosine decay to lr * this by trainer.max_steps
        warmup_steps: int = 0,  # linear warm-up before the cosine decay
        betas: tuple[float, float] | None = None,  # Adam; None = VQGAN's (0.5, 0.9) with a
        # discriminator, else (0.9, 0.99): measured on tiny shapes, beta2 0.999 with no warm-up
        # sat on a colourless plateau (MSE 0.041 at 600 steps) that (0.9, 0.99) + 50 warm-up
        # steps left by step ~400 (MSE 0.017-0.020 at 600)
        l1_weight: float = 1.0,
        l2_weight: float = 1.0,
        codebook_weight: float = 1.0,
        kl_weight: float = 1e-6,
        restart_dead_codes_every: int = 50,  # re-seed unused codes from the batch; 0 = off
        disc_weight: float = 0.0,  # 0 = no discriminator
        disc_start_step: int = 0,
        disc_channels: int = 32,
        disc_layers: int = 2,
        gradient_clip: float = 0.0,  # manual optimization: clipping is done here, not by Trainer
        output: str = "",  # "" = the experiment's autoencoder/ folder
        sample_every_n_steps: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.automatic_optimization = False
        self.ae = self._build(kind, resolution)
        check_resolution(self.ae, resolution)
        self.discriminator = (
            PatchDiscriminator(3, disc_channels, disc_layers) if disc_weight > 0 else None
        )
        # Running moments of the latents (for the scaling factor) and code usage counts.
        self.register_buffer("latent_moments", torch.tensor([0.0, 1.0], dtype=torch.float64))
        self.register_buffer("code_usage", torch.zeros(num_vq_embeddings))
        self.card: RunCard | None = None
        self._preview: tuple[torch.Tensor, list[str] | None] | None = None  # first batch

    def _build(self, kind: str, resolution: int) -> Autoencoder:
        hp = self.hparams
        common = dict(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * len(hp.block_out_channels),
            up_block_types=("UpDecoderBlock2D",) * len(hp.block_out_channels),
            block_out_channels=tuple(hp.block_out_channels),
            layers_per_block=hp.layers_per_block,
            latent_channels=hp.latent_channels,
            norm_num_groups=hp.norm_num_groups,
            sample_size=resolution,
            mid_block_add_attention=hp.mid_block_add_attention,
        )
        if kind == "vq":
            vq = VQModel(
                num_vq_embeddings=hp.num_vq_embeddings, vq_embed_dim=hp.vq_embed_dim, **common
            )
            # diffusers keeps taming's swapped weights by default (commitment 1, codebook 0.25);
            # the VQ-VAE form (codebook 1, commitment 0.25) trains faster. Training-only flag.
            vq.quantize.legacy = False
            return vq
        if kind == "kl":
            return AutoencoderKL(**common)
        raise AutoencoderError(f"autoencoder kind {kind!r} is not 'vq' or 'kl'")

    # --- losses ------------------------------------------------------------------------------
    def reconstruct(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(reconstruction (B,3,H,W), regularizer loss (), unscaled latents (B,C,h,w))."""
        if isinstance(self.ae, VQModel):
            h = self.ae.encode(x).latents
            z_q, qloss, (_, _, idx) = self.ae.quantize(h)
            self._count_codes(idx, h)
            rec = self.ae.decoder(self.ae.post_quant_conv(z_q))
            return rec, self.hparams.codebook_weight * qloss, h
        posterior = self.ae.encode(x).latent_dist
        z = posterior.sample()
        rec = self.ae.decode(z).sample
        return rec, self.hparams.kl_weight * posterior.kl().mean(), posterior.mean

    def _count_codes(self, idx: torch.Tensor, h: torch.Tensor) -> None:
        if not self.training or self.hparams.restart_dead_codes_every <= 0:
            return
        counts = torch.bincount(idx.flatten(), minlength=self.code_usage.numel())  # (K,)
        if self._trainer is not None and self.trainer.world_size > 1:
            # every rank's codes, so each rank holds the same counts (DDP also broadcasts
            # rank 0's buffers at each forward) and restarts the same entries
            counts = self.trainer.strategy.reduce(counts.to(self.code_usage), reduce_op="sum")
        self.code_usage += counts
        self._last_latents = h.detach()

    @torch.no_grad()
    def _restart_dead_codes(self) -> None:
        """Re-seed never-used codebook entries from random latents of the last batch.

        Keeps the codebook alive in short trainings (the classic VQ collapse). Under DDP every
        rank restarts the same entries with the same vectors: the usage counts are summed over
        the ranks at every step and the batch latents gathered before the draw, whose
        generator is seeded by the step.
        """
        dead = (self.code_usage == 0).nonzero().flatten()
        self.code_usage.zero_()
        latents = getattr(self, "_last_latents", None)
        if dead.numel() == 0 or latents is None:
            return
        flat = latents.permute(0, 2, 3, 1).reshape(-1, latents.shape[1])  # (B*h*w, D)
        if self._trainer is not None:
            flat = self.all_gather(flat).reshape(-1, latents.shape[1])  # (W*B*h*w, D)
        gen = torch.Generator().manual_seed(int(self.global_step))
        pick = torch.randint(0, flat.shape[0], (dead.numel(),), generator=gen)
        self.ae.quantize.embedding.weight.data[dead] = flat[pick.to(flat.device)].to(
            self.ae.quantize.embedding.weight.dtype
        )

    def _update_moments(self, z: torch.Tensor, decay: float = 0.99) -> None:
        z = z.detach().double()
        new = torch.stack([z.mean(), z.var()])
        first = self.global_step == 0
        self.latent_moments.copy_(new if first else decay * self.latent_moments + (1 - decay) * new)

    def _disc_active(self) -> bool:
        return self.discriminator is not None and self.global_step >= self.hparams.disc_start_step

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        hp = self.hparams
        x = batch["pixel_values"]  # (B, 3, H, W)
        opts = self.optimizers()
        opts = opts if isinstance(opts, list) else [opts]  # [autoencoder, discriminator?]
        rec, reg_loss, z = self.reconstruct(x)
        self._update_moments(z)
        rec_l1 = (rec - x).abs().mean()
        rec_l2 = (rec - x).pow(2).mean()
        rec_loss = hp.l1_weight * rec_l1 + hp.l2_weight * rec_l2
        loss = rec_loss + reg_loss
        logs = {"train/rec_loss": rec_loss, "train/l1": rec_l1, "train/reg_loss": reg_loss}
        d_loss = rec_loss.new_zeros(())
        if self.discriminator is not None:
            g_term, d_loss, adversarial_logs = self._adversarial_losses(x, rec, rec_loss)
            loss = loss + g_term
            logs |= adversarial_logs
        self._set_lr(opts)
        before = self.global_step  # + 1 a step; + 2 once the discriminator steps too
        self._step(opts if self._disc_active() else opts[:1], opts, loss + d_loss)
        every = hp.restart_dead_codes_every
        if isinstance(self.ae, VQModel) and every > 0:
            if (self.global_step + 1) // every > (before + 1) // every:  # crossed a multiple
                self._restart_dead_codes()
        logs["train/psnr"] = peak_signal_noise_ratio(  # mean of per-image PSNR, as features do
            rec.detach().clamp(-1, 1), x, data_range=2.0, dim=(1, 2, 3)
        )
        self.log_dict(logs, prog_bar=False, batch_size=x.shape[0])
        self.log("train/loss", loss, prog_bar=True, sync_dist=True, batch_size=x.shape[0])
        return loss

    def _adversarial_losses(
        self, x: torch.Tensor, rec: torch.Tensor, rec_loss: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """(the autoencoder's weighted GAN term, the discriminator's hinge loss, logs).

        VQGAN's two alternating steps from one graph and one backward: the GAN term sees the
        discriminator through detached weights (so it trains the autoencoder only), the hinge
        loss sees the reconstructions detached (so it trains the discriminator only), both
        with the discriminator as it was before this step, as two sequential steps would.
        Before `disc_start_step` the hinge loss is weighted 0 (taming's `adopt_weight`) and
        its optimizer does not step: every parameter still takes part in each backward, which
        is what plain DDP needs (no unused parameters, one gradient reduction per step).
        """
        d_loss = hinge_d_loss(self.discriminator(x), self.discriminator(rec.detach()))
        if not self._disc_active():
            return rec_loss.new_zeros(()), 0.0 * d_loss, {}
        frozen = {name: p.detach() for name, p in self.discriminator.named_parameters()}
        g_loss = -functional_call(self.discriminator, frozen, (rec,)).mean()
        last = self.ae.decoder.conv_out.weight
        weight = self.hparams.disc_weight * adaptive_weight(rec_loss, g_loss, last)
        logs = {"train/g_loss": g_loss, "train/disc_weight": weight, "train/d_loss": d_loss}
        return weight * g_loss, d_loss, logs

    def _set_lr(self, optimizers: list[Any]) -> None:
        """Cosine decay over the run (manual optimization: no Lightning LR scheduler)."""
        total = self.trainer.estimated_stepping_batches if self._trainer is not None else 0
        progress = min(1.0, self.global_step / total) if 0 < total < float("inf") else 0.0
        low = self.hparams.final_lr_fraction
        factor = low + (1 - low) * 0.5 * (1 + math.cos(math.pi * progress))
        if self.global_step < self.hparams.warmup_steps:
            factor *= (self.global_step + 1) / self.hparams.warmup_steps
        for opt in optimizers:
            for group in opt.param_groups:
                group["lr"] = self.hparams.lr * factor

    def _step(self, stepping: list[Any], every: list[Any], loss: torch.Tensor) -> None:
        """One backward of `loss`, then a (clipped) step of each optimizer in `stepping`.
        (With fp16's GradScaler each step would re-read one scale: use bf16 or fp32 here.)"""
        for opt in every:
            opt.zero_grad(set_to_none=True)
        self.manual_backward(loss)
        for opt in stepping:
            if self.hparams.gradient_clip > 0:
                self.clip_gradients(opt, gradient_clip_val=self.hparams.gradient_clip)
            opt.step()

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        betas = self.hparams.betas
        if betas is None:
            betas = (0.5, 0.9) if self.discriminator is not None else (0.9, 0.99)
        betas = tuple(betas)
        opts = [torch.optim.Adam(self.ae.parameters(), lr=self.hparams.lr, betas=betas)]
        if self.discriminator is not None:
            opts.append(
                torch.optim.Adam(self.discriminator.parameters(), lr=self.hparams.lr, betas=betas)
            )
        return opts

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        every = self.hparams.sample_every_n_steps
        if every > 0 and self.global_step % every == 0 and self.trainer.is_global_zero:
            self._log_reconstructions(batch["pixel_values"][:8], batch.get("caption"))
        if self._preview is None:  # the first batch's images, for the end-of-fit grid
            self._preview = (batch["pixel_values"][:8].detach(), batch.get("caption"))

    def on_train_end(self) -> None:
        """The reconstructions of the first batch's images: to W&B and `reconstructions.png`."""
        if self._preview is not None and not self.trainer.interrupted:
            if self.trainer.is_global_zero:
                self._log_reconstructions(*self._preview, png=self.output_folder())

    def _log_reconstructions(
        self, x: torch.Tensor, captions: list[str] | None, png: Path | None = None
    ) -> None:
        from lightning_mia.paths import atomic_write_bytes
        from lightning_mia.reporting import grid_png, log_image_grid

        was_training = self.training
        self.eval()
        with torch.no_grad():
            rec = self.reconstruct(x)[0].clamp(-1, 1)
        self.train(was_training)
        grid = torch.stack([x, rec], dim=1)  # (B, 2, 3, H, W): original, reconstruction
        names = list(captions[: x.shape[0]]) if captions else [""] * x.shape[0]
        log_image_grid(self.logger, "reconstructions", grid, names, self.global_step)
        if png is not None:
            atomic_write_bytes(png / RECONSTRUCTIONS_PNG, grid_png(grid))

    # --- output ------------------------------------------------------------------------------
    def finalized_autoencoder(self) -> Autoencoder:
        """The diffusers model with its scaling factor set (measured unless configured)."""
        factor = self.hparams.scaling_factor
        if factor <= 0:
            factor = float(1.0 / self.latent_moments[1].clamp_min(1e-12).sqrt())
        self.ae.register_to_config(scaling_factor=factor)
        return self.ae

    def output_folder(self) -> Path | None:
        if self.hparams.output:
            return Path(self.hparams.output)
        data = stage_data(self._trainer)
        return data.layout.autoencoder if data is not None else None

    def on_fit_end(self) -> None:
        folder = self.output_folder()
        if folder is not None and self.trainer.is_global_zero:
            save_autoencoder(self.finalized_autoencoder(), folder)
            rank_zero_info(f"autoencoder saved to {folder}")
        self.trainer.strategy.barrier("autoencoder_saved")

    def setup(self, stage: str) -> None:
        data = stage_data(self._trainer)
        self.card = RunCard(
            family=self.family,
            preset=self.hparams.preset,
            model_index=0,
            role="autoencoder",
            splits_hash=data.splits_hash if data is not None else "",
            experiment=str(data.layout.root) if data is not None else "",
            autoencoder=str(self.output_folder() or ""),
            train_split=data.train_split if data is not None else "",
        )

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.card is not None:
            checkpoint[CARD_KEY] = self.card.to_dict()


__all__ = ["AutoencoderError", "AutoencoderModule"]
