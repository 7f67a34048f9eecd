"""Black-box features on hand-made inputs: known values, orderings, shapes and names."""

import math

import pytest
import torch
import torch.nn.functional as F

from lightning_mia.features import FEATURE_GROUPS, FeatureExtractor
from lightning_mia.features.blind import blind_features
from lightning_mia.features.pixel import MAX_PSNR_DB, aggregate_over_images, pixel_features
from lightning_mia.features.quality import brisque_score, brisque_statistics, quality_features
from lightning_mia.features.semantic import semantic_features
from lightning_mia.features.text import text_features
from lightning_mia.specs.attacks import ATTACKS

STATS = ("mean", "min", "max", "std")


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def procedural(n, r, seed=0):
    """Images with natural-scene-like statistics: random phase, 1/f amplitude spectrum."""
    g = torch.Generator().manual_seed(seed)
    fy, fx = torch.fft.fftfreq(r)[:, None], torch.fft.fftfreq(r)[None, :]
    amp = 1 / (fx**2 + fy**2).sqrt().clamp_min(1 / r)
    img = torch.fft.ifft2(torch.randn(n, 3, r, r, generator=g) * amp).real
    img = img - img.mean(dim=(-2, -1), keepdim=True)
    return (img / img.std(dim=(1, 2, 3), keepdim=True) * 0.4).clamp(-1, 1)


def noisy(x, std=0.3, seed=1):
    return (x + std * torch.randn(x.shape, generator=torch.Generator().manual_seed(seed))).clamp(
        -1, 1
    )


def blurred(x, k=5):
    box = torch.ones(3, 1, k, k) / k**2
    return F.conv2d(F.pad(x, (k // 2,) * 4, mode="replicate"), box, groups=3)


# --- pixel -------------------------------------------------------------------------------------
def test_pixel_identical_images_give_zero_mse_unit_ssim_and_clamped_psnr():
    x = procedural(3, 32)
    feats = pixel_features(x, x[:, None].repeat(1, 4, 1, 1, 1))
    assert sorted(feats) == sorted(f"pixel/{m}_{s}" for m in ("mse", "psnr", "ssim") for s in STATS)
    assert all(v.shape == (3,) and torch.isfinite(v).all() for v in feats.values())
    assert torch.allclose(feats["pixel/mse_max"], torch.zeros(3))
    # SSIM of identical images is 1 up to float32 cancellation in the variances (E[x²] - E[x]²)
    assert torch.allclose(feats["pixel/ssim_min"], torch.ones(3), atol=1e-4)
    assert torch.allclose(feats["pixel/psnr_mean"], torch.full((3,), MAX_PSNR_DB))
    assert torch.allclose(feats["pixel/mse_std"], torch.zeros(3))


def test_pixel_values_match_definitions_and_order_by_distance():
    x = procedural(2, 32)
    near, far = noisy(x, 0.05), noisy(x, 0.4, seed=2)
    feats = pixel_features(x, torch.stack([near, far], dim=1))  # (B, 2, 3, H, W)
    mse = [((a + 1) / 2 - (x + 1) / 2).square().mean(dim=(1, 2, 3)) for a in (near, far)]
    # float32 means of 3,072 squares below 0.2, reduced in another order: atol 1e-6; PSNR is
    # -10 log10 of that: 1e-3 dB
    assert torch.allclose(feats["pixel/mse_min"], mse[0], atol=1e-6)
    assert torch.allclose(feats["pixel/mse_max"], mse[1], atol=1e-6)
    assert torch.allclose(feats["pixel/psnr_max"], -10 * torch.log10(mse[0]), atol=1e-3)
    assert (feats["pixel/ssim_max"] > feats["pixel/ssim_min"] + 0.1).all()
    assert torch.allclose(feats["pixel/mse_mean"], (mse[0] + mse[1]) / 2, atol=1e-6)


def test_pixel_shifted_image_scores_worse_than_itself():
    x = procedural(4, 32)
    shifted = torch.roll(x, shifts=3, dims=-1)
    same = pixel_features(x, x[:, None])
    moved = pixel_features(x, shifted[:, None])
    assert (moved["pixel/mse_mean"] > same["pixel/mse_mean"]).all()
    assert (moved["pixel/ssim_mean"] < same["pixel/ssim_mean"] - 0.1).all()
    assert (moved["pixel/psnr_mean"] < same["pixel/psnr_mean"]).all()


def test_pixel_resizes_the_query_to_the_generated_resolution():
    big = procedural(2, 64)
    small = F.interpolate(big, size=(32, 32), mode="bilinear", antialias=True)
    feats = pixel_features(big, small[:, None])
    assert (feats["pixel/ssim_mean"] > 0.99).all()
    with pytest.raises(ValueError, match=r"expected query \(B, 3, H, W\)"):
        pixel_features(big, small)


def test_aggregate_is_population_statistics_and_finite_for_one_image():
    v = torch.tensor([[1.0, 3.0], [2.0, 2.0]])
    agg = aggregate_over_images(v, "g/x")
    assert agg["g/x_mean"].tolist() == [2.0, 2.0]
    assert agg["g/x_std"].tolist() == [1.0, 0.0]
    assert aggregate_over_images(v[:, :1], "g/x")["g/x_std"].tolist() == [0.0, 0.0]


# --- semantic and text ---------------------------------------------------------------------
def test_semantic_features_on_constructed_embeddings():
    q = torch.tensor([[1.0, 0.0], [0.0, 2.0]])  # not unit norm: normalised inside
    g = torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[0.0, 1.0], [0.0, 1.0]]])  # (B=2, N=2, D=2)
    f = semantic_features(q, g)
    assert sorted(f) == sorted(f"semantic/{m}_{s}" for m in ("cos", "l2") for s in STATS)
    assert torch.allclose(f["semantic/cos_mean"], torch.tensor([0.5, 1.0]))
    assert torch.allclose(f["semantic/cos_min"], torch.tensor([0.0, 1.0]))
    assert torch.allclose(f["semantic/l2_max"], torch.tensor([math.sqrt(2), 0.0]))
    assert torch.allclose(f["semantic/cos_std"], torch.tensor([0.5, 0.0]))


def test_text_features_on_constructed_embeddings():
    t = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    q = torch.tensor([[0.0, 1.0], [0.6, 0.8]])
    g = torch.tensor([[[1.0, 0.0], [1.0, 1.0]], [[0.0, 1.0], [1.0, 0.0]]])
    f = text_features(t, q, g)
    assert sorted(f) == sorted([f"text/gen_cos_{s}" for s in STATS] + ["text/query_cos"])
    assert torch.allclose(f["text/query_cos"], torch.tensor([0.0, 1.0]))
    assert torch.allclose(f["text/gen_cos_max"], torch.tensor([1.0, 0.8]))
    assert torch.allclose(f["text/gen_cos_mean"], torch.tensor([(1 + 0.5**0.5) / 2, 0.7]))
    with pytest.raises(ValueError, match="embedding"):
        text_features(t, q, g[..., :1])


def test_blind_features_names_and_values():
    x = torch.zeros(2, 3, 16, 16)
    x[1, 0] = 0.5
    x[1, 1, :, ::2] = 1.0  # stripes: high-frequency energy
    emb = torch.eye(2, 8)
    f = blind_features(x, emb, emb, ["a red circle", "two words"])
    assert f["blind/mean_r"].tolist() == [0.0, 0.5]
    assert f["blind/std_g"][1] == pytest.approx(0.5)
    assert f["blind/hf_energy"][0] == 0 and f["blind/hf_energy"][1] > 0.1
    assert f["blind/query_cos"].tolist() == [1.0, 1.0]
    assert f["blind/caption_words"].tolist() == [3.0, 2.0]
    assert {"blind/img_emb_3", "blind/txt_emb_0", "blind/caption_chars"} <= set(f)
    assert all(v.shape == (2,) for v in f.values())


# --- quality ----------------------------------------------------------------------------------
def test_brisque_prefers_clean_images_to_noisy_or_blurred_at_256():
    x = procedural(4, 256)
    clean, bad_noise, bad_blur = (brisque_score(v) for v in (x, noisy(x), blurred(x)))
    assert clean.shape == (4,) and torch.isfinite(clean).all()
    assert (clean < bad_noise).all() and (clean < bad_blur).all()


def test_brisque_at_32_orders_means_and_is_finite_on_flat_images():
    x = procedural(8, 32)
    clean, bad_noise, bad_blur = (brisque_score(v).mean() for v in (x, noisy(x), blurred(x)))
    assert clean + 5 < bad_noise and clean + 5 < bad_blur
    flat = torch.zeros(2, 3, 32, 32)
    assert torch.isfinite(brisque_score(flat)).all()
    feats = quality_features(torch.stack([x[:2], noisy(x[:2])], dim=1))  # (2, 2, 3, 32, 32)
    assert sorted(feats) == sorted(f"quality/brisque_{s}" for s in STATS)
    assert (feats["quality/brisque_max"] >= feats["quality/brisque_min"]).all()


def test_brisque_statistics_match_opencv_on_textured_images():
    cv2 = pytest.importorskip("cv2")
    if not hasattr(cv2, "quality"):
        pytest.skip("opencv without the contrib quality module")
    x = noisy(procedural(2, 128), 0.2)
    u8 = ((x + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)  # what OpenCV sees
    ours = brisque_statistics(u8.double() / 127.5 - 1)
    for i in range(2):
        bgr = u8[i].permute(1, 2, 0).flip(-1).contiguous().numpy()
        ref = torch.from_numpy(cv2.quality.QualityBRISQUE_computeFeatures(bgr)).double().flatten()
        # another implementation (OpenCV: float32 filters of 8-bit images vs ours in float64,
        # another Gaussian window): the 36 statistics agree to 1%
        assert torch.allclose(ours[i], ref, atol=0.01, rtol=0.01), (ours[i], ref)


# --- extractor --------------------------------------------------------------------------------
def test_extractor_without_encoder_groups_and_errors():
    x = procedural(3, 32)
    gen = torch.stack([x, noisy(x)], dim=1)  # (3, 2, 3, 32, 32)
    ext = FeatureExtractor(None, groups=["pixel", "quality"])
    f = ext(x, gen, ["a", "b", "c"])
    assert len(f) == 16 and all(v.shape == (3,) and v.dtype == torch.float32 for v in f.values())
    with pytest.raises(ValueError, match="need an image-text encoder"):
        FeatureExtractor(None, groups=["semantic"])
    with pytest.raises(ValueError, match="unknown feature groups"):
        FeatureExtractor(None, groups=["pixels"])
    with pytest.raises(ValueError, match="captions"):
        ext(x, gen, ["a"])


def test_attack_groups_name_known_feature_groups():
    black_box = {n for n, s in ATTACKS.items() if s.access != "gray-box"}
    assert black_box == {"pixel", "semantic", "text", "combined", "blind"}
    for name in black_box:
        assert set(ATTACKS[name].groups) <= set(FEATURE_GROUPS)
    assert "blind" not in ATTACKS["combined"].groups
