"""trainer.evaluate: embedding, gathering over real gloo groups with uneven per-rank counts, de-duplication."""

import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from tests.helpers import run_on_gloo_ranks
from trainer.evaluation import EvalResult, deduplicate, evaluate, gather_to_rank0
from trainer.evaluation.metrics import compute_metrics

CFG = SimpleNamespace(every_epochs=1, recall_ks=[1, 2, 4], nmi=True, map_r=True, batch_size=4)
OPTS = dict(recall_ks=CFG.recall_ks, nmi=CFG.nmi, map_r=CFG.map_r)  # evaluate's options, as the loop passes them
N, DIM, CLASSES = 40, 6, 5


def dataset():
    """N samples of CLASSES classes: inputs, labels, keys."""
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(N) % CLASSES
    x = torch.randn(CLASSES, DIM, generator=g)[labels] + 0.7 * torch.randn(N, DIM, generator=g)
    return x, labels, [f"img/{i:03d}.jpg" for i in range(N)]


def model():
    torch.manual_seed(1)
    return torch.nn.Sequential(torch.nn.Linear(DIM, 8), torch.nn.BatchNorm1d(8))


def batches(rows, batch_size=4):
    x, labels, keys = dataset()
    rows = list(rows)
    return [
        (x[rows[i : i + batch_size]], labels[rows[i : i + batch_size]], [keys[r] for r in rows[i : i + batch_size]])
        for i in range(0, len(rows), batch_size)
    ]


def single_process_reference():
    x, labels, _ = dataset()
    with torch.no_grad():
        emb = model().eval()(x)
    return compute_metrics(emb, labels, recall_ks=CFG.recall_ks)


# ---------------------------------------------------------------- one process


def test_single_process_matches_compute_metrics():
    net = model()
    result = evaluate(net, batches(range(N)), device="cpu", **OPTS)
    ref, ref_table = single_process_reference()
    assert isinstance(result, EvalResult) and result.metrics == ref
    assert result.per_class.equals(ref_table)
    assert result.keys == sorted(result.keys) and len(result.keys) == N
    assert result.embeddings.shape == (N, 8) and result.embeddings.dtype == torch.float32
    assert net.training  # the mode is restored (BatchNorm ran in eval mode: results equal the reference)


def test_a_test_split_of_singletons_is_refused_by_name():
    """One image per class: no query has a match (Recall@K would be NaN): a user error naming the key."""
    from trainer.config import ConfigError
    x, _, keys = dataset()
    singletons = [(x[i : i + 4], torch.arange(i, i + 4), keys[i : i + 4]) for i in range(0, 8, 4)]
    with pytest.raises(ConfigError, match=r"data.test_split: each of the 8 test images is the only one"):
        evaluate(model(), singletons, device="cpu", **OPTS)
    one_pair = singletons + [(x[8:9], torch.tensor([0]), keys[8:9])]  # class 0 has 2 images: metrics defined
    assert 0 <= evaluate(model(), one_pair, device="cpu", **OPTS).metrics["recall_at_1"] <= 1


def test_result_does_not_depend_on_loader_order_or_duplicates():
    a = evaluate(model(), batches(range(N)), device="cpu", **OPTS)
    rows = list(reversed(range(N))) + [3, 17, 3]  # padding duplicates, as a sampler would add
    b = evaluate(model(), batches(rows, batch_size=7), device="cpu", **OPTS)
    assert a.metrics == b.metrics and a.keys == b.keys
    torch.testing.assert_close(a.embeddings, b.embeddings)


def test_deduplicate_keeps_one_row_per_key_and_rejects_clashing_labels():
    emb = torch.arange(10.0).view(5, 2)
    emb2, labels2, keys2 = deduplicate(emb, torch.tensor([1, 2, 1, 3, 2]), ["b", "c", "b", "a", "c"])
    assert keys2 == ["a", "b", "c"] and labels2.tolist() == [3, 1, 2]
    torch.testing.assert_close(emb2, emb[[3, 0, 1]])
    with pytest.raises(ValueError, match="'b' appears with two different labels"):
        deduplicate(emb, torch.tensor([1, 2, 4, 3, 2]), ["b", "c", "b", "a", "c"])


def test_bad_config_and_batches_are_named():
    with pytest.raises(TypeError, match=r"missing 2 required keyword-only arguments: 'nmi' and 'map_r'"):
        evaluate(model(), [], device="cpu", recall_ks=[1])
    with pytest.raises(ValueError, match="must yield"):
        evaluate(model(), [(1, 2, 3, 4)], device="cpu", **OPTS)
    with pytest.raises(TypeError, match="undecoded images"):
        evaluate(model(), [([torch.zeros(3, dtype=torch.uint8)], torch.tensor([0]), ["k"])],
                 device="cpu", **OPTS)


# ---------------------------------------------------------------- two ranks over gloo


# Uneven shares: rank 0 has 23 samples, rank 1 17 plus 3 padding duplicates of rank 0's, rank 2 none.
SHARES = [list(range(23)), list(range(23, N)) + [0, 5, 22], []]


def _evaluate_worker(rank, world_size, out_dir, shares, wrap_ddp):
    net = model()
    if wrap_ddp:
        net = torch.nn.parallel.DistributedDataParallel(net)
    result = evaluate(net, batches(shares[rank]), device="cpu", **OPTS)
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    _fail_on_last_rank(rank, world_size, out_dir)  # same group: saves starting processes again


class Exploding:
    def __iter__(self):
        yield from batches(range(4))
        raise OSError("shard unreadable")


def _fail_on_last_rank(rank, world_size, out_dir):
    loader = Exploding() if rank == world_size - 1 else batches(range(N))
    try:
        evaluate(model(), loader, device="cpu", **OPTS)
        outcome = "returned"
    except Exception as e:  # noqa: BLE001
        outcome = f"{type(e).__name__}: {e}"
    with open(os.path.join(out_dir, f"rank{rank}.txt"), "w") as f:
        f.write(outcome)


@pytest.mark.distributed
@pytest.mark.timeout(300)
@pytest.mark.parametrize(
    ("world_size", "wrap_ddp"), [(2, True), pytest.param(3, False, marks=pytest.mark.slow)]
)
def test_ranks_with_uneven_counts_count_every_sample_once(tmp_path, world_size, wrap_ddp):
    """Then, in the same group, a rank failing mid-stream makes every rank raise instead of hanging."""
    shares = SHARES[:world_size] if world_size == 3 else [SHARES[0], SHARES[1]]
    run_on_gloo_ranks(_evaluate_worker, world_size, str(tmp_path), shares, wrap_ddp)
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(world_size)]
    main = results[0]
    for other in results[1:]:
        assert other.metrics is None and other.embeddings is None and other.keys is None
    _, _, keys = dataset()
    assert main.keys == sorted(keys)  # all 40, once each, padding duplicates gone
    ref, ref_table = single_process_reference()
    assert main.metrics.keys() == ref.keys()
    for name in ref:
        assert main.metrics[name] == pytest.approx(ref[name], abs=1e-12), name
    assert main.per_class["size"].tolist() == [N // CLASSES] * CLASSES
    x, labels, _ = dataset()
    with torch.no_grad():
        torch.testing.assert_close(main.embeddings, model().eval()(x))
    assert main.labels.tolist() == labels.tolist()
    last = world_size - 1
    for r in range(last):
        assert (tmp_path / f"rank{r}.txt").read_text() == (f"PeerFailed: evaluation failed on rank(s) [{last}] "
                                                           f"(its error is printed there)")
    assert (tmp_path / f"rank{last}.txt").read_text() == "OSError: shard unreadable"


def _gather_worker(rank, world_size, out_dir):
    counts = [5, 0, 2]
    n = counts[rank]
    emb = torch.full((n, 3), float(rank)) + torch.arange(n, dtype=torch.float32)[:, None]
    keys = [f"r{rank}-{i}" for i in range(n)]
    got = gather_to_rank0((emb, torch.full((n,), rank), keys), device=torch.device("cpu"))
    torch.save(got, os.path.join(out_dir, f"rank{rank}.pt"))


@pytest.mark.slow
@pytest.mark.distributed
def test_gather_pads_and_trims_uneven_counts(tmp_path):
    run_on_gloo_ranks(_gather_worker, 3, str(tmp_path))
    emb, labels, keys = torch.load(tmp_path / "rank0.pt")
    assert keys == [f"r0-{i}" for i in range(5)] + ["r2-0", "r2-1"]
    assert labels.tolist() == [0] * 5 + [2] * 2
    assert emb[:, 0].tolist() == [0, 1, 2, 3, 4, 2, 3]
    assert torch.load(tmp_path / "rank1.pt") is None


def test_keys_survive_as_numpy_strings():
    """Keys come back as plain str (they name files for the export and the tracker)."""
    result = evaluate(model(), batches(range(N)), device="cpu", **OPTS)
    assert all(type(k) is str for k in result.keys)
    assert np.asarray(result.keys).dtype.kind == "U"
