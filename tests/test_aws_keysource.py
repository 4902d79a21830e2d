"""Config wiring: key_source_from_config, AwsKeySource (picklable, opened per worker), the CloudWatch sink from config."""

from __future__ import annotations

import pickle
import textwrap

import pytest
from aws_support import client, moto_url, new_kms_key, unique  # noqa: F401  (moto_url is a fixture)

from keyturn.aws.cloudwatch_sink import CloudWatchAuditSink
from keyturn.aws.dynamodb_registry import DynamoDbKeyRegistry, create_table
from keyturn.aws.keysource import AwsKeySource
from keyturn.aws.kms import AwsKms
from keyturn.config import load_config, parse_config
from keyturn.errors import ConfigError
from keyturn.keysource import KeySource, LocalKeySource, key_source_from_config
from keyturn.registry.sqlite import SqliteKeyRegistry

pytestmark = pytest.mark.aws


def aws_config(key_id: str, url: str | None, *, table: str | None = "keyturn-registry", rate: float = 20.0) -> dict:
    cmk = {"provider": "aws_kms", "key_id": key_id, "region": "us-east-1"}
    if url is not None:
        cmk["endpoint_url"] = url
    tracking = {"storage": "dynamodb", "table": table} if table else {"storage": "sqlite", "path": "reg.sqlite"}
    return {
        "key_hierarchy": {"cmk": cmk},
        "version_tracking": tracking,
        "lifecycle": {"max_kms_requests_per_second": rate},
    }


def test_local_config_gives_the_local_key_source(tmp_path):
    source = key_source_from_config(parse_config({}), tmp_path)
    assert source == LocalKeySource(
        str(tmp_path / "keystore.json"), str(tmp_path / "registry.sqlite"), passphrase_env="KEYTURN_PASSPHRASE"
    )
    with_key = key_source_from_config(parse_config({"key_hierarchy": {"cmk": {"root_key_file": "root.key"}}}), tmp_path)
    assert with_key.key_file == str(tmp_path / "root.key") and with_key.passphrase_env is None


def test_local_keystore_with_dynamodb_is_refused(tmp_path):
    cfg = parse_config({"version_tracking": {"storage": "dynamodb", "table": "t-abc"}})
    with pytest.raises(ConfigError) as info:
        key_source_from_config(cfg, tmp_path)
    assert info.value.field == "version_tracking.storage"


def test_aws_config_gives_a_picklable_aws_key_source(tmp_path):
    source = key_source_from_config(parse_config(aws_config("alias/lake", "http://127.0.0.1:4566")), tmp_path)
    assert source == AwsKeySource(
        region="us-east-1",
        endpoint_url="http://127.0.0.1:4566",
        key_id="alias/lake",
        registry_table="keyturn-registry",
        max_requests_per_second=20.0,
    )
    assert isinstance(source, KeySource)
    assert pickle.loads(pickle.dumps(source)) == source
    sqlite_source = key_source_from_config(parse_config(aws_config("alias/lake", None, table=None)), tmp_path)
    assert sqlite_source.registry_table is None and sqlite_source.registry_path == str(tmp_path / "reg.sqlite")


def test_aws_key_source_opens_kms_and_registry_on_the_worker(moto_url, tmp_path):
    admin = client("kms", moto_url)
    alias = unique("alias/keyturn-source")
    key = new_kms_key(admin, alias=alias)
    table = unique("keyturn-source")
    create_table(table, client=client("dynamodb", moto_url))
    (tmp_path / "keyturn.yaml").write_text(
        textwrap.dedent(
            f"""\
            dataset: customers
            key_hierarchy:
              cmk:
                provider: aws_kms
                key_id: {alias}
                region: us-east-1
                endpoint_url: {moto_url}
            version_tracking:
              storage: dynamodb
              table: {table}
            lifecycle:
              max_kms_requests_per_second: 200
            audit:
              sink: cloudwatch
              log_group: /keyturn/{table}
            """
        )
    )
    cfg = load_config(tmp_path / "keyturn.yaml")
    shipped = pickle.loads(pickle.dumps(key_source_from_config(cfg, tmp_path)))  # what a worker receives
    with shipped.open_kms() as kms:
        assert isinstance(kms, AwsKms) and kms.rate_limiter is not None and kms.rate_limiter.rate == 200
        assert kms.client.meta.endpoint_url == moto_url
        registry = shipped.open_registry()
        assert isinstance(registry, DynamoDbKeyRegistry) and registry.table == table
        v1 = registry.initialize(shipped.key_id, actor="tests", reason="bootstrap")
        assert v1.kek_id == alias
        gen = kms.generate_data_key(registry.active().kek_id, {"k": "v"})
        assert kms.decrypt(key["Arn"], gen.wrapped, {"k": "v"}).plaintext.material == gen.plaintext.material
    # The registry endpoint was left to botocore, which took AWS_ENDPOINT_URL (the moto server) from the environment.
    assert registry.client.meta.endpoint_url == moto_url
    with CloudWatchAuditSink.from_config(cfg) as sink:
        assert sink.log_group == f"/keyturn/{table}"
        assert sink._client.meta.endpoint_url == moto_url


def test_sqlite_registry_with_aws_kms(tmp_path):
    source = AwsKeySource(region="us-east-1", registry_path=str(tmp_path / "r.sqlite"))
    assert isinstance(source.open_registry(), SqliteKeyRegistry)


@pytest.mark.parametrize(
    "kwargs",
    [
        {},  # no registry
        {"registry_table": "t-abc", "registry_path": "r.sqlite"},
        {"registry_path": "r.sqlite", "registry_endpoint_url": "http://127.0.0.1:1"},
        {"registry_table": "t-abc", "endpoint_url": "ftp://nope"},
        {"registry_table": "t-abc", "max_requests_per_second": 0},
        {"registry_table": "t-abc", "max_requests_per_second": float("inf")},
        {"registry_table": "t-abc", "key_id": "has space"},
        {"registry_table": "t-abc", "max_attempts": 0},
    ],
)
def test_aws_key_source_validates_eagerly(kwargs):
    with pytest.raises(ValueError):
        AwsKeySource(**kwargs)


def test_cloudwatch_sink_from_config_needs_cloudwatch():
    with pytest.raises(ConfigError) as info:
        CloudWatchAuditSink.from_config(parse_config({}))
    assert info.value.field == "audit.sink"
