"""Attack stage: attack classifiers over query shards, baselines, calibration and the command.

    python attack.py --ckpt runs/demo/diffusion-target-000/checkpoints/last.ckpt

- `spec`: what an attack is (`AttackSpec`, `register_attack`, `ATTACKS`, `QueryCosts`);
- `catalog`: every registered attack (black-box ones from `lightning_mia.features`, gray-box
  ones from `lightning_mia.graybox`) and what is derived from them;
- `data`, `module`, `training`, `baselines`: the attack data, the classifier and its fitting,
  the threshold baseline;
- `blind`: the blind baseline cross-validated on the target's rows (a benchmark diagnostic);
- `calibration`, `lira`: LiRA (offline and online) of every attack's score;
- `runner`: trains and evaluates the attacks of one setting into an `AttackReport`;
- `report`, `render`, `scores`, `repeats`: the report's data, its files (report.json/.md,
  roc.png, scores.csv) and the summary across repeats;
- `command`: `attack.py`: query what is missing, run the attacks, write the report.

This package's `__init__` imports only `spec` (feature and signal modules register their
attacks there without pulling in the rest of the attack stage).
"""

from lightning_mia.attack.spec import (
    ATTACKS,
    AttackError,
    AttackSpec,
    QueryCosts,
    register_attack,
)

__all__ = ["ATTACKS", "AttackError", "AttackSpec", "QueryCosts", "register_attack"]
