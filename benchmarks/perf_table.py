"""The README's performance section, regenerated from the benchmarks' saved outputs.

    python benchmarks/perf_table.py                          # print the section (saved outputs)
    python benchmarks/perf_table.py --run signals signals-avx2 --lock /tmp/cpu-heavy.lock
    python benchmarks/perf_table.py --run all --write        # run everything, rewrite README.md

`--run KEY...` runs those benchmarks (`--list` names them; `all` = every one; a key with
`{family}` in it runs once per registered family) and saves each one's output as
benchmarks/results/perf/<key>.txt, its first line the command. `--lock FILE` holds an exclusive
lock on FILE around each run (so no other cooperating CPU-heavy job runs beside it). Without
`--write` the markdown is printed; with it, README.md's text between `<!-- perf:begin -->` and
`<!-- perf:end -->` is replaced. Rules: every figure comes from a saved output, never typed by
hand; each is tagged with the machine it ran on (the output's `MACHINE` line: CPU, kernels,
threads) and the CPU other processes used while it ran; a benchmark not saved yet is left
out.
"""

from __future__ import annotations

import argparse
import fcntl
import fnmatch
import os
import re
import shlex
import subprocess
import sys
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SAVED = ROOT / "benchmarks" / "results" / "perf"
README = ROOT / "README.md"
BEGIN, END = "<!-- perf:begin -->", "<!-- perf:end -->"
FAMILY = "{family}"


@dataclass(frozen=True)
class Entry:
    """One benchmark run: saved as <key>.txt; `show` = (RESULT name or glob, label) pairs."""

    key: str
    args: tuple[str, ...]  # the script under benchmarks/ and its arguments
    what: str
    show: tuple[tuple[str, str], ...] = ()
    env: tuple[tuple[str, str], ...] = ()

    def command(self) -> str:
        """The command line, as the README shows it and the saved output's first line."""
        env = "".join(f"{k}={v} " for k, v in self.env)
        return env + shlex.join(["python", f"benchmarks/{self.args[0]}", *self.args[1:]])

    def for_family(self, family: str) -> Entry:
        args = tuple(a.replace(FAMILY, family) for a in self.args)
        return Entry(self.key.replace(FAMILY, family), args, self.what, self.show, self.env)


GENERATE = (
    ("generate_over_per_caption_pipeline", "batched / per-caption pipeline"),
    ("generate_images_per_s", "images/s"),
    ("generate_model_over_total", "model passes / generate"),
    ("generate_networks_over_total", "with the VQ decoder / generate"),
    ("generate_forward_share", "share in the model"),
)
SIGNALS = ("bench_signals.py", "--threads", "2")
FULL_PRESETS = (  # each signal alone (no <family>_all: at these sizes it would take the longest)
    ("diffusion", "ldm-256", "loss,pia,secmi,clid"),
    ("flow", "sd3-256", "flow_loss,flow_pia,flow_secmi,flow_sweep,flow_clid"),
    ("seq2seq", "dalle-mini", "nll,nll_gap"),
)
FULL_SIZE = ("--batch", "2", "--rounds", "2", "--hooked", "1", "--scan", "")
ENTRIES = (
    Entry(
        "training-{family}",
        ("bench_training.py", "--family", FAMILY, "--threads", "2"),
        "samples/s, Lightning `Trainer` vs a plain PyTorch loop, same parts",
        (("train_lightning_over_plain", "Lightning / plain"), ("train_samples_per_s", "samples/s")),
    ),
    Entry(
        "generation-{family}",
        ("bench_generation.py", "--family", FAMILY, "--threads", "2"),
        "16 captions x 4 images: batched `generate` vs the library pipeline per caption, and vs "
        "the query network's own passes",
        GENERATE,
    ),
    Entry(
        "query-{family}",
        ("bench_query.py", "--family", FAMILY),
        "share of query time spent on attack features",
        (("features_share_of_query_time", "features share"),),
    ),
    Entry(
        "features",
        ("bench_features.py", "--threads", "2"),
        "feature extraction throughput per group, 32 and 256 px",
        (("features_*_qps", "queries/s"),),
    ),
    Entry(
        "data-metrics",
        ("bench_data_metrics.py",),
        "the shapes data's rendering and the report's bootstrap intervals",
        (
            ("shapes_render_ms", "ms per image rendered"),
            ("shapes_cached_ms", "ms per image cached"),
            ("bootstrap_auc_s", "s per AUC interval (10,000 samples, 1,000 resamples)"),
        ),
    ),
    Entry("signals", SIGNALS, "gray-box signals at the model's speed"),
    Entry(
        "signals-avx2", SIGNALS, "the same on AVX2 kernels", env=(("ATEN_CPU_CAPABILITY", "avx2"),)
    ),
    *(  # the networks at their real sizes (and so in their real proportions), on a CPU
        Entry(
            f"full-signals-{preset}",
            (*SIGNALS, "--family", family, "--preset", preset, "--signals", names, *FULL_SIZE),
            f"gray-box signals, {family} at {preset}",
        )
        for family, preset, names in FULL_PRESETS
    ),
)


@dataclass
class Output:
    """A saved output: its command, MACHINE line, others' CPU use, RESULT values, signal
    families (from bench_signals' `# <family> <preset> <res>px, batch` headers)."""

    command: str
    machine: str
    load: str
    results: dict[str, float]
    families: dict[str, str]
    presets: dict[str, str]  # signal -> the preset it ran at
    where: dict[str, str]  # signal -> its "where the time goes" split


def parse(text: str) -> Output:
    lines = text.splitlines()
    command = lines[0].removeprefix("$ ") if lines and lines[0].startswith("$ ") else ""
    machine = next((ln[len("MACHINE ") :] for ln in lines if ln.startswith("MACHINE ")), "")
    others = [m.group(1) for ln in lines if (m := re.match(r"# other processes: (\d+%)", ln))]
    results, families, presets, where = {}, {}, {}, {}
    family = preset = signal = ""
    for ln in lines:
        if m := re.match(r"# (\S+) (\S+) \d+px, batch", ln):
            family, preset = m.groups()
        if m := re.match(r"# (\S+): \d+ passes/sample", ln):
            signal = m.group(1)
        if m := re.match(r"#   where the time goes \(hooked run\): (.*)$", ln):
            where[signal] = m.group(1)
        if m := re.match(r"RESULT (\S+) (\S+)$", ln):
            results[m.group(1)] = float(m.group(2))
            name = m.group(1).removesuffix("_queries_per_sample")
            if name != m.group(1) and family:
                families[name], presets[name] = family, preset
    load = f"others {others[-1]} of a core" if others else "others not recorded"
    return Output(command, machine, load, results, families, presets, where)


def fmt(value: float) -> str:
    return f"{value:.3f}" if abs(value) < 10 else f"{value:,.1f}"


def shown(out: Output, show: tuple[tuple[str, str], ...]) -> str:
    """`label value` for each shown RESULT (a glob over several: its min-max range)."""
    parts = []
    for pattern, label in show:
        values = [v for k, v in out.results.items() if fnmatch.fnmatchcase(k, pattern)]
        if len(values) == 1:
            parts.append(f"{label} **{fmt(values[0])}**")
        elif values:
            parts.append(f"{label} {fmt(min(values))}-{fmt(max(values))}")
    return "; ".join(parts) or "(no figures)"


def saved(pattern: str) -> list[tuple[str, Output]]:
    """(key, output) of the saved outputs whose key matches `pattern` ({family} = any)."""
    glob = pattern.replace(FAMILY, "*")
    return [(p.stem, parse(p.read_text())) for p in sorted(SAVED.glob(glob + ".txt"))]


def machine_tags(outputs: list[Output]) -> dict[str, str]:
    """A short tag (M1, M2, ...) per distinct MACHINE line, in order of appearance."""
    tags: dict[str, str] = {}
    for out in outputs:
        tags.setdefault(out.machine, f"M{len(tags) + 1}")
    return tags


def main_table(tags: dict[str, str]) -> list[str]:
    """Rows of every non-signal entry with a saved output."""
    rows = ["| benchmark | command | result | machine, load |", "|---|---|---|---|"]
    for entry in ENTRIES:
        if entry.key.startswith(("signals", "full-signals")):
            continue
        for key, out in saved(entry.key):
            rows.append(
                f"| {key} | `{out.command or entry.command()}` | {entry.what}: "
                f"{shown(out, entry.show)} | {tags[out.machine]}, {out.load} |"
            )
    return rows


def signal_table(runs: list[tuple[str, Output]], tags: dict[str, str]) -> list[str]:
    """One row per (family, signal); per saved signals run: samples/s, model / signal, share."""
    head = "| family | signal | passes / sample |"
    rule = "|---|---|---|"
    for key, out in runs:
        head += (
            f" {key} ({tags[out.machine]}): samples/s, model / signal, the same with the "
            "encodings reused, networks / signal, share in the model |"
        )
        rule += "---|"
    rows = [head, rule]
    signals = dict.fromkeys(s for _, out in runs for s in out.families)
    for signal in signals:
        first = next(out for _, out in runs if signal in out.families)
        passes = first.results.get(f"{signal}_queries_per_sample", float("nan"))
        row = f"| {first.families[signal]} | `{signal}` | {passes:g} |"
        for _, out in runs:
            r = out.results
            if f"{signal}_samples_per_s" not in r:
                row += " - |"
                continue
            ratio, share = r[f"{signal}_model_over_signal"], r.get(f"{signal}_forward_share", 0)
            networks = r.get(f"{signal}_networks_over_signal")
            every = "-" if networks is None else f"**{networks:.2f}**"
            again = reused_cell(r, signal)
            row += f" {fmt(r[f'{signal}_samples_per_s'])}, **{ratio:.2f}**, {again}, {every}, "
            row += f"{share:.2f} |"
        rows.append(row)
    return rows


def shares(where: str) -> str:
    """'unet 1695.59 ms (64%), vae 861.48 ms (33%)' -> 'unet 64%, vae 33%'."""
    return re.sub(r" [\d.]+ ms \((\d+%)\)", r" \1", where)


def reused_cell(results: dict[str, float], signal: str) -> str:
    """The 'encodings reused' ratio, and CLiD's with its word importances kept too."""
    value = results.get(f"{signal}_model_over_reused")
    shared = results.get(f"{signal}_model_over_shared_text")
    cell = "-" if value is None else f"**{value:.2f}**"
    return cell if shared is None else f"{cell}; text shared **{shared:.2f}**"


def full_size_table(runs: list[tuple[str, Output]], tags: dict[str, str]) -> list[str]:
    """One row per signal of each full-size run: its figures and where its time goes."""
    rows = [
        "| family, preset | signal | passes / sample | samples/s | model / signal | the same, "
        "encodings reused | networks / signal | where the time goes (hooked run) "
        "| machine, load |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for _, out in runs:
        for signal, family in out.families.items():
            r, where = out.results, shares(out.where.get(signal, "-"))
            rows.append(
                f"| {family}, {out.presets[signal]} | `{signal}` | "
                f"{r[f'{signal}_queries_per_sample']:g} | {fmt(r[f'{signal}_samples_per_s'])} | "
                f"**{r[f'{signal}_model_over_signal']:.2f}** | {reused_cell(r, signal)} | "
                f"**{r[f'{signal}_networks_over_signal']:.2f}** | {where} | "
                f"{tags[out.machine]}, {out.load} |"
            )
    return rows


SIGNALS_CAPTION = (
    "Gray-box signals at the model's speed (`bench_signals.py`, tiny presets, batch 32): "
    "model / signal = the signal's declared passes of the query network (UNet, BART), "
    "replayed at the same batch, over the signal's measured time (goal >= 0.85); "
    "encodings reused = the same for every model after the first that queries the same images "
    "through the same autoencoder, which encoded them once (`graybox/encodings.py`; an attack "
    "queries the target's samples on the target, on each shadow for LiRA and under each "
    "caption control); text shared (CLiD) = its word importances kept as well, as for every "
    "model after the first that conditions alike (LoRA fine-tunes of one pipeline); "
    "networks / signal = model / signal with the passes the first model "
    "made through its other networks (text encoders, autoencoder) replayed at that batch as "
    "well, so that only the attack's own code is overhead (above 1 where a signal batches a "
    "network wider than 32 rows: CLiD's word variants); share in the model = the part of a "
    "hooked run spent inside the query network."
)
FULL_SIZE_CAPTION = (
    "The same with the networks at their real sizes, in their real proportions (the diffusion "
    "family at ldm-256, the flow family's SD3 architecture at 256 px, seq2seq at DALL-E mini's "
    "BART-large and VQGAN f16): random weights (a trained model costs the same), batch 2, 2 "
    "alternated rounds, one hooked run."
)


def section() -> str:
    """The markdown between the markers."""
    everything = [out for e in ENTRIES for _, out in saved(e.key)]
    tags = machine_tags(everything)
    lines = [
        "<!-- generated by benchmarks/perf_table.py from benchmarks/results/perf/*.txt -->",
        "Machines (each output's `MACHINE` line). Load: the CPU other processes used while a "
        "benchmark ran, in % of one core (0% = it ran alone):",
        "",
        *[f"- {tag}: {machine}" for machine, tag in tags.items()],
        "",
        *main_table(tags),
    ]
    for prefix, caption, table in (
        ("signals", SIGNALS_CAPTION, signal_table),
        ("full-signals", FULL_SIZE_CAPTION, full_size_table),
    ):
        runs = [(k, o) for e in ENTRIES if e.key.startswith(prefix) for k, o in saved(e.key)]
        if runs:
            commands = "; ".join(f"{k}: `{o.command}`" for k, o in runs)
            loads = "; ".join(f"{k} {o.load}" for k, o in runs)
            lines += ["", f"{caption} Runs: {commands}; load: {loads}.", "", *table(runs, tags)]
    return "\n".join(lines) + "\n"


def expanded(keys: list[str]) -> list[Entry]:
    """The entries to run for `keys` ("all" = every one; "generation" = generation-{family} of
    every registered family, "generation-seq2seq" that one). SystemExit naming unknown keys."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from _families import family_names

    out, known = [], {"all"}
    for entry in ENTRIES:
        prefix = entry.key.removesuffix("-" + FAMILY) if FAMILY in entry.key else entry.key
        concrete = [entry.for_family(f) for f in family_names()] if FAMILY in entry.key else [entry]
        known |= {prefix, entry.key, *(e.key for e in concrete)}
        every = "all" in keys or prefix in keys or entry.key in keys
        out += [e for e in concrete if every or e.key in keys]
    unknown = [k for k in keys if k not in known]
    if unknown:
        raise SystemExit(f"perf_table: unknown benchmark {', '.join(unknown)} (see --list)")
    return out


def run_entry(entry: Entry, lock: str) -> None:
    """Run one benchmark (holding `lock`, if given) and save its output as <key>.txt."""
    env = {**os.environ, **dict(entry.env)}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("WANDB_MODE", "disabled")
    cmd = [sys.executable, str(ROOT / "benchmarks" / entry.args[0]), *entry.args[1:]]
    print(f"perf_table: {entry.key}: {entry.command()}", file=sys.stderr, flush=True)
    with open(lock, "a") if lock else nullcontext() as held:
        if held:
            fcntl.flock(held, fcntl.LOCK_EX)
        done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{entry.key} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    SAVED.mkdir(parents=True, exist_ok=True)
    (SAVED / f"{entry.key}.txt").write_text(f"$ {entry.command()}\n{done.stdout}")


def write_readme(text: str) -> None:
    """Replace README.md's text between the markers by `text`."""
    readme = README.read_text()
    if (
        readme.count(BEGIN) != 1
        or readme.count(END) != 1
        or readme.index(BEGIN) > readme.index(END)
    ):
        raise SystemExit(f"README.md needs one {BEGIN} before one {END}")
    head, rest = readme.split(BEGIN)
    README.write_text(f"{head}{BEGIN}\n{text}{END}{rest.split(END, 1)[1]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", nargs="+", default=[], metavar="KEY", help="keys, or all")
    parser.add_argument("--lock", default="", help="hold an exclusive lock on FILE per run")
    parser.add_argument("--write", action="store_true", help="rewrite README.md's section")
    parser.add_argument("--list", action="store_true", help="the benchmarks and their commands")
    args = parser.parse_args()
    if args.list:
        for entry in ENTRIES:
            print(f"{entry.key:22s} {entry.command()}")
        return
    for entry in expanded(args.run) if args.run else []:
        run_entry(entry, args.lock)
    text = section()
    if args.write:
        write_readme(text)
    else:
        print(text, end="")


if __name__ == "__main__":
    main()
