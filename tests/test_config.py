"""keyturn.config: defaults, the example file, one clear ConfigError per bad config."""

from __future__ import annotations

import datetime
import os
import re
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from keyturn.config import (
    FILE_FIELD,
    MAX_CONFIG_BYTES,
    ROOT_FIELD,
    KeyturnConfig,
    default_config,
    dump_config,
    load_config,
    parse_config,
    resolve_paths,
)
from keyturn.errors import ConfigError

EXAMPLE = Path(__file__).resolve().parent.parent / "docs" / "config.example.yaml"


def _fields(model: type[BaseModel], prefix: str = "") -> list[str]:
    """Dotted names of every leaf field under `model`."""
    out = []
    for name, info in model.model_fields.items():
        ann = info.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            out.extend(_fields(ann, f"{prefix}{name}."))
        else:
            out.append(prefix + name)
    return out


def _nested(dotted: str, value: object) -> dict:
    """{"a.b.c": v} as nested dicts."""
    *parents, leaf = dotted.split(".")
    root: dict = {leaf: value}
    for part in reversed(parents):
        root = {part: root}
    return root


def _write(tmp_path: Path, text: str, name: str = "keyturn.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


# ------------------------------------------------------------------ defaults


@pytest.mark.parametrize("empty", [{}, None, "", "{}\n", "# only a comment\n"], ids=["dict", "none", "empty-file", "braces-file", "comment-file"])
def test_empty_config_is_the_default(empty, tmp_path):
    if isinstance(empty, str):
        cfg = load_config(_write(tmp_path, empty))
        assert cfg == resolve_paths(default_config(), tmp_path)
    else:
        assert parse_config(empty) == default_config()


def test_default_values():
    cfg = default_config()
    assert cfg.dataset == "default"
    assert (cfg.encryption.mode, cfg.encryption.algorithm, cfg.encryption.iv_bytes) == ("envelope", "AES-256-GCM", 12)
    cmk = cfg.key_hierarchy.cmk
    assert (cmk.provider, cmk.keystore, cmk.root_key_file, cmk.passphrase_env) == ("local", "keystore.json", None, "KEYTURN_PASSPHRASE")
    assert (cmk.key_id, cmk.region, cmk.endpoint_url) == (None, None, None)
    kh = cfg.key_hierarchy
    assert (kh.rotation_interval_days, kh.pending_deletion_days, kh.transition_window_days) == (90, 30, 0)
    assert (cfg.dek.max_cells, cfg.dek.max_bytes, cfg.dek.cache_plaintext) == (2**32, 2**36, False)
    lc = cfg.lifecycle
    assert (lc.reencryption_strategy, lc.rewrap_mode, lc.max_concurrent_reencryption_workers) == ("batch_lazy", "reencrypt", 4)
    assert (lc.max_kms_requests_per_second, lc.dek_max_age_days) == (50.0, 365)
    vt = cfg.version_tracking
    assert (vt.storage, vt.path, vt.table, vt.on_missing_version, vt.on_unknown_version) == ("sqlite", "registry.sqlite", None, "quarantine", "quarantine")
    au = cfg.audit
    assert (au.sink, au.path, au.log_group, au.log_stream) == ("file", "audit.log", None, None)
    assert (au.log_decrypt, au.log_encrypt, au.include_kms_request_ids) == (True, True, True)


def test_config_is_frozen():
    cfg = default_config()
    with pytest.raises(Exception):
        cfg.dataset = "other"  # type: ignore[misc]
    with pytest.raises(Exception):
        cfg.dek.cache_plaintext = True  # type: ignore[misc]


def test_empty_section_means_defaults():
    assert parse_config({"dek": None, "key_hierarchy": {"cmk": None}}) == default_config()


# -------------------------------------------------------------- example file


def test_example_file_loads_and_equals_defaults():
    assert load_config(EXAMPLE) == resolve_paths(default_config(), EXAMPLE.parent)
    assert parse_config(yaml.safe_load(EXAMPLE.read_text(encoding="utf-8"))) == default_config()


@pytest.mark.parametrize("field", _fields(KeyturnConfig))
def test_example_file_documents_every_field(field):
    text = EXAMPLE.read_text(encoding="utf-8")
    leaf = field.rsplit(".", 1)[-1]
    assert re.search(rf"^\s*(# )?{re.escape(leaf)}:", text, re.MULTILINE), f"{field} missing from the example"


def test_example_commented_settings_are_valid():
    """The commented-out AWS settings work once uncommented (with the matching choice)."""
    text = EXAMPLE.read_text(encoding="utf-8")
    text = re.sub(r"^(\s*)# ((key_id|region|endpoint_url|table|log_group|log_stream): )", r"\1\2", text, flags=re.MULTILINE)
    raw = yaml.safe_load(text)
    raw["key_hierarchy"]["cmk"]["provider"] = "aws_kms"
    raw["version_tracking"]["storage"] = "dynamodb"
    raw["audit"]["sink"] = "cloudwatch"
    cfg = parse_config(raw)
    assert cfg.key_hierarchy.cmk.key_id == "alias/keyturn-lake"
    assert cfg.version_tracking.table == "keyturn-registry"
    assert cfg.audit.log_group == "/keyturn/audit"


# ------------------------------------------------------------- valid configs


def test_aws_setup_is_accepted():
    cfg = parse_config(
        {
            "dataset": "sales",
            "key_hierarchy": {
                "cmk": {
                    "provider": "aws_kms",
                    "key_id": "arn:aws:kms:us-east-1:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab",
                    "region": "us-east-1",
                    "endpoint_url": "http://127.0.0.1:5000",
                },
                "rotation_interval_days": 365,
            },
            "version_tracking": {"storage": "dynamodb", "table": "keyturn-registry"},
            "audit": {"sink": "cloudwatch", "log_group": "/keyturn/audit", "log_stream": "lake"},
            "lifecycle": {"max_kms_requests_per_second": 5, "rewrap_mode": "auto"},
        }
    )
    assert cfg.key_hierarchy.cmk.provider == "aws_kms"
    assert cfg.lifecycle.max_kms_requests_per_second == 5.0


def test_relative_paths_resolve_against_config_dir(tmp_path, monkeypatch):
    sub = tmp_path / "conf"
    sub.mkdir()
    path = _write(
        sub,
        "key_hierarchy:\n  cmk:\n    keystore: keys/ks.json\n    root_key_file: root.key\n"
        f"version_tracking:\n  path: {str(tmp_path / 'abs.sqlite')!r}\n",
    )
    monkeypatch.chdir(tmp_path)
    cfg = load_config(Path("conf") / "keyturn.yaml")
    assert cfg.key_hierarchy.cmk.keystore == os.path.join(str(sub), "keys/ks.json")
    assert cfg.key_hierarchy.cmk.root_key_file == os.path.join(str(sub), "root.key")
    assert cfg.version_tracking.path == str(tmp_path / "abs.sqlite")
    assert cfg.audit.path == os.path.join(str(sub), "audit.log")
    assert load_config(path) == cfg


def test_parse_config_keeps_paths_as_given():
    assert parse_config({"audit": {"path": "logs/a.log"}}).audit.path == "logs/a.log"


# --------------------------------------------------------------- bad configs

BAD = [
    # (id, mapping, field, words in the message)
    ("unknown-top-level", {"datset": "x"}, "datset", "unknown key"),
    ("unknown-section-key", {"dek": {"scopes": "x"}}, "dek.scopes", "unknown key"),
    ("unknown-cmk-key", {"key_hierarchy": {"cmk": {"kms": "x"}}}, "key_hierarchy.cmk.kms", "unknown key"),
    ("non-string-key", {1: "x"}, "1", "strings"),
    ("section-not-mapping", {"dek": "big"}, "dek", "mapping"),
    ("int-as-string", {"key_hierarchy": {"rotation_interval_days": "90"}}, "key_hierarchy.rotation_interval_days", "integer"),
    ("int-as-float", {"lifecycle": {"dek_max_age_days": 1.5}}, "lifecycle.dek_max_age_days", "integer"),
    ("bool-as-int", {"audit": {"log_decrypt": 1}}, "audit.log_decrypt", "true or false"),
    ("bool-as-string", {"audit": {"log_encrypt": "yes"}}, "audit.log_encrypt", "true or false"),
    ("int-as-bool", {"lifecycle": {"max_concurrent_reencryption_workers": True}}, "lifecycle.max_concurrent_reencryption_workers", "integer"),
    ("dataset-as-int", {"dataset": 2024}, "dataset", "quote it"),
    ("dataset-as-date", {"dataset": datetime.date(2024, 1, 1)}, "dataset", "a date (quote it"),
    ("float-as-yaml-text", {"lifecycle": {"max_kms_requests_per_second": "1e3"}}, "lifecycle.max_kms_requests_per_second", "remove the quotes"),
    ("rotation-zero", {"key_hierarchy": {"rotation_interval_days": 0}}, "key_hierarchy.rotation_interval_days", ">= 1"),
    ("rotation-too-long", {"key_hierarchy": {"rotation_interval_days": 3651}}, "key_hierarchy.rotation_interval_days", "<= 3650"),
    ("pending-deletion-short", {"key_hierarchy": {"pending_deletion_days": 6}}, "key_hierarchy.pending_deletion_days", ">= 7"),
    ("pending-deletion-long", {"key_hierarchy": {"pending_deletion_days": 31}}, "key_hierarchy.pending_deletion_days", "<= 30"),
    ("transition-negative", {"key_hierarchy": {"transition_window_days": -1}}, "key_hierarchy.transition_window_days", ">= 0"),
    ("max-cells-zero", {"dek": {"max_cells": 0}}, "dek.max_cells", ">= 1"),
    ("max-cells-over-gcm-limit", {"dek": {"max_cells": 2**32 + 1}}, "dek.max_cells", "2**32"),
    ("max-bytes-zero", {"dek": {"max_bytes": 0}}, "dek.max_bytes", ">= 1"),
    ("workers-zero", {"lifecycle": {"max_concurrent_reencryption_workers": 0}}, "lifecycle.max_concurrent_reencryption_workers", ">= 1"),
    ("workers-too-many", {"lifecycle": {"max_concurrent_reencryption_workers": 257}}, "lifecycle.max_concurrent_reencryption_workers", "<= 256"),
    ("kms-rate-zero", {"lifecycle": {"max_kms_requests_per_second": 0}}, "lifecycle.max_kms_requests_per_second", "> 0"),
    ("kms-rate-inf", {"lifecycle": {"max_kms_requests_per_second": float("inf")}}, "lifecycle.max_kms_requests_per_second", "finite"),
    ("dek-age-zero", {"lifecycle": {"dek_max_age_days": 0}}, "lifecycle.dek_max_age_days", ">= 1"),
    ("huge-int", {"key_hierarchy": {"rotation_interval_days": 10**5000}}, "key_hierarchy.rotation_interval_days", "very large"),
    ("bad-mode", {"encryption": {"mode": "direct"}}, "encryption.mode", "'envelope'"),
    ("bad-algorithm", {"encryption": {"algorithm": "AES-128-CBC"}}, "encryption.algorithm", "'AES-256-GCM'"),
    ("iv-not-12", {"encryption": {"iv_bytes": 16}}, "encryption.iv_bytes", "must be 12"),
    ("bad-provider", {"key_hierarchy": {"cmk": {"provider": "vault"}}}, "key_hierarchy.cmk.provider", "'local' or 'aws_kms'"),
    ("removed-scope", {"dek": {"scope": "global"}}, "dek.scope", "was removed"),
    ("removed-auto-rotate", {"key_hierarchy": {"auto_rotate": True}}, "key_hierarchy.auto_rotate", "rotate --if-due"),
    ("transition-too-long", {"key_hierarchy": {"transition_window_days": 3651}}, "key_hierarchy.transition_window_days", "<= 3650"),
    ("bad-strategy", {"lifecycle": {"reencryption_strategy": "never"}}, "lifecycle.reencryption_strategy", "batch_lazy"),
    ("bad-rewrap-mode", {"lifecycle": {"rewrap_mode": "rotate"}}, "lifecycle.rewrap_mode", "reencrypt"),
    ("bad-storage", {"version_tracking": {"storage": "postgres"}}, "version_tracking.storage", "dynamodb"),
    ("bad-on-missing", {"version_tracking": {"on_missing_version": "guess"}}, "version_tracking.on_missing_version", "quarantine"),
    ("bad-on-unknown", {"version_tracking": {"on_unknown_version": "drop"}}, "version_tracking.on_unknown_version", "reject"),
    ("bad-sink", {"audit": {"sink": "stdout"}}, "audit.sink", "cloudwatch"),
    ("cache-plaintext-true", {"dek": {"cache_plaintext": True}}, "dek.cache_plaintext", "never cached"),
    ("aws-kms-without-key-id", {"key_hierarchy": {"cmk": {"provider": "aws_kms"}}}, "key_hierarchy.cmk.key_id", "required"),
    ("aws-kms-with-root-key-file", {"key_hierarchy": {"cmk": {"provider": "aws_kms", "key_id": "alias/k", "root_key_file": "r.key"}}}, "key_hierarchy.cmk.root_key_file", "local"),
    ("local-with-key-id", {"key_hierarchy": {"cmk": {"key_id": "alias/k"}}}, "key_hierarchy.cmk.key_id", "aws_kms"),
    ("local-with-region", {"key_hierarchy": {"cmk": {"region": "us-east-1"}}}, "key_hierarchy.cmk.region", "aws_kms"),
    ("cloudwatch-without-log-group", {"audit": {"sink": "cloudwatch"}}, "audit.log_group", "required"),
    ("file-sink-with-log-group", {"audit": {"log_group": "/g"}}, "audit.log_group", "cloudwatch"),
    ("dynamodb-without-table", {"version_tracking": {"storage": "dynamodb"}}, "version_tracking.table", "required"),
    ("sqlite-with-table", {"version_tracking": {"table": "keyturn"}}, "version_tracking.table", "dynamodb"),
    ("bad-table-name", {"version_tracking": {"storage": "dynamodb", "table": "a b"}}, "version_tracking.table", "DynamoDB"),
    ("bad-log-group", {"audit": {"sink": "cloudwatch", "log_group": "a:b"}}, "audit.log_group", "CloudWatch"),
    ("bad-log-stream", {"audit": {"sink": "cloudwatch", "log_group": "g", "log_stream": "a*"}}, "audit.log_stream", "':'"),
    ("bad-region", {"key_hierarchy": {"cmk": {"provider": "aws_kms", "key_id": "k", "region": "US East"}}}, "key_hierarchy.cmk.region", "region"),
    ("bad-endpoint", {"key_hierarchy": {"cmk": {"provider": "aws_kms", "key_id": "k", "endpoint_url": "ftp://x"}}}, "key_hierarchy.cmk.endpoint_url", "http"),
    ("key-id-with-space", {"key_hierarchy": {"cmk": {"provider": "aws_kms", "key_id": "alias/a b"}}}, "key_hierarchy.cmk.key_id", "spaces"),
    ("passphrase-in-env-field", {"key_hierarchy": {"cmk": {"passphrase_env": "correct horse!"}}}, "key_hierarchy.cmk.passphrase_env", "not the passphrase"),
    ("empty-keystore", {"key_hierarchy": {"cmk": {"keystore": ""}}}, "key_hierarchy.cmk.keystore", "empty"),
    ("empty-dataset", {"dataset": ""}, "dataset", "empty"),
    ("long-dataset", {"dataset": "d" * 201}, "dataset", "at most 200"),
    ("dataset-control-char", {"dataset": "sales\x00"}, "dataset", "control"),
    ("dataset-newline", {"dataset": "sales\nlake"}, "dataset", "control"),
    ("dataset-padded", {"dataset": " sales"}, "dataset", "whitespace"),
    ("path-with-nul", {"audit": {"path": "a\x00.log"}}, "audit.path", "control"),
]


@pytest.mark.parametrize(("mapping", "field", "words"), [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_config_names_the_field(mapping, field, words):
    with pytest.raises(ConfigError) as info:
        parse_config(mapping)
    err = info.value
    assert err.field == field
    assert words in err.problem
    assert "\n" not in str(err)
    assert "pydantic" not in str(err).lower()


def test_several_errors_report_the_first_and_count_the_rest():
    with pytest.raises(ConfigError) as info:
        parse_config({"lifecycle": {"dek_max_age_days": 0, "max_concurrent_reencryption_workers": 0, "rewrap_mode": "x"}})
    assert info.value.field == "lifecycle.rewrap_mode"
    assert info.value.problem.endswith("(and 2 more)")


def test_string_values_are_not_echoed():
    secret = "hunter2-is-my-passphrase"
    for mapping in (
        {"key_hierarchy": {"cmk": {"passphrase_env": secret + "!"}}},
        {"key_hierarchy": {"rotation_interval_days": secret}},
        {"dek": {secret: 1}},
    ):
        with pytest.raises(ConfigError) as info:
            parse_config(mapping)
        assert secret not in info.value.problem


@pytest.mark.parametrize("top", [[1, 2], "text", 42, True], ids=["list", "str", "int", "bool"])
def test_non_mapping_top_level(top):
    with pytest.raises(ConfigError) as info:
        parse_config(top)
    assert info.value.field == ROOT_FIELD


FILE_CASES = [
    ("yaml-syntax-error", "dek:\n  scope: [unclosed\n", FILE_FIELD, "YAML syntax error at line"),
    ("yaml-bad-indent", "dek:\n  scope: x\n max_cells: 3\n", FILE_FIELD, "YAML syntax error"),
    ("yaml-python-tag", "dataset: !!python/object/apply:os.system ['true']\n", FILE_FIELD, "YAML syntax error"),
    ("top-level-list", "- a\n- b\n", ROOT_FIELD, "mapping"),
    ("top-level-scalar", "just text\n", ROOT_FIELD, "mapping"),
    ("unknown-key-in-file", "dek:\n  max_cells: 10\n  cache: false\n", "dek.cache", "unknown key"),
    ("cache-plaintext-in-file", "dek:\n  cache_plaintext: true\n", "dek.cache_plaintext", "never cached"),
    ("yaml-string-number", "key_hierarchy:\n  rotation_interval_days: '90'\n", "key_hierarchy.rotation_interval_days", "integer"),
    ("yaml-date-dataset", "dataset: 2024-01-01\n", "dataset", "quote it"),
    ("yaml-1e3-is-text", "lifecycle:\n  max_kms_requests_per_second: 1e3\n", "lifecycle.max_kms_requests_per_second", "1.0e+3"),
    ("yaml-too-deep", "dek: " + "[" * 20000 + "]" * 20000 + "\n", FILE_FIELD, "nested too deeply"),
]


@pytest.mark.parametrize(("text", "field", "words"), [c[1:] for c in FILE_CASES], ids=[c[0] for c in FILE_CASES])
def test_bad_file_names_the_field(tmp_path, text, field, words):
    with pytest.raises(ConfigError) as info:
        load_config(_write(tmp_path, text))
    assert info.value.field == field
    assert words in info.value.problem
    assert "\n" not in str(info.value)


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "nope.yaml")
    assert info.value.field == FILE_FIELD
    assert "not found" in info.value.problem


def test_directory_instead_of_file(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path)
    assert info.value.field == FILE_FIELD


@pytest.mark.parametrize("bad", [0, None, b"keyturn.yaml", "bad\x00name.yaml"], ids=["fd-int", "none", "bytes", "nul-in-path"])
def test_bad_path_argument(bad):
    with pytest.raises(ConfigError) as info:
        load_config(bad)  # type: ignore[arg-type]
    assert info.value.field == FILE_FIELD


def test_oversized_file(tmp_path):
    path = tmp_path / "big.yaml"
    path.write_bytes(b"#" * (MAX_CONFIG_BYTES + 1))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.field == FILE_FIELD


def test_undecodable_file(tmp_path):
    path = tmp_path / "bin.yaml"
    path.write_bytes(b"dataset: \xff\xfe\xfa\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.field == FILE_FIELD


def test_config_error_is_a_value_error():
    with pytest.raises(ValueError):
        parse_config({"nope": 1})


# ----------------------------------------------------------------- round trip

ROUND_TRIP = [
    ("defaults", {}),
    (
        "aws",
        {
            "dataset": "sales-2024",
            "key_hierarchy": {
                "cmk": {"provider": "aws_kms", "key_id": "alias/k", "region": "eu-west-1", "endpoint_url": "https://kms.example"},
                "transition_window_days": 30,
            },
            "version_tracking": {"storage": "dynamodb", "table": "reg.v1", "on_missing_version": "reject"},
            "audit": {"sink": "cloudwatch", "log_group": "/k/a", "log_stream": "s", "log_decrypt": False},
            "lifecycle": {"max_kms_requests_per_second": 0.25, "rewrap_mode": "auto"},
            "dek": {"max_cells": 1, "max_bytes": 2**40},
        },
    ),
    ("yaml-lookalike-strings", {"dataset": "null", "audit": {"path": "true"}, "version_tracking": {"path": "0x10"}}),
    ("unicode-dataset", {"dataset": "données – 売上 🔑", "key_hierarchy": {"cmk": {"keystore": "ключи/ks.json", "root_key_file": "#r: k"}}}),
]


@pytest.mark.parametrize("mapping", [r[1] for r in ROUND_TRIP], ids=[r[0] for r in ROUND_TRIP])
def test_dump_round_trip(mapping, tmp_path):
    cfg = parse_config(mapping)
    text = dump_config(cfg)
    assert parse_config(yaml.safe_load(text)) == cfg
    # Through a file too: absolute paths stay as they are.
    absolute = resolve_paths(cfg, tmp_path)
    assert load_config(_write(tmp_path, dump_config(absolute))) == absolute


_safe_text = st.text(
    alphabet=st.characters(blacklist_categories=("Cc", "Cs", "Zl", "Zp")), min_size=1, max_size=40
)


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
@given(dataset=_safe_text.map(str.strip).filter(bool), path=_safe_text, rate=st.floats(min_value=1e-6, max_value=1e9))
def test_dump_round_trip_property(dataset, path, rate):
    cfg = parse_config({"dataset": dataset, "audit": {"path": path}, "lifecycle": {"max_kms_requests_per_second": rate}})
    assert parse_config(yaml.safe_load(dump_config(cfg))) == cfg


def test_dump_rejects_non_config():
    with pytest.raises(ConfigError):
        dump_config({"dataset": "x"})  # type: ignore[arg-type]


# ------------------------------------------------------ only ConfigError, ever

_ALL_KEYS = sorted({part for f in _fields(KeyturnConfig) for part in f.split(".")})
_CHOICES = ["local", "aws_kms", "dynamodb", "cloudwatch", "sqlite", "file", "none", "auto", "eager", "envelope", "AES-256-GCM", "partition_batch"]

_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=30),
    st.sampled_from(_CHOICES),
    st.binary(max_size=8),
)
_keys = st.one_of(st.sampled_from(_ALL_KEYS), st.text(max_size=10), st.integers(), st.none(), st.booleans())
_values = st.recursive(
    _scalars,
    lambda children: st.one_of(st.lists(children, max_size=4), st.dictionaries(_keys, children, max_size=6)),
    max_leaves=30,
)


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(st.dictionaries(_keys, _values, max_size=8), _values))
def test_random_input_only_raises_config_error(raw):
    try:
        cfg = parse_config(raw)
    except ConfigError as err:
        assert err.field
        assert "\n" not in str(err)
    else:
        assert isinstance(cfg, KeyturnConfig)
        assert parse_config(yaml.safe_load(dump_config(cfg))) == cfg


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(st.binary(max_size=200) | st.text(max_size=200).map(lambda t: t.encode("utf-8")))
def test_random_files_only_raise_config_error(tmp_path, data):
    path = tmp_path / "fuzz.yaml"
    path.write_bytes(data)
    try:
        load_config(path)
    except ConfigError as err:
        assert "\n" not in str(err)


@pytest.mark.parametrize("dotted", _fields(KeyturnConfig))
def test_every_field_rejects_a_list(dotted):
    with pytest.raises(ConfigError) as info:
        parse_config(_nested(dotted, [1]))
    assert info.value.field == dotted
