"""trainer.metrics on a real CUDA device (torch kNN and k-means there) against the brute-force numpy reference
(marked gpu: excluded by default, run with `-m gpu` on a GPU host; bench/gpu_check.sh does).

Not yet run: no GPU was lent while this was written.
"""
import numpy as np
import pandas as pd
import pytest
import torch

from tests.trainer.evaluation.test_metrics import collapsed_set, random_set, reference_metrics, tied_set
from trainer.evaluation.metrics import compute_metrics, kmeans

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.mark.parametrize("make", [random_set, tied_set, collapsed_set])
def test_cuda_metrics_match_the_reference_even_with_tf32_allowed(make):
    """The kNN runs in IEEE fp32 (the code turns TF32 off for it), so ties and orders are the reference's."""
    x, labels = make()
    ks = (1, 2, 4, 8, 16)
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        ours, table = compute_metrics(torch.from_numpy(x).cuda(), labels, recall_ks=ks, nmi=False)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before
    ref, ref_table = reference_metrics(x, labels, ks)
    for name, value in ref.items():
        assert ours[name] == pytest.approx(value, abs=1e-9), name
    pd.testing.assert_frame_equal(table.drop(columns="class_name"), ref_table, check_dtype=False, atol=1e-9)


def test_cuda_kmeans_separates_clusters():
    from sklearn.metrics import normalized_mutual_info_score

    rng = np.random.default_rng(3)
    centers = rng.normal(size=(12, 32)) * 10
    labels = np.repeat(np.arange(12), 25)
    x = torch.nn.functional.normalize(torch.from_numpy((centers[labels] + rng.normal(size=(300, 32)))
                                                       .astype(np.float32)), dim=1).cuda()
    assert normalized_mutual_info_score(labels, kmeans(x, 12, seed=0, backend="torch")) > 0.8
    m, _ = compute_metrics(x, labels, recall_ks=(1,), map_r=False, nmi=True)
    assert m["nmi"] > 0.8
