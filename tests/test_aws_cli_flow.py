"""The whole `keyturn` CLI flow on an s3:// lake, with AWS KMS, the DynamoDB registry and CloudWatch audit, on moto.

One moto server on 127.0.0.1 (tests/aws_support.py) plays KMS, DynamoDB,
CloudWatch Logs and S3; every call goes through boto3 or pyarrow's
S3FileSystem over HTTP. The environment's ``AWS_ENDPOINT_URL_S3`` points at
a closed loopback port, so S3 is reached only through ``--s3-endpoint-url``
(or the home's ``lake.s3_endpoint_url``): on the driver, in the Beam
workers (a multi-process run included) and in the lock's boto3 client.

The flow: init (aws_kms + DynamoDB + CloudWatch) -> encrypt a local
Parquet directory into s3://bucket/lake -> status -> rotate (KMS on-demand
rotation, same key id) -> a bounded `rewrap --max-deks` (DEK directory
only: status partially current, every S3 object unchanged, retire refused)
-> rotate --new-key -> the finishing `rewrap` (KMS ReEncrypt from key A to
key B, one request per DEK counted at the server; every S3 object
unchanged) -> status 100% current on version 3 -> a second `rewrap`, the
`reencrypt --mode rewrap` alias and a `reencrypt` with nothing due make
zero KMS requests (counted at the server) -> retire both old versions
without naming a lake -> decrypt to a local directory == the source. Then:
the lake lock refuses a concurrent exclusive run, and a reencrypt (fresh
DEKs, new payload) SIGKILLed mid-rewrite (a subprocess) leaves every row
exactly once; the next run is refused while the dead run's lease lives, and
finishes once it has expired.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
import yaml
from aws_support import client, moto_url, new_kms_key, requests_seen, unique  # noqa: F401  (moto_url is a fixture)
from cli_support import run_cli

from keyturn.aws.dynamodb_registry import DynamoDbKeyRegistry
from keyturn.aws.kms import AwsKms
from keyturn.format import kms_context
from keyturn.lake import Lake, S3Settings
from keyturn.pipelines import exitcodes

pytestmark = pytest.mark.aws

ROWS, PARTITIONS = 600, 3
LEASE_SECONDS = 10.0
DEAD_ENDPOINT = "http://127.0.0.1:9"  # loopback, nothing listens: only the explicit endpoint can work


def write_source(directory) -> pa.Table:
    ids = np.arange(ROWS, dtype=np.int64)
    table = pa.table(
        {
            "id": ids,
            "region": [f"r{i % PARTITIONS}" for i in ids],
            "email": [f"user{i}@example.com" for i in ids],
            "ssn": [None if i % 13 == 0 else f"{i:03d}-{i % 89:02d}-{i % 9973:04d}" for i in ids],
            "spend": np.round(np.linspace(1, 900, ROWS), 2),
        }
    )
    directory.mkdir()
    for k in range(4):  # four source files, so each partition gets several lake files
        pq.write_table(table.slice(k * ROWS // 4, ROWS // 4), directory / f"part-{k}.parquet")
    return table


def s3_keys(s3, bucket: str) -> list[str]:
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=bucket)
    return sorted(o["Key"] for page in pages for o in page.get("Contents", []))


def object_states(s3, bucket: str) -> dict[str, tuple[str, object]]:
    """Every object in the bucket: key -> (ETag, LastModified)."""
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=bucket)
    return {o["Key"]: (o["ETag"], o["LastModified"]) for page in pages for o in page.get("Contents", [])}


def s3_writes() -> int:
    """Mutating REST requests the server answered so far (S3 is the only REST service here; the rest are JSON targets)."""
    return sum(requests_seen(method) for method in ("PUT", "POST", "DELETE"))


def read_plain(out_dir) -> pa.Table:
    table = ds.dataset(str(out_dir), format="parquet", partitioning="hive").to_table()
    table = table.select(["id", "region", "email", "ssn", "spend"])
    return table.cast(pa.schema([("id", pa.int64()), ("region", pa.string()), ("email", pa.string()),
                                 ("ssn", pa.string()), ("spend", pa.float64())])).sort_by("id")


@pytest.fixture
def aws(moto_url, tmp_path, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", DEAD_ENDPOINT)
    s3 = client("s3", moto_url)
    bucket = unique("keyturn-cli")
    s3.create_bucket(Bucket=bucket)
    kms = client("kms", moto_url)
    alias = f"alias/{unique('keyturn-cli')}"
    key_a = new_kms_key(kms, alias=alias)
    key_b = new_kms_key(kms)
    return {
        "url": moto_url, "s3": s3, "bucket": bucket, "kms": kms, "alias": alias, "key_a": key_a, "key_b": key_b,
        "table": unique("keyturn-cli-registry"), "log_group": f"/keyturn/{unique('audit')}",
        "home": str(tmp_path / "home"), "lake": f"s3://{bucket}/lake", "tmp": tmp_path,
    }


def cli(aws, *args: str, s3_flag: bool = True):
    extra = ["--s3-endpoint-url", aws["url"]] if s3_flag else []
    result = run_cli("--home", aws["home"], "--json", *args[:1], *extra, *args[1:])
    return result


def ok(result):
    assert result.code == 0, (result.code, result.err, result.out[-2000:])
    return result.json()


def test_cli_flow_on_an_s3_lake_with_kms_dynamodb_and_cloudwatch(aws):
    source = write_source(aws["tmp"] / "source")
    lake_uri, s3, bucket = aws["lake"], aws["s3"], aws["bucket"]

    # init: the table is created, the key checked, version 1 registered; the home holds no key material
    init = ok(cli(aws, "init", "--provider", "aws_kms", "--key-id", aws["alias"], "--region", "us-east-1",
                  "--registry-table", aws["table"], "--log-group", aws["log_group"], "--dataset", "customers"))
    assert (init["provider"], init["registry"], init["audit_sink"]) == ("aws_kms", "dynamodb", "cloudwatch")
    assert (init["active_version"], init["kek_id"]) == (1, aws["alias"])
    assert sorted(os.listdir(aws["home"])) == ["audit.log", "audit.log.head", "config.yaml"]
    assert aws["table"] in client("dynamodb", aws["url"]).list_tables()["TableNames"]
    config = yaml.safe_load(open(os.path.join(aws["home"], "config.yaml")))
    assert config["lake"]["s3_endpoint_url"] == aws["url"]  # init's --s3-endpoint-url is kept in the config

    # encrypt: a local Parquet directory into the S3 lake (multi-process Beam workers reach S3 too)
    enc = ok(cli(aws, "encrypt", "--source", str(aws["tmp"] / "source"), "--lake", lake_uri, "--columns", "email,ssn",
                 "--partition-by", "region", "--", "--direct_running_mode=multi_processing", "--direct_num_workers=2"))
    assert enc["rows_written"] == ROWS and set(enc["partitions_written"]) == {"region=r0", "region=r1", "region=r2"}
    assert enc["kms_calls"] >= PARTITIONS and enc["audit_events_forwarded"] == enc["audit_events"] > 0
    keys = s3_keys(s3, bucket)
    data = [k for k in keys if k.endswith(".parquet") and "/_keyturn/" not in k]
    assert len(data) == enc["files_written"] >= PARTITIONS
    staged = [k for k in keys if k.startswith("lake/_keyturn/staging/") and k != "lake/_keyturn/staging/"]
    assert not staged and not any(".keyturn-tmp-" in k or k.endswith("_keyturn/lock") for k in keys), keys

    # status from the config's endpoint alone (no flag): every row current
    status = ok(cli(aws, "status", "--lake", lake_uri, s3_flag=False))
    assert (status["rows"], status["percent_current"], status["files"]) == (ROWS, 100.0, len(data))

    # rotate, KMS model: RotateKeyOnDemand on the same key, version 2 names the same key id
    kms_rotations_before = len(aws["kms"].list_key_rotations(KeyId=aws["key_a"]["KeyId"]).get("Rotations", []))
    rot = ok(cli(aws, "rotate", "--reason", "quarterly"))
    assert (rot["version_to"], rot["kek_id"], rot["rotation_model"]) == (2, aws["alias"], "kms_rotation")
    assert len(aws["kms"].list_key_rotations(KeyId=aws["key_a"]["KeyId"])["Rotations"]) == kms_rotations_before + 1
    assert ok(cli(aws, "status", "--lake", lake_uri))["percent_current"] == 0.0

    # every DEK the encrypt made is in the registry's directory, under version 1
    deks = ok(cli(aws, "directory", "show", s3_flag=False))["deks_by_version"]
    assert list(deks) == ["1"] and deks["1"] == enc["kms_calls"] >= len(data)
    n_deks = deks["1"]

    # a bounded rewrap onto version 2: the directory only, not one S3 write; status partially current
    lake_before, writes = object_states(s3, bucket), s3_writes()
    assert writes > 0  # the counter does see S3 writes (the encrypt's)
    reencrypts = requests_seen("TrentService.ReEncrypt")
    first = ok(cli(aws, "rewrap", "--max-deks", "2", "--reason", "bounded", s3_flag=False))
    assert (first["deks_moved"], first["kms_calls"], first["complete"]) == (2, 2, False)
    assert first["remaining"] == {"1": n_deks - 2} and first["lake_bytes_written"] == 0
    assert requests_seen("TrentService.ReEncrypt") == reencrypts + 2
    assert object_states(s3, bucket) == lake_before and s3_writes() == writes  # every key, ETag, LastModified
    status = ok(cli(aws, "status", "--lake", lake_uri))
    assert 0.0 < status["percent_current"] < 100.0 and status["rows"] == ROWS
    assert status["status_rows"]["current"] + status["status_rows"]["stale"] == ROWS
    refused = cli(aws, "retire", "1", s3_flag=False)  # the directory still wraps DEKs under version 1
    assert refused.code == exitcodes.REFUSED and f"holds {n_deks - 2} DEK" in refused.err, refused.err

    # rotate, new-key model: version 3 on key B; then the finishing rewrap, KMS ReEncrypt from key A to key B
    rot = ok(cli(aws, "rotate", "--new-key", aws["key_b"]["Arn"], "--reason", "new key"))
    assert (rot["version_to"], rot["kek_id"], rot["rotation_model"]) == (3, aws["key_b"]["Arn"], "new_key")
    assert rot["rewrap"] is None  # without --rewrap, rotate moves nothing
    reencrypts = requests_seen("TrentService.ReEncrypt")
    done = ok(cli(aws, "rewrap", s3_flag=False))
    assert (done["deks_moved"], done["kms_calls"], done["complete"]) == (n_deks, n_deks, True)
    assert done["from_versions"] == [1, 2] and done["active_version"] == 3 and done["lake_bytes_written"] == 0
    assert requests_seen("TrentService.ReEncrypt") == reencrypts + n_deks  # one ReEncrypt per DEK, at the server
    assert object_states(s3, bucket) == lake_before and s3_writes() == writes  # still not one S3 write
    registry = DynamoDbKeyRegistry(aws["table"], client=client("dynamodb", aws["url"]))
    assert registry.deks_by_version() == {3: n_deks}
    entries = registry.list_deks()
    assert len(entries) == n_deks and {(e.key_version, e.parsed().kek_id) for e in entries} == {(3, aws["key_b"]["Arn"])}
    sample = entries[0]  # the wrapped DEK really is under key B now, with version 3's context
    context = kms_context(dataset=sample.dataset, partition=sample.partition, dek_id=sample.dek_id, key_version=3)
    with AwsKms(client=client("kms", aws["url"])) as admin:
        admin.decrypt(aws["key_b"]["Arn"], sample.parsed().wrapped_dek, context).plaintext.wipe()
    status = ok(cli(aws, "status", "--lake", lake_uri))
    assert status["percent_current"] == 100.0 and status["versions"]["3"]["rows"] == ROWS
    assert s3_keys(s3, bucket) and not any(".keyturn-tmp-" in k or k.endswith("_keyturn/lock") for k in s3_keys(s3, bucket))
    assert sorted(k for k in s3_keys(s3, bucket) if k.endswith(".parquet") and "/_keyturn/" not in k) == data  # in place

    # a second rewrap, the reencrypt alias and a reencrypt with nothing due: no KMS request at all (counted at the server)
    kms_requests = requests_seen("TrentService.")
    again = ok(cli(aws, "rewrap", s3_flag=False))
    assert (again["deks_moved"], again["kms_calls"], again["complete"]) == (0, 0, True) and "audit_event" not in again
    alias = ok(cli(aws, "reencrypt", "--lake", lake_uri, "--mode", "rewrap"))
    assert alias["directory_rewrap"]["deks_moved"] == alias["directory_rewrap"]["kms_calls"] == 0
    assert alias["files_rewritten"] == 0 and alias["kms_calls"] == 0
    nothing = ok(cli(aws, "reencrypt", "--lake", lake_uri))
    assert nothing["mode"] == "reencrypt" and nothing["files_rewritten"] == 0 and nothing["kms_calls"] == 0
    assert requests_seen("TrentService.") == kms_requests
    lake_now = object_states(s3, bucket)
    assert {k: v for k, v in lake_now.items() if k in data} == {k: v for k, v in lake_before.items() if k in data}

    # the directory decides retire: both old versions go without naming a lake, and the lake still reads
    assert ok(cli(aws, "retire", "1", s3_flag=False))["state"] == "retired"
    assert ok(cli(aws, "retire", "2", s3_flag=False))["state"] == "retired"

    # decrypt to a local directory: identical to the source (every row's birth version, 1 or 2, is retired)
    out = aws["tmp"] / "plain"
    dec = ok(cli(aws, "decrypt", "--lake", lake_uri, "--out", str(out)))
    assert dec["rows_written"] == ROWS and dec["rows_by_status"]["current"] == ROWS
    assert read_plain(out).equals(source.sort_by("id"))

    # the control-plane chain stays local and intact; CloudWatch got the same control-plane events and the runs'
    entries = ok(run_cli("--home", aws["home"], "--json", "audit", "verify"))["entries"]
    assert entries == 7  # init + 2 rotations + 2 rewraps that moved DEKs + 2 retires (refusals and no-ops log nothing)
    logs = client("logs", aws["url"])
    stream = logs.describe_log_streams(logGroupName=aws["log_group"])["logStreams"][0]["logStreamName"]
    events = [json.loads(e["message"]) for e in
              logs.get_log_events(logGroupName=aws["log_group"], logStreamName=stream, startFromHead=True)["events"]]
    actions = [e["action"] for e in events]
    assert actions.count("rotate") == 3 and actions.count("rewrap") == 2 and actions.count("retire") == 2
    rewraps = [e for e in events if e["action"] == "rewrap"]
    assert [(e["version_to"], e["counts"]["deks_moved"]) for e in rewraps] == [(2, 2), (3, n_deks)]
    assert "encrypt" in actions and "decrypt" in actions and "reencrypt" not in actions


def test_lock_refuses_a_concurrent_run_and_a_crash_mid_rewrite_loses_nothing(aws):
    source = write_source(aws["tmp"] / "source")
    lake_uri, s3, bucket = aws["lake"], aws["s3"], aws["bucket"]
    ok(cli(aws, "init", "--provider", "aws_kms", "--key-id", aws["alias"], "--registry-table", aws["table"]))
    config_path = os.path.join(aws["home"], "config.yaml")
    with open(config_path) as f:
        config = yaml.safe_load(f)
    config["lake"]["lock_lease_seconds"] = LEASE_SECONDS  # so the crashed run's lease runs out within the test
    config["lifecycle"]["max_concurrent_reencryption_workers"] = 1  # files one at a time: a crash between two files
    with open(config_path, "w") as f:
        yaml.safe_dump(config, f)
    ok(cli(aws, "encrypt", "--source", str(aws["tmp"] / "source"), "--lake", lake_uri, "--columns", "email,ssn",
           "--partition-by", "region"))
    ok(cli(aws, "rotate"))

    # another job holds the lake exclusively: reencrypt and encrypt are refused at once (exit 5), nothing changes
    lake = Lake(lake_uri, s3=S3Settings.from_endpoint_url(aws["url"]))
    before = {k: s3.head_object(Bucket=bucket, Key=k)["ETag"] for k in s3_keys(s3, bucket)}
    with lake.lock(exclusive=True, owner="another reencrypt"):
        refused = cli(aws, "reencrypt", "--lake", lake_uri)
        assert refused.code == exitcodes.REFUSED and "locked by another keyturn job (another reencrypt" in refused.err
        assert cli(aws, "encrypt", "--source", str(aws["tmp"] / "source"), "--lake", lake_uri,
                   "--columns", "email,ssn").code == exitcodes.REFUSED
    after = {k: s3.head_object(Bucket=bucket, Key=k)["ETag"] for k in s3_keys(s3, bucket)}
    assert after == before

    # a reencrypt SIGKILLed after its first file, with the second file's verified temp object written
    env = {**os.environ, "KEYTURN_CRASHPOINT": "rewrite:before-swap", "KEYTURN_CRASHPOINT_SKIP": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "keyturn.pipelines.cli", "--home", aws["home"], "reencrypt", "--lake", lake_uri,
         "--s3-endpoint-url", aws["url"]],
        env=env, capture_output=True, text=True, timeout=180,
    )
    assert proc.returncode == -9, proc.stderr[-3000:]
    lease = json.loads(s3.get_object(Bucket=bucket, Key="lake/_keyturn/lock")["Body"].read())["holders"]
    assert [h["mode"] for h in lease] == ["exclusive"]  # the dead run's lease is still there

    # the next run is refused while that lease lives (asked and answered before it expired)
    refused = cli(aws, "reencrypt", "--lake", lake_uri)
    if time.time() < lease[0]["expires"]:
        assert refused.code == exitcodes.REFUSED and "locked by another keyturn job" in refused.err

    # meanwhile every row is readable exactly once: the first file on the new version, the rest on the old
    keys = s3_keys(s3, bucket)
    temps = [k for k in keys if ".keyturn-tmp-" in k]
    assert len(temps) == 1 and temps[0].split("/")[-1].startswith(".keyturn-tmp-")  # hidden, never data
    status = ok(cli(aws, "status", "--lake", lake_uri))
    assert status["rows"] == ROWS and status["status_rows"]["stale"] + status["status_rows"]["current"] == ROWS
    assert 0 < status["status_rows"]["current"] < ROWS
    while time.time() <= lease[0]["expires"]:  # wait for the lease to run out (an event, not a timing assertion)
        time.sleep(0.2)
    out = aws["tmp"] / "mid-crash"
    assert ok(cli(aws, "decrypt", "--lake", lake_uri, "--out", str(out)))["rows_written"] == ROWS
    assert read_plain(out).equals(source.sort_by("id"))

    # the expired lease is taken over: the run cleans the temp object and finishes
    finished = ok(cli(aws, "reencrypt", "--lake", lake_uri))
    assert finished["complete"] and finished["inventory"]["current_fraction"] == 1.0
    assert [t.split("/")[-1] for t in finished["temp_files_removed"]] == [temps[0].split("/")[-1]]
    assert not any(".keyturn-tmp-" in k or k.endswith("_keyturn/lock") for k in s3_keys(s3, bucket))
    out = aws["tmp"] / "after"
    assert ok(cli(aws, "decrypt", "--lake", lake_uri, "--out", str(out)))["rows_by_status"]["current"] == ROWS
    assert read_plain(out).equals(source.sort_by("id"))
    assert ok(cli(aws, "reencrypt", "--lake", lake_uri))["kms_calls"] == 0


def test_init_refuses_a_registry_with_another_history_and_adopts_its_own(aws, tmp_path):
    ok(cli(aws, "init", "--provider", "aws_kms", "--key-id", aws["alias"], "--registry-table", aws["table"]))
    ok(cli(aws, "rotate"))
    other = str(tmp_path / "other-home")
    clash = run_cli("--home", other, "init", "--provider", "aws_kms", "--key-id", aws["alias"],
                    "--registry-table", aws["table"])
    assert clash.code == exitcodes.USAGE and "already holds 2 key version(s)" in clash.err
    assert not os.path.exists(os.path.join(other, "config.yaml"))

    # an init interrupted after registering version 1 (no config written yet) can simply be run again
    table = unique("keyturn-cli-registry")
    from keyturn.aws.dynamodb_registry import DynamoDbKeyRegistry, create_table

    create_table(table, client=client("dynamodb", aws["url"]))
    DynamoDbKeyRegistry(table, client=client("dynamodb", aws["url"])).initialize(aws["alias"], actor="t", reason="t")
    again = ok(run_cli("--home", str(tmp_path / "third"), "--json", "init", "--provider", "aws_kms",
                       "--key-id", aws["alias"], "--registry-table", table))
    assert (again["active_version"], again["kek_id"]) == (1, aws["alias"])
    assert ok(run_cli("--home", str(tmp_path / "third"), "--json", "audit", "verify"))["entries"] == 1


def test_aws_options_are_checked(aws, tmp_path):
    missing_key = run_cli("--home", str(tmp_path / "h1"), "init", "--provider", "aws_kms")
    assert missing_key.code == exitcodes.USAGE and "--key-id" in missing_key.err
    local = str(tmp_path / "local")
    assert run_cli("--home", local, "init").code == 0
    refused = run_cli("--home", local, "rotate", "--new-key", aws["key_b"]["Arn"])
    assert refused.code == exitcodes.USAGE and "--new-key needs provider 'aws_kms'" in refused.err
    bad_key = run_cli("--home", str(tmp_path / "h2"), "init", "--provider", "aws_kms", "--key-id", "alias/does-not-exist",
                      "--registry-table", unique("keyturn-cli-registry"))
    assert bad_key.code == exitcodes.UNAVAILABLE and not os.path.exists(str(tmp_path / "h2" / "config.yaml"))
