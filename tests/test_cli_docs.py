"""Every command the README and the config headers show parses with the real parsers, as
written (nothing is run): train.py / LightningCLI, attack.py, the experiment runner, the
summary; other scripts exist and know the flags they are given; make targets exist. Also the
`--attack.attacks` spellings people type, and the W&B sweep config of the shadows."""

import re
import shlex
from collections import Counter
from pathlib import Path

import pytest
import yaml
from test_configs import ParseOnlyCLI

from lightning_mia.attack.options import SETTINGS, parse_attack_options
from lightning_mia.experiment import experiment_config
from lightning_mia.paths import find_config, with_found_configs
from lightning_mia.specs.attacks import ATTACKS
from lightning_mia.summary import summary_parser

ROOT = Path(__file__).resolve().parents[1]
MODULES = ("experiment", "summary")  # `python -m lightning_mia.X` = `lightning-mia-X`


def _commands_of(text: str) -> list[str]:
    """Shell commands of `text`: continuations joined, comments dropped, `a; b` split, the
    loop variable of `for k in 1 2 3 4; do ... $k; done` set to 1."""
    commands = []
    for line in re.sub(r"\\\n\s*", " ", text).splitlines():
        lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
        lexer.whitespace_split, lexer.commenters = True, "#"
        part: list[str] = []
        for word in [*lexer, ";"]:
            if word != ";":
                part.append(re.sub(r"\$\{?k\}?", "1", word))
                continue
            if part and part[0] == "do":
                part = part[1:]
            if part and part[0] not in ("for", "done"):
                commands.append(shlex.join(part))
            part = []
    return commands


def readme_commands() -> list[str]:
    """Commands of the README's bash blocks and of its inline `python ...` / `make ...` spans
    (those without <placeholders>)."""
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", text, flags=re.S)
    commands = [c for block in blocks for c in _commands_of(block)]
    inline = re.findall(r"`((?:python|make|lightning-mia-|wandb sweep)[^`]*)`", text)
    spans = [" ".join(span.split()) for span in inline if "<" not in span]
    commands += [c for span in spans for c in _commands_of(span)]
    return list(dict.fromkeys(commands))


def header_commands() -> list[str]:
    """The `#   python ...` lines of the YAML configs' headers (with their continuations)."""
    commands = []
    for path in sorted((ROOT / "configs").rglob("*.yaml")):
        lines = [ln[1:].strip() for ln in path.read_text().splitlines() if ln.startswith("#")]
        for i, line in enumerate(lines):
            if not line.startswith("python "):
                continue
            text = line
            while text.endswith("\\") and i + 1 < len(lines):
                i += 1
                text = text[:-1] + " " + lines[i]
            commands += _commands_of(text)
    return list(dict.fromkeys(commands))


def program_of(command: str) -> tuple[str, list[str]]:
    """(program, its arguments): `python train.py` and `python -m lightning_mia.X` are named
    by their console entry points (`lightning-mia-train`, `lightning-mia-X`)."""
    words = shlex.split(command)
    program, args = words[0], words[1:]
    if program == "python" and args[:2] == ["-m", "lightning_mia.cli"]:
        program, args = "lightning-mia-train", args[2:]
    elif program == "python" and args[:1] in (["train.py"], ["attack.py"]):
        program, args = f"lightning-mia-{args[0][:-3]}", args[1:]
    elif program == "python" and args[:2] in (["-m", f"lightning_mia.{m}"] for m in MODULES):
        program, args = f"lightning-mia-{args[1].split('.', 1)[1]}", args[2:]
    return program, args


def parse_command(command: str) -> str:
    """Parse one command with the parser that would run it; returns what checked it."""
    program, args = program_of(command)
    if program == "lightning-mia-train":
        ParseOnlyCLI(args=with_found_configs(args))
        return "train"
    if program == "lightning-mia-attack":
        options = parse_attack_options(with_found_configs(args))
        asked = options.attack.attacks
        unknown = [a for a in asked if a not in ("all", "paper") and a not in ATTACKS]
        assert not unknown and options.attack.setting in SETTINGS, (command, unknown)
        return "attack"
    if program == "lightning-mia-experiment":
        cfg = experiment_config(args)
        for key in ("autoencoder", "encoder", "model"):
            path = cfg.stages[key]
            assert not path or Path(find_config(path)).is_file(), (command, key)
        return "experiment"
    if program == "lightning-mia-summary":
        summary_parser().parse_args(args)
        return "summary"
    return check_other(program, args, command)


def check_other(program: str, args: list[str], command: str) -> str:
    """make targets exist; a script or module exists and mentions every flag it is given;
    `pip install .` installs this project; `wandb sweep X` names a shipped sweep config."""
    if program == "make":
        targets = re.findall(r"^([\w-]+):", (ROOT / "Makefile").read_text(), flags=re.M)
        assert all(a in targets for a in args if "=" not in a), (command, targets)
        return "make"
    if program == "pip":
        assert args == ["install", "."] and (ROOT / "pyproject.toml").is_file(), command
        return "pip"
    if program == "wandb":
        assert args[0] == "agent" or (args[0] == "sweep" and (ROOT / args[1]).is_file()), command
        return "wandb"
    assert program == "python", command
    if args[0] == "-m":
        source = ROOT / (args[1].replace(".", "/") + ".py")
        args = args[2:]
    else:
        source, args = ROOT / args[0], args[1:]
    assert source.is_file(), command
    common = source.parent / "_common.py"  # the benchmarks' shared flags
    text = source.read_text() + (common.read_text() if common.is_file() else "")
    flags = [a.split("=")[0] for a in args if a.startswith("--")]
    assert all(f'"{f}"' in text for f in flags), (command, flags)
    return "script"


def test_the_readme_and_the_headers_show_commands():
    programs = Counter(program_of(c)[0] for c in readme_commands() + header_commands())
    for program in ("lightning-mia-train", "lightning-mia-attack", "lightning-mia-experiment"):
        assert programs[program] >= 3, programs
    assert programs["make"] >= 2 and programs["lightning-mia-summary"] >= 1


@pytest.mark.parametrize("command", readme_commands())
def test_readme_command_parses(command):
    parse_command(command)


@pytest.mark.parametrize("command", header_commands())
def test_config_header_command_parses(command):
    parse_command(command)


def test_a_wrong_command_fails():
    with pytest.raises(SystemExit):
        parse_command("python train.py fit --config configs/diffusion/tiny.yaml --data.nope 1")
    with pytest.raises(AssertionError):
        parse_command("python attack.py --ckpt x.ckpt --attack.attacks pixle")
    with pytest.raises(FileNotFoundError):
        parse_command("python -m lightning_mia.experiment no-such-experiment")


@pytest.mark.parametrize(
    "args, expected",
    [
        ([], ("paper",)),
        (["--attack.attacks", "all"], ("all",)),
        (["--attack.attacks", "pixel", "semantic"], ("pixel", "semantic")),
        (["--attack.attacks", "[pixel, semantic]"], ("pixel", "semantic")),
        (["--attack.attacks=pixel,semantic"], ("pixel", "semantic")),
        (["--attack.attacks", "pixel", "--attack.setting", "partial"], ("pixel",)),
    ],
)
def test_attacks_spellings(args, expected):
    options = parse_attack_options(["--ckpt", "x.ckpt", *args])
    assert options.attack.attacks == expected


@pytest.mark.parametrize(
    "args, verbose", [([], False), (["--verbose"], True), (["--verbose", "false"], False)]
)
def test_verbose_flag_on_every_command(args, verbose):
    assert parse_attack_options(["--ckpt", "x", *args]).verbose is verbose
    assert experiment_config(["demo", *args]).verbose is verbose
    cli = ParseOnlyCLI(args=["fit", "--config", find_config("configs/encoder/tiny.yaml"), *args])
    assert cli.config.fit.verbose is verbose


def _sweep_runs(path: Path) -> list[list[str]]:
    """The command lines a W&B agent runs for a grid sweep (its ${...} macros expanded)."""
    sweep = yaml.safe_load(path.read_text())
    assert sweep["method"] == "grid" and (ROOT / sweep["program"]).is_file()
    ((name, spec),) = sweep["parameters"].items()
    runs = []
    for value in spec["values"]:
        argv = []
        for word in sweep["command"]:
            if word == "${args}":
                argv.append(f"--{name}={value}")
            elif word not in ("${env}", "${interpreter}", "${program}"):
                argv.append(word)
        runs.append(argv)
    return runs


def test_the_shadow_sweep_trains_each_shadow_row():
    runs = _sweep_runs(ROOT / "configs" / "sweeps" / "shadows.yaml")
    rows = []
    for argv in runs:
        cli = ParseOnlyCLI(args=with_found_configs(argv))
        rows.append(cli.config.fit.data.model_index)
    assert rows == sorted(set(rows)) and min(rows) >= 1  # shadows only, each once


@pytest.mark.parametrize(
    "args, expected",
    [
        ([], ("all",)),  # demo.yaml's
        (["--attack.attacks", "pixel", "semantic"], ("pixel", "semantic")),
        (["--attack.attacks", "[pixel, semantic]"], ("pixel", "semantic")),
        (["--attack.attacks", "all", "--settings", "shadow", "partial"], ("all",)),
    ],
)
def test_experiment_attacks_spellings(args, expected):
    cfg = experiment_config(["demo", *args])
    assert tuple(cfg.attack.attacks) == expected
    assert list(cfg.settings) in (["shadow"], ["shadow", "partial"])
