"""Why SecMI's t-error ranks members backwards on the demo's target, and where it turns round.

    python benchmarks/secmi_direction.py --experiment runs/demo [--t-sec 100 150 300]

On a finished diffusion experiment (read only: the target's checkpoint and its query table,
which names the samples and their membership; the images and captions come from the data
source splits.json records), for each t_sec (Δ = t_sec / 10, the reference's default;
`graybox.secmi`), along the deterministic DDIM inversion 0 -> t_sec - Δ of members and
non-members:

- the RMS of the model's noise prediction ε̂ at the first, middle and last inversion step (a
  properly noised latent carries noise of RMS 1; a memorised image at t = 0 leaves the model
  little noise to predict);
- the noise the inverted latent x̃ really carries, (x̃ - sqrt(ᾱ)·x0) / sqrt(1 - ᾱ), as an RMS;
- SecMI's t-error and its AUC with the paper's direction (lower = member).

Prints the MACHINE line, then `RESULT secmi_t<t_sec>_<figure>_<members|nonmembers> <value>` and
`RESULT secmi_t<t_sec>_auc_lower_member <value>`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from _machine import print_machine

from lightning_mia.data.sources import build_source
from lightning_mia.data.splits import load_splits
from lightning_mia.graybox.denoiser import LatentView
from lightning_mia.graybox.secmi import secmi_round_trip, t_error_features
from lightning_mia.metrics import roc_auc
from lightning_mia.models.registry import load_family_module
from lightning_mia.paths import ExperimentLayout
from lightning_mia.query.shards import load_query_table


def result(name: str, value: float) -> None:
    print(f"RESULT {name} {value:.4g}")


@torch.no_grad()
def inversion(view: LatentView, x0, cond, t_sec: int, steps: int = 10) -> dict:
    """ε̂ RMS at each inversion step, the noise x̃ (at t_sec - Δ) carries, and SecMI's t-error
    as the package computes it (`graybox.secmi`), per sample."""
    times = list(range(0, t_sec + 1, t_sec // steps))
    x, rms = x0, []
    for t, t_next in zip(times[:-2], times[1:-1]):
        eps, _ = view.eps_x0(x, t, cond)
        rms.append(eps.pow(2).mean((1, 2, 3)).sqrt())
        x = view.move(x, t, t_next, cond)
    x_ref, x_back = secmi_round_trip(view, x0, cond, t_sec, steps)
    abar = float(view.model.noise_scheduler.alphas_cumprod[times[-2]])
    carried = (x_ref - abar**0.5 * x0) / (1 - abar) ** 0.5
    return {
        "eps_rms": torch.stack(rms, 1),  # (S, steps - 1)
        "carried_rms": carried.pow(2).mean((1, 2, 3)).sqrt(),
        "t_error": t_error_features("secmi", x_ref, x_back)["secmi/t_error"],
        "times": times,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experiment", required=True, help="a finished diffusion experiment")
    parser.add_argument("--t-sec", type=int, nargs="+", default=[100, 150, 300])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print_machine("cpu")
    layout = ExperimentLayout(Path(args.experiment))
    model = load_family_module(layout.checkpoint("diffusion", 0)).eval()
    table = load_query_table(layout.queries("diffusion-target-000"))
    source = build_source(load_splits(layout.splits).dataset["source"])
    member = table.is_member
    scheduler = model.noise_scheduler.config
    print(f"# {scheduler.beta_schedule}, {scheduler.prediction_type}; {int(member.sum())} members")
    view = LatentView(model)
    with torch.no_grad():
        x0 = view.latents(torch.stack([source.image(int(i)) for i in table.sample_id]))
        cond = view.condition([source.caption(int(i)) for i in table.sample_id])
    abar = model.noise_scheduler.alphas_cumprod
    for t_sec in args.t_sec:
        out = inversion(view, x0, cond, t_sec)
        print(f"# t_sec {t_sec}: alpha_bar(t_sec - delta) = {float(abar[out['times'][-2]]):.4f}")
        steps = out["eps_rms"].shape[1]
        for j, label in ((0, "first"), (steps // 2, "mid"), (steps - 1, "last")):
            for side, rows in (("members", member), ("nonmembers", ~member)):
                value = float(out["eps_rms"][rows, j].mean())
                result(f"secmi_t{t_sec}_eps_rms_{label}_step_{side}", value)
        for side, rows in (("members", member), ("nonmembers", ~member)):
            carried = float(out["carried_rms"][rows].mean())
            result(f"secmi_t{t_sec}_carried_noise_rms_{side}", carried)
            result(f"secmi_t{t_sec}_t_error_{side}", float(out["t_error"][rows].mean()))
        result(f"secmi_t{t_sec}_auc_lower_member", float(roc_auc(-out["t_error"], member)))


if __name__ == "__main__":
    main()
