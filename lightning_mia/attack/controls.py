"""Controls: how much of each attack's AUC survives captions that do not describe the image.

    specs = control_specs(query)                   # fixed-caption, swapped-caption
    aucs = control_aucs(run, {"fixed-caption": table, ...}, main_spec)

A caption-conditioned attack may score the caption, not the pair: a third-party replay of CLiD
scored AUC 0.707 from the caption text alone, 0.586 with one fixed prompt for every sample and
0.729 with captions swapped between samples (DiffAudit-Research). Each control queries the
target once more with its caption mode (`specs.query.CONTROL_MODES`): every sample with the same
`fixed_caption`, or with another sample's caption (a seeded derangement). The attacks of the
main report, trained on the shadows' ordinary queries (in the shadow setting the very same fitted
models: `run_attacks(trained=...)`), score the target's control query; the report gives each
row's AUC there and how much of its lift over chance survives, (AUC_control - 0.5) / (AUC -
0.5). An attack that reads the image survives a swapped caption poorly when it needs the
caption to match; one whose AUC survives a fixed caption does not need the caption at all. Each
control's whole report is also written, to
`attack/<setting>@<mode>/`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import replace

from lightning.pytorch.utilities import rank_zero_info

from lightning_mia.attack.report import AttackReport
from lightning_mia.query.shards import QueryTable
from lightning_mia.specs.query import CONTROL_MODES, QuerySpec

CONTROL_CAPTIONS = {  # what each control queried the target with, in words
    "fixed-caption": "one fixed caption for every sample",
    "swapped-caption": "swapped captions (each sample queried with another sample's caption)",
}


def control_specs(query: QuerySpec) -> dict[str, QuerySpec]:
    """The query of each control: `query` with the control's caption mode."""
    return {mode: query.with_updates(captions=mode, captioner="") for mode in CONTROL_MODES}


def as_main_query(table: QueryTable, spec: QuerySpec) -> QueryTable:
    """A control table recorded as the main query, so the attack stage's check that target and
    shadows were queried alike compares everything but the captions (which differ by design)."""
    return replace(table, record=replace(table.record, spec=spec))


def row_aucs(report: AttackReport) -> dict[str, float | None]:
    """Every attack and baseline row's AUC."""
    return {r.name: r.metrics["auc"].value for _, r in report.results() if "auc" in r.metrics}


def control_aucs(
    run: Callable[[QueryTable], AttackReport],
    tables: Mapping[str, QueryTable],
    main: QuerySpec,
    write: Callable[[str, AttackReport], None],
) -> dict[str, dict[str, float | None]]:
    """{mode: {row: AUC}} of each control: `run` (the attack stage on a target table) on the
    control's table, its report written by `write(mode, report)`."""
    out = {}
    for mode, table in tables.items():
        rank_zero_info(
            f"[attack] {mode} control: the same attacks on the target, {CONTROL_CAPTIONS[mode]}"
        )
        report = run(as_main_query(table, main))
        report.captions, report.query = mode, table.record.spec.to_dict()
        write(mode, report)
        out[mode] = row_aucs(report)
    return out


MIN_LIFT = 0.05  # below this distance of the AUC from chance, a share of it is noise


def survival(auc: float | None, control: float | None) -> float | None:
    """The share of an attack's lift over chance its control keeps (None when undefined: no
    AUC, or one within `MIN_LIFT` of chance, where the share would divide noise by noise)."""
    if auc is None or control is None or abs(auc - 0.5) < MIN_LIFT:
        return None
    return (control - 0.5) / (auc - 0.5)


def control_rows(report: AttackReport) -> list[list[str]]:
    """[row, AUC, then AUC and survival of each control] for the report's table."""
    modes = list(report.controls)
    rows = []
    for _, r in report.results():
        auc = r.metrics["auc"].value if "auc" in r.metrics else None
        cells = [r.name, _num(auc)]
        for mode in modes:
            control = report.controls[mode].get(r.name)
            kept = survival(auc, control)
            cells += [_num(control), "" if kept is None else f"{100 * kept:.0f}%"]
        rows.append(cells)
    return rows


def control_header(report: AttackReport) -> list[str]:
    return ["row", "AUC", *(h for m in report.controls for h in (f"AUC {m}", "kept"))]


def _num(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"
