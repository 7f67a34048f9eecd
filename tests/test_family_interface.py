"""The family interface: a family is a plug-in. Its name is tested nowhere outside `models/` and
its own gray-box modules; every family implements the interface; what reports and folders need
to know of a family comes from its class or its registered layout."""

import ast
import inspect
from pathlib import Path

from lightning_mia.attack.cautions import autoencoder_what
from lightning_mia.graybox import SIGNALS, signals_for
from lightning_mia.models.base import FAMILIES, TextToImageModule
from lightning_mia.models.latent import LatentTextToImageModule
from lightning_mia.models.pipeline_folder import PIPELINE_LAYOUTS

PACKAGE = Path(__file__).resolve().parents[1] / "lightning_mia"
# Files allowed to name a family, each with the names (none: every family is a plug-in).
KNOWN_OFFENDERS: dict[str, set[str]] = {}


def _docstrings(tree: ast.AST) -> set[int]:
    """ids of the docstring constants of a module, its classes and functions."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                found.add(id(body[0].value))
    return found


def _declarations(tree: ast.AST) -> set[int]:
    """ids of the family constants that declare, not test: `SignalSpec(name, "family", ...)`
    and `register_family("name")`."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "SignalSpec":
            args = node.args[1:2] + [k.value for k in node.keywords if k.arg == "family"]
            found |= {id(a) for a in args}
        if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "register_family":
            found |= {id(a) for a in node.args}
    return found


def family_names_outside_models() -> dict[str, set[str]]:
    """{file relative to the package: family names it holds as string constants in code}."""
    families, found = set(FAMILIES.names()), {}
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).as_posix()
        if rel.startswith("models/"):
            continue
        tree = ast.parse(path.read_text())
        skip = _docstrings(tree) | _declarations(tree)
        names = {
            node.value
            for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and node.value in families and id(node) not in skip
        }
        if names:
            found[rel] = names
    return found


def test_no_module_outside_models_names_a_family():
    found = family_names_outside_models()
    assert {f: n for f, n in found.items() if n - KNOWN_OFFENDERS.get(f, set())} == {}
    fixed = sorted(f for f in KNOWN_OFFENDERS if f not in found)
    assert fixed == [], f"{fixed} no longer name a family: remove them from KNOWN_OFFENDERS"


def test_the_scan_finds_a_family_test():
    tree = ast.parse('"""doc: diffusion"""\nif card.family == "flow":\n    pass\n')
    consts = [n.value for n in ast.walk(tree) if isinstance(n, ast.Constant)]
    assert "flow" in consts and id(tree.body[0].value) in _docstrings(tree)


def test_every_family_implements_the_interface():
    assert {"diffusion", "seq2seq", "flow"} <= set(FAMILIES.names())
    for name, cls in FAMILIES.items():
        assert issubclass(cls, TextToImageModule) and cls.family == name
        assert not inspect.isabstract(cls), f"{name} leaves {cls.__abstractmethods__} abstract"
    latent = {n for n, cls in FAMILIES.items() if issubclass(cls, LatentTextToImageModule)}
    assert {"diffusion", "flow"} <= latent


def test_signals_are_declared_per_family():
    assert sorted(signals_for("flow")) == [
        "flow_clid",
        "flow_loss",
        "flow_pia",
        "flow_secmi",
        "flow_sweep",
    ]
    assert {s.family for s in SIGNALS.values()} <= set(FAMILIES.names())


def test_what_a_report_and_a_folder_need_comes_from_the_family():
    assert autoencoder_what("seq2seq") == "VQGAN image tokenizer"
    assert autoencoder_what("diffusion") == autoencoder_what("flow") == "image autoencoder"
    assert autoencoder_what("no-such-family") == "autoencoder"
    layouts = {name: layout.family for name, layout in PIPELINE_LAYOUTS.items()}
    assert layouts == {
        "StableDiffusionPipeline": "diffusion",
        "StableDiffusion3Pipeline": "flow",
        "FluxPipeline": "flow",
    }
