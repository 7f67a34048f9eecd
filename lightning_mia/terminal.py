"""What the command lines print: quiet by default, everything with `--verbose`.

    configure_terminal(verbose=verbose_requested(argv))  # first thing an entry point does

Quiet means: one line when a stage starts and one when it ends, Lightning's progress bars on
the long loops (training, queries), the result table at the end. The third-party messages that
repeat at every stage are dropped where they arise, each by its own logger or warning text, so
nothing else is hidden: Lightning's litlogger/litmodels tips, its device lines ("GPU available",
"LOCAL_RANK ..."), "Seed set to", "`Trainer.fit` stopped"; diffusers' advice to install
`accelerate` (the package loads models without it on purpose); transformers' torchvision
fallback notice and its weight loading/saving progress bars; torch's pytree deprecation notice
inside Lightning; two Lightning warnings that are false alarms in this package's regimes (fewer
batches per epoch than `log_every_n_steps` when training is budgeted in steps; the frozen
autoencoder in eval mode). W&B runs silently (`reporting.make_logger`), model summaries are off.
`--verbose` removes every one of these filters again.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import warnings
from collections.abc import Callable, Sequence
from typing import Any

from lightning_mia.errors import UserError

# logger name -> substrings of the messages dropped in quiet mode
QUIET_MESSAGES: dict[str, tuple[str, ...]] = {
    "lightning.pytorch.utilities.rank_zero": (
        "💡 Tip:",
        "GPU available:",
        "TPU available:",
        "HPU available:",
        "`Trainer.fit` stopped:",
    ),
    "lightning.fabric.utilities.seed": ("Seed set to",),
    "lightning.pytorch.accelerators.cuda": ("CUDA_VISIBLE_DEVICES",),
    "diffusers.models.modeling_utils": ("because `accelerate` was not found",),
    "diffusers.pipelines.pipeline_utils": ("because `accelerate` was not found",),
    "transformers.utils.import_utils": ("requires torchvision (not installed)",),
}
QUIET_WARNINGS = (  # regular expressions matched at the start of a warning's message
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",
    r"The number of training batches \(\d+\) is smaller than the logging interval",
    r"Found \d+ module\(s\) in eval mode at the start of training",
    r"Checkpoint directory .* exists and is not empty",  # attack folds share their folder
    # the autoencoder steps its optimizers by hand; its checkpoints hold the state after a step,
    # which is what resuming needs
    r"Using ModelCheckpoint with manual optimization and every_n_train_steps",
)
QUIET_ENV = {  # read when these libraries start (so they also reach stage subprocesses)
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",  # huggingface_hub and transformers progress bars
    "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",  # datasets (the hf-datasets source)
    "WANDB_SILENT": "true",  # W&B's process-wide terminal settings (also its init warnings)
}


class QuietFilter(logging.Filter):
    """Drops log records whose message contains one of `substrings`."""

    def __init__(self, substrings: Sequence[str]) -> None:
        super().__init__()
        self.substrings = tuple(substrings)

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(s in message for s in self.substrings)


_FILTERS = {name: QuietFilter(subs) for name, subs in QUIET_MESSAGES.items()}
_state: dict[str, Any] = {"verbose": True, "env_set": set()}


def is_verbose() -> bool:
    """Whether this process shows everything (the library default; entry points go quiet)."""
    return bool(_state["verbose"])


def verbose_requested(argv: Sequence[str] | None) -> bool:
    """Whether a command line asks for `--verbose` (`--verbose`, `--verbose true`, `=true`)."""
    args = list(sys.argv[1:] if argv is None else argv)
    for i, arg in enumerate(args):
        if arg == "--verbose":
            following = args[i + 1].lower() if i + 1 < len(args) else ""
            return following != "false"
        if arg.startswith("--verbose="):
            return arg.split("=", 1)[1].lower() == "true"
    return False


def normalized_argv(
    argv: Sequence[str],
    list_keys: Sequence[str],
    flag_keys: Sequence[str],
    aliases: dict[str, str] | None = None,
) -> list[str]:
    """A command line as jsonargparse reads it: `--a-b` is `--a_b`; an alias is its key
    (`--signal-preset` -> `--query.signal_preset`); a list option given as bare words or
    commas (`--attacks pixel semantic`, `--attacks pixel,semantic`, `none` for an empty list)
    becomes one YAML list; a boolean flag alone (`--verbose`) becomes `=true`."""
    out, args, i = [], list(argv), 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or arg == "--":
            out.append(arg)
            i += 1
            continue
        key, eq, value = arg[2:].partition("=")
        key = key.replace("-", "_")
        key = (aliases or {}).get(key, key)
        following = args[i + 1] if i + 1 < len(args) else None
        if key in list_keys:
            values = [value] if eq else []
            while not eq and i + 1 < len(args) and not args[i + 1].startswith("--"):
                values.append(args[i + 1])
                i += 1
            out.append(f"--{key}={yaml_list(values)}")
        elif key in flag_keys and not eq and (following is None or following.startswith("--")):
            out.append(f"--{key}=true")
        else:
            out.append(f"--{key}{eq}{value}")
        i += 1
    return out


def yaml_list(values: Sequence[str]) -> str:
    """Bare words, comma lists or one YAML list (`[a, b]`) as one YAML list; `none` = []."""
    text = " ".join(values).strip()
    if text.startswith("["):
        return text
    items = [v.strip().strip("'\"") for part in values for v in part.split(",") if v.strip()]
    return json.dumps([] if items == ["none"] else items)


def add_verbose_argument(parser: Any) -> None:
    """`--verbose` (also `--verbose true|false`) on a jsonargparse parser."""
    parser.add_argument(
        "--verbose",
        type=bool,
        nargs="?",
        const=True,
        default=False,
        help="show every message of Lightning, W&B and the model libraries",
    )


def _set_progress_bars(enabled: bool) -> None:
    """Weight loading/saving bars of transformers and huggingface_hub (imported or not yet),
    and the environment the libraries read when they start."""
    for name, value in QUIET_ENV.items():
        if not enabled and name not in os.environ:
            os.environ[name] = value
            _state["env_set"].add(name)
        elif enabled and name in _state["env_set"]:
            os.environ.pop(name, None)
            _state["env_set"].discard(name)
    if "huggingface_hub" in sys.modules:
        from huggingface_hub.utils import disable_progress_bars, enable_progress_bars

        (enable_progress_bars if enabled else disable_progress_bars)()
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        (hf_logging.enable_progress_bar if enabled else hf_logging.disable_progress_bar)()
    if "datasets" in sys.modules:
        from datasets.utils import disable_progress_bars, enable_progress_bars

        (enable_progress_bars if enabled else disable_progress_bars)()


def configure_terminal(verbose: bool) -> None:
    """Quiet (`verbose=False`) or everything (`verbose=True`); idempotent, reversible."""
    _state["verbose"] = verbose
    for name, quiet_filter in _FILTERS.items():
        logger = logging.getLogger(name)
        if verbose:
            logger.removeFilter(quiet_filter)
        elif quiet_filter not in logger.filters:
            logger.addFilter(quiet_filter)
    ours = [f for f in warnings.filters if f[0] == "ignore" and _is_ours(f[1])]
    for entry in ours:
        warnings.filters.remove(entry)
    if not verbose:
        for pattern in QUIET_WARNINGS:
            warnings.filterwarnings("ignore", message=pattern)
    getattr(warnings, "_filters_mutated", lambda: None)()  # invalidate warn()'s caches
    _set_progress_bars(enabled=verbose)


def _is_ours(message: Any) -> bool:
    pattern = getattr(message, "pattern", None)
    return pattern in QUIET_WARNINGS


class OneLineErrors:
    """Parser mixin (jsonargparse / LightningCLI parsers): a command-line error is one line,
    `error: <what is wrong>`, and exit status 2 — not the usage text and a nested report."""

    def error(self, message: str, ex: Exception | None = None) -> Any:
        if not getattr(self, "exit_on_error", True):
            return super().error(message, ex)  # a caller that catches the error
        sys.stderr.write(f"error: {short_parser_message(message)} (see --help)\n")
        raise SystemExit(2)


def short_parser_message(message: str) -> str:
    """jsonargparse's (often nested, multi-line) message as one line: for a class whose
    arguments do not fit, the key and that class's problem rather than every Union member's."""
    text = " ".join(str(message).split())
    key = re.match(r'Parser key "([^"]+)"', text)
    problem = re.search(r"(Problem with given class_path .*?)(?: - Expected a |$)", text)
    if key and problem:
        return f'Parser key "{key.group(1)}": {problem.group(1).rstrip(" -")}'
    return text


def argument_parser(**kwargs: Any) -> Any:
    """A jsonargparse `ArgumentParser` (with `OneLineErrors`) for the package's commands."""
    from jsonargparse import ArgumentParser

    class OneLineArgumentParser(OneLineErrors, ArgumentParser):
        pass

    return OneLineArgumentParser(**kwargs)


def user_error_in(err: BaseException) -> BaseException | None:
    """The user error behind `err`: itself, or one jsonargparse wrapped while instantiating
    a class from a config (it re-raises a ValueError whose cause or context is the error)."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, (UserError, FileNotFoundError)):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


def one_line(err: BaseException) -> str:
    """An error's message on one line (a list of problems joined with '; ')."""
    lines = [ln.strip() for ln in str(err).splitlines()]
    lines = [ln[2:] if ln.startswith("- ") else ln for ln in lines]  # a list's bullets
    return "; ".join(ln for ln in lines if ln).replace(":; ", ": ")


def run_cli(main: Callable[[], Any]) -> Any:
    """Run `main`; a user error becomes one line on stderr and exit status 1. Lightning ends a
    run sent SIGTERM with a SystemExit of status 0; here it is 143 (128 + SIGTERM), so a shell,
    a scheduler or the experiment runner never takes a stopped stage for a finished one."""
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    try:
        return main()
    except SIGTERMException:
        sys.stderr.write("error: stopped by SIGTERM; run the same command again to resume\n")
        raise SystemExit(143) from None
    except Exception as err:  # noqa: BLE001 - only user errors are caught, the rest re-raised
        user = user_error_in(err)
        if user is None:
            raise
        sys.stderr.write(f"error: {one_line(user)}\n")
        raise SystemExit(1) from None


def say(text: str) -> None:
    """A command's own output (tables, paths, hints) on stdout, from global rank zero only."""
    from lightning.pytorch.utilities import rank_zero_only

    rank_zero_only(lambda: sys.stdout.write(f"{text}\n"))()


__all__ = [
    "OneLineErrors",
    "add_verbose_argument",
    "argument_parser",
    "configure_terminal",
    "is_verbose",
    "normalized_argv",
    "run_cli",
    "say",
    "verbose_requested",
]
