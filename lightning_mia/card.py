"""The run card: what a checkpoint says about itself, so `attack.py --ckpt X` needs nothing else.

Every family LightningModule stores `checkpoint["lightning_mia"] = card.to_dict()` in
`on_save_checkpoint`; `read_card(path)` reads it back without building the model.
"""

from __future__ import annotations

import copy
import os
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from lightning_mia.errors import UserError

CARD_KEY = "lightning_mia"
MOVING_FOLDERS = ("autoencoder", "tokenizer")  # a model's folders that its experiment holds


class CheckpointError(UserError):
    """A checkpoint that is missing, unreadable, or not what the caller needs."""


@dataclass
class RunCard:
    """Identity and provenance of one trained model."""

    family: str  # "diffusion" | "seq2seq" (| "autoencoder" | "encoder")
    preset: str  # "tiny", "ldm-256", "dalle-mini", "pretrained", ...
    model_index: int  # row of splits.json: 0 = target, 1..K = shadows
    splits_hash: str  # hash of splits.json the model was trained on
    experiment: str  # experiment folder (as given at training time)
    role: str = ""  # "target" | "shadow" (derived from model_index when empty)
    autoencoder: str = ""  # folder of the frozen image autoencoder / VQGAN tokenizer
    tokenizer: str = ""  # folder of the caption tokenizer ("" = built in code by the preset)
    train_steps_per_image: float = 0.0  # optimizer steps x batch size / members
    augmentation: dict[str, Any] = field(default_factory=dict)
    train_split: str = ""  # an attacker's component: the pool it trained on (auxiliary | public)
    base: dict[str, str] = field(default_factory=dict)  # a fine-tune's base folder: path, sha256
    autoencoder_sha256: str = ""  # the frozen autoencoder's weights the model trained with
    text_init: str = ""  # seq2seq: the pretrained BART folder its text side started from
    external: dict[str, Any] = field(default_factory=dict)  # a model trained elsewhere: given
    # paths and their sha256 (`external.audit.facts_of`)
    train_steps: int = 0  # a captioner's optimizer steps
    quality: dict[str, float] = field(default_factory=dict)  # a captioner's held-out quality
    holdout: dict[str, Any] = field(default_factory=dict)  # a captioner's held-out share, seed

    def __post_init__(self) -> None:
        from lightning_mia.paths import role_of

        if not self.role:
            self.role = role_of(self.model_index)

    @property
    def run_name(self) -> str:
        from lightning_mia.paths import run_name

        return run_name(self.family, self.model_index)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunCard:
        """The card of a checkpoint (an older card's `extra` mapping read into the fields)."""
        values = {**(d.get("extra") or {}), **d}
        return cls(**{k: v for k, v in values.items() if k in cls.__dataclass_fields__})


def resumed_card(saved: RunCard, current: RunCard | None) -> RunCard:
    """The card a model keeps when its checkpoint `saved` is loaded: `current`, the one `setup`
    built from this stage's data, when there is one (a fit resumed with `ckpt_path`: the run
    now lies in that experiment, wherever the checkpoint was written, so what it writes goes
    there and not to the folder it was copied or moved from), once `saved` is shown to be of
    the same splits and row; else `saved` (a model loaded to be queried).
    CheckpointError when the two are of different experiments or rows."""
    from lightning_mia.paths import ExperimentLayout

    if current is None:
        return saved
    if saved.splits_hash != current.splits_hash:
        raise CheckpointError(
            f"checkpoint was trained on splits {saved.splits_hash[:12]} but "
            f"{ExperimentLayout(current.experiment).splits} has hash "
            f"{current.splits_hash[:12]}: they belong to different experiments"
        )
    if saved.model_index != current.model_index:
        raise CheckpointError(
            f"checkpoint is model_index {saved.model_index} but data.model_index is "
            f"{current.model_index}"
        )
    return current


def load_checkpoint(path: str | os.PathLike, mmap: bool = False) -> dict[str, Any]:
    """Load a Lightning checkpoint safely (`weights_only=True`) with one clear error.

    `mmap`: map the tensors instead of reading them (a checkpoint of the zip format; another
    is read whole), for a caller that reads only the small entries."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path}: no such file")
    try:
        mmap = mmap and zipfile.is_zipfile(path)
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as err:  # noqa: BLE001 - any unpickling failure means "not a checkpoint"
        detail = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"checkpoint {path}: not a readable checkpoint ({detail})") from err


def load_module(cls: type, path: str | os.PathLike, **kwargs: Any) -> Any:
    """`cls.load_from_checkpoint(path, **kwargs)`, without the guard Lightning wraps around it.

    The guard (that the classmethod is not called on an instance) walks `inspect.stack()` with
    source lines on every call: 0.1-0.3 s a call under a deep stack on a small CPU, and an
    attack stage loads a dozen classifiers and every queried model. Lightning keeps the
    unwrapped method as the wrapper's `__func__`; the guard is used where it is not there."""
    method = cls.load_from_checkpoint
    func = getattr(method, "__func__", None)
    return func(cls, path, **kwargs) if func is not None else method(path, **kwargs)


def read_card(path: str | os.PathLike) -> RunCard:
    """The run card of a lightning_mia checkpoint (see `read_card_and_moves`)."""
    return read_card_and_moves(path)[0]


def read_card_and_moves(path: str | os.PathLike) -> tuple[RunCard, dict[str, str]]:
    """The run card of a lightning_mia checkpoint; CheckpointError for anything else.

    A checkpoint inside an experiment folder (`<experiment>/<run>/checkpoints/*.ckpt`, beside
    its splits.json) belongs to that folder, wherever it was trained: an experiment moved or
    copied elsewhere keeps working (the splits hash, checked by every stage, still ties the
    checkpoint to its splits). Its autoencoder and tokenizer folders inside the old experiment
    folder move with it: the second value is {card field: new folder} of those that moved.
    """
    card = RunCard.from_dict(_card_entry(path))
    holder = holding_experiment(path)
    moves: dict[str, str] = {}
    if holder is not None and holder.resolve() != Path(card.experiment).resolve():
        old, card.experiment = card.experiment, str(holder)
        for key in MOVING_FOLDERS:
            before = getattr(card, key)
            after = moved_path(before, old, holder)
            if after != before:
                moves[key] = after
                setattr(card, key, after)
    return card, moves


_CARD_ENTRIES: dict[tuple, dict[str, Any]] = {}  # (file, version) -> its card entry


def _card_entry(path: str | os.PathLike) -> dict[str, Any]:
    """A checkpoint's card entry, read once per version of the file: an attack asks for the
    card of each model several times (its queries, the report), and reading it unpickles the
    whole checkpoint (its tensors mapped, not read)."""
    try:
        stat = Path(path).stat()
        key = (str(Path(path).resolve()), stat.st_ino, stat.st_size, stat.st_mtime_ns)
    except OSError:
        key = None  # not a file: load_checkpoint says so
    entry = _CARD_ENTRIES.get(key)
    if entry is None:
        ckpt = load_checkpoint(path, mmap=True)
        if CARD_KEY not in ckpt:
            raise CheckpointError(
                f"checkpoint {path}: not a lightning_mia checkpoint (no '{CARD_KEY}' entry)"
            )
        entry = ckpt[CARD_KEY]
        if key is not None:
            _CARD_ENTRIES[key] = entry
    return copy.deepcopy(entry)


def moved_path(path: str, old_root: str | os.PathLike, new_root: str | os.PathLike) -> str:
    """`path` under `new_root` when it lay under `old_root` (the autoencoder or tokenizer of a
    moved or copied experiment), else unchanged ("" stays "")."""
    if not path:
        return path
    try:  # relative ones: both to the working folder of the training run, whichever it was
        inside = Path(path).resolve().relative_to(Path(old_root).resolve())
    except ValueError:
        return path
    return str(Path(new_root) / inside)


def follow_moved_folders(ckpt: Any, arguments: Any) -> None:
    """Point a resumed model's folder `arguments` (MOVING_FOLDERS of its `init_args`, which
    LightningCLI takes from the checkpoint's hyper-parameters: where it was trained) at those of
    the experiment the checkpoint `ckpt` now lies in (`read_card_and_moves`); nothing when it
    has not moved."""
    if ckpt and arguments is not None and Path(str(ckpt)).is_file():
        for key, folder in read_card_and_moves(str(ckpt))[1].items():
            if isinstance(arguments.get(key), str):  # (the autoencoder stage takes none)
                arguments[key] = folder


def holding_experiment(path: str | os.PathLike) -> Path | None:
    """The experiment folder a checkpoint sits in (`<experiment>/<run>/checkpoints/x.ckpt`
    with `<experiment>/splits.json`), or None."""
    from lightning_mia.paths import CHECKPOINT_DIR, ExperimentLayout

    path = Path(path)
    if path.parent.name != CHECKPOINT_DIR or len(path.parents) < 3:
        return None
    root = path.parents[2]
    return root if ExperimentLayout(root).splits.is_file() else None
