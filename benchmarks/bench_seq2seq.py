"""Seq2seq family speed: Lightning vs a plain loop, batched sampling vs transformers' generate.

    python benchmarks/bench_seq2seq.py                 # both measurements
    python benchmarks/bench_seq2seq.py --only train    # train_ratio() only

`train_ratio()`: the same `Seq2SeqModule` (tiny preset, random VQ autoencoder, codes cached)
trained for the same number of steps by `Trainer.fit` and by a hand-written PyTorch loop over
the same optimizer and scheduler; prints `RESULT train_lightning_over_plain <plain / lightning
wall time>` (goal >= 0.95).

`generate_ratio()`: `Seq2SeqModule.generate` on C captions x N images in one batch vs one
caption at a time through transformers' `model.generate(...)` with the same code-range
restriction (a LogitsProcessor) and sampler, each followed by the VQ decoder; prints
`RESULT generate_over_per_caption_pipeline <per-caption time / batched time>` (goal >= 2).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from diffusers import VQModel
from lightning.pytorch import Trainer
from torch.utils.data import DataLoader
from transformers import LogitsProcessor, LogitsProcessorList

from lightning_mia.data.datamodule import collate_samples
from lightning_mia.data.shapes import ShapesSource
from lightning_mia.models.autoencoder import decode_codes
from lightning_mia.models.bart_tokenizer import train_caption_tokenizer
from lightning_mia.models.base import caption_seeds
from lightning_mia.models.seq2seq import Seq2SeqModule


class CodeRangeLogitsProcessor(LogitsProcessor):
    """Only image codes may be generated: every other logit is -inf."""

    def __init__(self, lo: int, hi: int) -> None:
        self.lo, self.hi = lo, hi

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        mask = torch.full_like(scores, float("-inf"))
        mask[:, self.lo : self.hi] = 0.0
        return scores + mask


def build(folder: Path, num_samples: int) -> tuple[Seq2SeqModule, list[dict]]:
    """A tiny model over a random f4 VQ (8x8 = 64 codes of 512) and its shapes data."""
    torch.manual_seed(0)
    VQModel(
        block_out_channels=(8, 16, 16),
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        layers_per_block=1,
        latent_channels=4,
        num_vq_embeddings=512,
        vq_embed_dim=4,
        norm_num_groups=8,
        sample_size=32,
        mid_block_add_attention=False,
    ).save_pretrained(folder / "autoencoder")
    source = ShapesSource(num_samples=num_samples, resolution=32, seed=0)
    items = [
        {"pixel_values": source.image(i), "caption": source.caption(i), "sample_id": i}
        for i in source.sample_ids()
    ]
    train_caption_tokenizer([it["caption"] for it in items], 512, folder / "tokenizer")
    model = Seq2SeqModule(
        autoencoder=str(folder / "autoencoder"), tokenizer=str(folder / "tokenizer")
    )
    return model, items


def plain_fit(model: Seq2SeqModule, loader: DataLoader, steps: int) -> float:
    """Seconds for `steps` optimizer steps of a hand-written loop."""
    cfg = model.configure_optimizers()
    opt, sched = cfg["optimizer"], cfg["lr_scheduler"]["scheduler"]
    model.train()
    start, done = time.perf_counter(), 0
    while done < steps:
        for batch in loader:
            loss = model.per_sample_loss(batch).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            done += 1
            if done == steps:
                break
    return time.perf_counter() - start


def lightning_fit(model: Seq2SeqModule, loader: DataLoader, steps: int) -> float:
    """Seconds for `Trainer.fit` to run `steps` optimizer steps (set-up included)."""
    trainer = Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    start = time.perf_counter()
    trainer.fit(model, loader)
    return time.perf_counter() - start


def train_ratio(steps: int = 100, rounds: int = 3, batch_size: int = 16) -> float:
    """Lightning throughput over the plain loop's (same model, data, optimizer, steps)."""
    with tempfile.TemporaryDirectory() as tmp:
        model, items = build(Path(tmp), 64)
        loader = DataLoader(items, batch_size, shuffle=True, collate_fn=collate_samples)
        for batch in loader:  # fill the code cache: both runs train on cached codes
            model.image_codes(batch)
        plain, light = [], []
        for _ in range(rounds):  # alternate, so drifting machine load hits both alike
            plain.append(plain_fit(model, loader, steps))
            light.append(lightning_fit(model, loader, steps))
    p, li = statistics.median(plain), statistics.median(light)
    print(f"train: {steps} steps of batch {batch_size}: plain {p:.2f} s, Lightning {li:.2f} s")
    ratio = p / li
    print(f"RESULT train_lightning_over_plain {ratio:.3f}")
    return ratio


def per_caption_pipeline(model: Seq2SeqModule, captions: list[str], n: int, seed: int) -> list:
    """One caption at a time: transformers' generate with the code-range processor, then VQ."""
    spec = model.spec
    restrict = LogitsProcessorList(
        [CodeRangeLogitsProcessor(spec.code_offset, spec.image_start_id)]
    )
    images = []
    for caption, s in zip(captions, caption_seeds(len(captions), seed)):
        torch.manual_seed(s)
        ids, mask = model.tokenize([caption])
        out = model.bart.generate(
            input_ids=ids,
            attention_mask=mask,
            do_sample=True,
            top_k=0,
            top_p=1.0,
            temperature=1.0,
            num_return_sequences=n,
            max_new_tokens=spec.image_tokens,
            min_new_tokens=spec.image_tokens,
            decoder_start_token_id=spec.image_start_id,
            logits_processor=restrict,
        )
        codes = out[:, 1:] - spec.code_offset  # (N, L)
        assert codes.shape == (n, spec.image_tokens) and codes.min() >= 0
        images.append(decode_codes(model.vq, codes, model.code_grid))
    return images


def generate_ratio(num_captions: int = 16, num_images: int = 4, rounds: int = 3) -> float:
    """Batched `generate` speed over the per-caption transformers pipeline's."""
    with tempfile.TemporaryDirectory() as tmp:
        model, items = build(Path(tmp), num_captions)
        model.eval()
        captions = [it["caption"] for it in items][:num_captions]
        batched, single = [], []
        with torch.no_grad():
            model.generate(captions[:2], 1)  # warm-up
            for r in range(rounds):
                start = time.perf_counter()
                model.generate(captions, num_images, seed=r)
                batched.append(time.perf_counter() - start)
                start = time.perf_counter()
                per_caption_pipeline(model, captions, num_images, seed=r)
                single.append(time.perf_counter() - start)
    b, s = statistics.median(batched), statistics.median(single)
    print(
        f"generate: {num_captions} captions x {num_images} images: batched {b:.2f} s, "
        f"per caption {s:.2f} s"
    )
    ratio = s / b
    print(f"RESULT generate_over_per_caption_pipeline {ratio:.3f}")
    return ratio


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", choices=["train", "generate"], default=None)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    p.add_argument("--steps", type=int, default=100)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.only in (None, "train"):
        train_ratio(args.steps)
    if args.only in (None, "generate"):
        generate_ratio()


if __name__ == "__main__":
    main()
