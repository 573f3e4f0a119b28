"""bench/quality.py end to end on tiny real shards: two losses, one seed, a few steps; table, chart and JSON."""
import json
import os
import sys

import pytest
import torch

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))  # the repository
sys.path.insert(0, os.path.join(ROOT, "bench"))
import quality  # noqa: E402

DIST_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def test_modes_list_their_rows():
    assert len(quality.entries_for("ablation", "", "")) == 8
    assert list(quality.entries_for("compare", "", "")) == quality.DEFAULT_COMPARE
    assert len(quality.entries_for("compare", "all", "")) == 8
    assert quality.entries_for("sweep-n", "", "1,3") == {"N=1": ["loss.proxies_per_class=1"],
                                                         "N=3": ["loss.proxies_per_class=3"]}
    with pytest.raises(SystemExit, match="--entries"):
        quality.entries_for("compare", "ProxyGML,Nope", "")


def test_two_entries_one_seed(tmp_path, shards):
    data = shards
    argv = ["--data", data, "--work", str(tmp_path / "work"), "--entries", "ProxyGML,ProxyAnchor", "--seeds", "1",
            "--steps", "3", "--batch-size", "64", "--width", "8", "--cpu", "data.num_workers=0",
            "data.transform.image_size=16", "data.transform.resize_size=16", "model.dim=16"]
    threads = torch.get_num_threads()
    try:
        rows = quality.main(argv)
    finally:
        for k in DIST_VARS:
            os.environ.pop(k, None)
    assert torch.get_num_threads() == threads  # the bench's --threads does not leak into the caller
    assert [r["entry"] for r in rows] == ["ProxyGML", "ProxyAnchor"]
    for row in rows:
        assert row["steps"] == 3 and row["seeds"] == 1
        for key, _ in quality.COLUMNS:
            mean, std = row[key]
            assert 0.0 < mean <= 1.0 and std == 0.0
    out = tmp_path / "work" / "results"
    table = (out / "quality-compare.md").read_text()
    assert "| ProxyGML |" in table and "| ProxyAnchor |" in table and "MAP@R" in table
    assert (out / "quality-compare.png").read_bytes()[:4] == b"\x89PNG"
    results = json.loads((out / "quality-compare.json").read_text())["results"]
    assert {(r["entry"], r["seed"]) for r in results} == {("ProxyGML", 0), ("ProxyAnchor", 0)}
    assert quality.main([*argv, "--report-only"]) == rows  # the table again from the JSON, no training
    # the two losses trained differently from the same start (same seed, data, schedule)
    assert results[0]["recall_at_1"] != results[1]["recall_at_1"] or results[0]["nmi"] != results[1]["nmi"]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("script, args", [("quality.py", []), ("omniglot.py", []),
                                          ("quality.py", ["--data", "nowhere"]), ("omniglot.py", ["--omniglot", "."])])
def test_run_from_a_clone_without_data_says_what_to_pass(tmp_path, script, args):
    """From any directory, without the data: one line naming --data, --omniglot and --download, exit 2."""
    import subprocess

    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    r = subprocess.run([sys.executable, os.path.join(ROOT, "bench", script), *args, "--work", str(tmp_path / "w")],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert r.returncode == 2, r.stderr[-2000:]
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert lines[0].startswith(f"bench/{script}: ")
    assert all(w in lines[0] for w in ("--data", "--omniglot", "--download")), lines[0]


def test_torchvisions_omniglot_layout_becomes_one_folder_per_character(tmp_path):
    """torchvision's images_background / images_evaluation (alphabet/character/*.png): background first."""
    base = tmp_path / "omniglot-py"
    for part, alphabets in (("images_background", ["Latin", "Greek"]), ("images_evaluation", ["Angelic"])):
        for alphabet in alphabets:
            for char in ("character01", "character02"):
                os.makedirs(base / part / alphabet / char)
                (base / part / alphabet / char / "0001_01.png").write_bytes(b"png")
    tree = quality.omniglot_tree(str(tmp_path), str(tmp_path / "work"), expected=None)
    classes = sorted(os.listdir(tree))
    assert classes == ["0_Greek_character01", "0_Greek_character02", "0_Latin_character01", "0_Latin_character02",
                       "1_Angelic_character01", "1_Angelic_character02"]
    assert os.path.isfile(os.path.join(tree, classes[-1], "0001_01.png"))
    with pytest.raises(quality.BenchInputError, match="expected 1623 character folders, found 6"):
        quality.omniglot_tree(str(tmp_path), str(tmp_path / "work"))
