"""No dead settings: every config field is read by keyturn's code, or is a declared one-value field.

The issue this guards against: settings that were validated and documented
(``auto_rotate``, ``transition_window_days``, ``on_unknown_version``, ...)
while no code read them, so a config promised behaviour that never happened.

How a field counts as read: the package sources (``keyturn/``,
``transforms/``, ``pipelines/``; not ``keyturn/config.py`` itself, not the
tests) are parsed, and every attribute chain that is loaded is collected
(``cfg.lifecycle.rewrap_mode``), with simple aliases resolved
(``tracking = cfg.version_tracking`` ... ``tracking.path``), and
``getattr(chain, "name", ...)`` read as ``chain.name``. A field
``section.name`` is read when some chain holds ``section`` immediately
followed by ``name`` (for ``key_hierarchy.cmk.region``: ``cmk.region``); a
top-level field when ``config.name`` or ``cfg.name`` is read. The only
exceptions are `keyturn.config.DECLARATIONS`, each of which must accept
exactly one value, so it cannot promise anything. Removed settings
(`keyturn.config.REMOVED_FIELDS`) must be gone from the models and the
example file, load with a `DeprecationWarning` at their old value, and fail
with a `ConfigError` naming them at any other.
"""

from __future__ import annotations

import ast
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel

from keyturn.config import DECLARATIONS, REMOVED_FIELDS, KeyturnConfig, default_config, parse_config
from keyturn.errors import ConfigError

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("keyturn", "transforms", "pipelines")
CONFIG_MODULE = REPO / "keyturn" / "config.py"
EXAMPLE = REPO / "docs" / "config.example.yaml"
ROOT_NAMES = ("config", "cfg")  # how the code names a whole KeyturnConfig


def config_fields(model: type[BaseModel] = KeyturnConfig, prefix: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    """Every leaf field of the config models, as a path of names."""
    for name, info in model.model_fields.items():
        ann = info.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            yield from config_fields(ann, prefix + (name,))
        else:
            yield prefix + (name,)


def _chain(node: ast.AST) -> list[str] | None:
    """``a.b.c`` -> ["a", "b", "c"]; a chain on a call or subscript starts with "" (unknown base)."""
    parts: list[str] = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
    elif parts:
        parts.append("")
    else:
        return None
    return parts[::-1]


def attribute_chains(source: str) -> set[tuple[str, ...]]:
    """Every loaded attribute chain of a module, each simple alias (``x = a.b``) expanded once or twice."""
    tree = ast.parse(source)
    aliases: dict[str, list[list[str]]] = {}
    for node in ast.walk(tree):
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) else []
        value = getattr(node, "value", None)
        if value is None or not isinstance(value, ast.Attribute):
            continue
        chain = _chain(value)
        for target in targets:
            if isinstance(target, ast.Name) and chain:
                aliases.setdefault(target.id, []).append(chain)

    def expand(chain: list[str], depth: int = 0) -> Iterator[list[str]]:
        yield chain
        if depth < 3:
            for prefix in aliases.get(chain[0], []):
                if prefix != chain:
                    yield from expand(prefix + chain[1:], depth + 1)

    found: set[tuple[str, ...]] = set()
    for node in ast.walk(tree):
        chain = None
        if isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Load):
            chain = _chain(node)
        elif (  # getattr(cfg.encryption, "bind_columns", None) reads cfg.encryption.bind_columns
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id == "getattr"
            and len(node.args) >= 2
            and isinstance(node.args[1], ast.Constant)
            and isinstance(node.args[1].value, str)
        ):
            base = _chain(node.args[0])
            chain = base + [node.args[1].value] if base else None
        if chain:
            found.update(tuple(c) for c in expand(chain))
    return found


def package_chains() -> dict[tuple[str, ...], set[str]]:
    """chain -> the files that read it, over the package sources outside keyturn/config.py."""
    out: dict[tuple[str, ...], set[str]] = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            if path == CONFIG_MODULE:
                continue
            for chain in attribute_chains(path.read_text(encoding="utf-8")):
                out.setdefault(chain, set()).add(str(path.relative_to(REPO)))
    return out


def readers(field: tuple[str, ...], chains: dict[tuple[str, ...], set[str]]) -> set[str]:
    """The files that read `field` (see the module docstring)."""
    parents = ROOT_NAMES if len(field) == 1 else (field[-2],)
    pairs = {(parent, field[-1]) for parent in parents}
    files: set[str] = set()
    for chain, where in chains.items():
        if any((chain[i], chain[i + 1]) in pairs for i in range(len(chain) - 1)):
            files |= where
    return files


FIELDS = [".".join(f) for f in config_fields()]
_CHAINS: dict[tuple[str, ...], set[str]] | None = None


def chains() -> dict[tuple[str, ...], set[str]]:
    global _CHAINS
    if _CHAINS is None:
        _CHAINS = package_chains()
    return _CHAINS


# ------------------------------------------------------------------------------ the guard


@pytest.mark.parametrize("dotted", [f for f in FIELDS if f not in DECLARATIONS])
def test_every_config_field_is_read_outside_the_config_module(dotted):
    found = readers(tuple(dotted.split(".")), chains())
    assert found, (
        f"config field {dotted!r} is defined and documented, but no code in {', '.join(PACKAGES)} reads it: "
        "make it do what docs/config.example.yaml says (with a test), or remove it (keyturn.config.REMOVED_FIELDS)"
    )


def test_declarations_are_real_fields_with_a_reason():
    for dotted, why in DECLARATIONS.items():
        assert dotted in FIELDS, f"DECLARATIONS names {dotted!r}, which is not a config field"
        assert len(why) > 20


def _other_values(value):
    if isinstance(value, bool):
        return [not value]
    if isinstance(value, int):
        return [value + 1, value - 1, 0]
    if isinstance(value, str):
        return [value + "x", value.lower(), "other"]
    raise AssertionError(f"no alternative values for {value!r}")


def _nested(path: list[str], value) -> dict:
    out: dict = {path[-1]: value}
    for part in reversed(path[:-1]):
        out = {part: out}
    return out


@pytest.mark.parametrize("dotted", sorted(DECLARATIONS))
def test_a_declaration_accepts_exactly_one_value(dotted):
    """A field nobody reads may only state a fixed choice: any other value is refused."""
    path = dotted.split(".")
    default = default_config()
    for part in path:
        default = getattr(default, part)
    assert parse_config(_nested(path, default)) == default_config()
    for other in _other_values(default):
        if other == default:
            continue
        with pytest.raises(ConfigError) as info:
            parse_config(_nested(path, other))
        assert info.value.field == dotted


# ------------------------------------------------------------------------------ removed settings


@pytest.mark.parametrize("dotted", sorted(REMOVED_FIELDS))
def test_a_removed_setting_is_gone_from_the_models_and_the_example(dotted):
    assert dotted not in FIELDS
    raw = yaml.safe_load(EXAMPLE.read_text(encoding="utf-8"))
    section, name = dotted.rsplit(".", 1)
    assert name not in (raw.get(section) or {}), f"docs/config.example.yaml still sets {dotted}"


@pytest.mark.parametrize("dotted", sorted(REMOVED_FIELDS))
def test_a_removed_setting_at_its_old_value_loads_with_a_deprecation_warning(dotted, tmp_path):
    old, _ = REMOVED_FIELDS[dotted]
    path = dotted.split(".")
    with pytest.warns(DeprecationWarning, match=dotted.replace(".", r"\.")):
        cfg = parse_config(_nested(path, old))
    assert cfg == default_config()
    # a config.yaml that an earlier `keyturn init` wrote (every field, the old defaults included) still opens
    text = yaml.safe_dump({**default_config().model_dump(), **_merge(path, old)})
    (tmp_path / "config.yaml").write_text(text, encoding="utf-8")
    from keyturn.config import load_config

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        assert load_config(tmp_path / "config.yaml").dataset == "default"


def _merge(path: list[str], value) -> dict:
    base = default_config().model_dump()
    section = base
    for part in path[:-1]:
        section = section[part]
    section[path[-1]] = value
    return base


@pytest.mark.parametrize("dotted", sorted(REMOVED_FIELDS))
def test_a_removed_setting_at_any_other_value_is_a_config_error_naming_it(dotted):
    old, why = REMOVED_FIELDS[dotted]
    path = dotted.split(".")
    others = [True] if isinstance(old, bool) else ["partition_batch", "something else"]
    for other in others + [None, 3]:
        with pytest.raises(ConfigError) as info:
            parse_config(_nested(path, other))
        assert info.value.field == dotted
        assert "was removed" in info.value.problem and why.split(";")[0][:30] in info.value.problem
        assert "\n" not in str(info.value)


def test_removed_setting_values_are_not_echoed():
    secret = "hunter2-pasted-here"
    with pytest.raises(ConfigError) as info:
        parse_config({"dek": {"scope": secret}})
    assert secret not in str(info.value)


# ------------------------------------------------------------------------------ the guard's own checks


def test_the_guard_resolves_aliases_and_sees_known_readers():
    sample = (
        "def f(cfg, home):\n"
        "    tracking = cfg.version_tracking\n"
        "    dek = home.config.dek\n"
        "    return tracking.path, dek.max_cells, cfg.dataset, home.other.rewrap_mode, getattr(cfg.audit, 'sink')\n"
    )
    found = attribute_chains(sample)
    assert ("cfg", "audit", "sink") in found
    assert ("cfg", "version_tracking", "path") in found
    assert ("home", "config", "dek", "max_cells") in found
    c = {chain: {"sample.py"} for chain in found}
    assert readers(("version_tracking", "path"), c) == {"sample.py"}
    assert readers(("dataset",), c) == {"sample.py"}
    assert readers(("lifecycle", "rewrap_mode"), c) == set()  # `other.rewrap_mode` is not lifecycle's
    assert readers(("audit", "path"), c) == set()


def test_the_guard_finds_the_readers_of_the_settings_the_issue_named():
    expected = {
        "key_hierarchy.transition_window_days": "pipelines/cli.py",
        "version_tracking.on_missing_version": "keyturn/policy.py",
        "version_tracking.on_unknown_version": "keyturn/policy.py",
        "lifecycle.reencryption_strategy": "pipelines/cli.py",
    }
    for dotted, path in expected.items():
        assert path in readers(tuple(dotted.split(".")), chains()), dotted
