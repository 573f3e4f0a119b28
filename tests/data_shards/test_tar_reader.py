"""data_shards/tar_reader.py yields exactly what webdataset's tarfile_samples yields for the same shard (keys, fields,
bytes, __url__), on every tar format a shard may be in, on damaged tars, and from a start sample on."""
import gzip
import io
import itertools
import os
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest
import webdataset as wds
from PIL import Image

from data_shards import write_dataset
from data_shards.manifest import read_manifest
from data_shards.tar_reader import _pax_records, is_plain_tar, local_members, local_path, tar_samples


def members(n: int, long: bool = False):
    """(name, bytes) of n samples with three fields each; long: paths past ustar's 100-byte name field."""
    folder = ("d" * 60 + "/" + "e" * 60 + "/") if long else "sub/"
    for i in range(n):
        key = f"{folder}sample_{i:04d}" + ("_" + "x" * 90 if long and i % 2 else "")
        yield f"{key}.jpg", os.urandom(100 + 37 * i)
        yield f"{key}.cls", str(i % 7).encode()
        yield f"{key}.JSON", b'{"i": %d}' % i


def write_tar(path, items, fmt=tarfile.GNU_FORMAT, mtime=0.0, extra=()):
    with tarfile.open(path, "w", format=fmt) as tf:
        for name, data in list(extra) + list(items):
            info = tarfile.TarInfo(name)
            if data is None:
                info.type = tarfile.DIRTYPE
            else:
                info.size = len(data)
            info.mtime = mtime
            tf.addfile(info, None if data is None else io.BytesIO(data))
    return path


def reference(url, start=0, handler=None):
    calls = []
    h = handler or (lambda e: calls.append(e) or True)
    return list(itertools.islice(wds.tarfile_samples([{"url": url}], handler=h), start, None)), calls


def ours(url, start=0):
    calls = []
    return list(tar_samples(url, lambda e: calls.append(e) or True, start)), calls


FORMATS = {
    "gnu": dict(fmt=tarfile.GNU_FORMAT),
    "gnu long names": dict(fmt=tarfile.GNU_FORMAT, long=True),
    "ustar prefix": dict(fmt=tarfile.USTAR_FORMAT, long=False),
    "pax float mtime (shards before integer mtime)": dict(fmt=tarfile.PAX_FORMAT, mtime=1764460000.25),
    "pax long names": dict(fmt=tarfile.PAX_FORMAT, long=True),
}


@pytest.mark.parametrize("name", list(FORMATS))
@pytest.mark.parametrize("start", [0, 1, 5, 40])
def test_same_samples_as_webdataset(tmp_path, name, start):
    kw = dict(FORMATS[name])
    long = kw.pop("long", False)
    extra = [("sub", None), ("__meta__", b"ignored"), ("__cache__/x.bin", b"ignored too")]
    path = write_tar(str(tmp_path / "a.tar"), members(12, long), extra=extra, **kw)
    assert is_plain_tar(path)
    got, calls = ours(path, start)
    want, _ = reference(path, start)
    assert got == want and not calls
    assert len(got) == max(0, 12 - start)


def test_a_shard_of_the_writer_and_its_file_url(tmp_path):
    src = tmp_path / "src"
    for c in range(3):
        (src / f"c{c}").mkdir(parents=True)
        for i in range(4):
            Image.new("RGB", (8, 8), (c * 60, i * 40, 0)).save(src / f"c{c}" / f"{i}.png")
    write_dataset("folder", str(src), str(tmp_path / "shards"), train_fraction=1.0, progress=False)
    m = read_manifest(str(tmp_path / "shards" / "train"))
    url = m.shard_url(0)
    assert local_path("file://" + url) == url and local_path("pipe:cat x") is None
    assert local_path("https://host/a.tar") is None
    assert ours(url)[0] == reference(url)[0]
    file_url = ours("file://" + url)[0]
    assert [s["__key__"] for s in file_url] == [s["__key__"] for s in ours(url)[0]]


def test_other_formats_and_urls_go_through_webdataset(tmp_path):
    path = write_tar(str(tmp_path / "a.tar"), members(5))
    gz = tmp_path / "a.tar.gz"
    gz.write_bytes(gzip.compress(Path(path).read_bytes()))
    assert not is_plain_tar(str(gz))
    assert ours(str(gz), 2)[0] == reference(str(gz), 2)[0]
    assert ours(f"pipe:cat {path}", 1)[0] == reference(f"pipe:cat {path}", 1)[0]


@pytest.mark.parametrize("cut", [0.3, 0.75])
def test_a_truncated_tar_ends_the_shard_with_one_handler_call(tmp_path, cut):
    path = write_tar(str(tmp_path / "a.tar"), members(20))
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(int(size * cut) // 512 * 512 + 300)  # inside a block (at a block boundary a tar just ends)
    got, calls = ours(path)
    want, _ = reference(path)
    assert len(calls) == 1 and "unexpected end of data" in str(calls[0])
    assert [s["__key__"] for s in got] == [s["__key__"] for s in want]
    assert got == want  # a sample cut short keeps the fields it has, as webdataset's


def test_a_garbled_header_ends_the_shard_there(tmp_path):
    path = write_tar(str(tmp_path / "a.tar"), members(10))
    data = bytearray(Path(path).read_bytes())
    names = [n for n, _ in local_members(path, path)]
    offset = data.index(b"sub/sample_0004.jpg")
    data[offset:offset + 8] = b"GARBLED!"  # that header's checksum no longer matches
    Path(path).write_bytes(bytes(data))
    got, calls = ours(path)
    want, _ = reference(path)
    assert len(calls) == 1 and "checksum" in str(calls[0])
    assert [s["__key__"] for s in got] == [s["__key__"] for s in want] == [f"sub/sample_{i:04d}" for i in range(4)]
    assert len(names) == 30


def test_a_handler_that_refuses_raises(tmp_path):
    path = write_tar(str(tmp_path / "a.tar"), members(4))
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 1024 * 512 + 300)

    def refuse(exn):
        return False

    with pytest.raises(tarfile.ReadError, match="unexpected end of data"):
        list(tar_samples(path, refuse))


def test_skipped_samples_are_not_read(tmp_path):
    path = write_tar(str(tmp_path / "a.tar"), members(6))
    read = []
    for name, data in local_members(path, path, wanted=lambda n: n.startswith("sub/sample_0005")):
        read.append((name, len(data)))
    assert [n for n, size in read if size] == ["sub/sample_0005.jpg", "sub/sample_0005.cls", "sub/sample_0005.JSON"]
    assert len(read) == 18


@pytest.mark.skipif(not shutil.which("tar") or "GNU" not in subprocess.run(["tar", "--version"], capture_output=True,
                                                                           text=True).stdout, reason="needs GNU tar")
@pytest.mark.parametrize("fmt", ["gnu", "posix"])
def test_gnu_sparse_members_are_read_by_webdataset(tmp_path, fmt):
    """GNU tar's sparse files (found by a fresh attacker): the shard goes on through webdataset from that sample."""
    for i in range(3):
        (tmp_path / f"a{i}.cls").write_bytes(b"1")
        (tmp_path / f"a{i}.jpg").write_bytes(os.urandom(700))
    with open(tmp_path / "a1.jpg", "r+b") as f:  # a hole of 1 MB: stored sparse
        f.truncate(1 << 20)
        f.seek(900_000)
        f.write(b"d")
    path = str(tmp_path / "sp.tar")
    names = sorted(p.name for p in tmp_path.iterdir() if p.name != "sp.tar")
    subprocess.run(["tar", f"--format={fmt}", "--sparse", "-cf", path, *names], cwd=tmp_path, check=True)
    for start in (0, 1, 2):
        got, calls = ours(path, start)
        assert got == reference(path, start)[0] and not calls
        assert len(got) == 3 - start
    assert len(ours(path)[0][1]["jpg"]) == 1 << 20


def test_pax_records_padded_with_nul_and_v7_directories(tmp_path):
    assert _pax_records(b"14 path=q.jpg\n\0\0\0") == {"path": "q.jpg"}
    path = str(tmp_path / "a.tar")
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tf:
        for name, data in members(3):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        v7 = tarfile.TarInfo("old_dir/")
        v7.type = tarfile.AREGTYPE  # an old V7 directory: a "file" whose name ends in a slash
        tf.addfile(v7)
    got = ours(path)[0]
    assert got == reference(path)[0] and len(got) == 3
