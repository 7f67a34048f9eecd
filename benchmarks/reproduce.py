"""Reproduce the paper's table on the embedded shapes data, both families, on this machine.

    python benchmarks/reproduce.py                      # runs (or reuses) both experiments
    python benchmarks/reproduce.py --only-report        # print the table of finished runs

Runs `configs/experiments/shapes-diffusion.yaml` and `shapes-seq2seq.yaml` (resumable: finished
stages are skipped), then prints the attack x family table (AUC, TPR@1%FPR, accuracy) of the
shadow setting with the machine it ran on, and `RESULT <family>_<attack>_auc <value>` lines.
"""

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

from lightning_mia.experiment import experiment_main

EXPERIMENTS = {"diffusion": "shapes-diffusion", "seq2seq": "shapes-seq2seq"}
COLUMNS = (("auc", "AUC"), ("tpr@1%fpr", "TPR@1%FPR"), ("accuracy", "accuracy"))


def machine() -> str:
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, {device}"


def cell(metric: dict) -> str:
    return "n/r" if not metric["resolvable"] else f"{metric['value']:.3f}"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only-report", action="store_true")
    args = parser.parse_args()
    seconds = {}
    for family, name in EXPERIMENTS.items():
        if not args.only_report:
            start = time.perf_counter()
            experiment_main([name])
            seconds[family] = time.perf_counter() - start
    reports = {}
    for family, name in EXPERIMENTS.items():
        path = Path("runs") / name / "attack" / "report.json"
        if path.is_file():
            reports[family] = json.loads(path.read_text())
    print(f"\nshapes, shadow setting, on {machine()}")
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
            row += [cell(entry["metrics"][key]) if entry else "-" for key, _ in COLUMNS]
            if entry and entry["metrics"]["auc"]["resolvable"]:
                results.append(
                    f"RESULT {family}_{attack}_auc {entry['metrics']['auc']['value']:.4f}"
                )
        print("| " + " | ".join(row) + " |")
    print("\n".join(results))
    for family, s in seconds.items():
        print(f"RESULT {family}_experiment_seconds {s:.0f}")


if __name__ == "__main__":
    main()
