"""The slow tier's tiny experiments: built once per test session (conftest.py's session
fixtures) through the real command lines, then copied by the tests that change them.

- diffusion (`diffusion_experiment`): `python -m lightning_mia.experiment` on a config written
  here: KL autoencoder, attacker's encoder, target and 2 shadows (4 steps each), the queries of
  target, shadows and the shadows' calibration rows (1 image, 2 DDIM steps, the loss signal) and
  the attack stage (pixel, loss, LiRA); on one thread, so the queries are bitwise comparable
  with the one-thread runs of test_kill_resume.py.
- seq2seq (`seq2seq_experiment`): `train.py fit` for the VQ autoencoder, encoder, target and
  one shadow (4 steps each); no query.
- captioner (`captioner_experiment`): a copy of the diffusion experiment with the attacker's
  captioner trained into it (48 steps at batch 32: it learns the shapes grammar).

Every split is the same (DATA): 450 shapes, a 15-sample target pool (8 members, 7 non-members:
odd, so two DDP ranks get unequal shares), shadows of the same size from a 160-sample
auxiliary pool, a 256-sample public pool (the captioner's held-out tenth is ~25 samples).
"""

from __future__ import annotations

import contextlib
import shutil
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
import yaml

from lightning_mia.paths import ExperimentLayout

ROOT = Path(__file__).resolve().parents[1]
NUM_SAMPLES, RESOLUTION = 450, 32  # the tiny configs' ShapesSource(resolution=32, seed=0)
TARGET_SIZE = 15  # queries of the target and of each shadow
STEPS = 4  # every training stage
CAPTIONER_STEPS = 48  # 6 epochs of the 256-sample public pool at batch 32
DATA = [
    f"--data.source.init_args.num_samples={NUM_SAMPLES}",
    f"--data.target_size={TARGET_SIZE}",
    "--data.member_fraction=0.5",
    "--data.aux_size=160",
    f"--data.shadow_size={TARGET_SIZE}",
    "--data.public_size=256",
    "--data.batch_size=8",
]
TRAINER = [
    "--trainer.accelerator=cpu",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
    "--trainer.logger=false",
]
DIFFUSION_ARGS = ["--model.init_args.num_inference_steps=2"]
ATTACKS = ["pixel", "loss"]  # one black-box and one gray-box attack (its signal), + LiRA
# attack classifiers train at most this many epochs: 24 shadow rows tell nothing more after
# 200 (the default) than after 5, and every attack stage of the slow tier trains a dozen
ATTACK_EPOCHS = 5
CONFIGS = {  # family -> (autoencoder, model) stage configs
    "diffusion": ("configs/autoencoder/tiny-kl.yaml", "configs/diffusion/tiny.yaml"),
    "seq2seq": ("configs/autoencoder/tiny.yaml", "configs/seq2seq/tiny.yaml"),
}
ENCODER = str(ROOT / "configs/encoder/tiny.yaml")
CAPTIONER = str(ROOT / "configs/captioner/tiny.yaml")


@contextlib.contextmanager
def torch_threads(n: int):
    """Run the block with n intra-op threads (tiny models on a shared 2-core machine thrash
    with two, and one thread makes float results comparable across processes)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def experiment_config(folder: Path, family: str = "diffusion", steps: int = STEPS, **top) -> dict:
    """The config `python -m lightning_mia.experiment` runs: the shared data, `steps` for every
    stage, one image per query, pixel + loss; `top` replaces top-level keys."""
    autoencoder, model = CONFIGS[family]
    config = {
        "experiment": str(folder),
        "family": family,
        "num_shadows": 2,
        "stages": {
            "autoencoder": str(ROOT / autoencoder),
            "encoder": ENCODER,
            "model": str(ROOT / model),
            "data_args": DATA,
            "trainer_args": [*TRAINER, f"--trainer.max_steps={steps}"],
            "model_args": DIFFUSION_ARGS if family == "diffusion" else [],
        },
        "query": {"num_images": 1, "signals": ["loss"]},
        "attack": {"attacks": ATTACKS, "max_epochs": ATTACK_EPOCHS},
    }
    return {**config, **top}


def write_config(path: Path, config: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config))
    return path


@dataclass(frozen=True)
class TinyExperiment:
    """An experiment folder, the config that made it and what its commands returned."""

    root: Path
    config: Path  # the experiment config (its `experiment` is root)
    outcomes: tuple = ()  # experiment_main's attack outcomes
    metrics: dict = field(default_factory=dict)  # the captioner's last callback metrics

    @property
    def layout(self) -> ExperimentLayout:
        return ExperimentLayout(self.root)


def build_diffusion(tmp: Path) -> TinyExperiment:
    """The diffusion experiment through the experiment command (every stage, then the attack)."""
    from lightning_mia.experiment import experiment_main

    config = write_config(tmp / "experiment.yaml", experiment_config(tmp / "exp"))
    with torch_threads(1):
        outcomes = experiment_main([str(config)])
    return TinyExperiment(tmp / "exp", config, tuple(outcomes))


def fit_args(exp: Path, config: str, *extra: str) -> list[str]:
    """`train.py fit` arguments of one stage of a tiny experiment in `exp`."""
    common = [f"--data.experiment={exp}", *DATA, *TRAINER, f"--trainer.max_steps={STEPS}"]
    return ["fit", "--config", str(ROOT / config), *common, *extra]


def build_seq2seq(tmp: Path) -> TinyExperiment:
    """The seq2seq experiment through `train.py fit`: VQ autoencoder, encoder, target and one
    shadow (nothing queried)."""
    from lightning_mia.cli import train_main

    exp = tmp / "exp"
    autoencoder, model = CONFIGS["seq2seq"]
    config = experiment_config(exp, "seq2seq", num_shadows=1)
    with torch_threads(1):
        for stage in (autoencoder, ENCODER):
            train_main(fit_args(exp, stage, "--data.num_shadows=1"))
        for index in (0, 1):
            train_main(fit_args(exp, model, "--data.num_shadows=1", f"--data.model_index={index}"))
    return TinyExperiment(exp, write_config(tmp / "experiment.yaml", config))


def captioner_args(exp: Path) -> list[str]:
    """The captioner stage's `train.py fit` arguments (batch 32: 8 steps an epoch)."""
    return [
        *fit_args(exp, CAPTIONER, "--data.batch_size=32"),
        f"--trainer.max_steps={CAPTIONER_STEPS}",
        "--model.init_args.warmup_steps=8",
    ]


def build_captioner(base: TinyExperiment, tmp: Path) -> TinyExperiment:
    """A copy of `base` with the attacker's captioner trained into it."""
    from lightning_mia.cli import train_main

    exp = copy_experiment(base, tmp)
    with torch_threads(1):
        cli = train_main(captioner_args(exp.root))
    metrics = {k: float(v) for k, v in cli.trainer.callback_metrics.items()}
    return replace(exp, metrics=metrics)


def copy_experiment(
    exp: TinyExperiment, tmp: Path, keep: tuple[str, ...] | None = None
) -> TinyExperiment:
    """`exp` copied to `tmp/exp` (only the top-level entries in `keep`, if given) with its config
    rewritten for the copy: what a test changes is its own."""
    dest = tmp / "exp"
    if keep is None:
        shutil.copytree(exp.root, dest)
    else:
        dest.mkdir(parents=True)
        for name in keep:
            src = exp.root / name
            (shutil.copytree if src.is_dir() else shutil.copy)(src, dest / name)
    config = yaml.safe_load(exp.config.read_text())
    path = write_config(tmp / "experiment.yaml", {**config, "experiment": str(dest)})
    return TinyExperiment(dest, path, exp.outcomes, exp.metrics)
