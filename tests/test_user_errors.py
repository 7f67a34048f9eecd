"""Every user error through the real command lines: one line on stderr naming the file or value
and what is wrong, a non-zero exit, no traceback, and nothing half-written.

Each case runs `train.py`, `attack.py` or the experiment command in this process and checks the
four properties; the cases cover data of every format, split settings, configs, checkpoints,
splits mismatches, attack options and the query stage. The cases on a trained experiment (a
copy of the session's, tests/tiny_experiment.py) are slow.
"""

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_experiment import DATA, TARGET_SIZE, copy_experiment

from lightning_mia.cli import attack_main, train_main
from lightning_mia.experiment import experiment_main
from lightning_mia.paths import last_checkpoint

ROOT = Path(__file__).resolve().parents[1]
ENCODER = str(ROOT / "configs/encoder/tiny.yaml")
AUTOENCODER = str(ROOT / "configs/autoencoder/tiny-kl.yaml")
DIFFUSION = str(ROOT / "configs/diffusion/tiny.yaml")
SMALL = [
    "--data.source.num_samples=200",
    "--data.target_size=16",
    "--data.aux_size=100",
    "--data.shadow_size=16",
    "--data.public_size=80",
    "--data.member_fraction=0.5",
    "--data.num_shadows=1",
    "--data.batch_size=8",
    "--trainer.max_steps=2",
    "--trainer.enable_progress_bar=false",
    "--trainer.logger=false",
]
SHARED = [  # the session experiment's data (tests/tiny_experiment.py), 2 steps
    *DATA,
    "--data.num_shadows=2",
    "--trainer.max_steps=2",
    "--trainer.enable_progress_bar=false",
    "--trainer.logger=false",
]
FOLDER = [
    "--data.target_size=4",
    "--data.aux_size=2",
    "--data.shadow_size=2",
    "--data.public_size=2",
]


def png(k, size=(8, 8)):
    buf = io.BytesIO()
    pixels = np.random.default_rng(k).integers(0, 255, (*size, 3), np.uint8)
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def image_folder(root, rows=None, images=None, fmt="jsonl"):
    """An imagefolder dataset of 8 PNGs (`images` replaces some by name)."""
    root.mkdir(parents=True)
    rows = rows or [{"file_name": f"{k}.png", "text": f"a picture {k}"} for k in range(8)]
    for k in range(8):
        (root / f"{k}.png").write_bytes((images or {}).get(f"{k}.png", png(k)))
    if fmt == "jsonl":
        (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        lines = ["file_name,caption"] + [f"{r['file_name']},{r['text']}" for r in rows]
        (root / "metadata.csv").write_text("\n".join(lines) + "\n")
    return root


def folder_args(root, fmt_args=()):
    return [
        "--data.source=lightning_mia.data.imagefolder.ImageFolderSource",
        f"--data.source.root={root}",
        "--data.source.resolution=32",
        *fmt_args,
        *FOLDER,
    ]


def shards_args(tmp_path, cut):
    folder = tmp_path / "shards"
    folder.mkdir()
    with tarfile.open(folder / "00000.tar", "w") as tar:
        for k in range(8):
            for ext, data in ((".png", png(k)), (".txt", f"a picture {k}".encode())):
                info = tarfile.TarInfo(f"{k:05d}{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    raw = (folder / "00000.tar").read_bytes()
    (folder / "00000.tar").write_bytes(raw[: len(raw) // 2] if cut else raw)
    source = "lightning_mia.data.webdataset.WebDatasetSource"
    return [
        f"--data.source={source}",
        f"--data.source.shards={folder}",
        "--data.source.resolution=32",
        *FOLDER,
    ]


def coco_args(tmp_path):
    (tmp_path / "img").mkdir()
    (tmp_path / "captions.json").write_text('{"images": [{"id": 1, "file_name": "a.jpg"}')
    return [
        "--data.source=lightning_mia.data.coco.CocoSource",
        f"--data.source.annotations={tmp_path / 'captions.json'}",
        f"--data.source.images={tmp_path / 'img'}",
        "--data.source.resolution=32",
        *FOLDER,
    ]


def run(main, args, capsys):
    """(exit code, the error line) of a command that must fail."""
    with pytest.raises(SystemExit) as info:
        main(args)
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert "Traceback" not in err, err
    assert lines and lines[-1].startswith("error: "), err
    return info.value.code, lines[-1]


def snapshot(folder):
    """{relative path: (size, mtime)} of every file under `folder` (to show nothing was
    written: a rewritten or replaced file gets a new mtime)."""
    if not Path(folder).exists():
        return {}
    files = (p for p in Path(folder).rglob("*") if p.is_file())
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in files}


# --- data, split settings and configs: train.py fit ------------------------------------------
DATA_CASES = {
    "folder missing": (lambda t: folder_args(t / "nope"), "nope"),
    "jsonl malformed": (
        lambda t: folder_args(_with(image_folder(t / "d"), "metadata.jsonl", "{not json\n")),
        "metadata.jsonl",
    ),
    "csv without its column": (
        lambda t: folder_args(image_folder(t / "d", fmt="csv"), ["--data.source.caption_column=x"]),
        "x",
    ),
    "empty caption": (
        lambda t: folder_args(
            image_folder(
                t / "d",
                rows=[
                    {"file_name": f"{k}.png", "text": "  " if k == 3 else f"a {k}"}
                    for k in range(8)
                ],
            )
        ),
        "caption",
    ),
    "text named .png": (
        lambda t: folder_args(image_folder(t / "d", images={"3.png": b"not an image\n"})),
        "3.png",
    ),
    "png cut short": (
        lambda t: folder_args(image_folder(t / "d", images={"3.png": png(3)[:40]})),
        "3.png",
    ),
    "tar shard cut short": (lambda t: shards_args(t, cut=True), "00000.tar"),
    "coco json malformed": (coco_args, "captions.json"),
    "split sizes the data cannot hold": (lambda t: ["--data.target_size=100000"], "target_size"),
    "member fraction out of range": (lambda t: ["--data.member_fraction=1.5"], "member_fraction"),
    "unknown config key": (lambda t: ["--model.init_args.no_such=1"], "no_such"),
    "value of the wrong type": (lambda t: ["--data.batch_size=many"], "batch_size"),
    "unknown preset": (lambda t: ["--model.init_args.preset=huge"], "huge"),
    "config file missing": (lambda t: ["--config", str(t / "none.yaml")], "none.yaml"),
    "attacker's encoder on members": (lambda t: ["--data.train_split=members"], "train_split"),
}


def _with(folder, name, text):
    (folder / name).write_text(text)
    return folder


@pytest.mark.parametrize("case", DATA_CASES, ids=list(DATA_CASES))
def test_data_and_config_errors(case, tmp_path, capsys):
    make_args, needle = DATA_CASES[case]
    exp = tmp_path / "exp"
    args = ["fit", "--config", ENCODER, *SMALL, f"--data.experiment={exp}", *make_args(tmp_path)]
    code, line = run(train_main, args, capsys)
    assert code != 0 and needle in line, line
    assert not exp.exists(), snapshot(exp)  # no splits.json, no stage folder


# --- the session's tiny trained experiment for the later stages ------------------------------
@pytest.fixture(scope="module")
def trained(diffusion_experiment, tmp_path_factory):
    """A copy of the session's diffusion experiment (tests/tiny_experiment.py): these cases
    must leave it unchanged, and one hides its shadows."""
    return copy_experiment(diffusion_experiment, tmp_path_factory.mktemp("errors")).layout


@pytest.mark.slow
def test_splits_edited_by_hand(trained, tmp_path, capsys):
    copy = tmp_path / "exp"
    copy.mkdir()
    doc = json.loads(trained.splits.read_text())
    doc["rows"][0]["members"].append(doc["rows"][0]["nonmembers"].pop())
    (copy / "splits.json").write_text(json.dumps(doc))
    before = snapshot(copy)
    args = ["fit", "--config", ENCODER, *SHARED, f"--data.experiment={copy}"]
    code, line = run(train_main, args, capsys)
    assert code != 0 and "do not match its hash" in line and snapshot(copy) == before


@pytest.mark.slow
def test_splits_made_with_other_settings(trained, capsys):
    before = snapshot(trained.root)
    args = [
        "fit",
        "--config",
        ENCODER,
        *SHARED,
        f"--data.experiment={trained.root}",
        "--data.target_size=18",
    ]
    code, line = run(train_main, args, capsys)
    assert code != 0 and f"target_size={TARGET_SIZE} (asked 18)" in line
    assert snapshot(trained.root) == before


@pytest.mark.slow
def test_a_missing_autoencoder_folder(trained, tmp_path, capsys):
    args = [
        "fit",
        "--config",
        DIFFUSION,
        *SHARED,
        f"--data.experiment={trained.root}",
        f"--model.init_args.autoencoder={tmp_path / 'nope'}",
    ]
    code, line = run(train_main, args, capsys)
    assert code != 0 and "nope" in line and "config.json" in line


@pytest.mark.slow
def test_resuming_from_a_checkpoint_of_another_family(trained, capsys):
    args = [
        "fit",
        "--config",
        DIFFUSION,
        *SHARED,
        f"--data.experiment={trained.root}",
        f"--model.init_args.autoencoder={trained.autoencoder}",
        "--data.model_index=1",
        f"--ckpt_path={last_checkpoint(trained.autoencoder)}",
    ]
    code, line = run(train_main, args, capsys)
    assert code != 0 and "autoencoder" in line


# --- attack.py ------------------------------------------------------------------------------
def target(layout):
    return str(layout.checkpoint("diffusion", 0))


ATTACK_CASES = {
    "checkpoint missing": (lambda e, t: ["--ckpt", str(t / "none.ckpt")], "no such file"),
    "not a checkpoint": (lambda e, t: ["--ckpt", _junk(t)], "not a readable checkpoint"),
    "a checkpoint of another tool": (
        lambda e, t: ["--ckpt", _plain(t)],
        "not a lightning_mia checkpoint",
    ),
    "an autoencoder as target": (
        lambda e, t: ["--ckpt", str(last_checkpoint(e.autoencoder))],
        "not a target model",
    ),
    "another experiment": (
        lambda e, t: ["--ckpt", target(e), "--experiment", str(t)],
        "belongs to experiment",
    ),
    "unknown attack": (lambda e, t: ["--ckpt", target(e), "--attack.attacks", "pixle"], "pixle"),
    "unknown attack in a list": (
        lambda e, t: [
            "--ckpt",
            target(e),
            "--query.num_images=1",
            "--attack.attacks",
            '["nosuch"]',
        ],
        "nosuch",
    ),
    "unknown setting": (
        lambda e, t: ["--ckpt", target(e), "--attack.setting", "sideways"],
        "sideways",
    ),
    "known fraction out of range": (
        lambda e, t: [
            "--ckpt",
            target(e),
            "--attack.setting",
            "partial",
            "--attack.known_fraction",
            "1.5",
        ],
        "known_fraction",
    ),
    "encoder folder missing": (
        lambda e, t: ["--ckpt", target(e), "--query.encoder", str(t / "nope")],
        "nope",
    ),
    "no images per query": (
        lambda e, t: ["--ckpt", target(e), "--query.num_images", "0"],
        "num_images",
    ),
    "unknown signal": (lambda e, t: ["--ckpt", target(e), "--query.signals", "lossy"], "lossy"),
}


def _junk(tmp_path):
    (tmp_path / "junk.ckpt").write_bytes(b"not a checkpoint")
    return str(tmp_path / "junk.ckpt")


def _plain(tmp_path):
    torch.save({"state_dict": {}}, tmp_path / "plain.ckpt")
    return str(tmp_path / "plain.ckpt")


@pytest.mark.slow
@pytest.mark.parametrize("case", ATTACK_CASES, ids=list(ATTACK_CASES))
def test_attack_errors(case, trained, tmp_path, capsys):
    make_args, needle = ATTACK_CASES[case]
    before = snapshot(trained.root)
    code, line = run(attack_main, [*make_args(trained, tmp_path), "--progress=false"], capsys)
    assert code != 0 and needle in line, line
    assert {k for k in snapshot(trained.root) if "attack" in k} == {
        k for k in before if "attack" in k
    }  # no report written


@pytest.mark.slow
def test_no_trained_shadows(trained, capsys):
    done = [trained.run_dir("diffusion", i) / "DONE.json" for i in (1, 2)]
    for marker in done:
        marker.rename(marker.with_suffix(".hidden"))
    try:
        code, line = run(attack_main, ["--ckpt", target(trained)], capsys)
    finally:
        for marker in done:
            marker.with_suffix(".hidden").rename(marker)
    assert code != 0 and "no trained diffusion shadow" in line


def test_unknown_experiment_name(capsys):
    code, line = run(experiment_main, ["no-such-experiment"], capsys)
    assert code != 0 and "no-such-experiment" in line and "known:" in line
