"""Gray-box signals at the model's speed: every signal of every family against the model's own
forward passes.

    python benchmarks/bench_signals.py                       # every family, tiny, CPU
    python benchmarks/bench_signals.py --family diffusion --threads 2 [--profile 12]
    python benchmarks/bench_signals.py --family diffusion --preset ldm-256 --device cuda --batch 16
    python benchmarks/bench_signals.py --family diffusion --preset ldm-256 --batch 2 --rounds 2 \
        --hooked 1 --scan '' --signals loss,pia          # full-size networks on a CPU

For each registered family with gray-box signals (`lightning_mia.models.base.FAMILIES`,
`lightning_mia.graybox.signals_for`), a random-init model of the preset (a trained one costs
the same; `_families.build_model`) and one batch of shapes images. Per signal (default
options), in rounds that alternate the two so that other load on the machine hits both alike:
- the signal: `compute_signals(model, batch, [signal])`, seconds per sample;
- the model: its declared passes per sample (`queries_per_sample`, q) forward passes of the
  query network (`_forward.query_network`: the UNet, BART) at the same batch, each a replay of
  the signal's own first call at that batch: the time the signal would take if it were nothing
  but its model passes.
`RESULT <signal>_model_over_signal` = model / signal, the median over rounds of each round's
ratio (the two ran back to back; the `#` line also gives the ratio of the best rounds and by
CPU time; 1 = no overhead, goal >= 0.85). `<signal>_samples_per_s` and
`<signal>_seconds_per_sample` are the best round's (other load only adds time);
`RESULT <signal>_networks_over_signal` is the same ratio with every network of the model in the
reference: besides the q query-network passes, the passes the signal made through the model's
other networks (text encoder, autoencoder: CLiD's word importance encodes each caption once per
word), each module's rows counted in the hooked run and replayed at the same batch
(`_forward.batched_replays`); what it leaves out is the attack's own code (Python loops, the
tokenizer, elementwise maths). `RESULT <signal>_model_over_reused` is model / signal when the
batch's image encodings are already kept (`graybox/encodings.py`): the cost of each model after
the first that queries the same images with the same autoencoder (an attack queries the
target's samples on the target, on each shadow for LiRA and on each caption control);
`RESULT <signal>_model_over_shared_text` (CLiD) the same with the word importances kept too,
as for every model after the first that conditions alike (LoRA fine-tunes of one pipeline);
every other figure is the first model's, each signal run starting with nothing kept.
`<signal>_queries_per_sample` the declared passes;
`<signal>_forward_share` the share of the
signal's time spent inside the query network in a run with hooks (`_forward.ForwardClock`),
whose `#` line splits the rest between the other components (text encoder, autoencoder) and
`other` (Python loops, per-sample generators, the tokenizer, elementwise maths, mode
switches). The counted passes are checked against the declared ones. `--scan 1,2,4,8`
(default) times one forward at k x batch rows: what stacking k calls of a signal into one would
gain (`RESULT <family>_forward_ms_per_sample_at_<rows>`).
`<family>_all` is every signal of the family in one `compute_signals` call, as the query stage
asks for them (the latents or codes and the caption's conditioning computed once); its model
passes are those counted (signals may share one: nll_gap reuses nll's), not the declared sum.
`--signals a,b` times only those (and no `<family>_all`); `--hooked 1` makes one hooked run per
signal instead of the less disturbed of two (for full-size presets on a CPU, where the tiny
presets' proportions between the networks are not the real models'). `--profile N` adds the N
functions with the most own time (cProfile) per signal.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from _families import build_model, family_names, family_presets, make_batch
from _forward import (
    alternate,
    batched_replays,
    breakdown,
    clocked,
    query_network,
    reference_call,
    replay,
)
from _machine import print_machine

from lightning_mia.graybox import (
    SIGNALS,
    SignalOptions,
    compute_signals,
    full_precision,
    signals_for,
)
from lightning_mia.graybox.encodings import CAPTION_MEMO, MEMO


def float32(run: Callable[[], Any], device: torch.device) -> Callable[[], Any]:
    """`run` in float32 as `compute_signals` runs the signals: autocast off, no TF32 on CUDA."""

    def in_float32() -> Any:
        with full_precision(device):
            return run()

    return in_float32


def kept_only(run: Callable[[], Any], images: bool = False) -> Callable[[], Any]:
    """`run` with nothing kept from before (as the first model to query its batch) or, with
    `images`, only the batch's image encodings (as a later model with its own text encoder)."""

    def emptied() -> Any:
        if not images:
            MEMO.clear()
        CAPTION_MEMO.clear()
        return run()

    return emptied


def shares_text(run: Callable[[], Any]) -> bool:
    """Whether `run`, made again, takes something from the caption memo (CLiD's importances):
    what every model after the first that conditions alike (LoRA fine-tunes) would do."""
    run()
    hits = CAPTION_MEMO.hits
    run()
    return CAPTION_MEMO.hits > hits


def profile_lines(fn: Callable[[], Any], top: int) -> str:
    """The `top` functions with the most own time during fn(), as pstats prints them."""
    profiler = cProfile.Profile()
    profiler.runcall(fn)
    out = io.StringIO()
    pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(top)
    lines = [ln for ln in out.getvalue().splitlines() if ln.strip()]
    start = next(i for i, ln in enumerate(lines) if ln.lstrip().startswith("ncalls"))
    return "\n".join(f"#   {ln}" for ln in lines[start:])


def bench_family(family: str, args: argparse.Namespace) -> None:
    """Every signal of `family`: rounds, breakdown, RESULT lines."""
    with tempfile.TemporaryDirectory() as tmp:
        model, res = build_model(family, args.preset, Path(tmp))
    model = model.to(args.device).eval()
    batch, b = make_batch(args.batch, res, args.device), args.batch
    network, options = query_network(model), SignalOptions()
    print(f"# {family} {args.preset} {res}px, batch {b}, query network `{network}`")
    names = [n for n in signals_for(family) if not args.signals or n in args.signals]
    # each alone, then all in one call (as a query asks: the latents or codes and the caption's
    # conditioning computed once)
    groups = [(n, [n]) for n in names] + ([] if args.signals else [(f"{family}_all", names)])
    # `fresh`: nothing kept, as for the first model to query a batch; `signals`: everything an
    # earlier run kept (image encodings, CLiD's word importances; graybox/encodings.py)
    signals = {
        name: (lambda group=group: compute_signals(model, batch, group, seed=0, options=options))
        for name, group in groups
    }
    fresh = {name: kept_only(run) for name, run in signals.items()}
    passes = {name: SIGNALS[name].queries_per_sample(options) for name in names}
    clocks = {}
    for name, run in fresh.items():
        run()  # warm-up: first calls build kernels for their shapes
        hooked = [clocked(model, network, run) for _ in range(args.hooked)]
        clocks[name] = min(hooked, key=lambda clock_s: clock_s[1])  # the less disturbed one
    # together, signals may share passes (nll_gap reuses nll's): the model needs those counted
    if f"{family}_all" in clocks:
        passes[f"{family}_all"] = round(clocks[f"{family}_all"][0].queries(b))
    calls = [c for clock, _ in clocks.values() for c in clock.calls]
    reference = reference_call(calls, b)
    forward = float32(replay(reference, rows=b), model.device)
    with torch.no_grad():
        forward()  # warm-up
    for name, run in signals.items():
        q = passes[name]
        model_run = lambda q=q: [forward() for _ in range(q)]  # noqa: E731
        others, skipped = batched_replays(clocks[name][0].other_calls, b)
        others = [float32(o, model.device) for o in others]
        networks_run = lambda q=q, o=others: [forward() for _ in range(q)] + [f() for f in o]  # noqa: E731
        reused = kept_only(run, images=True)
        runs = {"model": model_run, "networks": networks_run, "signal": fresh[name]}
        runs |= {"reused": reused} | ({"shared": run} if shares_text(run) else {})
        times = alternate(runs, args.rounds, args.device)
        report_signal(name, q, times, clocks[name], b, args.rounds, skipped)
        if args.profile:
            print(profile_lines(fresh[name], args.profile))
    if args.scan:
        batch_scan(family, reference, b, args)


def batch_scan(family: str, reference: Any, b: int, args: argparse.Namespace) -> None:
    """Per-sample time of one query-network forward at k x batch rows, for each k of --scan:
    what stacking a signal's k calls of one batch into one call would gain."""
    device = next(reference.module.parameters()).device
    runs = {k: float32(replay(reference, rows=k * b), device) for k in args.scan}
    for run in runs.values():
        run()  # warm-up
    times = alternate(runs, args.rounds, args.device)
    base = times[args.scan[0]].best / (args.scan[0] * b)
    parts = []
    for k, t in times.items():
        per_sample = t.best / (k * b)
        parts.append(f"{k * b} rows {1e3 * per_sample:.3f} ms ({base / per_sample:.2f}x)")
        print(f"RESULT {family}_forward_ms_per_sample_at_{k * b} {1e3 * per_sample:.4f}")
    print(f"# {family} forward per sample by batch (best of {args.rounds}): " + ", ".join(parts))


def report_signal(
    name: str, q: int, times: dict, clocked_run: tuple, b: int, rounds: int, skipped: list[str]
) -> None:
    """The `#` lines and RESULT lines of one signal."""
    model, networks, signal = times["model"], times["networks"], times["signal"]
    reused = times["reused"]
    ratio = model.over(signal)
    clock, hooked_s = clocked_run
    counted = clock.queries(b)
    network_s = clock.seconds.get(clock.network, 0.0)
    print(
        f"# {name}: {q} passes/sample (counted {counted:g}), {signal.best / b * 1e3:.2f} "
        f"ms/sample vs model {model.best / b * 1e3:.2f} ms/sample (best of {rounds}): ratio "
        f"{ratio:.3f} (median of the rounds' ratios; of the best rounds "
        f"{model.best / signal.best:.3f}, by CPU time {model.over(signal, cpu=True):.3f})"
    )
    print(f"#   where the time goes (hooked run): {breakdown(clock.seconds, hooked_s, b)}")
    others = sorted(set(clock.seconds) - {clock.network})
    print(
        f"#   every network's passes ({clock.network} and {', '.join(others) or 'nothing else'}"
        f" at batch {b}): {networks.best / b * 1e3:.2f} ms/sample, ratio "
        f"{networks.over(signal):.3f} (by CPU time {networks.over(signal, cpu=True):.3f})"
        + (f"; not replayable, left out: {', '.join(skipped)}" if skipped else "")
    )
    print(
        f"#   its images' encodings reused (every model after the first on a batch): "
        f"{reused.best / b * 1e3:.2f} ms/sample, ratio {model.over(reused):.3f}"
    )
    if "shared" in times:
        shared = times["shared"]
        print(
            f"#   and its word importances reused too (every model after the first with the "
            f"same text encoders: LoRA fine-tunes of one pipeline): {shared.best / b * 1e3:.2f} "
            f"ms/sample, ratio {model.over(shared):.3f}"
        )
    if abs(counted - q) > 1e-6:
        print(f"#   WARNING: {name} declares {q} passes per sample, the clock counted {counted:g}")
    print(f"RESULT {name}_queries_per_sample {q}")
    print(f"RESULT {name}_seconds_per_sample {signal.best / b:.6f}")
    print(f"RESULT {name}_samples_per_s {b / signal.best:.2f}")
    print(f"RESULT {name}_model_over_signal {ratio:.3f}")
    print(f"RESULT {name}_networks_over_signal {networks.over(signal):.3f}")
    print(f"RESULT {name}_model_over_reused {model.over(reused):.3f}")
    if "shared" in times:
        print(f"RESULT {name}_model_over_shared_text {model.over(times['shared']):.3f}")
    print(f"RESULT {name}_forward_share {network_s / hooked_s:.3f}")


def main() -> None:
    families = [f for f in family_names() if signals_for(f)]
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", choices=[*families, "all"], default="all")
    parser.add_argument("--preset", default="tiny", help="tiny | ldm-256 | dalle-mini | ...")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=7, help="alternated rounds")
    parser.add_argument(
        "--scan",
        type=lambda text: [int(k) for k in text.split(",") if k],
        default=[1, 2, 4, 8],
        help="forward time per sample at k x batch rows, for each k (comma-separated; '' = off)",
    )
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument(
        "--signals",
        type=lambda text: [s for s in text.split(",") if s],
        default=[],
        help="only these signals (comma-separated), without <family>_all; default: every one",
    )
    parser.add_argument("--hooked", type=int, default=2, help="hooked runs (the less disturbed)")
    parser.add_argument("--profile", type=int, default=0, help="top N functions per signal")
    args = parser.parse_args()
    chosen = families if args.family == "all" else [args.family]
    if args.family == "all" and args.preset != "tiny":  # only the families that have it
        chosen = [f for f in chosen if args.preset in family_presets(f)]
    if not chosen:
        parser.error(f"no family has a benchmark set-up for preset {args.preset!r}")
    unknown = sorted(set(args.signals) - {s for f in chosen for s in signals_for(f)})
    if unknown:
        parser.error(f"--signals: no chosen family has {', '.join(unknown)}")
    torch.set_num_threads(args.threads)
    print_machine(args.device)
    for family in chosen:
        bench_family(family, args)


if __name__ == "__main__":
    main()
