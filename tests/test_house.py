"""The house rules that keep the package navigable: registries, imports, sizes, one declaration
per attack."""

import ast
from pathlib import Path

import pytest
import torch

from lightning_mia.attack.runner import run_attacks
from lightning_mia.features.groups import FEATURE_GROUPS, FeatureGroup, register_group
from lightning_mia.paths import ExperimentLayout
from lightning_mia.query.shards import load_query_table, write_shard
from lightning_mia.registry import DuplicateNameError, Registry, UnknownNameError
from lightning_mia.specs.attacks import (
    ATTACKS,
    AttackSpec,
    query_feature_groups,
    register_attack,
)
from lightning_mia.specs.query import QueryRecord, QuerySpec

PACKAGE = Path(__file__).resolve().parents[1] / "lightning_mia"
MAX_FILE_LINES, MAX_FUNCTION_LINES = 400, 60


def _modules() -> dict[str, Path]:
    mods = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = path
    return mods


def _import_graph() -> dict[str, set[str]]:
    """module -> package modules it imports, anywhere in the file (functions included)."""
    mods = _modules()
    graph = {m: set() for m in mods}
    for name, path in mods.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                targets = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
            else:
                continue
            graph[name] |= {t for t in targets if t in mods and t != name}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, found, counter = {}, {}, [], set(), [], [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_no_import_cycle_in_the_package():
    assert _cycles(_import_graph()) == []


GROUND = ("lightning_mia.specs", "lightning_mia.registry", "lightning_mia.errors")
BELOW_ATTACK = ("features", "graybox", "query", "models", "data", "reporting", "specs", "setlevel")


def test_contracts_live_on_the_ground_floor():
    """Nothing below the attack stage imports it, and the ground floor imports nothing but
    itself: the specs every floor shares are declared once, at the bottom."""
    graph = _import_graph()
    below = [m for m in graph if m.count(".") and m.split(".")[1] in BELOW_ATTACK]
    upward = {m: sorted(t for t in graph[m] if t.startswith("lightning_mia.attack")) for m in below}
    assert {m: t for m, t in upward.items() if t} == {}
    ground = [m for m in graph if m.startswith(GROUND)]
    assert {m: sorted(t for t in graph[m] if not t.startswith(GROUND)) for m in ground} == {
        m: [] for m in ground
    }


def test_command_lines_only_parse():
    """cli.py holds the two commands and LightningCLI's hooks, nothing else (rule: 200 lines)."""
    assert (PACKAGE / "cli.py").read_text().count("\n") <= 200


def test_cycle_finder_finds_a_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(graph) == [["a", "b", "c"]]


def test_files_and_functions_stay_small():
    too_long = []
    for path in PACKAGE.rglob("*.py"):
        text = path.read_text()
        if text.count("\n") > MAX_FILE_LINES:
            too_long.append(f"{path.name}: {text.count(chr(10))} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                body = node.body[1:] if ast.get_docstring(node) else node.body
                if body and body[-1].end_lineno - body[0].lineno + 1 > MAX_FUNCTION_LINES:
                    too_long.append(f"{path.name}:{node.name}")
    assert too_long == []


def test_only_reporting_imports_wandb():
    importers = set()
    for name, path in _modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            if any(n == "wandb" or n.startswith("wandb.") for n in names):
                importers.add(name)
    assert importers == {"lightning_mia.reporting"}


def test_registry_refuses_duplicates_and_lists_known_names():
    reg = Registry("widget")
    reg.register("a", 1)

    @reg.register("b")
    class B:
        pass

    assert reg.names() == ["a", "b"] and reg["b"] is B and "a" in reg
    with pytest.raises(DuplicateNameError, match="widget 'a' is registered twice"):
        reg.register("a", 2)
    assert reg["a"] == 1  # never silently replaced
    with pytest.raises(UnknownNameError, match=r"unknown widget 'c'; known: \['a', 'b'\]"):
        reg["c"]
    assert reg.check(["a", "z"]) == ["unknown widgets ['z']; known: ['a', 'b']"]
    assert reg.unregister("a") == 1 and reg.names() == ["b"]


@pytest.fixture
def new_attack():
    """A new black-box attack and its feature group, declared as a plugin would (one place)."""
    group = register_group(
        FeatureGroup(
            "brightness", lambda x: {"brightness/gen_mean": x.generated.mean((1, 2, 3, 4))}
        )
    )
    spec = register_attack(
        AttackSpec(
            "bright",
            ("brightness",),
            "black-box",
            "mean brightness of the generations",
            score_feature="brightness/gen_mean",
        )
    )
    yield spec, group
    ATTACKS.unregister("bright")
    FEATURE_GROUPS.unregister("brightness")


def _table(layout, index, leak):
    g = torch.Generator().manual_seed(index)
    member = torch.arange(120) % 2 == 0
    feats = {
        "brightness/gen_mean": torch.randn(120, generator=g) + leak * member.float(),
        "blind/noise": torch.randn(120, generator=g),
    }
    meta = QueryRecord(
        splits_hash="h",
        run_name=f"diffusion-x-{index:03d}",
        family="diffusion",
        spec=QuerySpec(num_images=2),
    )
    folder = layout.queries(meta.run_name)
    write_shard(folder / "shard-0.safetensors", torch.arange(120), member, index, feats, meta)
    return load_query_table(folder)


def test_an_attack_declared_once_reaches_query_report_and_calibration(tmp_path, new_attack):
    assert "brightness" in query_feature_groups()  # the query computes its group
    layout = ExperimentLayout(tmp_path)
    tables = [_table(layout, i, leak=3.0) for i in range(3)]
    report = run_attacks(
        layout, tables[0], tables[1:], ["all"], max_epochs=10, n_boot=50, progress=False
    )
    # `all` = every attack whose features exist; the shadows saw the same sample ids, so its
    # score is LiRA-calibrated too
    assert set(report.attacks) == {"bright", "lira-online-bright", "lira-offline-bright"}
    assert report.attacks["bright"].queries_per_sample == 2
    assert report.attacks["bright"].metrics["auc"].value > 0.9
