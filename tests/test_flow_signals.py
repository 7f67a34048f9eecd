"""Gray-box signals of the flow family: the maths on a hand-made straight flow, then each signal
on a tiny random flow model (shapes, determinism, batch independence, its own recipe). That the
members of an overfitted model look like members is checked by
`benchmarks/bench_memorisation.py --check flow`."""

import pytest
import torch
from tiny_pipeline import tiny_vae

from lightning_mia.data.shapes import ShapesSource
from lightning_mia.graybox import SignalError, SignalOptions, compute_signals, signal_queries
from lightning_mia.graybox.denoiser import LatentView, fixed_noise, noise_seeds
from lightning_mia.graybox.flow import flow_secmi_signals, stacked_losses
from lightning_mia.models.flow import FlowMatchingModule
from lightning_mia.models.latent import TimeGrid
from lightning_mia.models.vae import save_autoencoder

RES = 16
SOURCE = ShapesSource(num_samples=64, resolution=RES, seed=0)
NAMES = ["flow_loss", "flow_sweep", "flow_secmi", "flow_pia", "flow_clid"]
# few times and steps keep it fast; the defaults are the references'
OPTIONS = SignalOptions(
    flow_times=(0.3, 0.6),
    flow_sweep_times=(0.2, 0.3, 0.6),
    flow_secmi_t=0.2,
    secmi_steps=4,
    flow_clid_times=(0.45,),
    clid_cut_rates=(0.5,),
)

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


class StraightFlow:
    """A hand-made flow whose velocity is a constant field c (each trajectory a straight line
    the Euler steps follow exactly), implementing the family interface; counts its passes."""

    device, time_grid, calls = torch.device("cpu"), TimeGrid(0.0, 1.0, False, 1000), 0

    def __init__(self, c):
        self.c = c

    def predict(self, x_t, t, cond):
        StraightFlow.calls += 1
        return self.c.expand_as(x_t).clone()

    noised = FlowMatchingModule.noised
    split_prediction = FlowMatchingModule.split_prediction


def test_the_flow_interface_maths_on_a_straight_flow():
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(3, 2, 2, 2, generator=g), torch.randn(3, 2, 2, 2, generator=g)
    flow = StraightFlow(torch.randn(1, 2, 2, 2, generator=g))
    t = torch.tensor([0.1, 0.5, 0.9])
    x_t = flow.noised(x0, eps, t)
    noise_hat, x0_hat = flow.split_prediction(eps - x0, x_t, t)  # the true velocity
    torch.testing.assert_close(noise_hat, eps) and torch.testing.assert_close(x0_hat, x0)
    view = LatentView(flow)
    moved = view.move(x_t[:1], 0.5, 0.2, None)  # an Euler step: x + (t' - t)·v
    torch.testing.assert_close(moved, x_t[:1] + (0.2 - 0.5) * flow.c)
    # a straight flow's Euler round trip comes back exactly: SecMI's t-error is 0
    StraightFlow.calls = 0
    feats = flow_secmi_signals(flow, None, 0, 0.2, 4, {"view": view, "x0": x0, "cond": None})
    assert StraightFlow.calls == 4 + 1  # num_steps + 1 passes, as flow_secmi's cost says
    torch.testing.assert_close(feats["flow_secmi/t_error"], torch.zeros(3), atol=1e-12, rtol=0)


@pytest.fixture(scope="module")
def autoencoder(tmp_path_factory):
    torch.manual_seed(0)
    ae = tiny_vae()
    with torch.no_grad():  # unit-variance latents, as a trained autoencoder's scaling gives
        std = ae.encode(shapes_batch(list(range(32)))["pixel_values"]).latent_dist.mean.std()
    ae.register_to_config(scaling_factor=float(1.0 / std))
    return save_autoencoder(ae, tmp_path_factory.mktemp("flow_signals") / "autoencoder")


# every signal runs through the family interface alone: the same tests hold for both
# transformer architectures (models.flow_arch)
@pytest.fixture(scope="module", params=["tiny", "flux-tiny"])
def model(request, autoencoder):
    torch.manual_seed(1)
    return FlowMatchingModule(
        preset=request.param, autoencoder=str(autoencoder), resolution=RES, max_caption_length=77
    ).eval()


def shapes_batch(ids):
    return {
        "pixel_values": torch.stack([SOURCE.image(i) for i in ids]),
        "caption": [SOURCE.caption(i)[:77] for i in ids],
        "sample_id": torch.tensor(ids, dtype=torch.int64),
    }


IDS = list(range(8))


@pytest.fixture(scope="module")
def signals(model):
    return compute_signals(model, shapes_batch(IDS), NAMES, seed=0, options=OPTIONS)


def test_signal_names_shapes_and_costs(signals):
    expected = {f"flow_loss/t{k}" for k in (300, 600)} | {f"flow_pia/t{k}" for k in (300, 600)}
    expected |= {f"flow_sweep/t{k}" for k in (200, 300, 600)}
    expected |= {"flow_loss/mean", "flow_sweep/mean", "flow_pia/mean"}
    expected |= {f"flow_secmi/{n}" for n in ("t_error", "err_max", "err_p90")}
    expected |= {f"flow_clid/{n}" for n in ("loss_cond", "gap_null", "gap_cut50", "score")}
    assert set(signals) == expected
    for name, value in signals.items():
        assert value.shape == (len(IDS),) and value.dtype == torch.float32, name
        assert torch.isfinite(value).all(), name
    costs = signal_queries(NAMES, OPTIONS)
    assert costs == {
        "flow_loss": 2,
        "flow_sweep": 3,
        "flow_secmi": 5,
        "flow_pia": 6,
        "flow_clid": 3,
    }


def test_loss_and_sweep_are_the_models_own_training_loss(model, signals):
    batch = shapes_batch(IDS)
    seeds = noise_seeds(0, batch["sample_id"])
    noise = fixed_noise(seeds, 0.6, model.latent_shape, "cpu")
    with torch.no_grad():
        own = model.per_sample_loss(batch, times=torch.full((len(IDS),), 0.6), noise=noise)
    # the same transformer pass in a stacked batch of another size: float32 GEMM blockings
    # differ (~1e-6 relative; measured 4e-7)
    torch.testing.assert_close(signals["flow_loss/t600"], own, rtol=1e-5, atol=0.0)
    torch.testing.assert_close(signals["flow_sweep/t600"], own, rtol=1e-5, atol=0.0)


def test_clid_gaps_are_loss_differences_at_the_same_noise(model, signals):
    batch = shapes_batch(IDS)
    with torch.no_grad():
        view = LatentView(model)
        x0 = view.latents(batch["pixel_values"])
        conds = [view.condition(batch["caption"]), view.condition([""] * len(IDS))]
        losses = stacked_losses(view, x0, conds, [0.45], noise_seeds(0, batch["sample_id"]))[0]
    torch.testing.assert_close(signals["flow_clid/loss_cond"], losses[0], rtol=1e-5, atol=1e-6)
    # a gap of two O(1) losses carries their absolute error (measured 2e-7)
    torch.testing.assert_close(
        signals["flow_clid/gap_null"], losses[1] - losses[0], rtol=1e-5, atol=1e-5
    )
    gaps = [signals["flow_clid/gap_null"], signals["flow_clid/gap_cut50"]]
    torch.testing.assert_close(signals["flow_clid/score"], torch.stack(gaps).mean(0))


def test_pia_follows_its_recipe(model, signals):
    batch, t, scale = shapes_batch(IDS), 0.3, OPTIONS.pia_guidance
    b = len(IDS)
    with torch.no_grad():
        view = LatentView(model)
        x0 = view.latents(batch["pixel_values"])
        both = view.guidance_condition(view.condition(batch["caption"]), scale)  # [null; caption]

        def velocity(x, time):  # guided velocity at x (B, C, h, w)
            v = model.predict(x.repeat(2, 1, 1, 1), torch.full((2 * b,), time), both)
            return v[:b] + scale * (v[b:] - v[:b])

        v0 = velocity(x0, 0.0)
        x_t = x0 + t * v0  # (1 - t)·x0 + t·eps0 with eps0 = x0 + v0
        expected = (velocity(x_t, t) - v0).abs().pow(4).flatten(1).mean(1)
    # 4th power of a difference of guided predictions: cancellation times 4 (measured 3e-6)
    torch.testing.assert_close(signals["flow_pia/t300"], expected, rtol=1e-4, atol=1e-9)


def test_signals_are_deterministic_and_batch_independent(model, signals):
    again = compute_signals(model, shapes_batch(IDS), NAMES, seed=0, options=OPTIONS)
    for k in signals:  # same batch, same process: the same float ops
        torch.testing.assert_close(again[k], signals[k], rtol=0, atol=0, msg=k)
    order = [5, 0, 3]
    part = compute_signals(model, shapes_batch(order), NAMES, seed=0, options=OPTIONS)
    for k in signals:
        # other batch sizes, other GEMM blockings: ~1e-6 relative per pass; SecMI's squared
        # round-trip error cancels ~100x (measured 3e-5), PIA's 4th power 4x, gaps absolute
        tol = (
            dict(rtol=5e-3, atol=1e-7) if "secmi" in k or "pia" in k else dict(rtol=1e-4, atol=1e-5)
        )
        torch.testing.assert_close(part[k], signals[k][order], **tol, msg=k)
    other = compute_signals(model, shapes_batch(order), ["flow_loss"], seed=1, options=OPTIONS)
    assert not torch.allclose(other["flow_loss/mean"], part["flow_loss/mean"])


def test_bad_requests_fail_with_one_clear_error(model):
    batch = shapes_batch([0, 1])
    with pytest.raises(SignalError, match=r"flow_times \[1.5\] out of the flow's time range"):
        compute_signals(model, batch, ["flow_loss"], 0, options=SignalOptions(flow_times=(1.5,)))
    with pytest.raises(SignalError, match=r"\['loss', 'nll'\] are not for the 'flow' family"):
        compute_signals(model, batch, ["loss", "nll"], seed=0)
    with pytest.raises(SignalError, match="flow_secmi_t 0.0 out of"):
        compute_signals(model, batch, ["flow_secmi"], 0, options=SignalOptions(flow_secmi_t=0.0))
    assert not model.training


def test_training_steps_lower_the_members_flow_loss(autoencoder):
    """The overfitting check's path (benchmarks/bench_memorisation.py --check flow: 300 steps,
    then members' signals against non-members') cut to a few steps: uniform-time training
    lowers the members' flow_loss signal."""
    torch.manual_seed(0)
    m = FlowMatchingModule(  # the SD3 preset (flux-tiny's training: test_flux.py)
        autoencoder=str(autoencoder),
        resolution=RES,
        max_caption_length=77,
        timestep_sampling="uniform",
    )
    members = shapes_batch(IDS)

    def flow_loss():
        feats = compute_signals(m.eval(), members, ["flow_loss"], seed=0, options=OPTIONS)
        return feats["flow_loss/mean"].mean().item()

    before = flow_loss()
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=2e-3)
    m.train()
    for _ in range(10):
        loss = m.per_sample_loss(members).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = flow_loss()
    assert after < 0.8 * before, (before, after)  # measured 2.02 -> 0.96
