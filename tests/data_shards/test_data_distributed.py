"""CUB-200-2011, Cars196 and SOP layouts converted, then read back under `torchrun --nproc_per_node 2` with
2 DataLoader workers per rank: equal train batches per rank (an all_reduce per batch, as DDP does, would
hang otherwise), labels, and every test/train sample evaluated exactly once across ranks and workers; a
split with a truncated shard and a corrupt JPEG is read to the end with the damage reported (verify="off"; the
intact splits are read with the default verify="quick", its start-up work shared between the ranks)."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from data_shards import read_manifest, write_dataset
from tests.data_shards.test_data_layouts import REPO, make_cars, make_cub, make_sop, read_split
from tests.data_shards.test_data_stream import damaged_copy
from tests.helpers import free_port

SCRIPT = r'''
import json, os, sys
import torch
import torch.distributed as dist
from data_shards import TransformConfig, eval_loader, read_manifest, train_loader

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
tf = TransformConfig(image_size=24, resize_size=28)
out = {}
for name, bs in json.loads(sys.argv[2]).items():
    for split in ("train", "test"):
        d = os.path.join(sys.argv[1], name, split)
        verify = "off" if name == "damaged" else "quick"
        tl = train_loader(d, batch_size=bs, num_workers=2, seed=5, epoch=1, rank=rank, world_size=world,
                          transform=tf, verify=verify)
        n, labels = 0, []
        for x, y in tl:
            assert x.shape == (bs, 3, 24, 24) and y.shape == (bs,), (x.shape, y.shape)
            t = torch.ones(1)
            dist.all_reduce(t)
            assert t.item() == world
            labels += y.tolist()
            n += 1
        keys, eval_labels = [], []
        for x, y, k in eval_loader(d, batch_size=bs, num_workers=2, rank=rank, world_size=world, transform=tf,
                                   verify=verify):
            assert x.shape[1:] == (3, 24, 24)
            keys += k
            eval_labels += y.tolist()
        out[f"{name}/{split}"] = dict(len=len(tl), batches=n, labels=labels, keys=keys, eval_labels=eval_labels)
with open(os.path.join(sys.argv[3], f"rank{rank}.json"), "w") as f:
    json.dump(out, f)
dist.barrier()
dist.destroy_process_group()
'''


@pytest.mark.slow  # the layouts bench under torchrun (20 s); the 2-rank stream tests stay in the default run
@pytest.mark.distributed
def test_benchmark_layouts_under_torchrun(tmp_path):
    shards = tmp_path / "shards"
    make_cub(str(tmp_path / "cub"))
    write_dataset("cub200", str(tmp_path / "cub"), shards / "cub200", shard_size="7kB", progress=False)
    write_dataset("cars196", make_cars(str(tmp_path / "cars")), shards / "cars196", shard_size="9kB",
                  progress=False)
    write_dataset("sop", make_sop(str(tmp_path / "sop")), shards / "sop", shard_size="5kB", progress=False)
    damaged_copy(shards / "cub200" / "train", shards / "damaged" / "train")   # a truncated shard, a bad JPEG
    shutil.copytree(shards / "cub200" / "test", shards / "damaged" / "test")
    batch = {"cub200": 8, "cars196": 8, "sop": 3, "damaged": 8}
    script = tmp_path / "read.py"
    script.write_text(SCRIPT)
    env = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), str(script), str(shards), json.dumps(batch), str(tmp_path)]
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{k}.json").read_text()) for k in range(2)]
    assert "the shard ended early" in r.stderr and "skipped sample" in r.stderr
    for name, bs in batch.items():
        for split in ("train", "test"):
            d = str(shards / name / split)
            m = read_manifest(d)
            assert len(m.shards) >= 3, (name, split, len(m.shards))
            a, b = (rk[f"{name}/{split}"] for rk in ranks)
            expected_batches = m.num_samples // (bs * 2)
            assert a["len"] == b["len"] == a["batches"] == b["batches"] == expected_batches > 0, (name, split)
            assert all(0 <= y < m.num_classes for y in a["labels"] + b["labels"])
            truth = {json.loads(s["json"])["path"]: int(s["cls"]) for s in read_split(str(shards / "cub200" / split))
                     } if name == "damaged" else {json.loads(s["json"])["path"]: int(s["cls"]) for s in read_split(d)}
            keys = a["keys"] + b["keys"]
            if name == "damaged" and split == "train":                   # what is readable, once
                # (a sample cut off before its .json by the truncation is keyed by its tar key)
                assert len(set(keys)) == len(keys) and 150 < len(keys) < len(truth)
                assert all(k in truth or (len(k) == 8 and k.isdigit()) for k in keys)
            else:
                assert sorted(keys) == sorted(truth), (name, split)      # every sample exactly once
            assert a["keys"] and b["keys"]
            assert [truth.get(k, -1) for k in keys] == [y if k in truth else -1 for k, y in
                                                        zip(keys, a["eval_labels"] + b["eval_labels"])]
