"""keyturn's YAML configuration: frozen pydantic models plus load, parse and dump.

The file follows the usual envelope-encryption template, in seven parts:
`dataset`, `encryption`, `key_hierarchy`, `dek`, `lifecycle`,
`version_tracking` and `audit`, plus an optional `lake` section (how S3
lakes are reached). Every field has a default, so an empty file
(or `{}`) is a valid config for the embedded local setup: a local keystore,
a SQLite registry and a file audit log. `docs/config.example.yaml` lists and
explains every field.

Contracts:

- `load_config`, `parse_config` and `dump_config` raise only
  `keyturn.errors.ConfigError`, exactly one per call. Its `field` is the
  dotted path of the culprit (`"dek.cache_plaintext"`), or `"<file>"` for
  an unreadable file or bad YAML, or `"<root>"` when the top level is not
  a mapping. Its message is one line. When several fields are wrong, the
  first is reported and the message ends `(and N more)`.
- Messages name the type of a bad value but never echo a string value (a
  passphrase pasted into the wrong field must not reach a log). Choices
  (enums) are the exception, so a typo is easy to spot.
- Types are strict: `"90"` is not an integer and `"yes"` (quoted) is not a
  boolean. A section left empty in YAML (`dek:` with nothing under it) means
  "all defaults".
- An optional setting that only another choice uses is an error, so a
  half-switched config fails loudly: `key_id`, `region` and `endpoint_url`
  need provider `aws_kms`; `root_key_file` needs provider `local`; `table`
  needs storage `dynamodb`; `log_group` and `log_stream` need sink
  `cloudwatch`.
- `load_config` resolves relative paths (`key_hierarchy.cmk.keystore`,
  `key_hierarchy.cmk.root_key_file`, `version_tracking.path`, `audit.path`)
  against the directory that holds the config file, so the result does not
  depend on the working directory. `~` is not expanded. `parse_config`
  leaves paths as given.
- YAML is read with `yaml.safe_load` only. Note that PyYAML keeps the last
  of two duplicate keys without complaint.

Build configs with `parse_config` or `load_config`; constructing the models
directly raises pydantic's `ValidationError` instead of `ConfigError`.

Every field is read by some code outside this module (the test
`tests/test_config_settings_used.py` fails otherwise), except the
`DECLARATIONS`: fields that allow exactly one value and exist so a file states
a fixed choice out loud (or so a config asking for something keyturn refuses
fails loudly). Settings that were removed because nothing ever read them are
listed in `REMOVED_FIELDS`: a file that still sets one to the value it always
behaved as (its old default, which earlier `keyturn init` wrote into every
home's config.yaml) loads, with a `DeprecationWarning`, and the field is
dropped; any other value is a `ConfigError` naming the field and saying why.
"""

from __future__ import annotations

import datetime
import math
import os
import re
import unicodedata
import warnings
from collections.abc import Callable, Mapping
from typing import Annotated, Any, Literal

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import PydanticCustomError

from keyturn.errors import ConfigError
from keyturn.format import NONCE_BYTES

__all__ = [
    "KeyturnConfig",
    "EncryptionConfig",
    "KeyHierarchyConfig",
    "CmkConfig",
    "DekConfig",
    "LifecycleConfig",
    "VersionTrackingConfig",
    "AuditConfig",
    "LakeConfig",
    "load_config",
    "parse_config",
    "dump_config",
    "default_config",
    "resolve_paths",
    "map_paths",
    "MAX_CONFIG_BYTES",
    "FILE_FIELD",
    "ROOT_FIELD",
    "DECLARATIONS",
    "REMOVED_FIELDS",
]

FILE_FIELD = "<file>"
ROOT_FIELD = "<root>"
MAX_CONFIG_BYTES = 1 << 20
"""A config file larger than this (1 MiB) is refused unread."""

DECLARATIONS: dict[str, str] = {
    "encryption.mode": "fixed: keyturn only does envelope encryption (a DEK per scope, wrapped by the KEK)",
    "encryption.algorithm": "fixed: every cell and every locally wrapped DEK is AES-256-GCM (docs/FORMAT.md)",
    "encryption.iv_bytes": "fixed: the nonce length of the wire format (keyturn.format.NONCE_BYTES)",
    "dek.cache_plaintext": "a refusal: only false is allowed, plaintext DEKs never outlive their scope",
}
"""Fields no code reads on purpose: each allows exactly one value, so it can promise nothing it does not do."""

REMOVED_FIELDS: dict[str, tuple[Any, str]] = {
    "key_hierarchy.auto_rotate": (
        False,
        "keyturn runs no scheduler and this setting never rotated anything; run `keyturn rotate --if-due` "
        "from a scheduler (cron, Airflow, ...) to rotate every rotation_interval_days",
    ),
    "dek.scope": (
        "partition_bundle",
        "a DEK always covers one partition within one bundle (the jobs group a partition's rows with "
        "PartitionBatches before encrypting), and 'partition_batch' never changed that",
    ),
}
"""Settings that were removed: dotted field -> (the value it always behaved as, why it went)."""

# AES-GCM with random 96-bit nonces: NIST SP 800-38D caps one key at 2**32 encryptions.
_MAX_GCM_INVOCATIONS = 2**32

_FORBIDDEN_CATEGORIES = frozenset({"Cc", "Cs", "Zl", "Zp"})
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,254}")
_REGION = re.compile(r"[a-z0-9]+(-[a-z0-9]+)*")
_DYNAMODB_TABLE = re.compile(r"[A-Za-z0-9_.\-]{3,255}")
_LOG_GROUP = re.compile(r"[A-Za-z0-9_.\-/#]{1,512}")


def _problem(message: str) -> PydanticCustomError:
    """A field-level problem whose message is shown verbatim."""
    return PydanticCustomError("keyturn_value", message)


def _cross_field(field: str, message: str) -> PydanticCustomError:
    """A problem found by a model validator, blamed on the model's `field`."""
    return PydanticCustomError("keyturn_cross_field", message, {"field": field})


def _clean_text(value: str, *, max_len: int = 4096) -> str:
    """Reject empty, over-long, control-character or surrogate text; return it unchanged."""
    if not value:
        raise _problem("must not be empty")
    if len(value) > max_len:
        raise _problem(f"must be at most {max_len} characters, got {len(value)}")
    if any(unicodedata.category(ch) in _FORBIDDEN_CATEGORIES for ch in value):
        raise _problem("must not contain control characters, line breaks or lone surrogates")
    return value


def _optional_path(value: str | None) -> str | None:
    return None if value is None else _clean_text(value)


def _checked(ok: Callable[[str], Any], message: str, *, max_len: int | None = None) -> AfterValidator:
    """A validator for optional text: None passes, else `ok(value)` must hold (after `_clean_text` if `max_len`)."""

    def check(value: str | None) -> str | None:
        if value is None:
            return None
        if max_len is not None:
            _clean_text(value, max_len=max_len)
        if not ok(value):
            raise _problem(message)
        return value

    return AfterValidator(check)


_Path = Annotated[str, AfterValidator(_clean_text)]
_OptionalPath = Annotated[str | None, AfterValidator(_optional_path)]
_HttpUrl = Annotated[
    str | None,
    _checked(
        lambda v: v.startswith(("http://", "https://")) and not any(ch.isspace() for ch in v),
        "must be an http:// or https:// URL without spaces",
        max_len=2048,
    ),
]
_AwsRegion = Annotated[
    str | None, _checked(lambda v: len(v) <= 64 and _REGION.fullmatch(v), "must be an AWS region name such as us-east-1")
]


def _none_means_defaults(value: Any) -> Any:
    """A YAML section with nothing under it loads as None; treat it as `{}`."""
    return {} if value is None else value


def _drop_removed(section: str, value: Any) -> Any:
    """Drop the `REMOVED_FIELDS` of `section` that keep the value they always behaved as; refuse any other value."""
    if not isinstance(value, Mapping):
        return value
    kept_value = dict(value)
    for dotted, (old, why) in REMOVED_FIELDS.items():
        where, name = dotted.rsplit(".", 1)
        if where != section or name not in kept_value:
            continue
        given = kept_value.pop(name)
        if type(given) is not type(old) or given != old:
            # never echo the value: a string pasted into the wrong field must not reach a log
            raise _cross_field(name, f"was removed: {why}; delete this line")
        warnings.warn(
            f"config field {dotted!r} was removed and is ignored ({why}); delete it from the file",
            DeprecationWarning,
            stacklevel=2,
        )
    return kept_value


class EncryptionConfig(BaseModel):
    """How payloads are encrypted. Fixed for now; present so files say it out loud."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    mode: Literal["envelope"] = "envelope"
    algorithm: Literal["AES-256-GCM"] = "AES-256-GCM"
    iv_bytes: int = 12
    # row-key columns bound into every cell by `keyturn encrypt` / `ingest` (None: the dataset contract's)
    bind_columns: list[str] | None = None

    @field_validator("bind_columns", mode="before")
    @classmethod
    def _bind_names(cls, value: Any) -> Any:
        if value is None or (
            isinstance(value, list) and all(isinstance(n, str) and n.strip() for n in value) and len(set(value)) == len(value)
        ):
            return value
        raise _problem("must be a list of distinct, non-empty column names (strings), or null")

    @field_validator("iv_bytes")
    @classmethod
    def _iv_is_12(cls, value: int) -> int:
        if value != NONCE_BYTES:
            raise _problem(f"must be {NONCE_BYTES} (the AES-GCM nonce length keyturn writes), got {value}")
        return value


class CmkConfig(BaseModel):
    """The customer master key (KEK) that wraps every DEK, and where it lives."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    provider: Literal["local", "aws_kms"] = "local"
    # provider: local
    keystore: _Path = "keystore.json"
    root_key_file: _OptionalPath = None
    passphrase_env: str = "KEYTURN_PASSPHRASE"
    # provider: aws_kms
    key_id: Annotated[
        str | None,
        _checked(lambda v: not any(ch.isspace() for ch in v), "must be a KMS key ARN, key id or alias, without spaces", max_len=2048),
    ] = None
    region: _AwsRegion = None
    endpoint_url: _HttpUrl = None

    @field_validator("passphrase_env")
    @classmethod
    def _env_name(cls, value: str) -> str:
        if not _ENV_NAME.fullmatch(value):
            raise _problem(
                "must be the name of an environment variable (letters, digits and '_', "
                "not starting with a digit), not the passphrase itself"
            )
        return value

    @model_validator(mode="after")
    def _provider_fields(self) -> CmkConfig:
        if self.provider == "aws_kms":
            if self.key_id is None:
                raise _cross_field("key_id", "is required when provider is 'aws_kms'")
            if self.root_key_file is not None:
                raise _cross_field("root_key_file", "is only used by provider 'local'")
        else:
            for name in ("key_id", "region", "endpoint_url"):
                if getattr(self, name) is not None:
                    raise _cross_field(name, "is only used by provider 'aws_kms'")
        return self


class KeyHierarchyConfig(BaseModel):
    """The KEK and the rotation policy around it.

    `rotation_interval_days` is what `keyturn rotate --if-due` follows;
    `pending_deletion_days` is `schedule-deletion`'s default;
    `transition_window_days` is how long `keyturn retire` refuses a version
    after it left the active state (`keyturn.rotation.retire`).
    """

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    cmk: CmkConfig = Field(default_factory=CmkConfig)
    rotation_interval_days: int = Field(90, ge=1, le=3650)
    pending_deletion_days: int = Field(30, ge=7, le=30)
    transition_window_days: int = Field(0, ge=0, le=3650)

    @model_validator(mode="before")
    @classmethod
    def _removed(cls, value: Any) -> Any:
        return _drop_removed("key_hierarchy", value)

    @field_validator("cmk", mode="before")
    @classmethod
    def _empty_section(cls, value: Any) -> Any:
        return _none_means_defaults(value)


class DekConfig(BaseModel):
    """Data keys: one per partition scope (one partition within one bundle), with hard usage caps."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    max_cells: int = Field(2**32, ge=1)
    max_bytes: int = Field(2**36, ge=1)
    cache_plaintext: bool = False

    @model_validator(mode="before")
    @classmethod
    def _removed(cls, value: Any) -> Any:
        return _drop_removed("dek", value)

    @field_validator("max_cells")
    @classmethod
    def _gcm_limit(cls, value: int) -> int:
        if value > _MAX_GCM_INVOCATIONS:
            raise _problem(
                f"must be at most 2**32 (the AES-GCM limit for random nonces under one key), got {value}"
            )
        return value

    @field_validator("cache_plaintext")
    @classmethod
    def _never_cache(cls, value: bool) -> bool:
        if value:
            raise _problem("must be false: plaintext keys are never cached beyond a scope")
        return value


class LifecycleConfig(BaseModel):
    """How data moves onto the current key after a rotation.

    `reencryption_strategy`: ``eager`` (`keyturn rotate` re-wraps the whole
    DEK directory at once), ``lazy`` (readers re-wrap the stale DEKs they
    read: `keyturn decrypt`, `DecryptBatches(..., rewrap_stale=True)`), or
    ``batch_lazy`` (nothing moves until a bounded job runs: `keyturn rewrap
    --max-deks`, `keyturn reencrypt --max-files`).

    `max_kms_requests_per_second`: the most requests per second one process
    sends to the KMS, counted once over every KMS call it makes, whatever
    the command or job (CLI verbs, encrypt, decrypt, ingest, rewrap,
    reencrypt, every DoFn instance and thread) and whatever the backend.
    The key source's ``open_kms()`` applies it through one token bucket per
    KMS per process (`keyturn.kms.decorators.process_bucket`), burst equal
    to one second's worth: on ``local`` each GenerateDataKey, Decrypt and
    ReEncrypt takes a token; on ``aws_kms`` each HTTP attempt does
    (retries and DescribeKey included). N worker processes may reach N
    times the rate together.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    reencryption_strategy: Literal["eager", "lazy", "batch_lazy"] = "batch_lazy"
    rewrap_mode: Literal["rewrap", "reencrypt", "auto"] = "reencrypt"
    max_concurrent_reencryption_workers: int = Field(4, ge=1, le=256)
    max_kms_requests_per_second: float = Field(50.0, gt=0, allow_inf_nan=False)
    dek_max_age_days: int = Field(365, ge=1)


class VersionTrackingConfig(BaseModel):
    """Where key versions are registered, and what readers do with rows they cannot place.

    `on_missing_version` / `on_unknown_version`: ``quarantine`` routes such
    rows to the version-mismatch side output (exit code 3 for `keyturn
    decrypt`); ``reject`` raises `keyturn.errors.VersionMismatchError`
    (`keyturn.policy.VersionRules`).
    """

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    storage: Literal["sqlite", "dynamodb"] = "sqlite"
    path: _Path = "registry.sqlite"
    table: Annotated[str | None, _checked(_DYNAMODB_TABLE.fullmatch, "must be a DynamoDB table name: 3..255 of A-Z a-z 0-9 _ . -")] = None
    on_missing_version: Literal["quarantine", "reject"] = "quarantine"
    on_unknown_version: Literal["quarantine", "reject"] = "quarantine"

    @model_validator(mode="after")
    def _storage_fields(self) -> VersionTrackingConfig:
        if self.storage == "dynamodb" and self.table is None:
            raise _cross_field("table", "is required when storage is 'dynamodb'")
        if self.storage != "dynamodb" and self.table is not None:
            raise _cross_field("table", "is only used by storage 'dynamodb'")
        return self


class AuditConfig(BaseModel):
    """Where structured audit events go, and which ones are written."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    sink: Literal["file", "cloudwatch", "none"] = "file"
    path: _Path = "audit.log"
    log_group: Annotated[
        str | None, _checked(_LOG_GROUP.fullmatch, "must be a CloudWatch log group name: 1..512 of A-Z a-z 0-9 _ . - / #")
    ] = None
    log_stream: Annotated[
        str | None,
        _checked(lambda v: ":" not in v and "*" not in v, "must not contain ':' or '*' (CloudWatch log stream rules)", max_len=512),
    ] = None
    log_decrypt: bool = True
    log_encrypt: bool = True
    include_kms_request_ids: bool = True

    @model_validator(mode="after")
    def _sink_fields(self) -> AuditConfig:
        if self.sink == "cloudwatch" and self.log_group is None:
            raise _cross_field("log_group", "is required when sink is 'cloudwatch'")
        if self.sink != "cloudwatch":
            for name in ("log_group", "log_stream"):
                if getattr(self, name) is not None:
                    raise _cross_field(name, "is only used by sink 'cloudwatch'")
        return self


class LakeConfig(BaseModel):
    """How lakes on S3 are reached and locked (local lakes need none of it). --s3-endpoint-url overrides the endpoint."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    s3_endpoint_url: Annotated[
        _HttpUrl,
        _checked(
            lambda v: "/" not in v.split("://", 1)[1].rstrip("/") and "?" not in v,
            "must be a scheme and host[:port] only, without a path",
        ),
    ] = None
    s3_region: _AwsRegion = None
    lock_lease_seconds: float = Field(120.0, ge=3, le=3600, allow_inf_nan=False)


class KeyturnConfig(BaseModel):
    """The whole configuration; `default_config()` is the embedded local setup."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    dataset: str = "default"
    encryption: EncryptionConfig = Field(default_factory=EncryptionConfig)
    key_hierarchy: KeyHierarchyConfig = Field(default_factory=KeyHierarchyConfig)
    dek: DekConfig = Field(default_factory=DekConfig)
    lifecycle: LifecycleConfig = Field(default_factory=LifecycleConfig)
    version_tracking: VersionTrackingConfig = Field(default_factory=VersionTrackingConfig)
    audit: AuditConfig = Field(default_factory=AuditConfig)
    lake: LakeConfig = Field(default_factory=LakeConfig)

    @field_validator("encryption", "key_hierarchy", "dek", "lifecycle", "version_tracking", "audit", "lake", mode="before")
    @classmethod
    def _empty_section(cls, value: Any) -> Any:
        return _none_means_defaults(value)

    @field_validator("dataset")
    @classmethod
    def _dataset(cls, value: str) -> str:
        _clean_text(value, max_len=200)
        if value != value.strip():
            raise _problem("must not start or end with whitespace (it is bound into every ciphertext)")
        return value


# ---------------------------------------------------------------- public API


def default_config() -> KeyturnConfig:
    """The configuration an empty file gives: local keystore, SQLite registry, file audit."""
    return KeyturnConfig()


def parse_config(mapping: Any) -> KeyturnConfig:
    """Validate a mapping (as loaded from YAML); raise one `ConfigError` on any problem.

    `None` counts as an empty mapping. Paths are kept as given.
    """
    if mapping is None:
        mapping = {}
    if not isinstance(mapping, Mapping):
        raise ConfigError(ROOT_FIELD, f"the top level must be a mapping of sections, got {_type_name(mapping)}")
    try:
        return KeyturnConfig.model_validate(dict(mapping))
    except ValidationError as exc:
        raise _to_config_error(exc) from None
    except RecursionError:
        raise ConfigError(ROOT_FIELD, "the config is nested too deeply") from None


def load_config(path: str | os.PathLike[str]) -> KeyturnConfig:
    """Read, parse and validate a YAML config file; raise one `ConfigError` on any problem.

    Relative paths inside the file are resolved against the file's directory.
    """
    if not isinstance(path, str | os.PathLike) or isinstance(os.fspath(path), bytes):
        raise ConfigError(FILE_FIELD, f"the config path must be a str or path, got {_type_name(path)}")
    try:
        with open(path, "rb") as fh:
            data = fh.read(MAX_CONFIG_BYTES + 1)
    except FileNotFoundError:
        raise ConfigError(FILE_FIELD, f"config file not found: {os.fspath(path)!r}") from None
    except (OSError, ValueError) as exc:
        reason = getattr(exc, "strerror", None) or type(exc).__name__
        raise ConfigError(FILE_FIELD, f"cannot read config file {os.fspath(path)!r}: {reason}") from None
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError(FILE_FIELD, f"config file is larger than {MAX_CONFIG_BYTES} bytes")
    try:
        raw = yaml.safe_load(data)
    except yaml.MarkedYAMLError as exc:
        raise ConfigError(FILE_FIELD, _yaml_message(exc)) from None
    except yaml.YAMLError as exc:
        raise ConfigError(FILE_FIELD, f"cannot parse YAML: {_one_line(str(exc))}") from None
    except RecursionError:
        raise ConfigError(FILE_FIELD, "cannot parse YAML: nested too deeply") from None
    cfg = parse_config(raw)
    return resolve_paths(cfg, os.path.dirname(os.path.abspath(path)))


def resolve_paths(cfg: KeyturnConfig, base_dir: str | os.PathLike[str]) -> KeyturnConfig:
    """Return `cfg` with every relative file path joined onto `base_dir`; absolute paths stay."""
    base = os.fspath(base_dir)
    return map_paths(cfg, lambda p: p if p is None or os.path.isabs(p) else os.path.join(base, p))


def map_paths(cfg: KeyturnConfig, change: Callable[[str | None], str | None]) -> KeyturnConfig:
    """Return `cfg` with each file path that `load_config` resolves replaced by `change(path)`."""
    kh = cfg.key_hierarchy
    cmk = kh.cmk.model_copy(update={"keystore": change(kh.cmk.keystore), "root_key_file": change(kh.cmk.root_key_file)})
    return cfg.model_copy(
        update={
            "key_hierarchy": kh.model_copy(update={"cmk": cmk}),
            "version_tracking": cfg.version_tracking.model_copy(update={"path": change(cfg.version_tracking.path)}),
            "audit": cfg.audit.model_copy(update={"path": change(cfg.audit.path)}),
        }
    )


def dump_config(cfg: KeyturnConfig) -> str:
    """Serialise `cfg` as YAML that `parse_config(yaml.safe_load(...))` turns back into an equal config."""
    if not isinstance(cfg, KeyturnConfig):
        raise ConfigError(ROOT_FIELD, f"expected a KeyturnConfig, got {_type_name(cfg)}")
    return yaml.safe_dump(cfg.model_dump(mode="python"), sort_keys=False, default_flow_style=False, width=1000)


# ------------------------------------------------------ error translation

_TYPE_WORDS = {
    "int_type": "an integer",
    "float_type": "a number",
    "bool_type": "true or false",
    "string_type": "a string",
    "model_type": "a mapping (a YAML section)",
    "dict_type": "a mapping",
}

_BOUNDS = {
    "greater_than": ("gt", ">"),
    "greater_than_equal": ("ge", ">="),
    "less_than": ("lt", "<"),
    "less_than_equal": ("le", "<="),
}


def _to_config_error(exc: ValidationError) -> ConfigError:
    """Turn pydantic's report into one ConfigError about its first problem."""
    errors = exc.errors(include_url=False)
    first = errors[0]
    loc = tuple(first["loc"])
    ctx = first.get("ctx") or {}
    if first["type"] == "keyturn_cross_field":
        loc += (ctx["field"],)
    field = ".".join(str(part) for part in loc) or ROOT_FIELD
    message = _message(first, loc)
    if len(errors) > 1:
        message += f" (and {len(errors) - 1} more)"
    return ConfigError(field, _one_line(message))


def _message(err: Mapping[str, Any], loc: tuple[Any, ...]) -> str:
    kind = err["type"]
    ctx = err.get("ctx") or {}
    value = err.get("input")
    if kind == "extra_forbidden":
        allowed = _allowed_keys(loc[:-1])
        return "unknown key" + (f"; allowed here: {', '.join(allowed)}" if allowed else "")
    if kind == "invalid_key":
        return "keys must be strings"
    if kind == "missing":
        return "is required"
    if kind in _TYPE_WORDS:
        hint = ""
        if kind == "string_type" and not isinstance(value, (str, list, dict)) and value is not None:
            hint = " (quote it in YAML)"
        elif kind in ("int_type", "float_type") and isinstance(value, str) and _looks_numeric(value):
            hint = " (remove the quotes; note YAML reads 1e3 as text, write 1000 or 1.0e+3)"
        return f"expected {_TYPE_WORDS[kind]}, got {_type_name(value)}{hint}"
    if kind == "literal_error":
        return f"must be {ctx.get('expected', 'one of the allowed values')}, got {_short_repr(value, echo_strings=True)}"
    if kind in _BOUNDS:
        key, op = _BOUNDS[kind]
        return f"must be {op} {ctx.get(key)}, got {_short_repr(value)}"
    if kind == "finite_number":
        return "must be a finite number"
    return err["msg"]  # our own messages (keyturn_value, keyturn_cross_field) and anything else


def _model_at(loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """The model class that validates the mapping at `loc`, if any."""
    model: type[BaseModel] = KeyturnConfig
    for part in loc:
        info = model.model_fields.get(part) if isinstance(part, str) else None
        ann = info.annotation if info is not None else None
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return None
        model = ann
    return model


def _allowed_keys(loc: tuple[Any, ...]) -> list[str]:
    model = _model_at(loc)
    return list(model.model_fields) if model is not None else []


def _looks_numeric(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, datetime.datetime):
        return "a timestamp"
    if isinstance(value, datetime.date):
        return "a date"
    return {
        int: "an integer",
        float: "a number",
        str: "a string",
        bytes: "binary data",
        list: "a list",
        dict: "a mapping",
    }.get(type(value), type(value).__name__)


def _short_repr(value: Any, *, echo_strings: bool = False) -> str:
    """Show numbers, booleans and null; show strings only when asked and short."""
    if value is None or isinstance(value, bool) or (isinstance(value, float) and not math.isfinite(value)):
        return repr(value)
    if isinstance(value, int) and abs(value) >= 10**30:
        return "a very large integer"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str) and echo_strings and len(value) <= 40:
        return repr(value)
    return _type_name(value)


def _yaml_message(exc: yaml.MarkedYAMLError) -> str:
    mark = exc.problem_mark or exc.context_mark
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    problem = exc.problem or exc.context or "invalid YAML"
    return f"YAML syntax error{where}: {_one_line(problem)}"


def _one_line(text: str) -> str:
    return " ".join(text.split())
