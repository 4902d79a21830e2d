"""The built wheel, installed into a fresh virtual environment outside the repository, works under one import namespace.

keyturn's folders `transforms/`, `pipelines/` and `schemas/` install as
`keyturn.transforms`, `keyturn.pipelines` and `keyturn.schemas`. This test
builds the wheel from a copy of the project, installs it (without its
dependencies, which come from this environment through a ``.pth`` line) into
a new virtual environment in a temporary directory, and then, from a working
directory that holds unrelated `transforms` and `schemas` packages on
``sys.path`` (as a user's repository or a worker image might), runs the
`keyturn` console script end to end and one Beam pipeline.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap
import zipfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

REPO = Path(__file__).resolve().parent.parent
_IGNORED = shutil.ignore_patterns(
    ".git", ".venv", "__pycache__", "*.egg-info", "build", "dist", "bench-out", "demo-out", ".pytest_cache", ".hypothesis",
    "target", "corpus", "artifacts",
)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> dict[str, Path]:
    """Build the wheel from a copy of the project and install it into a fresh venv; returns its paths."""
    root = tmp_path_factory.mktemp("wheel")
    source = root / "source"
    shutil.copytree(REPO, source, ignore=_IGNORED)
    dist = root / "dist"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--wheel-dir", str(dist), str(source)],
        check=True, capture_output=True, text=True,
    )
    [wheel] = list(dist.glob("keyturn-*.whl"))
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, capture_output=True)
    python = venv / "bin" / "python"
    purelib = Path(subprocess.check_output([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], text=True).strip())
    # The dependencies (Beam, pyarrow, ...) come from this environment; keyturn itself only from the wheel.
    (purelib / "_keyturn_test_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run(
        [str(python), "-m", "pip", "install", "--quiet", "--no-deps", "--no-index", str(wheel)],
        check=True, capture_output=True, text=True,
    )
    return {"root": root, "wheel": wheel, "python": python, "keyturn": venv / "bin" / "keyturn", "purelib": purelib}


@pytest.fixture()
def user_repo(tmp_path) -> Path:
    """A working directory with its own `transforms` and `schemas` packages, as an unrelated project has."""
    for name in ("transforms", "schemas", "pipelines"):
        package = tmp_path / "user" / name
        package.mkdir(parents=True)
        (package / "__init__.py").write_text(f"WHO = 'the user project {name}'\n")
        (package / "arrow.py").write_text("raise ImportError('this is the user project, not keyturn')\n")
    return tmp_path / "user"


def _env(user_repo: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "KEYTURN_HOME", "VIRTUAL_ENV")}
    env["PYTHONPATH"] = str(user_repo)
    return env


def _run(argv: list[str], user_repo: Path, **kwargs) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, cwd=user_repo, env=_env(user_repo), capture_output=True, text=True, timeout=600, **kwargs)


def test_the_wheel_holds_one_namespace_with_its_data_files(installed):
    names = zipfile.ZipFile(installed["wheel"]).namelist()
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert tops == {"keyturn"}
    for expected in ("keyturn/py.typed", "keyturn/schemas/audit_event.avsc", "keyturn/transforms/arrow.py",
                     "keyturn/pipelines/cli.py", "keyturn/home.py"):
        assert expected in names
    metadata = zipfile.ZipFile(installed["wheel"]).read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    assert "License-Expression: Apache-2.0" in metadata


def test_imports_come_from_the_wheel_not_the_user_packages(installed, user_repo):
    probe = textwrap.dedent(
        """
        import transforms, schemas, pipelines
        import keyturn, keyturn.transforms.arrow, keyturn.schemas, keyturn.avro_codec, keyturn.pipelines.cli
        print(transforms.WHO, schemas.WHO, pipelines.WHO, sep="|")
        print(keyturn.__version__)
        print(keyturn.__file__)
        print(keyturn.transforms.arrow.EncryptBatches.__module__)
        print(sorted(keyturn.schemas.schema_names()))
        """
    )
    done = _run([str(installed["python"]), "-c", probe], user_repo)
    assert done.returncode == 0, done.stderr
    who, version, where, module, schemas = done.stdout.strip().splitlines()
    assert who == "the user project transforms|the user project schemas|the user project pipelines"
    assert Path(where).is_relative_to(installed["purelib"])
    assert module == "keyturn.transforms.arrow"
    assert "audit_event" in schemas
    version_cli = _run([str(installed["keyturn"]), "--version"], user_repo)
    assert version_cli.returncode == 0 and version_cli.stdout.split() == ["keyturn", version]


def _source(directory: Path) -> pa.Table:
    table = pa.table({
        "id": list(range(300)),
        "region": [f"r{i % 3}" for i in range(300)],
        "email": [f"user{i}@example.com" for i in range(300)],
    })
    directory.mkdir(parents=True)
    pq.write_table(table, directory / "part-0.parquet")
    return table


def test_the_cli_runs_end_to_end_from_the_installed_wheel(installed, user_repo, tmp_path):
    table = _source(tmp_path / "src")
    keyturn = str(installed["keyturn"])
    home, lake, out = str(tmp_path / "home"), str(tmp_path / "lake"), str(tmp_path / "out")
    steps = [
        [keyturn, "--home", home, "init", "--dataset", "customers"],
        [keyturn, "--home", home, "encrypt", "--source", str(tmp_path / "src"), "--lake", lake,
         "--columns", "email", "--partition-by", "region"],
        [keyturn, "--home", home, "rotate", "--rewrap"],
        [keyturn, "--home", home, "decrypt", "--lake", lake, "--out", out],
    ]
    for argv in steps:
        done = _run(argv, user_repo)
        assert done.returncode == 0, (argv[3], done.stdout, done.stderr)
    lake_rows = [p for p in Path(lake).rglob("*.parquet") if "_keyturn" not in p.parts]
    assert lake_rows and all(b"user1@example.com" not in p.read_bytes() for p in lake_rows)
    back = pq.read_table(out).select(["id", "email"]).sort_by("id")
    assert back.equals(table.select(["id", "email"]))


def test_a_beam_pipeline_runs_from_the_installed_wheel(installed, user_repo, tmp_path):
    script = textwrap.dedent(
        """
        import sys
        import apache_beam as beam
        import pyarrow as pa
        from apache_beam.testing.util import assert_that, equal_to
        from keyturn.home import KeyHome
        from keyturn.transforms.arrow import DecryptBatches, EncryptBatches
        from keyturn.pipelines.runner import pipeline_options

        home = KeyHome.init(sys.argv[1], dataset="customers")
        source = home.key_source()
        batch = pa.record_batch({"id": list(range(50)), "email": [f"u{i}@example.com" for i in range(50)]})
        with beam.Pipeline(options=pipeline_options([])) as p:
            sealed = (p | beam.Create([("region=1", batch)])
                        | EncryptBatches(source, dataset="customers", columns=["email"]))
            opened = sealed.main | DecryptBatches(source, dataset="customers")
            rows = opened.main | beam.FlatMap(lambda kv: kv[1].to_pylist())
            assert_that(rows, equal_to(batch.to_pylist()))
        print("pipeline ok")
        """
    )
    done = _run([str(installed["python"]), "-c", script, str(tmp_path / "home")], user_repo)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().endswith("pipeline ok")
