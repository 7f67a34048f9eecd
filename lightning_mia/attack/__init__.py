"""Attack stage: attack classifiers over query shards, baselines, calibration and the command.

    python attack.py --ckpt runs/demo/diffusion-target-000/checkpoints/last.ckpt

What an attack is (`AttackSpec`, the `ATTACKS` registry) lives on the ground floor, in
`lightning_mia.specs.attacks`: feature and signal modules declare their attacks there. Here:

- `data`, `module`, `training`, `baselines`: the attack data, the classifier and its fitting,
  the threshold baseline;
- `blind`: the blind baseline cross-validated on the target's rows (a benchmark diagnostic);
- `calibration`, `lira`: LiRA (offline and online) of every attack's score;
- `runner`: trains and evaluates the attacks of one setting into an `AttackReport`;
- `report`, `render`, `scores`, `repeats`, `examples`: the report's data, its files
  (report.json/.md, roc.png, scores.csv, examples.png) and the summary across repeats;
- `command`: `attack.py`: query what is missing, run the attacks, write the report.
"""
