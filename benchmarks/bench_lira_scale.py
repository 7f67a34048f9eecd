"""LiRA on a stated scale: TPR@1%FPR and AUC of LiRA on raw vs declared-scale scores, mean vs
median centre, on synthetic log-normal losses (default) or on finished experiments.

    python benchmarks/bench_lira_scale.py [--shadows 16] [--samples 2000] [--repeats 5]
    python benchmarks/bench_lira_scale.py --experiment runs/demo [DIR ...] [--attacks all]

Synthetic (Carlini et al.'s online setting: every shadow trains on an independent half of the
target's pool): per-sample difficulty d ~ N(0, `--difficulty`²) on the log scale, a shadow's or
the target's loss exp(d - `--shift`·member + `--noise`·ε): positive and right-skewed, like a
denoising loss, SecMI's t-error or PIA's distance. LiRA (`attack.calibration.calibrate`) fits its
per-sample Gaussians to the raw losses (before: what the package did) or to their log (after:
`AttackSpec.score_scale = "log"`), centred at the mean (before) or the median (after, as
Carlini's script), one global variance per side (16 < 64 shadows). Offline and online, each over
`--repeats` seeds. Prints a table, then `RESULT <name> <value>` lines (means over the repeats):
`lira_{offline,online}_{auc,tpr1}_{before,after}` and the two halves of the change
(`..._{log_mean,raw_median}`).

`--experiment DIR`: a finished experiment's shadow setting, read only (splits.json, queries/, and
attack/<attack>/shadow.ckpt for an attack without a declared scalar, whose logit is calibrated).
Every `lira-offline-<attack>` row is rebuilt as the attack stage builds it
(`attack.lira.lira_results` on the tables `attack.command.run_queries` picks) twice: before (raw
scores, mean centre) and after (each score on its declared scale, median centre). Prints
attack × (AUC, TPR@1%FPR) before/after, beside the figures of DIR/attack/report.json where there
is one (after should equal them), then `RESULT lira_<attack>_{auc,tpr1}_{before,after}` (with
`@<experiment folder name>` appended when several DIRs are given).

Both modes print the `MACHINE` line first; TPR@FPR is read strictly below the budget
(`metrics.tpr_at_fpr`).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch
from _machine import print_machine

from lightning_mia.attack.calibration import CENTRE, calibrate, to_scale
from lightning_mia.attack.command import holds_target_samples
from lightning_mia.attack.lira import Models, lira_results
from lightning_mia.attack.module import AttackModule
from lightning_mia.attack.plan import validate
from lightning_mia.attack.report import read_report
from lightning_mia.data.splits import load_splits
from lightning_mia.errors import UserError
from lightning_mia.metrics import roc_auc, tpr_at_fpr
from lightning_mia.models.base import FAMILIES
from lightning_mia.paths import ExperimentLayout, run_name
from lightning_mia.query.shards import QueryTable, load_query_table
from lightning_mia.specs.attacks import ATTACKS, AttackError

VARIANTS = {  # name -> (scale, centre)
    "before": ("identity", "mean"),
    "raw_median": ("identity", "median"),
    "log_mean": ("log", "mean"),
    "after": ("log", "median"),
}
# an experiment's rows: name -> (scale, centre); None = each attack's declared scale
EXPERIMENT_VARIANTS = {"before": ("identity", "mean"), "after": (None, CENTRE)}
SETTING = "shadow"  # the setting with LiRA rows; the learned attacks' checkpoints are named so
BUDGET = 0.01  # TPR@1%FPR
N_BOOT = 10  # bootstrap resamples of each rebuilt row: its intervals are not used here


def world(args: argparse.Namespace, seed: int) -> tuple[torch.Tensor, ...]:
    """(shadow losses (M, S), shadow membership (M, S), target losses (S,), membership (S,))."""
    g = torch.Generator().manual_seed(seed)
    m, s = args.shadows, args.samples
    difficulty = args.difficulty * torch.randn(s, generator=g)  # (S,)
    is_in = torch.rand(m, s, generator=g) < 0.5  # (M, S)
    noise = args.noise * torch.randn(m, s, generator=g)
    shadow = torch.exp(difficulty - args.shift * is_in.float() + noise)
    member = torch.randperm(s, generator=g) < s // 2  # (S,), exactly half
    target = torch.exp(
        difficulty - args.shift * member.float() + args.noise * torch.randn(s, generator=g)
    )
    return shadow, is_in, target, member


def figures(args: argparse.Namespace, seed: int) -> dict[str, float]:
    """{"<mode>_<metric>_<variant>": value} for one world."""
    shadow, is_in, target, member = world(args, seed)
    observed = torch.ones_like(is_in)
    out = {}
    for variant, (scale, centre) in VARIANTS.items():
        x, scores = -to_scale(target, scale), -to_scale(shadow, scale)  # lower loss = member
        for mode, online in (("offline", False), ("online", True)):
            lira, _ = calibrate(x, scores, is_in, observed, online, True, 4, centre)
            out[f"{mode}_auc_{variant}"] = float(roc_auc(lira, member))
            out[f"{mode}_tpr1_{variant}"] = float(tpr_at_fpr(lira, member, 0.01))
    return out


def target_family(layout: ExperimentLayout, family: str | None) -> str:
    """`family`, else the one family with a query of its target (row 0) in the experiment."""
    if family:
        return family
    found = [f for f in FAMILIES if layout.queries(run_name(f, 0)).is_dir()]
    if len(found) != 1:
        raise AttackError(f"{layout.root}: target queries of {found or 'no family'}; give --family")
    return found[0]


def experiment_tables(
    layout: ExperimentLayout, family: str
) -> tuple[QueryTable, list[QueryTable], list[QueryTable]]:
    """(target, shadows, calibration) query tables, as the attack stage picks them: each
    finished shadow's own query, and its query on the target's samples (its own where its row
    holds them all, `attack.command.holds_target_samples`, else `queries/<shadow>/row-000/`)."""
    splits = load_splits(layout.splits)
    target = load_query_table(layout.queries(run_name(family, 0)))
    shadows, calibration = [], []
    for run in layout.finished_runs(family, "shadow"):
        own = load_query_table(layout.queries(run.name))
        shadows.append(own)
        covered = holds_target_samples(splits, own.model_index)
        calibration.append(own if covered else load_query_table(layout.queries(run.name, row=0)))
    return target, shadows, calibration


def learned_models(layout: ExperimentLayout, names: list[str]) -> Models:
    """The fitted classifiers of the attacks without a declared scalar (LiRA calibrates their
    logit), read from `attack/<attack>/shadow.ckpt` where the attack stage saved them."""
    models = {}
    for name in names:
        path = layout.attack / name / f"{SETTING}.ckpt"
        if not ATTACKS[name].score_feature and path.is_file():
            model = AttackModule.load_from_checkpoint(path, weights_only=True).eval()
            models[name] = (model, list(model.hparams.feature_names))
    return models


def reported(layout: ExperimentLayout) -> dict[str, tuple[float | None, float | None]]:
    """{attack: (AUC, TPR@1%FPR)} of the lira-offline rows of attack/report.json ({} if none)."""
    if not (layout.attack / "report.json").is_file():
        return {}
    report = read_report(layout.attack)
    return {
        row.removeprefix("lira-offline-"): tuple(r.metrics[k].value for k in ("auc", "tpr@1%fpr"))
        for row, r in report.attacks.items()
        if row.startswith("lira-offline-")
    }


def experiment_figures(
    layout: ExperimentLayout, family: str, attacks: list[str], seed: int
) -> dict[str, dict]:
    """{attack: {"scale": its declared scale, "<auc|tpr1>_<before|after>": value}} of every
    lira-offline-<attack> row of the shadow setting, rebuilt before and after."""
    target, shadows, calibration = experiment_tables(layout, family)
    _, names, _ = validate(  # known_fraction: of the partial setting, unused here
        target, shadows, attacks, SETTING, known_fraction=0.5, seed=seed, calibration=calibration
    )
    models, costs = learned_models(layout, names), target.costs()
    out: dict[str, dict] = {}
    for variant, (scale, centre) in EXPERIMENT_VARIANTS.items():
        rows, _ = lira_results(
            names, target, shadows, calibration, models, costs, seed, N_BOOT, scale, centre
        )
        for row, result in rows.items():
            if not row.startswith("lira-offline-"):
                continue
            figures = out.setdefault(row.removeprefix("lira-offline-"), {})
            figures[f"auc_{variant}"] = float(roc_auc(result.scores, result.labels))
            figures[f"tpr1_{variant}"] = float(tpr_at_fpr(result.scores, result.labels, BUDGET))
            if scale is None:
                figures["scale"] = result.details["scale"]
    return out


def print_experiment(path: str, args: argparse.Namespace, suffix: str) -> None:
    """The table and RESULT lines of one experiment folder."""
    layout = ExperimentLayout(path)
    family = target_family(layout, args.family)
    figures = experiment_figures(layout, family, args.attacks, args.seed)
    report, labels = reported(layout), load_query_table(layout.queries(run_name(family, 0)))
    members = int(labels.is_member.sum())
    print(
        f"# {layout.root} ({family}): {len(layout.finished_runs(family, 'shadow'))} shadows, "
        f"{members} members, {len(labels) - members} non-members; offline LiRA, shadow setting"
    )
    print(
        f"{'attack':10s} {'scale after':26s} {'AUC before':>10s} {'after':>7s} "
        f"{'TPR1 before':>11s} {'after':>7s}   {'report.json AUC, TPR1':>21s}"
    )
    for attack, f in figures.items():
        said = ", ".join("-" if v is None else f"{v:.4f}" for v in report.get(attack, ()))
        print(
            f"{attack:10s} {f['scale']:26s} {f['auc_before']:10.4f} {f['auc_after']:7.4f} "
            f"{f['tpr1_before']:11.4f} {f['tpr1_after']:7.4f}   {said or '-':>21s}"
        )
    for attack, f in figures.items():
        for metric in ("auc", "tpr1"):
            for variant in EXPERIMENT_VARIANTS:
                value = f[f"{metric}_{variant}"]
                print(f"RESULT lira_{attack}_{metric}_{variant}{suffix} {value:.4f}")


def print_synthetic(args: argparse.Namespace) -> None:
    """The synthetic world's table and RESULT lines (means over the repeats)."""
    print(
        f"{args.shadows} shadows, {args.samples} target samples, log-loss = d - {args.shift}"
        f"·member + {args.noise}·ε, d ~ N(0, {args.difficulty}²); {args.repeats} seeds"
    )
    runs = [figures(args, seed) for seed in range(args.repeats)]
    keys = list(runs[0])
    print(f"{'figure':28s} {'mean':>7s} {'sd':>7s}")
    for key in keys:
        values = [r[key] for r in runs]
        print(f"{key:28s} {statistics.mean(values):7.4f} {statistics.pstdev(values):7.4f}")
    for key in keys:
        print(f"RESULT lira_{key} {statistics.mean(r[key] for r in runs):.4f}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shadows", type=int, default=16)
    parser.add_argument("--samples", type=int, default=2000, help="target samples (half members)")
    parser.add_argument("--repeats", type=int, default=5, help="seeds")
    parser.add_argument("--difficulty", type=float, default=1.0, help="std of log-difficulty")
    parser.add_argument("--shift", type=float, default=0.3, help="membership shift of log-loss")
    parser.add_argument("--noise", type=float, default=0.5, help="std of log-loss noise")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--experiment", nargs="+", metavar="DIR", help="finished experiments")
    parser.add_argument("--family", default=None, help="experiment mode: the target's family")
    parser.add_argument("--attacks", nargs="+", default=["all"], help="experiment mode")
    parser.add_argument("--seed", type=int, default=0, help="experiment mode: the attack seed")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print_machine()
    if not args.experiment:
        print_synthetic(args)
        return 0
    failed = []
    for path in args.experiment:
        suffix = f"@{Path(path).resolve().name}" if len(args.experiment) > 1 else ""
        try:
            print_experiment(path, args, suffix)
        except UserError as err:  # e.g. no calibration queries (a run without LiRA)
            print(f"# {path}: skipped, {err}")
            failed.append(path)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
