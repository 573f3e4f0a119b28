"""Failure paths of the data room on real shards and files: damaged or foreign shards (verify), hostile sources
(FIFO, symlink loop, linked files), and expected data errors as one or two lines (API and CLI)."""

import gc
import io
import json
import logging
import multiprocessing
import os
import shutil
import subprocess
import sys
import tarfile
import time

import pytest

import data_shards.verify as verify_mod
from data_shards import (
    BadManifest,
    DamagedShard,
    DataError,
    MissingData,
    TransformConfig,
    eval_loader,
    read_manifest,
    train_loader,
    verify_shards,
    write_dataset,
)
from tests.data_shards.test_data_layouts import REPO, make_folder, read_split

TF = TransformConfig(image_size=16, resize_size=20)


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """6 classes x 5 images: train (classes 0-2) and test (3-5), each in several shards."""
    root = tmp_path_factory.mktemp("integrity")
    src = make_folder(str(root / "src"), classes=6, per_class=5)
    write_dataset("folder", src, root / "out", shard_size="5kB", progress=False)
    for split in ("train", "test"):
        assert len(read_manifest(root / "out" / split).shards) >= 3
    return root / "out"


@pytest.fixture
def out(written, tmp_path):
    """A private copy of the written output, free to damage."""
    return shutil.copytree(written, tmp_path / "out")


def one_line_or_two(exn: BaseException) -> str:
    text = str(exn)
    assert text.count("\n") <= 1 and "Traceback" not in text and "Caught" not in text, text
    return text


def edit_manifest(split_dir, change) -> None:
    path = os.path.join(split_dir, "manifest.json")
    with open(path) as f:
        raw = json.load(f)
    change(raw)
    with open(path, "w") as f:
        json.dump(raw, f)


def drop_bytes(raw) -> None:
    """As a manifest without per-shard sizes reads (hand-made or foreign ones)."""
    for s in raw["shards"]:
        del s["bytes"]


def untag(shard: str) -> None:
    """Rewrite a shard as shards written before samples recorded their dataset and split."""
    with tarfile.open(shard) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(shard, "w") as tar:
        for m, data in members:
            if m.name.endswith(".json"):
                meta = json.loads(data)
                data = json.dumps({k: v for k, v in meta.items() if k not in ("dataset", "split")}).encode()
                m.size = len(data)
            tar.addfile(m, io.BytesIO(data))


# kind 7: shards read with integrity checks

@pytest.mark.timeout(60)
@pytest.mark.parametrize("case", ["as written", "split tag", "class"])
def test_a_test_shard_copied_over_a_train_shard_is_refused(out, case):
    """as written (shards pad to 10 KiB records, so sizes often agree); split tag: the manifest does not know
    the sizes (older or foreign manifest), the first sample says test; class: nor do the samples say their
    split (older shards), the class ids differ."""
    train, test = out / "train", out / "test"
    victim = read_manifest(train).shards[1]
    shutil.copy(read_manifest(test).shards[0], victim)
    if case != "as written":
        edit_manifest(train, drop_bytes)
    if case == "class":
        untag(victim)
    expected = {"as written": "", "split tag": "'split': 'test'", "class": "the manifest's label"}
    for make in (lambda: train_loader(train, batch_size=4, num_workers=0, transform=TF),
                 lambda: eval_loader(train, batch_size=4, num_workers=0, transform=TF)):
        with pytest.raises(DamagedShard) as info:
            make()
        text = one_line_or_two(info.value)
        assert f"damaged shard {victim}: " in text and expected[case] in text
        assert f"Rewrite the split: python -m data_shards write folder --src {written_src(out)}" in text
        assert f"--out {out} --shard-size 5120 --overwrite" in text   # the options it was written with
    # off: the old behaviour, test classes train silently (labels in range, so nothing else notices)
    assert len(list(train_loader(train, batch_size=4, num_workers=0, transform=TF, verify="off"))) == 3


@pytest.mark.timeout(60)
@pytest.mark.parametrize("workers", [0, 2])
def test_a_manifest_of_fewer_classes_than_its_shards_is_refused_not_skipped(out, workers):
    """Labels past the manifest's classes mean shards and manifest of different writes: raised as DamagedShard
    naming the shard and the manifest (skipped as unreadable, they trained and evaluated on a silently smaller
    split: the attacker's inflated Recall@1), whatever the decode and the sampler."""
    train = out / "train"

    def fewer(raw):
        raw["num_classes"] = 2
        raw["class_names"], raw["class_ids"] = raw["class_names"][:2], raw["class_ids"][:2]

    edit_manifest(train, fewer)
    makes = [lambda: train_loader(train, batch_size=4, num_workers=workers, transform=TF, verify="off"),
             lambda: train_loader(train, batch_size=4, num_workers=workers, decode="none", verify="off"),
             lambda: train_loader(train, batch_size=4, num_workers=workers, transform=TF, verify="off",
                                  sampler="m_per_class", m_per_class=2, sampler_window=1),
             lambda: eval_loader(train, batch_size=4, num_workers=workers, transform=TF, verify="off")]
    for make in makes:
        with pytest.raises(DamagedShard) as info:
            for _ in make():
                pass
        text = one_line_or_two(info.value)
        assert "has label 2, outside the 2 classes of" in text and f"{train}/manifest.json" in text
        assert "Rewrite the split: python -m data_shards write folder" in text


def written_src(out) -> str:
    return read_manifest(out / "train").raw["source"]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("workers", [0, 2])
def test_a_shard_replaced_during_a_run_is_caught_when_opened(out, workers):
    train, test = out / "train", out / "test"
    edit_manifest(train, drop_bytes)            # so that the first sample is what tells
    verify_mod._verified.clear()
    el = eval_loader(train, batch_size=4, num_workers=workers, transform=TF)   # checked at start-up: fine
    victim = read_manifest(train).shards[2]
    shutil.copy(read_manifest(test).shards[0], victim)
    with pytest.raises(DamagedShard) as info:
        for _ in el:
            pass
    text = one_line_or_two(info.value)
    assert f"damaged shard {victim}: its first sample" in text and "'split': 'test'" in text


@pytest.mark.timeout(60)
def test_a_truncated_or_grown_shard_is_refused_by_size(written, out):
    m = read_manifest(out / "train")
    for i, change in ((0, 512), (2, -10240)):
        os.truncate(m.shards[i], m.shard_bytes[i] + change)
        with pytest.raises(DamagedShard, match=f"{m.shard_names[i]}: {m.shard_bytes[i] + change} bytes, the "
                                               f"manifest says {m.shard_bytes[i]}"):
            verify_shards(m, "quick", rank=1, world_size=len(m.shards))   # every rank stats every shard
        shutil.copy(written / "train" / m.shard_names[i], m.shards[i])
    verify_shards(m, "quick")


@pytest.mark.timeout(60)
def test_sha256_is_opt_in_and_shared_among_ranks(out):
    train = out / "train"
    m = read_manifest(train)
    victim = m.shards[1]
    with tarfile.open(victim) as tar:            # garble the last image's bytes in place: same size
        last = [mb for mb in tar.getmembers() if mb.name.endswith(".jpg")][-1]
    with open(victim, "r+b") as f:
        f.seek(last.offset_data + last.size // 2)
        f.write(b"\x00" * 8)
    verify_mod._verified.clear()
    verify_shards(m, "quick")                   # size and first sample are intact
    assert len(list(train_loader(train, batch_size=4, num_workers=0, transform=TF))) == 3
    with pytest.raises(DamagedShard, match=r"its sha256 is [0-9a-f]{64}, the manifest says " + m.shard_sha256[1]):
        train_loader(train, batch_size=4, num_workers=0, transform=TF, verify="sha256")
    verify_shards(m, "sha256", rank=0, world_size=2)   # rank 0 hashes shards 0, 2, ...; shard 1 is rank 1's
    with pytest.raises(DamagedShard, match="damaged shard .*-000001.tar"):
        verify_shards(m, "sha256", rank=1, world_size=2)


@pytest.mark.timeout(60)
def test_startup_checks_run_once_per_process_unless_a_shard_changes(out, monkeypatch):
    train = out / "train"
    m = read_manifest(train)
    verify_mod._verified.clear()
    opened = []
    real = verify_mod.first_sample
    monkeypatch.setattr(verify_mod, "first_sample", lambda url: opened.append(url) or real(url))
    for epoch in range(3):
        train_loader(train, batch_size=4, num_workers=0, epoch=epoch, transform=TF)
    assert sorted(opened) == sorted(m.shards)
    os.utime(m.shards[0], ns=(1, 1))             # touched: read again
    train_loader(train, batch_size=4, num_workers=0, transform=TF)
    assert opened[len(m.shards):] == [m.shards[0]]


@pytest.mark.timeout(60)
def test_a_manifest_without_shard_sizes_is_still_read(out):
    train = out / "train"
    edit_manifest(train, drop_bytes)
    m = read_manifest(train)
    assert m.shard_bytes == [None] * len(m.shards) and m.num_samples == 15
    os.truncate(m.shards[0], os.path.getsize(m.shards[0]) - 1)   # unknown size: not checked
    verify_shards(m, "quick")
    labels = [y for _, y in train_loader(train, batch_size=5, num_workers=0, transform=TF)]
    assert len(labels) == 3


@pytest.mark.timeout(60)
def test_a_pipe_url_gets_the_first_sample_check(out):
    train = out / "train"
    verify_mod._verified.clear()
    url = f"pipe:cat {train}/{{name}}"
    assert len(list(train_loader(url, batch_size=4, num_workers=0, transform=TF))) == 3
    shutil.copy(read_manifest(out / "test").shards[0], read_manifest(train).shards[0])
    damage = r"damaged shard pipe:cat .*-000000.tar: its first sample .*'test'"
    tl = train_loader(url, batch_size=4, num_workers=2, transform=TF)   # remote: start-up check once per process
    with pytest.raises(DamagedShard, match=damage):                     # but every open is checked
        list(tl)
    verify_mod._verified.clear()
    with pytest.raises(DamagedShard, match=damage):
        train_loader(url, batch_size=4, num_workers=0, transform=TF)


def daemonic_children() -> list:
    return [c for c in multiprocessing.active_children() if c.daemon]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("how", ["raises", "closed early", "exhausted"])
@pytest.mark.parametrize("persistent", [False, True])
def test_loader_workers_end_with_their_iteration_not_at_a_gc_pass(out, how, persistent):
    """Workers are stopped when an iteration raises, is closed early or ends (persistent workers: only when it
    raises), with the garbage collector off: left to gc, an iterator abandoned by an exception cost 5 s per
    worker and left the workers alive (CI once hung 60 s in a loader forked beside such garbage)."""
    train = out / "train"
    verify_mod._verified.clear()
    assert daemonic_children() == []
    gc.collect()
    gc.disable()
    try:
        tl = train_loader(train, batch_size=4, num_workers=2, transform=TF, persistent_workers=persistent)
        t0 = time.monotonic()
        if how == "raises":
            shutil.copy(read_manifest(out / "test").shards[0], read_manifest(train).shards[0])
            with pytest.raises(DamagedShard):
                list(tl)
        elif how == "closed early":
            batches = iter(tl)
            next(batches)
            batches.close()
        else:
            assert len(list(tl)) == 3
        stays = persistent and how != "raises"
        assert len(daemonic_children()) == (2 if stays else 0)
        assert time.monotonic() - t0 < 10
        tl.close()
        assert daemonic_children() == []
    finally:
        gc.enable()


# data side of kind 9: expected data errors are DataErrors of one or two lines naming the path and the fix

@pytest.mark.timeout(60)
def test_missing_and_inconsistent_data_are_clean_data_errors(written, out, tmp_path):
    with pytest.raises(MissingData, match="the split directory does not exist") as info:
        train_loader(tmp_path / "nowhere" / "train", batch_size=4)
    assert isinstance(info.value, FileNotFoundError) and isinstance(info.value, DataError)
    assert "python -m data_shards write FORMAT --src SRC --out OUT" in one_line_or_two(info.value)
    os.makedirs(tmp_path / "half")
    with pytest.raises(MissingData, match="not a finished split"):
        read_manifest(tmp_path / "half")
    train = out / "train"
    edit_manifest(train, lambda raw: raw.update(num_samples=raw["num_samples"] + 1))
    with pytest.raises(BadManifest, match="is inconsistent .*shard counts sum to 15, num_samples is 16") as info:
        eval_loader(train, batch_size=4)
    assert "rewrite the split (python -m data_shards write folder --src" in one_line_or_two(info.value)
    edit_manifest(train, lambda raw: raw.pop("class_ids"))
    with pytest.raises(BadManifest, match="lacks or garbles a field .*class_ids"):
        read_manifest(train)
    with open(train / "manifest.json", "w") as f:
        f.write('{"format_version": 1, "dataset": ')
    with pytest.raises(BadManifest, match="is not valid JSON"):
        read_manifest(train)
    test = out / "test"
    os.remove(read_manifest(test).shards[1])
    with pytest.raises(MissingData, match=r"shard .*-000001.tar of folder/test is missing") as info:
        eval_loader(test, batch_size=4)
    one_line_or_two(info.value)
    with pytest.raises(DataError, match="no full batch .* lower the batch size"):
        train_loader(written / "train", batch_size=64)


@pytest.mark.timeout(120)
def test_cli_prints_expected_errors_in_one_or_two_lines_and_exits_2(written, tmp_path):
    def cli(*args):
        r = subprocess.run([sys.executable, "-m", "data_shards", "write", *args, "--no-progress"], cwd=REPO,
                           capture_output=True, text=True, timeout=60, env={**os.environ, "PYTHONPATH": REPO})
        assert r.returncode == 2 and "Traceback" not in r.stderr and 1 <= r.stderr.count("\n") <= 2, r.stderr
        return r.stderr

    assert "src " + str(tmp_path / "missing") + " does not exist" in cli(
        "folder", "--src", str(tmp_path / "missing"), "--out", str(tmp_path / "o"))
    out = shutil.copytree(written, tmp_path / "out")
    shard = read_manifest(out / "train").shards[0]
    with open(shard, "r+b") as f:
        f.seek(700)
        f.write(b"XXXX")
    err = cli("folder", "--src", written_src(out), "--out", str(out), "--shard-size", "5kB")
    assert "exists but does not verify" in err and "Rewrite it: python -m data_shards write folder" in err
    src = written_src(out)
    shutil.copytree(written, out, dirs_exist_ok=True)  # undamaged again
    changed = cli("folder", "--src", src, "--out", str(out), "--shard-size", "5kB", "--train-fraction", "0.4")
    new = f"python -m data_shards write folder --src {src} --out {out} --shard-size 5120 " \
          "--train-fraction 0.4 --overwrite"  # the NEW option in the command it suggests, never the old one
    assert "was written with --train-fraction (not given), not --train-fraction 0.4" in changed, changed
    assert new in changed, changed
    assert "--seed 7" in cli("folder", "--src", src, "--out", str(out), "--shard-size", "5kB", "--seed", "7")
    bad = tmp_path / "bad_sop"
    os.makedirs(bad)
    (bad / "Ebay_train.txt").write_text("image_id class_id super_class_id path\n1 x 1 a/b_0.JPG\n")
    (bad / "Ebay_test.txt").write_text("image_id class_id super_class_id path\n")
    assert "Ebay_train.txt line 2 is not" in cli("sop", "--src", str(bad), "--out", str(tmp_path / "o2"))


# kind 8: the writer on hostile sources

@pytest.mark.timeout(60)
def test_a_fifo_named_like_an_image_is_skipped_not_waited_on(tmp_path):
    src = make_folder(str(tmp_path / "src"), classes=2, per_class=3)
    os.mkfifo(os.path.join(src, "class_00", "pipe.jpg"))     # no writer: a blocking open would wait forever
    summary = write_dataset("folder", src, tmp_path / "out", train_fraction=1.0, workers=2, progress=False)
    s = summary["train"]
    assert s["num_samples"] == 6 and s["skipped"] == 1
    assert s["skipped_paths"] == [os.path.join("class_00", "pipe.jpg") + ": not a regular file (a FIFO)"]
    m = read_manifest(tmp_path / "out" / "train")
    assert m.skipped == {"count": 1, "paths": s["skipped_paths"]}
    # a re-run verifies (the FIFO counts as a source record left out) instead of failing or hanging
    again = write_dataset("folder", src, tmp_path / "out", train_fraction=1.0, workers=2, progress=False)
    assert again["train"]["status"] == "verified"


@pytest.mark.timeout(60)
def test_symlink_loops_and_linked_files_add_no_duplicates(tmp_path, caplog):
    src = make_folder(str(tmp_path / "src"), classes=4, per_class=3)
    c0, c1, c3 = (os.path.join(src, f"class_0{c}") for c in (0, 1, 3))
    os.symlink(".", os.path.join(c0, "loop"))                          # the folder itself
    os.makedirs(os.path.join(c0, "sub"))
    os.symlink(os.path.join("..", ".."), os.path.join(c0, "sub", "up"))    # the source root above it
    os.symlink(os.path.join("..", "class_00", "img_0.jpg"), os.path.join(c1, "alias.jpg"))   # another class
    os.link(os.path.join(c1, "img_1.jpg"), os.path.join(c1, "hard.jpg"))    # same class, listed first
    os.symlink(os.path.join("..", "class_00", "img_2.jpg"), os.path.join(c3, "leak.jpg"))   # the test split
    outside = make_folder(str(tmp_path / "elsewhere"), classes=1, per_class=2, seed=7)
    os.symlink(os.path.join(outside, "class_00"), os.path.join(c1, "more"))   # a linked folder: followed once
    caplog.set_level(logging.WARNING, logger="data_shards")
    summary = write_dataset("folder", src, tmp_path / "out", train_fraction=0.5, progress=False)
    train, test = summary["train"], summary["test"]
    assert train["num_samples"] == 3 + 3 + 2 and test["num_samples"] == 6
    assert sorted(p.split(":")[0] for p in train["skipped_paths"]) == [
        os.path.join("class_01", "alias.jpg"), os.path.join("class_01", "img_1.jpg")]
    assert [p.split(":")[0] for p in test["skipped_paths"]] == [os.path.join("class_03", "leak.jpg")]
    assert "the same file as class_00/img_2.jpg (train)" in test["skipped_paths"][0]
    warned = " ".join(r.getMessage() for r in caplog.records)
    assert "loop leads to" in warned and "up leads to" in warned
    for split, n in (("train", 8), ("test", 6)):
        samples = read_split(str(tmp_path / "out" / split))
        images = [s["jpg"] for s in samples]
        assert len(samples) == n and len(set(images)) == n         # no image twice
        assert all(json.loads(s["json"])["split"] == split for s in samples)


def test_data_verify_config_key():
    from trainer.config import ConfigError, load_config
    assert load_config(None, ["data.root=x"]).data.verify == "quick"
    assert load_config(None, ["data.root=x", "data.verify=sha256"]).data.verify == "sha256"
    with pytest.raises(ConfigError, match=r"^data\.verify: 'full' is not one of 'quick', 'sha256', 'off'"):
        load_config(None, ["data.root=x", "data.verify=full"])


class _Finalized:
    """In a reference cycle (only gc frees it); its finalizer writes to a file."""

    def __init__(self, path):
        self.path, self.me = path, self

    def __del__(self):
        with open(self.path, "a") as f:
            f.write(f"{os.getpid()}\n")


def _collect_in_pool_worker(_):
    gc.collect()
    return os.getpid()


@pytest.mark.timeout(60)
def test_forked_workers_never_finalize_the_parents_garbage(tmp_path):
    """Loader workers and the writer's pool are forked: the parent's uncollected cycles must not be finalized
    in a child (a gloo process group destroyed inside a shard-writer process hung the test suite)."""
    import concurrent.futures

    log = tmp_path / "finalized.txt"
    gc.collect()
    gc.disable()
    try:
        _Finalized(str(log))  # garbage of the parent, not yet collected
        with concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("fork")) as pool:
            child = pool.submit(_collect_in_pool_worker, 0).result(timeout=30)
        assert child != os.getpid() and not log.exists(), log.read_text()  # the worker's gc left it alone
    finally:
        gc.enable()
        gc.collect()
    assert log.read_text().split() == [str(os.getpid())]  # the parent still does
