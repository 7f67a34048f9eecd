"""Every YAML under configs/ parses against the code, so a stale config fails CI."""

from pathlib import Path

import pytest
from jsonargparse import ArgumentParser

from lightning_mia.attack.options import attack_parser
from lightning_mia.cli import MIACLI
from lightning_mia.experiment import run_experiment

ROOT = Path(__file__).resolve().parents[1]
STAGE_CONFIGS = sorted(
    p
    for p in (ROOT / "configs").rglob("*.yaml")
    if not {"experiments", "attack", "sweeps"} & set(p.parts)  # sweeps: test_cli_docs.py
)
ATTACK_CONFIGS = sorted((ROOT / "configs" / "attack").glob("*.yaml"))
EXPERIMENT_CONFIGS = sorted((ROOT / "configs" / "experiments").glob("*.yaml"))


class ParseOnlyCLI(MIACLI):
    """Parse and validate a config against the signatures; build and run nothing. The parser
    is built once per process and reused (building it is half of a parse, and the docs and
    config tests parse about a hundred command lines); jsonargparse parsers parse any number
    of times."""

    _built: dict = {}

    def setup_parser(self, add_subcommands, main_kwargs, subparser_kwargs) -> None:
        key = (add_subcommands, repr(main_kwargs), repr(subparser_kwargs))
        kept = ("parser", "_subcommand_method_arguments", "_subcommand_parsers")
        if key not in self._built:
            super().setup_parser(add_subcommands, main_kwargs, subparser_kwargs)
            self._built[key] = {name: getattr(self, name, None) for name in kept}
        for name, value in self._built[key].items():
            setattr(self, name, value)

    def before_instantiate_classes(self) -> None:
        pass

    def instantiate_classes(self) -> None:
        pass

    def _run_subcommand(self, subcommand: str) -> None:
        pass


def test_there_are_configs():
    assert len(STAGE_CONFIGS) >= 1


@pytest.mark.parametrize("path", STAGE_CONFIGS, ids=lambda p: str(p.relative_to(ROOT)))
def test_stage_config_parses(path):
    subcommand = "predict" if "query" in path.parts else "fit"
    cli = ParseOnlyCLI(args=[subcommand, "--config", str(path)])
    cfg = cli.config[subcommand]
    assert cfg.model.class_path.startswith("lightning_mia.")


def test_stale_config_fails(tmp_path):
    bad = tmp_path / "bad.yaml"
    good = (ROOT / "configs" / "encoder" / "tiny.yaml").read_text()
    bad.write_text(good.replace("init_args:", "init_args:\n    no_such_argument: 1", 1))
    with pytest.raises(SystemExit):
        ParseOnlyCLI(args=["fit", "--config", str(bad)])


@pytest.mark.parametrize("path", EXPERIMENT_CONFIGS, ids=lambda p: p.stem)
def test_experiment_config_parses(path):
    parser = ArgumentParser()
    parser.add_function_arguments(run_experiment)
    cfg = parser.parse_path(str(path))
    for key in ("autoencoder", "encoder", "captioner", "model"):
        value = cfg.stages[key]
        if value:
            assert (ROOT / value).is_file(), f"{path.name}: {key} config {value} missing"


@pytest.mark.parametrize("path", ATTACK_CONFIGS, ids=lambda p: p.stem)
def test_attack_config_parses(path):
    cfg = attack_parser().parse_args(["--config", str(path), "--ckpt", "x.ckpt"])
    assert cfg.attack.setting in ("shadow", "partial")


@pytest.mark.parametrize("device", ["cuda", "cpu"])
def test_the_gpu_checks_experiment_config_parses(device, tmp_path):
    """benchmarks/gpu_check.sh writes its own experiment config (a heredoc): with the values of
    each mode, it parses as the experiment command reads it (it once went stale unseen)."""
    script = (ROOT / "benchmarks" / "gpu_check.sh").read_text()
    body = script.split('cat > "$WORK/tiny.yaml" << EOF\n', 1)[1].split("\nEOF\n", 1)[0]
    cuda = device == "cuda"
    values = {
        "WORK": str(tmp_path),
        "SHADOWS": "2" if cuda else "1",
        "ACCEL": "gpu" if cuda else "cpu",
        "STEPS": "300" if cuda else "2",
        "INFERENCE_STEPS": "10" if cuda else "2",
        "IMAGES": "4" if cuda else "1",
        "ATTACKS": "[all]" if cuda else "[pixel]",
    }
    for name in sorted(values, key=len, reverse=True):
        assert f"${name}" in script, name  # the script still sets it
        body = body.replace(f"${name}", values[name])
    assert "$" not in body, body
    (tmp_path / "tiny.yaml").write_text(body)
    test_experiment_config_parses(tmp_path / "tiny.yaml")
