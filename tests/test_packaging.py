"""Installed, not only checked out: the wheel holds every config and the console entry points,
and an installed copy runs its commands from another folder, finding `configs/...` in itself."""

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = {
    "lightning-mia-train": "lightning_mia.cli:train_main",
    "lightning-mia-attack": "lightning_mia.cli:attack_main",
    "lightning-mia-experiment": "lightning_mia.experiment:experiment_main",
    "lightning-mia-summary": "lightning_mia.summary:summary_main",
}


def test_the_package_list_covers_the_source_tree():
    """pyproject lists its packages (configs/ ships as lightning_mia.configs): none is missing."""
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    listed = set(pyproject["tool"]["setuptools"]["packages"])
    inits = ROOT.glob("lightning_mia/**/__init__.py")
    code = {".".join(p.parent.relative_to(ROOT).parts) for p in inits}
    folders = [p.name for p in (ROOT / "configs").iterdir() if p.is_dir()]
    configs = {"lightning_mia.configs", *(f"lightning_mia.configs.{name}" for name in folders)}
    assert listed == code | configs


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    """A wheel built from a copy of the sources (the checkout stays clean)."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info")
    for name in ("lightning_mia", "configs"):
        shutil.copytree(ROOT / name, src / name, ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            str(src),
            "-w",
            str(tmp / "dist"),
        ],
        check=True,
        cwd=tmp,
    )
    (path,) = (tmp / "dist").glob("lightning_mia-*.whl")
    return path


@pytest.mark.slow
def test_the_wheel_holds_the_configs_and_the_entry_points(wheel):
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        entry_points = next(z.read(n).decode() for n in names if n.endswith("entry_points.txt"))
    configs = {
        f"lightning_mia/{p.relative_to(ROOT).as_posix()}" for p in ROOT.glob("configs/**/*.yaml")
    }
    assert len(configs) > 20 and configs <= names
    assert "lightning_mia/features/brisque_live.safetensors" in names
    for script, target in SCRIPTS.items():
        assert f"{script} = {target}" in entry_points


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory):
    """The wheel installed into its own folder (the shared environment's dependencies)."""
    site = tmp_path_factory.mktemp("site")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--no-deps",
            "-q",
            "--target",
            str(site),
            str(wheel),
        ],
        check=True,
    )
    elsewhere = tmp_path_factory.mktemp("elsewhere")  # no configs/ here
    env = {**os.environ, "PYTHONPATH": str(site), "WANDB_MODE": "disabled"}
    return site, elsewhere, env


@pytest.mark.slow
def test_an_installed_entry_point_runs_from_another_folder(installed):
    site, elsewhere, env = installed
    assert all((site / "bin" / script).is_file() for script in SCRIPTS)
    script = site / "bin" / "lightning-mia-experiment"
    out = subprocess.run(
        [str(script), "--help"], cwd=elsewhere, env=env, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "usage: lightning_mia.experiment" in out.stdout and "--num_shadows" in out.stdout


@pytest.mark.slow
def test_installed_commands_find_their_configs_from_another_folder(installed):
    site, elsewhere, env = installed
    code = (
        "import lightning_mia, sys\n"
        "from lightning_mia.experiment import config_path, experiment_parser\n"
        "path = config_path('demo')\n"
        "cfg = experiment_parser().parse_args(['--config', path])\n"
        "from lightning_mia.paths import find_config\n"
        "print(lightning_mia.__file__, path, find_config(cfg.stages.model), sep='\\n')\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=elsewhere, env=env, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr[-2000:]
    package, demo, model = out.stdout.split()
    assert Path(package).is_relative_to(site)  # the installed copy, not the checkout
    assert Path(demo) == site / "lightning_mia" / "configs" / "experiments" / "demo.yaml"
    assert Path(model) == site / "lightning_mia" / "configs" / "diffusion" / "tiny.yaml"
    train = subprocess.run(
        [
            str(site / "bin" / "lightning-mia-train"),
            "fit",
            "--config",
            "configs/encoder/tiny.yaml",
            "--print_config",
        ],
        cwd=elsewhere,
        env=env,
        capture_output=True,
        text=True,
    )
    assert train.returncode == 0, train.stderr[-2000:]
    assert "class_path: lightning_mia.models.encoder.EncoderModule" in train.stdout
