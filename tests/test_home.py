"""keyturn.home.KeyHome: init lays out a working home; open validates it with one clear error each."""

from __future__ import annotations

import os
import pickle
import stat
from datetime import datetime, timezone

import pytest
import yaml

from keyturn.audit.chain import verify_chain
from keyturn.errors import ConfigError, HomeError, KeystoreError, RegistryError
from keyturn.keysource import LocalKeySource
from keyturn.registry.base import KeyState
from keyturn.scope import DekScope, Location
from keyturn.home import HOME_FILES, KeyHome, default_home

T0 = datetime(2025, 3, 1, tzinfo=timezone.utc)


@pytest.fixture
def home(tmp_path) -> KeyHome:
    return KeyHome.init(tmp_path / "home", dataset="customers", clock=lambda: T0)


def test_init_lays_out_every_file(home):
    assert sorted(n for n in os.listdir(home.path) if n in HOME_FILES) == sorted(HOME_FILES)
    assert stat.S_IMODE(os.stat(os.path.join(home.path, "root.key")).st_mode) == 0o600
    assert os.path.getsize(os.path.join(home.path, "root.key")) == 32
    assert stat.S_IMODE(os.stat(os.path.join(home.path, "keystore.json")).st_mode) == 0o600
    assert home.dataset == "customers"
    [v1] = home.registry().versions()
    assert (v1.version, v1.kek_id, v1.state, v1.created_at) == (1, "kek-0001", KeyState.ACTIVE, T0)
    with home.kms() as kms:
        assert kms.kek_ids() == ["kek-0001"]


def test_config_file_uses_relative_paths(home):
    with open(os.path.join(home.path, "config.yaml")) as f:
        raw = yaml.safe_load(f)
    assert raw["dataset"] == "customers"
    assert raw["key_hierarchy"]["cmk"]["keystore"] == "keystore.json"
    assert raw["key_hierarchy"]["cmk"]["root_key_file"] == "root.key"
    assert raw["version_tracking"]["path"] == "registry.sqlite"
    assert raw["audit"]["path"] == "audit.log"
    # ...so a moved home still opens.
    moved = os.path.join(os.path.dirname(home.path), "moved")
    os.rename(home.path, moved)
    again = KeyHome.open(moved)
    assert again.config.version_tracking.path == os.path.join(moved, "registry.sqlite")


def test_init_records_first_version_in_audit_log(home):
    [entry] = home.chain().entries()
    assert (entry.event.action.value, entry.event.version_from, entry.event.version_to) == ("rotate", None, 1)
    assert entry.event.dataset == "customers"
    assert verify_chain(home.config.audit.path) == 1


def test_init_refuses_existing_home(home):
    with open(os.path.join(home.path, "root.key"), "rb") as f:
        before = f.read()
    with pytest.raises(HomeError, match="already holds a key home"):
        KeyHome.init(home.path)
    with open(os.path.join(home.path, "root.key"), "rb") as f:
        assert f.read() == before


def test_init_refuses_a_single_leftover_file(tmp_path):
    (tmp_path / "h").mkdir()
    (tmp_path / "h" / "keystore.json").write_text("{}")
    with pytest.raises(HomeError, match="keystore.json"):
        KeyHome.init(tmp_path / "h")
    assert os.listdir(tmp_path / "h") == ["keystore.json"]


def test_init_into_existing_empty_dir_and_bad_options(tmp_path):
    (tmp_path / "empty").mkdir()
    KeyHome.init(tmp_path / "empty", rotation_interval_days=30)
    assert KeyHome.open(tmp_path / "empty").config.key_hierarchy.rotation_interval_days == 30
    with pytest.raises(ConfigError, match="rotation_interval_days"):
        KeyHome.init(tmp_path / "bad", rotation_interval_days=0)
    assert not os.path.exists(tmp_path / "bad")
    (tmp_path / "file").write_text("x")
    with pytest.raises(HomeError, match="not a directory"):
        KeyHome.init(tmp_path / "file")


def test_open_missing_home(tmp_path):
    with pytest.raises(HomeError, match="keyturn init"):
        KeyHome.open(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(HomeError, match="config.yaml not found"):
        KeyHome.open(tmp_path / "empty")


@pytest.mark.parametrize(
    "name, error, words",
    [
        ("config.yaml", HomeError, "incomplete"),
        ("root.key", HomeError, "root key file"),
        ("keystore.json", HomeError, "keystore"),
        ("registry.sqlite", HomeError, "registry"),
        ("audit.log", HomeError, "audit log"),
    ],
)
def test_open_names_the_missing_file(home, name, error, words):
    os.remove(os.path.join(home.path, name))
    with pytest.raises(error, match=words):
        KeyHome.open(home.path)


def test_open_rejects_loose_root_key_mode(home):
    os.chmod(os.path.join(home.path, "root.key"), 0o644)
    with pytest.raises(HomeError, match="0600"):
        KeyHome.open(home.path)


def test_open_rejects_wrong_root_key(home, tmp_path):
    other = KeyHome.init(tmp_path / "other")
    os.replace(os.path.join(other.path, "root.key"), os.path.join(home.path, "root.key"))
    with pytest.raises(KeystoreError):
        KeyHome.open(home.path)


def test_open_rejects_bad_config(home):
    path = os.path.join(home.path, "config.yaml")
    with open(path, "a") as f:
        f.write("surprise: 1\n")
    with pytest.raises(ConfigError, match="surprise"):
        KeyHome.open(home.path)


def test_open_rejects_unsupported_provider(home):
    path = os.path.join(home.path, "config.yaml")
    with open(path) as f:
        raw = yaml.safe_load(f)
    raw["audit"]["sink"] = "none"
    with open(path, "w") as f:
        yaml.safe_dump(raw, f)
    with pytest.raises(ConfigError, match="audit.sink"):
        KeyHome.open(home.path)
    assert KeyHome.open(home.path, check_keys=False).config.audit.sink == "none"


def test_open_rejects_registry_kek_missing_from_keystore(home):
    home.registry().rotate("kek-9999", actor="t", reason="kek never created")
    with pytest.raises(KeystoreError, match="kek-9999"):
        KeyHome.open(home.path)


def test_open_rejects_empty_registry(home):
    os.remove(os.path.join(home.path, "registry.sqlite"))
    open(os.path.join(home.path, "registry.sqlite"), "w").close()
    with pytest.raises(RegistryError, match="empty"):
        KeyHome.open(home.path)


def test_key_source_is_picklable_and_works(home):
    source = pickle.loads(pickle.dumps(home.key_source()))
    assert isinstance(source, LocalKeySource)
    assert home.policy().active.kek_id == "kek-0001"
    with source.open_kms() as kms, DekScope(kms, home.policy().active, Location(home.dataset, "p=1")) as scope:
        assert scope is not None
    assert source.open_registry().active().version == 1


def test_provision_kek_creates_and_reuses_orphans(home):
    assert home.provision_kek(2) == "kek-0002"
    # A rotation that provisioned kek-0002 but crashed before the registry changed: reused.
    assert home.provision_kek(2) == "kek-0002"
    home.registry().rotate("kek-0002", actor="t", reason="r")
    with pytest.raises(Exception, match="already protects key version 2"):
        home.provision_kek(2)


def test_default_home(monkeypatch):
    monkeypatch.delenv("KEYTURN_HOME", raising=False)
    assert default_home() == ".keyturn"
    monkeypatch.setenv("KEYTURN_HOME", "/somewhere/else")
    assert default_home() == "/somewhere/else"
    monkeypatch.setenv("KEYTURN_HOME", "")
    assert default_home() == ".keyturn"
