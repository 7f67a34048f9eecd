"""Gray-box signals of the diffusion family: the maths of each piece on hand-made inputs, then on
a tiny latent diffusion model trained briefly on 16 members.

One model for the file (module fixture): the `tiny` preset at 16x16 pixels (4x4x4 latents of a
random VQ autoencoder), v-prediction with the cosine schedule, STEPS AdamW steps at lr 1e-3 on
16 members, then 16 non-members from the same source. The tests check what holds for any
weights (names, shapes, each signal against its reference recipe, determinism); whether members
look like members after 300 steps is `python benchmarks/bench_memorisation.py --check
graybox-diffusion`, which imports this module's data, autoencoder and options.
"""

import math

import pytest
import torch
from diffusers import DDPMScheduler, VQModel

import lightning_mia.graybox.clid as clid_module
from lightning_mia.data.shapes import ShapesSource
from lightning_mia.graybox import SignalError, SignalOptions, compute_signals
from lightning_mia.graybox.clid import mask_top_words, word_importance
from lightning_mia.graybox.denoiser import LatentView, fixed_noise, guided
from lightning_mia.graybox.denoiser import noise_seeds as seeds_of
from lightning_mia.graybox.pia import pia_distance
from lightning_mia.graybox.secmi import ddim_invert, ddim_reverse, secmi_features
from lightning_mia.models.diffusion import LatentDiffusionModule, split_prediction
from lightning_mia.models.latent import TimeGrid
from lightning_mia.models.vae import encode_latents

RES, MEMBERS, STEPS = 16, 16, 20
SOURCE = ShapesSource(num_samples=64, resolution=RES, seed=0)
IDS = list(range(2 * MEMBERS))  # the first 16 are members
LABELS = torch.tensor(IDS) < MEMBERS
EOT = "<|endoftext|>"  # the tiny model's CLIP tokenizer's end-of-text token
# SecMI at t_sec=100 with 5 steps was unstable here: the same training, perturbed only at float
# level (latents cached vs re-encoded each step), gave t_error AUC 0.29 or 0.96. t_sec=300 in
# 10 steps gave 0.895 and 0.898 with the earlier round trip (invert to t_sec, down, up, compare
# at t_sec) and 0.902 with the reference's (invert to t_sec - Δ, up, down, compare at t_sec - Δ);
# the two orders gave the same AUC within 0.007 at t_sec 100-500 in 10 steps (0.86-1.0).
OPTIONS = SignalOptions(timesteps=(200, 300), secmi_t=300, secmi_steps=10)


# --- the maths on hand-made inputs ----------------------------------------------------------------
class ScalarDenoiser:
    """A hand-made epsilon-predictor eps(x_t, t) = k(t)·x_t on a DDPM schedule, implementing the
    family interface the signals use (models.latent); records each t it is queried at."""

    device, time_grid = torch.device("cpu"), TimeGrid(0, 999, True, 1000)

    def __init__(self, k):
        self.alphas = DDPMScheduler(beta_start=1e-4, beta_end=0.02).alphas_cumprod.float()
        self.k, self.calls = k, []

    def predict(self, x_t, t, cond):
        self.calls.append(int(t[0]))
        return self.k(int(t[0])) * x_t

    def noised(self, x0, noise, t):
        abar = self.alphas[t].reshape(-1, 1, 1, 1)
        return abar.sqrt() * x0 + (1 - abar).sqrt() * noise

    def split_prediction(self, prediction, x_t, t):
        return split_prediction(prediction, x_t, self.alphas[t].reshape(-1, 1, 1, 1), "epsilon")

    def step(self, t, t_next):
        """The factor one DDIM step t -> t_next multiplies x by, in float64."""
        a, a_next, k = float(self.alphas[t]), float(self.alphas[t_next]), self.k(t)
        return math.sqrt(a_next / a) * (1 - math.sqrt(1 - a) * k) + math.sqrt(1 - a_next) * k


@pytest.mark.parametrize("t_sec, steps", [(100, 10), (300, 3), (50, 1)])
def test_secmi_runs_the_reference_order_on_a_hand_made_denoiser(t_sec, steps):
    view = ScalarDenoiser(lambda t: 0.2 + t / 40)  # k changes along t: a round-trip error
    x0 = torch.randn(2, 3, 2, 2, generator=torch.Generator().manual_seed(0))
    feats = secmi_features(LatentView(view), x0, None, t_sec, steps)
    delta = t_sec // steps
    # invert 0 -> t_sec - Δ, one step up to t_sec, one step down to t_sec - Δ: num_steps + 1
    assert view.calls == [*range(0, t_sec - delta, delta), t_sec - delta, t_sec]
    to_ref = math.prod(view.step(t, t + delta) for t in range(0, t_sec - delta, delta))
    x_ref = x0.double() * to_ref  # x̃ at t_sec - Δ
    trip = view.step(t_sec - delta, t_sec) * view.step(t_sec, t_sec - delta)
    err = (x_ref * (trip - 1)) ** 2  # compared at t_sec - Δ
    close = {"rtol": 1e-4, "atol": 0.0}  # float32 maths against float64
    torch.testing.assert_close(feats["secmi/t_error"].double(), err.flatten(1).mean(1), **close)
    err_map = err.sum(1).flatten(1)  # (B, h*w)
    torch.testing.assert_close(feats["secmi/err_max"].double(), err_map.max(1).values, **close)


def test_pia_distance_is_the_mean_p_power_and_guidance_is_cfg():
    eps0 = torch.tensor([[1.0, -2.0], [0.5, 0.0]])
    zero = torch.zeros(2, 2)
    torch.testing.assert_close(pia_distance(eps0, zero, 4.0), torch.tensor([8.5, 0.03125]))
    torch.testing.assert_close(pia_distance(eps0, zero, 1.0), torch.tensor([1.5, 0.25]))
    uncond, cond = torch.tensor([[1.0]]), torch.tensor([[3.0]])
    torch.testing.assert_close(guided(torch.cat([uncond, cond]), 7.5), torch.tensor([[16.0]]))
    assert guided(cond, 1.0) is cond


def test_reduced_captions_mask_the_most_important_words_as_the_reference():
    caption = "a b c d e f g h i j"
    descending = [10.0 - i for i in range(10)]  # "a" most important
    for rate, masked in [(0.3, 3), (0.5, 5), (0.7, 7)]:  # int(r·n - 0.01) + 1 words
        expected = " ".join([EOT] * masked + caption.split()[masked:])
        assert mask_top_words(caption, descending, rate, EOT) == expected
    assert mask_top_words("a b c d", [1.0, 3.0, 3.0, 2.0], 0.3, "_") == "a _ _ d"  # ties together
    assert mask_top_words("circle", [0.2], 0.3, "_") == "_"  # one word: always masked
    assert mask_top_words("", [], 0.5, "_") == ""
    with pytest.raises(ValueError, match="1 importances for the 2 words"):
        mask_top_words("a b", [1.0], 0.5, "_")


def test_word_importance_is_the_conditioning_change_of_masking_each_word(monkeypatch):
    def encode(captions):  # (B, 1, 1): the caption's length without the mask word
        return torch.tensor([[[float(len(c.replace("<m>", "")))]] for c in captions])

    monkeypatch.setattr(clid_module, "ENCODE_CHUNK", 2)  # three calls for five words
    captions = ["ab c", "hello", "", "x yz"]
    importance = word_importance(encode, captions, encode(captions), "<m>")
    assert importance == [[4.0, 1.0], [25.0], [], [1.0, 4.0]]  # len(word)², in word order


def shapes_batch(ids):
    return {
        "pixel_values": torch.stack([SOURCE.image(i) for i in ids]),
        "caption": [SOURCE.caption(i) for i in ids],
        "sample_id": torch.tensor(ids, dtype=torch.int64),
    }


def random_autoencoder(folder):
    """A random f4 VQ autoencoder, its scaling factor set to 1 / std of the data's latents."""
    torch.manual_seed(0)
    vq = VQModel(
        block_out_channels=(32, 64, 64),
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        layers_per_block=1,
        latent_channels=4,
        num_vq_embeddings=64,
        vq_embed_dim=4,
        norm_num_groups=16,
        sample_size=RES,
    )
    with torch.no_grad():
        std = encode_latents(vq, shapes_batch(IDS)["pixel_values"]).std()
    vq.register_to_config(scaling_factor=float(1.0 / std))
    vq.save_pretrained(folder)
    return folder


def test_every_signal_runs_on_a_random_model(tmp_path):
    """The fast tier's check of the whole signal path (the trained model's tests are slow)."""
    folder = random_autoencoder(tmp_path / "autoencoder")
    torch.manual_seed(0)
    m = LatentDiffusionModule(autoencoder=str(folder), resolution=RES, max_caption_length=77)
    batch = shapes_batch(IDS[:4])
    names = ["loss", "secmi", "pia", "clid"]
    feats = compute_signals(m.eval(), batch, names, seed=0, options=OPTIONS)
    assert {k.split("/")[0] for k in feats} == {"loss", "secmi", "pia", "clid"}
    assert all(v.shape == (4,) and bool(torch.isfinite(v).all()) for v in feats.values())


# --- a trained model ------------------------------------------------------------------------------
def trained_model(root, steps: int) -> LatentDiffusionModule:
    """The file's model over a random autoencoder in `root`, trained `steps` AdamW steps at lr
    1e-3 on the 16 members; in eval mode."""
    folder = random_autoencoder(root / "autoencoder")
    torch.manual_seed(0)
    m = LatentDiffusionModule(
        autoencoder=str(folder), resolution=RES, caption_dropout=0.1, max_caption_length=77
    )
    members = shapes_batch(IDS[:MEMBERS])
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-3)
    m.train()
    for _ in range(steps):
        loss = m.per_sample_loss(members).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return m.eval()


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the test machine is shared: two threads thrash
    yield trained_model(tmp_path_factory.mktemp("graybox"), STEPS)
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def signals(model):
    return compute_signals(
        model, shapes_batch(IDS), ["loss", "secmi", "pia", "clid"], seed=0, options=OPTIONS
    )


@pytest.mark.slow
def test_signal_names_and_shapes(signals):
    expected = {f"loss/{s}{t}" for s in ("t", "eps_t") for t in (200, 300)}
    expected |= {"loss/mean", "loss/eps_mean", "secmi/t_error", "secmi/err_max", "secmi/err_p90"}
    expected |= {"pia/t200", "pia/t300", "pia/mean"}
    expected |= {f"clid/{n}" for n in ("loss_cond", "gap_null", "score")}
    expected |= {f"clid/gap_cut{r}" for r in (30, 50, 70)}
    assert set(signals) == expected
    for name, value in signals.items():
        assert value.shape == (len(IDS),) and value.dtype == torch.float32, name
        assert torch.isfinite(value).all(), name


@pytest.mark.slow
def test_loss_is_the_models_own_training_loss(model, signals):
    batch = shapes_batch(IDS)
    seeds = seeds_of(0, batch["sample_id"])
    noise = fixed_noise(seeds, 300, model.latent_shape, "cpu")
    timesteps = torch.full((len(IDS),), 300)
    with torch.no_grad():
        own = model.per_sample_loss(batch, timesteps=timesteps, noise=noise)
    # the same UNet pass on the same batch; float32 means of 64 squared errors may be reduced
    # in another order: 1e-5 relative (measured: equal)
    torch.testing.assert_close(signals["loss/t300"], own, rtol=1e-5, atol=0.0)
    # v-prediction: the noise-space error is ᾱ_t times the v error; computed from eps and x_t
    # instead, a few more float32 ops per element: 1e-5 relative (measured 2.8e-7)
    abar = model.noise_scheduler.alphas_cumprod[300]
    torch.testing.assert_close(signals["loss/eps_t300"], abar * own, rtol=1e-5, atol=0.0)


@pytest.mark.slow
def test_clid_gaps_are_loss_differences_at_the_same_noise(model, signals):
    batch, ts = shapes_batch(IDS), OPTIONS.clid_timesteps  # (440, 450, 460)

    def eps_loss(captions):
        feats = compute_signals(model, {**batch, "caption": captions}, ["loss"], 0, timesteps=ts)
        return feats["loss/eps_mean"]

    own = eps_loss(batch["caption"])
    # O(1) float32 losses and their gaps, the same UNet passes in batches of other sizes: the
    # default tolerance (1.3e-6 relative, 1e-5 absolute; measured 4.8e-7 absolute)
    torch.testing.assert_close(signals["clid/loss_cond"], own)
    torch.testing.assert_close(signals["clid/gap_null"], eps_loss([""] * len(IDS)) - own)
    view = LatentView(model)
    with torch.no_grad():
        cond = view.condition(batch["caption"])
        importance = word_importance(view.condition, batch["caption"], cond, EOT)
    reduced = [mask_top_words(c, w, 0.5, EOT) for c, w in zip(batch["caption"], importance)]
    words = len(batch["caption"][0].split())
    assert reduced[0].split().count(EOT) == int(0.5 * words - 0.01) + 1  # no ties here
    torch.testing.assert_close(signals["clid/gap_cut50"], eps_loss(reduced) - own)
    gaps = [signals[f"clid/gap_{n}"] for n in ("null", "cut30", "cut50", "cut70")]
    torch.testing.assert_close(signals["clid/score"], torch.stack(gaps).mean(0))


@pytest.mark.slow
def test_pia_follows_the_reference_recipe(model, signals):
    view, t, scale = LatentView(model), 200, OPTIONS.pia_guidance
    batch = shapes_batch(IDS)
    with torch.no_grad():
        x0, cond = view.latents(batch["pixel_values"]), view.condition(batch["caption"])
        both = view.guidance_condition(cond, scale)  # [null; caption]

        def eps(x, step):  # guided eps at x (B, C, h, w), timestep `step`
            out = view.predict(x.repeat(2, 1, 1, 1), step, both)
            abar = model.noise_scheduler.alphas_cumprod[step].reshape(1, 1, 1, 1)
            e = split_prediction(out, x.repeat(2, 1, 1, 1), abar, "v_prediction")[0]
            return e[len(IDS) :] * scale + e[: len(IDS)] * (1 - scale)

        eps0 = eps(x0, 0)  # the model at t = 0 on the clean latents
        x_t = model.noise_scheduler.add_noise(x0, eps0, torch.full((len(IDS),), t))
        expected = (eps0 - eps(x_t, t)).abs().pow(4).flatten(1).mean(1)  # p = 4, no root
    # the same passes batched otherwise; the 4th power of a difference of guided predictions
    # multiplies their float32 relative error (~1e-6) by cancellation and 4 (measured 1.1e-5)
    torch.testing.assert_close(signals["pia/t200"], expected, rtol=1e-4, atol=1e-7)


@pytest.mark.slow
def test_secmi_inversion_then_ddim_gives_back_the_latents(model):
    view = LatentView(model)
    with torch.no_grad():
        x0 = view.latents(shapes_batch(IDS[:8])["pixel_values"])
        cond = view.condition([SOURCE.caption(i) for i in IDS[:8]])
        x_t = ddim_invert(view, x0, cond, 100, 10)
        back = ddim_reverse(view, x_t, cond, 100, 10)
    moved, error = (x_t - x0).pow(2).mean(), (back - x0).pow(2).mean()
    assert moved > 1e-3  # the inversion went somewhere...
    assert error < 0.05 * moved  # ...and DDIM comes back to x0,
    assert error < 1e-4 * x0.pow(2).mean()  # within 1% of its scale
    with pytest.raises(ValueError, match="timestep 100 must be a positive multiple of"):
        ddim_invert(view, x0, cond, 100, 7)


# Batch independence holds up to float32 reordering: a batch of another size runs the UNet's
# GEMMs and convolutions with other blockings (MKL and oneDNN choose them by shape and by the
# CPU's ISA), so each output carries ~1e-6 relative error (tens of layers, sums of <= 10^3
# terms; measured <= 1.4e-6 on AVX-512 and AVX2 kernels). Carried to each signal:
BATCH_TOLERANCE = {
    "loss": dict(rtol=1e-5, atol=0.0),  # means of 64 squared O(1) errors (measured 7e-7)
    # the 4th power of a difference of two guided noise predictions: cancellation, then 4x the
    # relative error (measured 1e-5)
    "pia": dict(rtol=1e-4, atol=0.0),
    # gaps are differences of two O(1) losses: the losses' absolute error, ~1e-5 of ~2, not a
    # fraction of the (small) gap; measured 4.8e-7
    "clid": dict(rtol=1e-5, atol=1e-5),
    # squared errors ~1e-4 after 20 chained UNet passes (10 inverse + 10 DDIM steps):
    # cancellation in x' - x~ makes the error relative to the result ~100x larger (measured
    # 2.5e-4)
    "secmi": dict(rtol=2e-3, atol=0.0),
}


def _named(key):
    """assert_close's message with the signal's name in front."""
    return lambda message: f"{key}: {message}"


@pytest.mark.slow
def test_fixed_noise_determinism_and_batch_independence(model, signals):
    names = ["loss", "secmi", "pia", "clid"]
    again = compute_signals(model, shapes_batch(IDS), names, seed=0, options=OPTIONS)
    for k in signals:  # same batch, same thread count, same process: the same float ops
        torch.testing.assert_close(again[k], signals[k], rtol=0, atol=0)
    order = [20, 3, 7]  # another batch, another order
    part = compute_signals(model, shapes_batch(order), names, seed=0, options=OPTIONS)
    for k in signals:
        tolerance = BATCH_TOLERANCE[k.split("/")[0]]
        torch.testing.assert_close(part[k], signals[k][order], **tolerance, msg=_named(k))
    other = compute_signals(model, shapes_batch(order), ["loss"], seed=1, options=OPTIONS)
    assert not torch.allclose(other["loss/mean"], part["loss/mean"])


@pytest.mark.slow
def test_bad_requests_fail_with_one_clear_error(model):
    batch = shapes_batch([0, 1])
    with pytest.raises(
        ValueError,
        match=r"timesteps \[1000\] out of the scheduler's range "
        r"\(0 <= t < num_train_timesteps = 1000\)",
    ):
        compute_signals(model, batch, ["loss"], seed=0, timesteps=[100, 1000])
    with pytest.raises(SignalError, match=r"\['nll'\] are not for the 'diffusion' family"):
        compute_signals(model, batch, ["nll"], seed=0)
    with pytest.raises(SignalError, match="batch lacks"):
        compute_signals(model, {"caption": ["x"]}, ["loss"], seed=0)
    with pytest.raises(ValueError, match="resolution 16"):
        compute_signals(model, {**batch, "pixel_values": torch.zeros(2, 3, 32, 32)}, ["pia"], 0)
    assert not model.training
