"""The shipped LiRA experiment's splits, resolved as its stages resolve them and drawn with the
real split code: what its header promises holds."""

from pathlib import Path

import pytest
import yaml
from test_configs import ParseOnlyCLI

from lightning_mia.data.shapes import ShapesSource
from lightning_mia.data.split_config import SplitConfig
from lightning_mia.data.splits import make_splits

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "experiments" / "shapes-diffusion-lira.yaml"
SPLIT_FIELDS = list(SplitConfig.__dataclass_fields__)


def _data(stage_config, args):
    """The data section of a stage as `python -m lightning_mia.experiment` runs it."""
    cli = ParseOnlyCLI(args=["fit", "--config", str(ROOT / stage_config), *args])
    return cli.config["fit"].data


@pytest.fixture(scope="module")
def stages():
    experiment = yaml.safe_load(CONFIG.read_text())
    stages = experiment["stages"]
    common, model_args = stages["data_args"], stages.get("model_args", [])
    return experiment, {
        "autoencoder": _data(stages["autoencoder"], common),
        "encoder": _data(stages["encoder"], common),
        "model": _data(stages["model"], [*common, *model_args]),
    }


def test_every_stage_draws_the_same_splits_and_the_right_pools(stages):
    experiment, data = stages
    configs = {name: {f: d[f] for f in SPLIT_FIELDS} for name, d in data.items()}
    assert configs["autoencoder"] == configs["encoder"] == configs["model"]  # one splits.json
    assert configs["model"]["num_shadows"] == experiment["num_shadows"]
    assert data["autoencoder"].train_split == data["encoder"].train_split == "public"
    assert data["model"].train_split == "members"


def test_every_target_sample_is_in_and_out_for_at_least_two_shadows(stages):
    _, data = stages
    d = data["model"]
    source = ShapesSource(**d.source.init_args)
    splits = make_splits(source, **{f: d[f] for f in SPLIT_FIELDS})
    target = splits.rows[0]
    assert len(target.nonmembers) >= 100  # TPR@1%FPR resolvable
    shadows = [set(row.members) for row in splits.rows[1:]]
    counts = [sum(i in members for members in shadows) for i in target.queries]
    assert min(counts) >= 3 and len(shadows) - max(counts) >= 3, (min(counts), max(counts))
    sizes = [len(row.members) for row in splits.rows[1:]]
    assert all(abs(size - len(target.members)) <= 2 for size in sizes)  # shadows like the target
    assert not set(splits.public_pool) & set(splits.target_pool + splits.aux_pool)
    assert all(set(row.queries) >= set(target.queries) for row in splits.rows[1:])  # reuse
