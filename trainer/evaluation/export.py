"""Embedding export for retrieval deployments: keys + vectors as .npy, optionally a faiss index.

    paths = export_embeddings(out_dir, embeddings, keys, labels, faiss_index=True)
    emb, keys, labels = load_export(out_dir)
    index = faiss.read_index(paths["index"])      # row i of the index is keys[i]; inner product = cosine

Files: embeddings.npy (N, D) float32 L2-normalised, keys.npy (N,) unicode, labels.npy (N,) int64,
index.faiss (faiss IndexFlatIP, exact). Per-class tables: write_table(df, "x.csv" | "x.parquet").
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

FILES = {"embeddings": "embeddings.npy", "keys": "keys.npy", "labels": "labels.npy", "index": "index.faiss"}


def export_embeddings(out_dir, embeddings, keys, labels, *, faiss_index: bool = False) -> dict[str, str]:
    """Write the export files into out_dir (created); returns their paths by name."""
    emb = F.normalize(torch.as_tensor(embeddings).float(), dim=1).cpu().numpy()
    keys = np.asarray([str(k) for k in keys])
    labels = np.asarray(torch.as_tensor(labels).cpu(), dtype=np.int64)
    if not len(emb) == len(keys) == len(labels):
        raise ValueError(f"export: {len(emb)} embeddings, {len(keys)} keys and {len(labels)} labels differ")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {name: str(out / FILES[name]) for name in ("embeddings", "keys", "labels")}
    np.save(paths["embeddings"], emb)
    np.save(paths["keys"], keys)
    np.save(paths["labels"], labels)
    if faiss_index:
        import faiss

        index = faiss.IndexFlatIP(emb.shape[1])
        index.add(np.ascontiguousarray(emb))
        paths["index"] = str(out / FILES["index"])
        faiss.write_index(index, paths["index"])
    return paths


def load_export(out_dir) -> tuple[np.ndarray, list[str], np.ndarray]:
    out = Path(out_dir)
    missing = [f for f in ("embeddings", "keys", "labels") if not (out / FILES[f]).is_file()]
    if missing:
        raise FileNotFoundError(f"{out_dir}: no {', '.join(FILES[m] for m in missing)} (not an export?)")
    return (np.load(out / FILES["embeddings"]), np.load(out / FILES["keys"]).tolist(),
            np.load(out / FILES["labels"]))


def write_table(table: pd.DataFrame, path) -> str:
    """A DataFrame as CSV or parquet, by the file's suffix (its folder is created)."""
    path = Path(path)
    if path.suffix in (".csv", ".parquet"):
        path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".csv":
        table.to_csv(path, index=False)
    elif path.suffix == ".parquet":
        table.to_parquet(path, index=False)
    else:
        raise ValueError(f"{path}: the table file must end in .csv or .parquet")
    return str(path)
