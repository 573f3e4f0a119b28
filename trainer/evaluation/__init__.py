"""Evaluation room: retrieval metrics (metrics), the one kNN search (knn), the collective evaluation of a model
over the test stream (evaluate), embedding export (export) and the standalone CLI (cli).

    result = evaluate(model, loader, device=device, recall_ks=[1, 2, 4, 8], nmi=True, map_r=True)
    metrics, per_class = compute_metrics(embeddings, labels)
"""

from trainer.evaluation.evaluate import EvalResult, deduplicate, embed, evaluate, gather_to_rank0
from trainer.evaluation.export import export_embeddings, load_export, write_table
from trainer.evaluation.metrics import compute_metrics

__all__ = ["EvalResult", "compute_metrics", "deduplicate", "embed", "evaluate", "export_embeddings",
           "gather_to_rank0", "load_export", "write_table"]
