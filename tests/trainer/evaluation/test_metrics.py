"""trainer.metrics against a brute-force numpy reference (full similarity matrix, lexsort tie-breaking)."""

import math

import numpy as np
import pandas as pd
import pytest
import torch

from trainer.evaluation import knn
from trainer.evaluation.knn import nearest_neighbors
from trainer.evaluation.metrics import compute_metrics, kmeans

BACKENDS = ["faiss", "torch"]


# ---------------------------------------------------------------- reference


def reference_neighbors(x: np.ndarray) -> np.ndarray:
    """(N, N-1) neighbour order: similarity descending, then index ascending, the query left out."""
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    s = x.astype(np.float64) @ x.astype(np.float64).T
    np.fill_diagonal(s, -np.inf)
    n = len(x)
    return np.stack([np.lexsort((np.arange(n), -s[i]))[: n - 1] for i in range(n)])


def reference_metrics(x, labels, ks):
    order = reference_neighbors(x)
    ids, counts = np.unique(labels, return_counts=True)
    size = dict(zip(ids.tolist(), counts.tolist()))
    hits = {K: [] for K in ks}
    aps, rps, per_class = [], [], {c: [] for c in ids.tolist()}
    for i, nbrs in enumerate(order):
        r = size[int(labels[i])] - 1
        if r == 0:
            continue
        same = labels[nbrs] == labels[i]
        for K in ks:
            hits[K].append(same[:K].any())
        rel = same[:r]
        precision = np.cumsum(rel) / np.arange(1, r + 1)
        aps.append((precision * rel).sum() / r)
        rps.append(rel.sum() / r)
        per_class[int(labels[i])].append((same[0], aps[-1]))
    out = {f"recall_at_{K}": np.mean(hits[K]) if hits[K] else math.nan for K in ks}
    out["map_at_r"] = np.mean(aps) if aps else math.nan
    out["r_precision"] = np.mean(rps) if rps else math.nan
    table = pd.DataFrame(
        {
            "class_index": ids,
            "size": counts,
            "recall_at_1": [np.mean([h for h, _ in per_class[c]]) if per_class[c] else np.nan for c in ids],
            "map_at_r": [np.mean([a for _, a in per_class[c]]) if per_class[c] else np.nan for c in ids],
        }
    )
    return out, table


# ---------------------------------------------------------------- data


def random_set(n=300, dim=16, classes=40, singletons=5, seed=0):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(classes + singletons, dim))
    labels = np.concatenate([rng.integers(0, classes, n - singletons), np.arange(classes, classes + singletons)])
    x = centers[labels] + 1.2 * rng.normal(size=(n, dim))
    return x.astype(np.float32), (labels * 7 + 1000).astype(np.int64)  # class ids need not be 0..C-1


def tied_set(n=150, dim=8, classes=20, seed=1):
    """Unit vectors with four entries of +-0.5: every similarity is a multiple of 0.25, exact in any order
    of summation, so ties (and duplicate vectors) are everywhere. Classes of one included."""
    rng = np.random.default_rng(seed)
    x = np.zeros((n, dim), np.float32)
    for row in x:
        row[rng.choice(dim, 4, replace=False)] = rng.choice([-0.5, 0.5], 4)
    labels = rng.integers(0, classes, n)
    labels[:4] = [classes, classes + 1, classes + 2, classes + 3]
    return x, labels


def collapsed_set(n=60, classes=7, seed=2):
    """A collapsed model: every embedding the same, so every row is one big tie (index order decides)."""
    rng = np.random.default_rng(seed)
    return np.ones((n, 5), np.float32), rng.integers(0, classes, n)


@pytest.fixture(params=BACKENDS)
def small_chunks(request, monkeypatch):
    """Force several query chunks (and several similarity chunks on the torch path)."""
    monkeypatch.setattr(knn, "QUERY_CHUNK", 37)
    monkeypatch.setattr(knn, "SIM_BUDGET", 37 * 160)
    return request.param


def run(x, labels, backend, **kw):
    return compute_metrics(x, labels, nmi=False, backend=backend, **kw)


# ---------------------------------------------------------------- tests


@pytest.mark.parametrize("make", [random_set, tied_set, collapsed_set])
def test_metrics_match_reference(make, small_chunks):
    x, labels = make()
    ks = (1, 2, 4, 8, 16, len(x) + 5)
    ours, table = run(x, labels, small_chunks, recall_ks=ks)
    ref, ref_table = reference_metrics(x, labels, ks)
    assert set(ours) == set(ref)
    for name, value in ref.items():
        assert ours[name] == pytest.approx(value, abs=1e-9), name
    assert ours[f"recall_at_{len(x) + 5}"] == 1.0  # K beyond N - 1 means all the others
    pd.testing.assert_frame_equal(table.drop(columns="class_name")[list(ref_table.columns)], ref_table,
                                  check_dtype=False, atol=1e-9)


def test_neighbours_are_the_reference_order_on_ties(small_chunks):
    x, _ = tied_set()
    ref = reference_neighbors(x)
    unit = torch.nn.functional.normalize(torch.from_numpy(x), dim=1)
    for k in (1, 3, 10, len(x) - 2, len(x) - 1):
        got = torch.cat([idx for _, _, idx in nearest_neighbors(unit, k, small_chunks)]).numpy()
        np.testing.assert_array_equal(got, ref[:, :k], err_msg=f"k={k}")


def test_neighbours_have_the_reference_similarities(small_chunks):
    """On random data float32 rounding may swap near-ties, so compare similarity by rank."""
    x, _ = random_set()
    unit = torch.nn.functional.normalize(torch.from_numpy(x), dim=1)
    s = unit.double() @ unit.double().T
    ref = np.take_along_axis(s.numpy(), reference_neighbors(x), axis=1)
    for k in (1, 10, len(x) - 1):
        chunks = list(nearest_neighbors(unit, k, small_chunks))
        idx = torch.cat([i for _, _, i in chunks])
        sims = torch.cat([v for _, v, _ in chunks]).double()
        assert (idx != torch.arange(len(x))[:, None]).all()
        np.testing.assert_allclose(sims.numpy(), ref[:, :k], atol=1e-6)
        np.testing.assert_allclose(s.gather(1, idx).numpy(), ref[:, :k], atol=1e-6)
        assert (idx.numpy() == reference_neighbors(x)[:, :k]).mean() > 0.999


def test_backends_agree_on_tied_duplicates():
    x, labels = tied_set(n=120, dim=4)  # only 4 choose 4 * 16 sign patterns: many exact duplicates
    faiss_m, faiss_t = run(x, labels, "faiss", recall_ks=(1, 5))
    torch_m, torch_t = run(x, labels, "torch", recall_ks=(1, 5))
    assert faiss_m == torch_m
    pd.testing.assert_frame_equal(faiss_t, torch_t)


@pytest.mark.parametrize("backend", BACKENDS)
def test_nmi_separates_clusters_from_noise(backend):
    rng = np.random.default_rng(3)
    centers = rng.normal(size=(12, 32)) * 10
    labels = np.repeat(np.arange(12), 25)
    x = torch.from_numpy((centers[labels] + rng.normal(size=(300, 32))).astype(np.float32))
    unit = torch.nn.functional.normalize(x, dim=1)
    clustered = kmeans(unit, 12, seed=0, backend=backend)
    from sklearn.metrics import normalized_mutual_info_score

    assert normalized_mutual_info_score(labels, clustered) > 0.8  # random init: a blob may get two centroids
    shuffled = rng.permutation(labels)
    assert normalized_mutual_info_score(shuffled, clustered) < 0.3
    m, _ = compute_metrics(x, labels, recall_ks=(1,), map_r=False, nmi=True, backend=backend)
    assert m["nmi"] > 0.8 and set(m) == {"recall_at_1", "nmi"}


def test_nmi_is_seeded():
    x, labels = random_set()
    a, _ = compute_metrics(x, labels, seed=5)
    b, _ = compute_metrics(x, labels, seed=5)
    assert a["nmi"] == b["nmi"]


def test_per_class_table_names_and_files(tmp_path):
    x, labels = random_set(n=120, classes=6, singletons=2)
    ids = np.unique(labels)
    names = {int(c): f"class-{c}" for c in ids}
    _, table = compute_metrics(x, labels, class_names=names, nmi=False)
    assert list(table.columns) == ["class_name", "recall_at_1", "map_at_r", "size", "class_index"]
    assert table["class_name"].tolist() == [f"class-{c}" for c in ids]
    assert table["size"].sum() == len(x)
    singles = table[table["size"] == 1]
    assert len(singles) == 2 and singles["recall_at_1"].isna().all() and singles["map_at_r"].isna().all()
    table.to_csv(tmp_path / "t.csv", index=False)
    table.to_parquet(tmp_path / "t.parquet")
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "t.parquet"), table)
    assert len(pd.read_csv(tmp_path / "t.csv")) == len(table)


def test_class_names_as_sequence():
    x, _ = random_set(n=60, classes=3, singletons=0)
    labels = np.arange(60) % 3
    _, table = compute_metrics(x, labels, class_names=["a", "b", "c"], nmi=False, map_r=False)
    assert table["class_name"].tolist() == ["a", "b", "c"] and "map_at_r" not in table


def test_only_singletons_gives_nan():
    x, _ = random_set(n=10, classes=1, singletons=0)
    m, table = compute_metrics(x, np.arange(10), nmi=True)
    assert math.isnan(m["recall_at_1"]) and math.isnan(m["map_at_r"])
    assert m["nmi"] == pytest.approx(1.0)  # 10 clusters of one for 10 classes of one
    assert table["recall_at_1"].isna().all()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"embeddings": np.full((4, 3), np.nan, np.float32)}, "NaN"),
        ({"embeddings": np.ones((1, 3), np.float32)}, "N >= 2"),
        ({"embeddings": np.ones((4, 3), np.int64)}, "floating point"),
        ({"labels": np.zeros(5, np.int64)}, r"labels must have shape \(4,\)"),
        ({"labels": np.zeros(4, np.float32)}, "labels must be integers"),
        ({"recall_ks": (1, 0)}, "recall_ks"),
        ({"class_names": ["only-one"]}, "class_names has no name for class id 1"),
    ],
)
def test_bad_input_is_named(kwargs, message):
    args = {"embeddings": np.eye(4, 3, dtype=np.float32), "labels": np.array([0, 0, 1, 1]), "nmi": False}
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        compute_metrics(**args)


def test_float32_matmul_precision_is_restored():
    """The metrics force IEEE float32 matmuls (no TF32) and put the trainer's setting back."""
    x, labels = random_set(n=40, classes=4, singletons=0)
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    try:
        compute_metrics(x, labels, backend="torch")
        assert torch.get_float32_matmul_precision() == "high"
    finally:
        torch.set_float32_matmul_precision(previous)


def test_ieee_matmuls_when_cuda_and_cpu_precisions_differ():
    """The legacy `allow_tf32 = True` makes CUDA TF32 while the CPU stays IEEE; torch 2.11's global getter
    raised in that state (H200 run). Each backend's own setting is forced to IEEE and put back."""
    from trainer.evaluation.metrics import _ieee_fp32_matmul
    cuda, cpu = torch.backends.cuda.matmul, torch.backends.mkldnn.matmul
    before = (cuda.fp32_precision, cpu.fp32_precision)
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        mixed = (cuda.fp32_precision, cpu.fp32_precision)
        with _ieee_fp32_matmul():
            assert (cuda.fp32_precision, cpu.fp32_precision) == ("ieee", "ieee")
            x, labels = random_set(n=40, classes=4, singletons=0)
            compute_metrics(x, labels, backend="torch")
        assert (cuda.fp32_precision, cpu.fp32_precision) == mixed and mixed[0] == "tf32"
    finally:
        cuda.fp32_precision, cpu.fp32_precision = before
