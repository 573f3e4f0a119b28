"""The trainer on shards in S3-compatible object storage (moto's server on 127.0.0.1, started here): a run on
`data.root=s3://...` trains exactly as on the same shards on local disk; a missing bucket and refused credentials
are one line and exit 2 before training; a store that stops answering is one line and exit 1 after the bounded
retries, never a hang."""
from __future__ import annotations

import json
import os

import pytest

from data_shards.upload import upload_dataset
from tests.data_shards.test_object_store import local_root, moto  # noqa: F401 (fixtures)
from tests.services import FaultProxy, MotoS3
from tests.trainer.test_failure_paths import cli, one_error_line
from tests.trainer.test_trainer_loop import clean_env, tiny

pytestmark = [pytest.mark.services, pytest.mark.timeout(600)]


def aws_env(server: MotoS3, **more) -> dict:
    env = {k: v for k, v in clean_env().items() if not k.startswith("AWS_")}
    return {**env, **server.env, "AWS_CONFIG_FILE": os.devnull, "AWS_SHARED_CREDENTIALS_FILE": os.devnull, **more}


@pytest.fixture(scope="module")
def s3_root(moto, local_root):  # noqa: F811
    with pytest.MonkeyPatch.context() as mp:
        for k, v in aws_env(moto).items():
            mp.setenv(k, v)
        moto.boto().create_bucket(Bucket="trainer-shards")
        upload_dataset(str(local_root), "s3://trainer-shards/digits", progress=False)
    return "s3://trainer-shards/digits"


def evaluations(run_dir):
    with open(run_dir / "t" / "summary.json") as f:
        return json.load(f)["evaluations"]


def test_training_on_s3_is_training_on_local_disk(moto, local_root, s3_root, tmp_path):  # noqa: F811
    """Same config, same shards, 2 loader workers: the same evaluations (metrics to the last digit)."""
    runs = {}
    for where, root in (("local", str(local_root)), ("s3", s3_root)):
        status, out, _ = cli(tiny(root, tmp_path / where, "data.num_workers=2"), timeout=300, env=aws_env(moto))
        assert status == 0, out[-3000:]
        runs[where] = evaluations(tmp_path / where)
    assert len(runs["s3"]) == 2 and runs["s3"] == runs["local"]


def test_missing_bucket_and_wrong_credentials_are_one_line_exit_2(moto, s3_root, tmp_path):  # noqa: F811
    status, out, _ = cli(tiny("s3://no-such-bucket/digits", tmp_path / "a"), env=aws_env(moto))
    assert status == 2, out[-3000:]
    assert "bucket no-such-bucket of s3://no-such-bucket/digits/train/manifest.json does not exist" in \
        one_error_line(out)
    secured = MotoS3(tmp_path / "auth", auth=True).start()
    try:
        env = aws_env(secured, AWS_SECRET_ACCESS_KEY="wrong-secret-123")
        status, out, _ = cli(tiny("s3://trainer-shards/digits", tmp_path / "b"), env=env)
        assert status == 2, out[-3000:]
        line = one_error_line(out)
        assert "refused access to s3://trainer-shards/digits/train/manifest.json" in line and "AWS_ACCESS_KEY_ID" \
            in line
        assert "wrong-secret-123" not in out and "retry" not in out
        assert not (tmp_path / "b" / "t" / "checkpoints").exists()
    finally:
        secured.stop()


def test_store_that_stops_answering_is_one_line_exit_1(moto, s3_root, tmp_path):  # noqa: F811
    """Every shard GET hangs: 2 workers, each try ends at the 1 s read timeout, 3 tries; exit 1 within seconds."""
    proxy = FaultProxy(moto.port)
    proxy.hang = True
    try:
        env = aws_env(moto, AWS_ENDPOINT_URL=proxy.endpoint, AWS_MAX_ATTEMPTS="3", DATA_SHARDS_S3_TIMEOUT_S="1")
        status, out, secs = cli(tiny(s3_root, tmp_path / "c", "data.num_workers=2"), env=env, timeout=120)
        assert status == 1, out[-3000:]
        line = one_error_line(out)
        assert "s3://trainer-shards/digits/train/folder-00000" in line and "failed 3 tries in a row" in line
        assert "check that it is up and reachable" in line and secs < 90
        assert out.count("retry ") >= 2
    finally:
        proxy.stop()


def test_object_deleted_mid_run_is_one_line_exit_2(moto, local_root, s3_root, tmp_path):  # noqa: F811
    """The train shards are deleted from the bucket once the run has fetched three of them (in the loader workers'
    traffic, seen by a proxy): the run stops with one line naming a deleted object, exit 2, no shorter epoch."""
    with pytest.MonkeyPatch.context() as mp:
        for k, v in aws_env(moto).items():
            mp.setenv(k, v)
        upload_dataset(str(local_root), "s3://trainer-shards/doomed", progress=False)
    s3 = moto.boto()
    doomed = [o["Key"] for o in s3.list_objects_v2(Bucket="trainer-shards", Prefix="doomed/train/")["Contents"]
              if o["Key"].endswith(".tar")]
    proxy = FaultProxy(moto.port)
    fault, seen = proxy._fault, []

    def delete_after_three(method, path):
        if method == "GET" and "/doomed/train/" in path and path.split("?")[0].endswith(".tar"):
            seen.append(path)
            if len(seen) == 3:
                for key in doomed:
                    s3.delete_object(Bucket="trainer-shards", Key=key)
        return fault(method, path)

    proxy._fault = delete_after_three
    try:
        env = aws_env(moto, AWS_ENDPOINT_URL=proxy.endpoint)
        status, out, _ = cli(tiny("s3://trainer-shards/doomed", tmp_path / "d", "data.num_workers=2"), env=env,
                             timeout=300)
        assert status == 2, out[-3000:]
        line = one_error_line(out)
        assert "s3://trainer-shards/doomed/train/folder-00000" in line and "does not exist (deleted" in line
        assert len(seen) >= 3
    finally:
        proxy.stop()
