"""Frozen-encoder outputs cached by sample_id: latents (diffusion) and the shared helper."""

import torch

from lightning_mia.data.shapes import ShapesSource
from lightning_mia.models.base import cached_by_id
from lightning_mia.models.diffusion import LatentDiffusionModule

SOURCE = ShapesSource(num_samples=8, resolution=16, seed=3)


def test_cached_by_id_computes_each_id_once_in_batch_order():
    cache, calls = {}, []

    def compute(rows):
        calls.append(list(rows))
        return torch.tensor([[float(ids[r])] for r in rows])

    ids = [5, 2, 7]
    assert cached_by_id(cache, ids, compute).flatten().tolist() == [5.0, 2.0, 7.0]
    ids = [7, 9, 5]  # only 9 is new, at batch position 1
    out = cached_by_id(cache, torch.tensor(ids), compute, torch.float16)
    assert out.flatten().tolist() == [7.0, 9.0, 5.0]
    assert calls == [[0, 1, 2], [1]]
    assert cache[9].dtype == torch.float16 and cache[9].device.type == "cpu"


def batch(ids):
    return {
        "pixel_values": torch.stack([SOURCE.image(i) for i in ids]),
        "caption": [SOURCE.caption(i) for i in ids],
        "sample_id": torch.tensor(ids),
    }


def test_training_latents_are_cached_only_without_augmentation(trained_autoencoder):
    torch.manual_seed(0)
    model = LatentDiffusionModule(
        autoencoder=str(trained_autoencoder), resolution=16, max_caption_length=77
    )
    first = batch([0, 1, 2])
    direct = model.encode_images(first["pixel_values"])
    model.train()
    # the cache encoded the same batch with the same encoder: equal up to float32 rounding of
    # latents of O(1) (atol 1e-5); the negated images below move them by O(1) (atol 1e-3)
    assert torch.allclose(model.image_latents(first), direct, atol=1e-5)
    assert sorted(model._latent_cache) == [0, 1, 2]
    # a cached id answers from the cache, whatever image the batch carries for it
    changed = {**first, "pixel_values": -first["pixel_values"]}
    assert torch.allclose(model.image_latents(changed), direct, atol=1e-5)
    model.eval()  # queries and gray-box signals always encode what they are given
    assert not torch.allclose(model.image_latents(changed), direct, atol=1e-3)
    model.train()
    model.hparams.random_flip = True  # augmented images differ each step: never cached
    assert not torch.allclose(model.image_latents(changed), direct, atol=1e-3)
    assert sorted(model._latent_cache) == [0, 1, 2]


def test_both_families_crop_and_flip_and_say_so(trained_autoencoder):
    from lightning_mia.models.augment import augment_images
    from lightning_mia.models.seq2seq import Seq2SeqModule

    x = torch.stack([SOURCE.image(i) for i in range(8)])  # (8, 3, 16, 16)
    torch.manual_seed(0)
    flipped = augment_images(x, random_crop=False, random_flip=True)
    same = [torch.equal(a, b) for a, b in zip(flipped, x)]
    mirrored = [torch.equal(a, b.flip(-1)) for a, b in zip(flipped, x)]
    assert all(s or m for s, m in zip(same, mirrored)) and 0 < sum(mirrored) < 8
    cropped = augment_images(x, random_crop=True, random_flip=False)
    assert cropped.shape == x.shape and cropped.abs().max() <= 1
    assert not torch.equal(cropped, x)
    model = Seq2SeqModule(random_crop=True)
    want = {"random_crop": True, "random_flip": False, "caption_dropout": 0.1}
    assert model.augmentation_config() == want and model.augments_images
    assert LatentDiffusionModule(
        autoencoder=str(trained_autoencoder), resolution=16, random_flip=True
    ).augmentation_config() == {
        **want,
        "random_crop": False,
        "random_flip": True,
    }
