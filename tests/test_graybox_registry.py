"""Gray-box signals without a trained model: the maths of each piece, the registry, its checks."""

import pytest
import torch
from diffusers import DDPMScheduler

from lightning_mia.graybox import (
    SIGNALS,
    SignalError,
    SignalOptions,
    check_signals,
    signal_queries,
    signals_for,
)
from lightning_mia.graybox.denoiser import fixed_noise, noise_seeds
from lightning_mia.graybox.seq2seq import low_k_mean
from lightning_mia.models.diffusion import split_prediction, training_target
from lightning_mia.specs.attacks import ATTACKS, QueryCosts


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction", "sample"])
def test_split_prediction_inverts_the_training_target(kind):
    sched = DDPMScheduler(beta_schedule="squaredcos_cap_v2", prediction_type=kind)
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(3, 4, 2, 2, generator=g), torch.randn(3, 4, 2, 2, generator=g)
    t = torch.tensor([10, 500, 980])
    abar = sched.alphas_cumprod[t].reshape(3, 1, 1, 1)
    x_t = sched.add_noise(x0, eps, t)
    target = training_target(sched, x0, eps, t)
    eps_hat, x0_hat = split_prediction(target, x_t, abar, kind)
    # float32 round trip through sqrt(abar) as small as 0.02: errors of ~1e-5 relative
    torch.testing.assert_close(eps_hat, eps, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(x0_hat, x0, atol=1e-4, rtol=1e-4)


def test_v_target_is_diffusers_velocity():
    sched = DDPMScheduler(beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction")
    g = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(2, 4, 3, 3, generator=g), torch.randn(2, 4, 3, 3, generator=g)
    t = torch.tensor([10, 700])
    abar = sched.alphas_cumprod[t].reshape(2, 1, 1, 1)
    manual = abar.sqrt() * eps - (1 - abar).sqrt() * x0  # v = sqrt(abar) eps - sqrt(1-abar) x0
    torch.testing.assert_close(training_target(sched, x0, eps, t), manual)


def test_split_prediction_rejects_unknown_type():
    x = torch.zeros(1, 1, 1, 1)
    with pytest.raises(ValueError, match="prediction_type 'flow'"):
        split_prediction(x, x, x + 0.5, "flow")


def test_fixed_noise_depends_on_sample_seed_and_timestep_only():
    seeds = noise_seeds(3, torch.tensor([5, 9]))
    assert seeds == noise_seeds(3, torch.tensor([5, 9]))
    assert noise_seeds(4, torch.tensor([5]))[0] != seeds[0]
    a = fixed_noise(seeds, 100, (2, 3, 3), "cpu")  # (2, 2, 3, 3)
    alone = fixed_noise(seeds[1:], 100, (2, 3, 3), "cpu")
    torch.testing.assert_close(a[1:], alone, rtol=0, atol=0)  # batch-independent
    assert not torch.equal(a, fixed_noise(seeds, 200, (2, 3, 3), "cpu"))
    assert not torch.equal(a[0], a[1])


def test_low_k_mean_is_mean_of_least_likely_tokens():
    nll = torch.tensor([[0.1, 5.0, 0.2, 3.0, 0.3], [1.0, 1.0, 1.0, 1.0, 1.0]])
    torch.testing.assert_close(low_k_mean(nll, 40), torch.tensor([4.0, 1.0]))  # 2 of 5
    torch.testing.assert_close(low_k_mean(nll, 1), torch.tensor([5.0, 1.0]))  # at least one
    torch.testing.assert_close(low_k_mean(nll, 100), nll.mean(1))


def test_registry_families_and_query_counts():
    assert sorted(signals_for("diffusion")) == ["clid", "loss", "pia", "secmi"]
    assert signals_for("seq2seq") == ["nll", "nll_gap"]
    opts = SignalOptions(timesteps=(50, 100, 200), secmi_t=100, secmi_steps=5)
    counts = signal_queries(SIGNALS.names(), opts)
    # secmi: 4 steps up to t - Δ, one up, one down; pia: (1 + 3) guided passes (2 each);
    # clid: 3 default timesteps x (caption, null, 3 reduced captions); the flow signals the same
    # with their default times (3 for loss and PIA, 9 for the sweep, 3 for CLiD)
    assert counts == {"loss": 3, "secmi": 6, "pia": 8, "clid": 15, "nll": 1, "nll_gap": 2} | {
        "flow_loss": 3,
        "flow_sweep": 9,
        "flow_secmi": 6,
        "flow_pia": 8,
        "flow_clid": 15,
    }
    unguided = SignalOptions(timesteps=(50,), pia_guidance=1.0, clid_cut_rates=(0.5,))
    assert signal_queries(["pia", "clid"], unguided) == {"pia": 2, "clid": 9}
    costs = QueryCosts(num_images=4, signal_queries=counts)
    for name, spec in SIGNALS.items():  # each signal declared its attack, which agrees
        attack = ATTACKS[name]
        assert attack.groups == (spec.group,) and attack.access == "gray-box"
        assert attack.queries(costs) == counts[name]
        assert attack.score_feature == spec.score_feature
        assert spec.score_feature.startswith(f"{name}/")


def test_check_signals_names_family_and_each_problem():
    with pytest.raises(SignalError, match=r"signals \['nll'\] are not for the 'diffusion'"):
        check_signals("diffusion", ["loss", "nll"], SignalOptions(), 1000)
    with pytest.raises(SignalError, match=r"unknown signals \['lossy'\]"):
        check_signals("seq2seq", ["lossy"], SignalOptions())
    with pytest.raises(SignalError, match="no signal"):
        check_signals("seq2seq", [], SignalOptions())
    bad = SignalOptions(
        timesteps=(10, 1000, -1),
        secmi_t=100,
        secmi_steps=7,
        pia_p=0.0,
        pia_guidance=0.0,
        clid_timesteps=(),
        clid_cut_rates=(0.3, 1.0, 0.301),
    )
    with pytest.raises(SignalError) as err:
        check_signals("diffusion", ["loss", "secmi", "pia", "clid"], bad, 1000)
    msg = str(err.value)
    assert "timesteps [1000, -1]" in msg and "0 <= t < num_train_timesteps = 1000" in msg
    assert "secmi_t 100 must be a positive multiple of secmi_steps 7" in msg
    assert "pia_p must be > 0" in msg and "pia_guidance must be > 0" in msg
    assert "clid_timesteps is empty" in msg and "clid_cut_rates [1.0] must each be in (0, 1)" in msg
    assert "clid_cut_rates [0.3, 1.0, 0.301] must differ in percent" in msg
    with pytest.raises(SignalError, match="secmi_t 1000 out of the scheduler's range"):
        check_signals("diffusion", ["secmi"], SignalOptions(secmi_t=1000), 1000)
    with pytest.raises(SignalError, match=r"clid_timesteps \[1000\] out of the scheduler's"):
        check_signals("diffusion", ["clid"], SignalOptions(clid_timesteps=(450, 1000)), 1000)
    with pytest.raises(SignalError, match="low_k_percent must be in"):
        check_signals("seq2seq", ["nll"], SignalOptions(low_k_percent=0))
    check_signals("diffusion", ["loss", "secmi", "pia", "clid"], SignalOptions(), 1000)
