"""The ground floor: the contracts that features, gray-box signals, queries and attacks share.

- `attacks`: what an attack is (`AttackSpec`, the `ATTACKS` registry, `QueryCosts`) and what is
  derived from the registry (the paper's attacks, the query's feature groups, LiRA's scores);
- `signals`: the options of the gray-box signals (`SignalOptions`);
- `query`: what a query is (`QuerySpec`) and what its shards record (`QueryRecord`).

Nothing here imports a higher floor (`features/`, `graybox/`, `query/`, `attack/`, `models/`):
the registries find their plugin modules by name (`lightning_mia.registry`).
"""
