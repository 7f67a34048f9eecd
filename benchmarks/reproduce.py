"""Reproduce the paper's table on the embedded shapes data, and where leakage starts.

    python benchmarks/reproduce.py                      # the table: both families, 3 repeats
    python benchmarks/reproduce.py --only-report        # print the table of finished runs
    python benchmarks/reproduce.py onset                # AUC / TPR@1%FPR vs steps per image
    python benchmarks/reproduce.py onset --families diffusion --steps 20 50 100 250 500 \
        --augment none crop-flip
    python benchmarks/reproduce.py onset --families flow             # the flow family's table
    python benchmarks/reproduce.py onset --families flux --steps 20 100 500   # its FLUX preset
    python benchmarks/reproduce.py setlevel                          # the set-level audit

`table` runs `configs/experiments/shapes-diffusion.yaml` and `shapes-seq2seq.yaml` (finished
stages are skipped), each `--repeats` times on new splits (3 by default: mean ± sd across them
beside the bootstrap interval), then prints the attack x family table (AUC, TPR@1%FPR,
accuracy) of the shadow setting with the machine it ran on, and `RESULT
<family>_<attack>_auc <value>` lines (repeat 0's).

`onset` trains, for each family, one autoencoder and one attacker's encoder (on the public
pool) and then, for each number of training steps per image and each augmentation, a target and
its shadows from the same splits (32 members and 128 non-members each), queries them and runs
every attack, calibrated and not, and the set-level audit (dataset inference) of the target's
member set. It prints the AUC and TPR@1%FPR of every attack against the steps per image, the
onset of each attack (the fewest steps per image from which on every point's AUC interval lies
wholly above 0.5), the audit's p-value and smallest set size per point (and those of its
second test, on the LiRA-calibrated scores; computed from scores.csv for points run before
the attack stage wrote it), writes
`runs/onset/onset.md`, one `onset-<family>.png` per family, and `RESULT` lines.

`setlevel` runs experiments (`shapes-diffusion-realistic` by default: 1,024 members, about 20
steps per image with crop and flip) with the set-level audit, its size curve holding the sizes
`--sizes` (100, 300, 1,000), and prints per experiment the p-value with the whole member set and
at those sizes (median over 100 random subsets), the smallest set size whose median p-value
stays below 0.01, the shift guard, and the best per-sample AUC beside them (shadow setting; the
shadows are also queried on the target's samples, which doubles the queries: the LiRA rows
they give are what the audit's second test reads); also for the onset
points already run under `--root`. Writes `runs/setlevel.md`.
"""

import argparse
import json
import os
import platform
import shutil
import subprocess
import time
from pathlib import Path

import torch

from lightning_mia.attack.options import AttackSettings
from lightning_mia.attack.repeats import REPEATS_JSON, repeat_cell
from lightning_mia.attack.scores import read_scores
from lightning_mia.experiment import StageConfigs, experiment_main, fit_stage, run_experiment
from lightning_mia.paths import ExperimentLayout
from lightning_mia.setlevel import AuditOptions, calibrated_scores_test
from lightning_mia.terminal import configure_terminal

EXPERIMENTS = {"diffusion": "shapes-diffusion", "seq2seq": "shapes-seq2seq"}
COLUMNS = (("auc", "AUC"), ("tpr@1%fpr", "TPR@1%FPR"), ("accuracy", "accuracy"))
FAMILY_CONFIGS = {  # (autoencoder config, model config)
    "diffusion": ("configs/autoencoder/tiny-kl.yaml", "configs/diffusion/tiny.yaml"),
    "seq2seq": ("configs/autoencoder/tiny.yaml", "configs/seq2seq/tiny.yaml"),
    "flow": ("configs/autoencoder/tiny-kl.yaml", "configs/flow/tiny.yaml"),
    "flux": ("configs/autoencoder/tiny-kl.yaml", "configs/flow/flux-tiny.yaml"),
}
FAMILY_OF = {"flux": "flow"}  # a curve of another architecture of a family: its family
AUGMENT = {
    "none": [],
    "crop-flip": ["--model.init_args.random_crop=true", "--model.init_args.random_flip=true"],
}
ENCODER = "configs/encoder/tiny.yaml"
MEMBERS, BATCH = 32, 32  # the tiny configs' members per model and batch: 1 step = 1 per image
QUOTED_SIZES = (100, 300, 1000)  # set sizes whose p-value `setlevel` reports


def machine() -> str:
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        model = next(
            ln.split(":", 1)[1].strip() for ln in lscpu.splitlines() if ln.startswith("Model name")
        )
    except (OSError, StopIteration):
        model = platform.processor() or platform.machine()
    capability = torch.backends.cpu.get_cpu_capability()
    return f"{model}, {os.cpu_count()} CPUs, capability {capability}, {device}"


def cell(metric: dict) -> str:
    return "n/r" if not metric["resolvable"] else f"{metric['value']:.3f}"


def table(only_report: bool, repeats: int) -> None:
    seconds = {}
    for family, name in EXPERIMENTS.items():
        if not only_report:
            start = time.perf_counter()
            experiment_main([name, f"--repeats={repeats}"])
            seconds[family] = time.perf_counter() - start
    reports, spread = {}, {}
    for family, name in EXPERIMENTS.items():
        path = Path("runs") / name / "attack" / "report.json"
        if path.is_file():
            reports[family] = json.loads(path.read_text())
        if (path.parent / REPEATS_JSON).is_file():  # mean ± sd across the repeats
            spread[family] = json.loads((path.parent / REPEATS_JSON).read_text())["results"]
    print(
        f"\nshapes, shadow setting, on {machine()}; cells: repeat 0's value, or mean ± sd "
        "[mean bootstrap interval] across repeats"
    )
    header = "| attack | " + " | ".join(f"{f} {label}" for f in reports for _, label in COLUMNS)
    print(header + " |")
    print("|" + "---|" * (1 + len(reports) * len(COLUMNS)))
    names = list(
        dict.fromkeys(n for r in reports.values() for n in [*r["attacks"], *r["baselines"]])
    )
    results = []
    for attack in names:
        row = [attack]
        for family, report in reports.items():
            entry = report["attacks"].get(attack) or report["baselines"].get(attack)
            across = spread.get(family, {}).get(attack)
            for key, _ in COLUMNS:
                one = cell(entry["metrics"][key]) if entry else "-"
                row.append(repeat_cell(across["metrics"][key]) if across else one)
            if entry and entry["metrics"]["auc"]["resolvable"]:
                results.append(
                    f"RESULT {family}_{attack}_auc {entry['metrics']['auc']['value']:.4f}"
                )
        print("| " + " | ".join(row) + " |")
    print("\n".join(results))
    for family, s in seconds.items():
        print(f"RESULT {family}_experiment_seconds {s:.0f}")


def onset_point(root: Path, family: str, steps: int, augment: str, parallel: int) -> dict:
    """Train (or reuse) one point of the curve; its report.json."""
    base = ExperimentLayout(root / family / "base")
    autoencoder, model = FAMILY_CONFIGS[family]
    for folder, config in ((base.autoencoder, autoencoder), (base.encoder, ENCODER)):
        fit_stage(folder, config, [f"--data.experiment={base.root}"], isolate=False)
    base = base.root
    point = root / family / f"steps-{steps:04d}-{augment}"
    if (point / "attack" / "report.json").is_file():  # a finished point (delete it to redo)
        return with_calibrated_test(point / "attack")
    point.mkdir(parents=True, exist_ok=True)
    for shared in ("splits.json", "autoencoder", "encoder"):  # trained once per family
        if not (point / shared).exists():
            copy = shutil.copytree if (base / shared).is_dir() else shutil.copy
            copy(base / shared, point / shared)
    max_steps = steps * MEMBERS // BATCH
    run_experiment(
        experiment=str(point),
        family=FAMILY_OF.get(family, family),
        num_shadows=2,
        stages=StageConfigs(
            autoencoder="",  # the family's base autoencoder, copied above
            encoder="",  # likewise the attacker's encoder
            model=model,
            parallel=parallel,
            model_args=[
                f"--trainer.max_steps={max_steps}",
                f"--model.init_args.autoencoder={point / 'autoencoder'}",
                *AUGMENT[augment],
            ],
        ),
        attack=AttackSettings(attacks=("all",)),
        dataset_inference=True,
        audit=AuditOptions(subset_sizes=QUOTED_SIZES),
    )
    return with_calibrated_test(point / "attack")


def with_calibrated_test(folder: Path) -> dict:
    """report.json of `folder`; where its set-level audit predates the second test (on the
    LiRA-calibrated scores), that test computed from its scores.csv, as the attack stage does."""
    report = json.loads((folder / "report.json").read_text())
    audit = report.get("dataset_inference")
    if audit and "calibrated" not in audit:
        table = read_scores(folder)
        ids, member = table.sample_id.tolist(), table.is_member.tolist()
        rows = {name: (ids, v.tolist()) for name, v in table.scores.items()}
        suspect = [i for i, m in zip(ids, member) if m]
        reference = [i for i, m in zip(ids, member) if not m]
        test = calibrated_scores_test(rows, suspect, reference)
        audit["calibrated"] = None if test is None else test.to_dict()
    return report


def onset_table(points: dict, steps: list[int]) -> tuple[list[str], list[str]]:
    """(markdown lines, RESULT lines) of AUC / TPR@1%FPR per attack against steps per image."""
    lines, results = [], []
    for (family, augment), reports in points.items():
        lines += [
            "",
            f"### {family}, augmentation: {augment}",
            "",
            "| attack | " + " | ".join(f"{s} steps" for s in steps) + " | onset |",
            "|" + "---|" * (len(steps) + 2),
        ]
        names = list(
            dict.fromkeys(n for r in reports.values() for n in [*r["attacks"], *r["baselines"]])
        )
        for name in names:
            cells, onset = [], "none"
            for s in steps:
                entry = reports[s]["attacks"].get(name) or reports[s]["baselines"].get(name)
                if entry is None:
                    cells.append("-")
                    continue
                auc, tpr = entry["metrics"]["auc"], entry["metrics"]["tpr@1%fpr"]
                cells.append(f"{cell(auc)} / {cell(tpr)}")
                above = auc["low"] is not None and auc["low"] > 0.5
                onset = (f"{s}" if onset == "none" else onset) if above else "none"
                results.append(f"RESULT onset_{family}_{augment}_{name}_{s}_auc {auc['value']:.4f}")
            lines.append(f"| {name} | " + " | ".join(cells) + f" | {onset} |")
        audits = {st: audit_summary(r) for st, r in reports.items()}
        lines.append(
            "| set-level p (whole member set) / smallest set for p < 0.01 | "
            + " | ".join(audit_cell(audits[st]) for st in steps)
            + " | |"
        )
        lines.append(
            "| set-level second test (LiRA-calibrated scores) p / smallest set | "
            + " | ".join(audit_cell(audits[st], "calibrated") for st in steps)
            + " | |"
        )
        for st in steps:
            if audits[st]:
                p_value = audits[st]["p"]
                results.append(f"RESULT onset_{family}_{augment}_setlevel_{st}_p {p_value:.3g}")
            if audits[st] and audits[st]["calibrated"]:
                p_value = audits[st]["calibrated"]["p"]
                results.append(f"RESULT onset_{family}_{augment}_calibrated_{st}_p {p_value:.3g}")
    return lines, results


def audit_summary(report: dict) -> dict | None:
    """The set-level audit of a report (None without one), beside its best per-sample AUC."""
    audit = report.get("dataset_inference")
    if not audit:
        return None
    curve = audit.get("curve") or {}
    medians = dict(zip(curve.get("sizes", []), curve.get("median", [])))
    aucs = [
        (entry["metrics"]["auc"]["value"], name)
        for name, entry in report["attacks"].items()
        if entry["metrics"]["auc"]["resolvable"]
    ]
    shift = audit.get("shift") or {}
    second = audit.get("calibrated")
    return {
        "calibrated": second and {"p": second["p_value"], "smallest": second["smallest_size"]},
        "p": audit["p_value"],
        "decision": audit["decision"],
        "suspect": audit["suspect_size"],
        "reference": audit["reference_size"],
        "at": {k: medians.get(k) for k in QUOTED_SIZES},
        "smallest": curve.get("smallest_size"),
        "shift_p": (shift.get("outcome") or {}).get("p_value"),
        "raw_p": (audit.get("uncalibrated") or {}).get("p_value"),  # without difficulty calib.
        "transfer": audit.get("shadow_transfer"),  # (AUC, p) of the score on left-out shadows
        "best": max(aucs) if aucs else (float("nan"), "-"),
    }


def audit_cell(audit: dict | None, test: str = "") -> str:
    """ "p / smallest set" of the main test (or of the `test` entry: "calibrated")."""
    audit = (audit or {}).get(test) if test else audit
    if audit is None:
        return "-"
    smallest = audit["smallest"] if audit["smallest"] is not None else "none"
    return f"{audit['p']:.2g} / {smallest}"


def setlevel_table(folders: dict[str, Path]) -> tuple[list[str], list[str]]:
    """(markdown lines, RESULT lines): one row per finished experiment folder."""
    sizes = " | ".join(f"p at {k}" for k in QUOTED_SIZES)
    lines = [
        f"| experiment | suspect / reference | p (whole sets) | {sizes} | smallest set for "
        "p < 0.01 | p without difficulty calibration | score on left-out shadows: AUC (p) | "
        "shift guard p | decision | second test p / smallest set | best per-sample AUC |",
        "|" + "---|" * (10 + len(QUOTED_SIZES)),
    ]
    results = []
    for name, folder in folders.items():
        path = folder / "attack" / "report.json"
        audit = audit_summary(with_calibrated_test(path.parent)) if path.is_file() else None
        if audit is None:
            continue
        at = " | ".join("-" if v is None else f"{v:.2g}" for v in audit["at"].values())
        shift = "-" if audit["shift_p"] is None else f"{audit['shift_p']:.2g}"
        raw = "- (not calibrated)" if audit["raw_p"] is None else f"{audit['raw_p']:.2g}"
        t = audit["transfer"]
        transfer = "-" if t is None else f"{t[0]:.3f} ({t[1]:.2g})"
        auc, best = audit["best"]
        lines.append(
            f"| {name} | {audit['suspect']} / {audit['reference']} | {audit['p']:.2g} | {at} | "
            f"{audit['smallest'] or 'none'} | {raw} | {transfer} | {shift} | {audit['decision']} | "
            f"{audit_cell(audit, 'calibrated')} | {auc:.3f} ({best}) |"
        )
        results.append(f"RESULT setlevel_{name}_p {audit['p']:.3g}")
        for k, v in audit["at"].items():
            if v is not None:
                results.append(f"RESULT setlevel_{name}_p_at_{k} {v:.3g}")
        results.append(f"RESULT setlevel_{name}_smallest_size {audit['smallest'] or 0}")
    return lines, results


def setlevel(args: argparse.Namespace) -> None:
    """Run the experiments with the set-level audit; the table of them and of the onset points."""
    start = time.perf_counter()
    folders = {}
    for name in args.experiments:
        folder = Path(args.root).parent / name
        experiment_main(
            [
                name,
                f"--experiment={folder}",
                "--settings=[shadow]",
                "--dataset_inference=true",
                f"--audit.subset_sizes=[{','.join(map(str, QUOTED_SIZES))}]",
            ]
        )
        folders[name] = folder
    for point in sorted(Path(args.root).glob("*/steps-*")):
        folders[f"onset {point.parent.name} {point.name}"] = point
    lines, results = setlevel_table(folders)
    head = [
        "# Was the member set used? Set-level audits (p-values: median over 100 random subsets "
        "at each size)",
        "",
        f"{machine()}; {time.perf_counter() - start:.0f} s",
        "",
    ]
    Path(args.root).parent.mkdir(parents=True, exist_ok=True)
    (Path(args.root).parent / "setlevel.md").write_text("\n".join([*head, *lines]) + "\n")
    print("\n".join([*head, *lines, *results]))


def onset_plot(points: dict, steps: list[int], root: Path) -> list[Path]:
    """`onset-<family>.png` per family: AUC (top) and TPR at 1% FPR (bottom) against steps per
    image, one column per kind of access as roc.png groups them (`attack.roc.PANELS`), at most
    `roc.MAX_CURVES` curves a panel (the highest AUC at any point), one colour per attack, a
    line style per augmentation, the legend under its column; the paths written."""
    from types import SimpleNamespace

    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from lightning_mia.attack.roc import MAX_CURVES, PANELS

    styles = {"none": ("-", "o"), "crop-flip": ("--", "s")}
    colours = list(colormaps["tab10"].colors)
    written = []
    for family in dict.fromkeys(f for f, _ in points):
        runs = {augment: reports for (f, augment), reports in points.items() if f == family}

        def value(reports: dict, step: int, name: str, key: str) -> float:
            entry = reports[step]["attacks"].get(name) or reports[step]["baselines"].get(name)
            got = (entry or {}).get("metrics", {}).get(key, {}).get("value")
            return float("nan") if got is None else got

        rows = {}  # name -> (kind, a result-like record for the panel rules)
        for reports in runs.values():
            for report in reports.values():
                for kind in ("attacks", "baselines"):
                    for name, entry in report[kind].items():
                        rows[name] = SimpleNamespace(
                            name=name, access=entry.get("access"), statistic=entry.get("statistic")
                        )
        columns = []
        for title, rule in PANELS:
            names = [n for n, r in rows.items() if rule("attack", r)]
            best = {
                n: max(value(r, s, n, "auc") for r in runs.values() for s in steps) for n in names
            }
            names = sorted(names, key=lambda n: -(best[n] if best[n] == best[n] else 0.0))
            if names:
                kept = names[:MAX_CURVES]
                more = f", {MAX_CURVES} of {len(names)} by AUC" if len(names) > MAX_CURVES else ""
                columns.append((title + more, kept))
        aucs = [
            value(r, s, n, "auc")
            for _, ns in columns
            for n in ns
            for r in runs.values()
            for s in steps
        ]
        lowest = min([0.15] + [a - 0.03 for a in aucs if a == a])  # AUC axis from 0.15 or lower
        fig = Figure(figsize=(3.6 * len(columns), 7.6), dpi=110)
        FigureCanvasAgg(fig)
        grid = fig.add_gridspec(2, len(columns), height_ratios=(1, 1))
        for c, (title, names) in enumerate(columns):
            top, bottom = fig.add_subplot(grid[0, c]), fig.add_subplot(grid[1, c])
            for i, name in enumerate(names):
                for augment, reports in runs.items():
                    line, marker = styles.get(augment, (":", "^"))
                    for ax, key in ((top, "auc"), (bottom, "tpr@1%fpr")):
                        ax.plot(
                            steps,
                            [value(reports, s, name, key) for s in steps],
                            linestyle=line,
                            marker=marker,
                            markersize=3,
                            color=colours[i % len(colours)],
                            label=f"{name} ({augment})" if len(runs) > 1 else name,
                        )
            top.set_title(title, fontsize=9)
            top.axhline(0.5, color="0.4", linestyle=":", linewidth=1.0)
            top.set_ylim(lowest, 1.02)
            bottom.set_ylim(-0.02, 1.02)
            for ax, label in ((top, "ROC-AUC"), (bottom, "TPR at 1% FPR")):
                ax.set_xscale("log")
                ax.set_xticks(steps, [str(s) for s in steps])
                ax.minorticks_off()
                ax.grid(True, color="0.92", linewidth=0.6)
                ax.tick_params(labelsize=7)
                if c == 0:
                    ax.set_ylabel(label, fontsize=8)
            bottom.set_xlabel("training steps per image", fontsize=8)
            bottom.legend(
                fontsize=6.5, loc="upper center", bbox_to_anchor=(0.5, -0.2), frameon=False
            )
        words = {"-": "solid", "--": "dashed", ":": "dotted"}
        said = "; ".join(f"{words[styles.get(a, (':',))[0]]}: {a}" for a in runs)
        fig.suptitle(f"{family}: leakage onset (augmentation {said}; grey dotted: chance)")
        fig.tight_layout()
        path = root / f"onset-{family}.png"
        fig.savefig(path)
        written.append(path)
    return written


def onset(args: argparse.Namespace) -> None:
    root = Path(args.root)
    points: dict = {}
    start = time.perf_counter()
    for family in args.families:
        for augment in args.augment:
            points[(family, augment)] = {
                s: onset_point(root, family, s, augment, args.parallel) for s in args.steps
            }
    lines, results = onset_table(points, args.steps)
    seconds = time.perf_counter() - start
    head = [
        "# Leakage onset on shapes (AUC / TPR@1%FPR; onset = the fewest steps per image "
        "from which on every point's AUC interval lies above 0.5)",
        "",
        f"{machine()}; {seconds:.0f} s",
    ]
    (root / "onset.md").write_text("\n".join([*head, *lines]) + "\n")
    onset_plot(points, args.steps, root)
    print("\n".join([*head, *lines]))
    print("\n".join(results))
    print(f"RESULT onset_seconds {seconds:.0f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", nargs="?", default="table", choices=["table", "onset", "setlevel"])
    parser.add_argument("--only-report", action="store_true", help="table: print, run nothing")
    parser.add_argument(
        "--repeats", type=int, default=3, help="table: whole experiments on new splits; mean ± sd"
    )
    parser.add_argument(
        "--families",
        nargs="+",
        default=["diffusion", "seq2seq"],
        choices=sorted(FAMILY_CONFIGS),
        help="onset: families (flux: the flow family's FLUX preset)",
    )
    parser.add_argument(
        "--steps",
        nargs="+",
        type=int,
        default=[20, 50, 100, 250, 500],
        help="onset: training steps per image of each point",
    )
    parser.add_argument(
        "--augment", nargs="+", default=["none", "crop-flip"], choices=sorted(AUGMENT)
    )
    parser.add_argument("--parallel", type=int, default=3, help="training stages at once")
    parser.add_argument("--root", default="runs/onset")
    parser.add_argument(
        "--experiments",
        nargs="*",
        default=["shapes-diffusion-realistic"],
        help="setlevel: experiment configs run with the audit (none: only the onset points)",
    )
    parser.add_argument("--verbose", action="store_true", help="every library message")
    args = parser.parse_args()
    configure_terminal(args.verbose)  # the stages' one-line starts and ends, as the runner's
    if args.what == "onset":
        onset(args)
    elif args.what == "setlevel":
        setlevel(args)
    else:
        table(args.only_report, args.repeats)


if __name__ == "__main__":
    main()
