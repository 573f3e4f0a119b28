"""Shards in S3-compatible object storage against a real S3 API on 127.0.0.1 (moto's server, started here), through
a fault-injecting proxy where a fault is needed: the same batches as from local disk (plan, resume, eval),
writing with the manifest last, verify against metadata and content, and the faults (a server restarted
mid-epoch, slow responses, 503 SlowDown, connections reset, an object deleted mid-run, wrong credentials, a
missing bucket, a store that stops answering)."""
from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from data_shards import DamagedShard, MissingData, eval_loader, object_store, read_manifest, train_loader, verify_shards
from data_shards.errors import StoreUnavailable
from data_shards.object_store import MissingBucket, StoreAccessDenied
from data_shards.upload import upload_dataset
from tests.services import FaultProxy, MotoS3
from trainer.demo import write_digits_shards

pytestmark = [pytest.mark.services, pytest.mark.timeout(300)]
ROOT = Path(__file__).resolve().parents[2]
BUCKET = "shards"


@pytest.fixture(scope="module")
def local_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("digits")
    write_digits_shards(str(root))
    return root


@pytest.fixture(scope="module")
def moto(tmp_path_factory):
    server = MotoS3(tmp_path_factory.mktemp("moto")).start()
    yield server
    server.stop()


@pytest.fixture
def s3_env(moto, monkeypatch):
    """The standard AWS environment of the moto server (and no profile or config file of this machine)."""
    for k in ("AWS_PROFILE", "AWS_ENDPOINT_URL_S3", "AWS_SESSION_TOKEN", "AWS_MAX_ATTEMPTS",
              "DATA_SHARDS_S3_TIMEOUT_S"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
    for k, v in moto.env.items():
        monkeypatch.setenv(k, v)
    return moto.env


def fill(moto, local_root, prefix="digits"):
    with pytest.MonkeyPatch.context() as mp:
        for k, v in moto.env.items():
            mp.setenv(k, v)
        s3 = moto.boto()
        if BUCKET not in [b["Name"] for b in s3.list_buckets().get("Buckets", [])]:
            s3.create_bucket(Bucket=BUCKET)
        upload_dataset(str(local_root), f"s3://{BUCKET}/{prefix}", overwrite=True, progress=False)
    return f"s3://{BUCKET}/{prefix}"


@pytest.fixture
def s3_root(moto, s3_env, local_root):
    return fill(moto, local_root)


def batches(loader):
    return [(x.clone(), y.clone()) for x, y in loader]


def same(a, b) -> None:
    assert len(a) == len(b) and len(a) > 0
    for (xa, ya), (xb, yb) in zip(a, b):
        assert torch.equal(ya, yb)
        assert torch.equal(xa, xb)


TRAIN = dict(batch_size=16, num_workers=2, seed=3, epoch=1, world_size=2, shuffle_buffer=8)  # read as batches go


def test_s3_split_reads_as_local(local_root, s3_root):
    """Manifest, train batches of both ranks (2 workers each), a resumed epoch, and eval keys: identical."""
    m_local, m_s3 = read_manifest(local_root / "train"), read_manifest(f"{s3_root}/train")
    assert (m_s3.shard_names, m_s3.shard_sha256, m_s3.num_samples) == \
        (m_local.shard_names, m_local.shard_sha256, m_local.num_samples)
    assert m_s3.shards[0] == f"{s3_root}/train/{m_s3.shard_names[0]}"
    for rank in range(2):
        local = batches(train_loader(str(local_root / "train"), rank=rank, **TRAIN))
        remote = batches(train_loader(f"{s3_root}/train", rank=rank, **TRAIN))
        same(local, remote)
        resumed = batches(train_loader(f"{s3_root}/train", rank=rank, start_batch=3, **TRAIN))
        same(local[3:], resumed)
    ev_local = [(x, y, k) for x, y, k in eval_loader(str(local_root / "test"), batch_size=32, num_workers=2)]
    ev_s3 = [(x, y, k) for x, y, k in eval_loader(f"{s3_root}/test", batch_size=32, num_workers=2)]
    assert [k for *_, k in ev_local] == [k for *_, k in ev_s3]
    same([(x, y) for x, y, _ in ev_local], [(x, y) for x, y, _ in ev_s3])


def test_verify_against_metadata_and_content(moto, s3_root):
    """quick: the object's size and the sha256 its writer put in its metadata; sha256: the content."""
    m = read_manifest(f"{s3_root}/test")
    verify_shards(m, "quick")
    verify_shards(m, "sha256")
    bucket, key = object_store.split_url(m.shard_url(0))
    s3 = moto.boto()
    body = s3.get_object(Bucket=bucket, Key=key)["Body"].read()
    assert s3.head_object(Bucket=bucket, Key=key)["Metadata"]["sha256"] == m.shard_sha256[0]
    flipped = body[:2000] + bytes([body[2000] ^ 1]) + body[2001:]  # same size, same metadata, other content
    s3.put_object(Bucket=bucket, Key=key, Body=flipped, Metadata={"sha256": m.shard_sha256[0]})
    verify_shards(read_manifest(f"{s3_root}/test"), "quick")  # size and metadata agree: quick cannot see it
    with pytest.raises(DamagedShard, match=re.escape(key)):
        verify_shards(read_manifest(f"{s3_root}/test"), "sha256")
    s3.put_object(Bucket=bucket, Key=key, Body=body[:-512], Metadata={"sha256": m.shard_sha256[0]})
    with pytest.raises(DamagedShard, match="bytes in the store"):
        verify_shards(read_manifest(f"{s3_root}/test"), "quick")


def test_write_to_s3_publishes_manifest_last(moto, s3_env, tmp_path):
    """`python -m data_shards write folder --out s3://...`: every shard PUT before the split's manifest PUT (seen
    by a proxy on the wire), the split reads back; then `upload` of the same data finds it already there."""
    from tests.data_shards.test_data_layouts import make_folder

    src = tmp_path / "src"
    make_folder(src, classes=6, per_class=5)
    proxy = FaultProxy(moto.port)
    proxy.requests = []
    fault = proxy._fault
    proxy._fault = lambda method, path: (proxy.requests.append((method, path)), fault(method, path))[1]
    try:
        moto.boto().create_bucket(Bucket="written")
        env = {**os.environ, **s3_env, "AWS_ENDPOINT_URL": proxy.endpoint, "PYTHONPATH": str(ROOT)}
        out = subprocess.run([sys.executable, "-m", "data_shards", "write", "folder", "--src", str(src), "--out",
                              "s3://written/ds", "--shard-size", "4kB", "--no-progress"],
                             env=env, capture_output=True, text=True, timeout=180)
        assert out.returncode == 0, out.stderr
        for split in ("train", "test"):
            puts = [p for meth, p in proxy.requests if meth == "PUT" and f"/ds/{split}/" in p]
            assert len(puts) >= 3 and puts[-1].endswith(f"/ds/{split}/manifest.json"), puts
            m = read_manifest(f"s3://written/ds/{split}")
            assert len(m.shard_names) == len(puts) - 1
            verify_shards(m, "sha256")
        again = subprocess.run([sys.executable, "-m", "data_shards", "write", "folder", "--src", str(src), "--out",
                                "s3://written/ds", "--shard-size", "4kB", "--no-progress"],
                               env=env, capture_output=True, text=True, timeout=180)
        assert again.returncode == 0 and "verified" in again.stdout, again.stdout + again.stderr
    finally:
        proxy.stop()


def through(proxy, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)


@pytest.fixture
def proxy(moto, s3_root):
    p = FaultProxy(moto.port)
    yield p
    p.stop()


def test_fault_slow_responses_throttling_and_resets(local_root, s3_root, proxy, monkeypatch, caplog):
    """Slow answers (0.2 s per GET), three 503 SlowDown and three connections reset mid-body: the epoch is the
    same batches as from local disk; every retry is counted in the log. (A reset on a stream the reader drops
    anyway, e.g. after a shard's first sample, needs no retry.)"""
    through(proxy, monkeypatch)
    proxy.delay_s, proxy.slowdown, proxy.resets, proxy.reset_after = 0.2, 3, 3, 100_000
    before = object_store.retries()
    caplog.set_level(logging.WARNING, logger="data_shards")
    args = dict(TRAIN, num_workers=0)
    remote = batches(train_loader(f"{s3_root}/train", rank=0, **args))
    same(batches(train_loader(str(local_root / "train"), rank=0, **args)), remote)
    assert proxy.counts["slowdown"] == 3 and proxy.counts["resets"] == 3 and proxy.counts["delayed"] > 3
    retried = object_store.retries() - before
    logged = [r.getMessage() for r in caplog.records if "retry" in r.getMessage()]
    assert len(logged) == retried >= 4, logged
    assert sum("SlowDown 503" in m for m in logged) == 3 and any("IncompleteRead" in m for m in logged), logged
    assert re.search(rf"\({retried} retries so far", logged[-1])


def test_fault_server_restarted_mid_epoch(moto, local_root, s3_root, proxy, monkeypatch, caplog):
    """moto killed (its open connections reset) after the third batch and started again 2 s later: the reader
    retries through the outage and the epoch is exactly the local one. moto keeps its objects in memory, so the
    restarted server is filled again before the proxy lets clients reach it (a real store keeps its data)."""
    through(proxy, monkeypatch)
    caplog.set_level(logging.WARNING, logger="data_shards")

    def refill():  # this thread leaves the process's AWS environment (the reader's) alone
        s3 = moto.boto()
        s3.create_bucket(Bucket=BUCKET)
        for split in ("train", "test"):
            m = read_manifest(local_root / split)
            for name, sha in zip(m.shard_names, m.shard_sha256):
                s3.upload_file(str(local_root / split / name), BUCKET, f"digits/{split}/{name}",
                               ExtraArgs={"Metadata": {"sha256": sha}})
            s3.upload_file(str(local_root / split / "manifest.json"), BUCKET, f"digits/{split}/manifest.json")

    def restart():
        proxy.closed = True
        moto.restart(down_s=2.0, refill=refill)
        proxy.closed = False

    args = dict(TRAIN, num_workers=0)
    local = batches(train_loader(str(local_root / "train"), rank=0, **args))
    got, before = [], object_store.retries()
    loader = train_loader(f"{s3_root}/train", rank=0, **args)
    for i, (x, y) in enumerate(loader):
        got.append((x.clone(), y.clone()))
        if i == 2:
            restarter = threading.Thread(target=restart)
            restarter.start()
            time.sleep(0.5)  # the server is down when the next shard is opened
    restarter.join()
    same(local, got)
    assert object_store.retries() > before
    assert any("retry" in r.getMessage() for r in caplog.records)


def test_fault_object_deleted_mid_run(moto, s3_root):
    """A shard deleted while the epoch runs: MissingData naming the object and the fix, never a shorter epoch."""
    loader = train_loader(f"{s3_root}/train", rank=0, **dict(TRAIN, num_workers=0, world_size=1))
    m = read_manifest(f"{s3_root}/train")
    it = iter(loader)
    next(it)
    bucket = object_store.split_url(s3_root)[0]
    for name in m.shard_names:  # delete every shard: whichever the stream opens next is gone
        moto.boto().delete_object(Bucket=bucket, Key=f"digits/train/{name}")
    with pytest.raises(MissingData, match=r"s3://shards/digits/train/folder-\d+\.tar does not exist.*write the split"):
        for _ in it:
            pass


def test_fault_missing_bucket_and_wrong_credentials(moto, s3_env, tmp_path, monkeypatch):
    """A missing bucket: MissingBucket naming it and the fix. Wrong credentials (moto with IAM checks on): one
    StoreAccessDenied naming the object and the AWS variables, and neither the secret nor a retry."""
    with pytest.raises(MissingBucket, match="bucket no-such-bucket of s3://no-such-bucket/x/train/manifest.json "
                                            "does not exist"):
        read_manifest("s3://no-such-bucket/x/train")
    with pytest.raises(MissingData, match="manifest s3://shards/nothing-here/train/manifest.json does not exist"):
        read_manifest(f"s3://{BUCKET}/nothing-here/train")
    secured = MotoS3(tmp_path / "auth", auth=True).start()
    try:
        s3 = secured.boto()
        s3.create_bucket(Bucket="locked")
        s3.put_object(Bucket="locked", Key="ds/train/manifest.json", Body=b"{}")
        monkeypatch.setenv("AWS_ENDPOINT_URL", secured.endpoint)
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", secured.key[0])
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
        before = object_store.retries()
        with pytest.raises(StoreAccessDenied, match="refused access to s3://locked/ds/train/manifest.json "
                                                    r"\(SignatureDoesNotMatch\).*AWS_ACCESS_KEY_ID") as e:
            read_manifest("s3://locked/ds/train")
        assert "not-the-secret" not in str(e.value) and object_store.retries() == before
    finally:
        secured.stop()


def test_fault_store_stops_answering(s3_root, proxy, monkeypatch):
    """A store that accepts connections and never answers: each try ends at the read timeout, then
    StoreUnavailable after the bounded tries, naming the object; never a hang."""
    through(proxy, monkeypatch)
    monkeypatch.setenv("DATA_SHARDS_S3_TIMEOUT_S", "1")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "3")
    proxy.match, proxy.hang = "/train/manifest.json", True
    t0 = time.monotonic()
    with pytest.raises(StoreUnavailable, match=r"s3://shards/digits/train/manifest.json: the store at .* failed 3 "
                                               r"tries in a row \(last: ReadTimeoutError"):
        read_manifest(f"{s3_root}/train")
    assert time.monotonic() - t0 < 20
    assert proxy.counts["hung"] == 3
