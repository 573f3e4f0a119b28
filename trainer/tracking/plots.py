"""Pictures the tracker logs: retrieval grid (and which queries and neighbours it shows), recall curve,
per-class recall histogram.

Pure functions that write PNG files; matplotlib is used through its object API (no pyplot, no global
backend switch; imported on first use), the grid is drawn with PIL; neighbours come from the one kNN search
(trainer.evaluation.knn).
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont, ImageOps

if TYPE_CHECKING:
    from matplotlib.figure import Figure

log = logging.getLogger("trainer.tracking")
GRID_NEIGHBOURS = 8

GREEN = (40, 170, 60)
RED = (215, 40, 40)
GREY = (150, 150, 150)
QUERY = (40, 90, 200)


def _figure(**kwargs) -> Figure:
    from matplotlib.figure import Figure

    return Figure(**kwargs)


def _save(fig: Figure, path: str) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=100, bbox_inches="tight")


def _tile(image: Image.Image | None, size: int, frame: tuple[int, int, int], border: int, caption: str):
    """A `size` x `size` thumbnail (letterboxed) inside a coloured frame, with a caption underneath."""
    inner = size - 2 * border
    if image is None:
        thumb = Image.new("RGB", (inner, inner), (225, 225, 225))
        ImageDraw.Draw(thumb).line([(0, 0), (inner, inner)], fill=GREY, width=2)
    else:
        thumb = ImageOps.pad(image.convert("RGB"), (inner, inner), color=(255, 255, 255))
    tile = Image.new("RGB", (size, size + 14), (255, 255, 255))
    ImageDraw.Draw(tile).rectangle([0, 0, size - 1, size - 1], fill=frame)
    tile.paste(thumb, (border, border))
    ImageDraw.Draw(tile).text((2, size + 1), caption[: size // 6], fill=(0, 0, 0))
    return tile


def retrieval_grid(
    rows: Sequence[dict],
    images: Mapping[str, Image.Image],
    path: str,
    *,
    tile: int = 112,
    border: int = 5,
    names: Mapping[int, str] | None = None,
    title: str = "retrieval",
) -> None:
    """One row per query: the query (blue frame), then its neighbours framed green (same class) or red, under
    a header with `title` (e.g. "retrieval at step 28, epoch 2") and the legend of the frames.

    rows: [{"key": str, "label": int, "neighbours": [(key, label), ...]}, ...]; images: key -> PIL image
    (a missing key is drawn as a crossed grey placeholder). Captions show the class of each image (its name
    from `names` when given).
    """
    names = names or {}
    if not rows:
        raise ValueError("retrieval_grid: `rows` is empty")
    cols = 1 + max(len(r["neighbours"]) for r in rows)
    gap = 12
    header = 40
    width = cols * tile + gap
    height = header + len(rows) * (tile + 14)
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    _header(ImageDraw.Draw(canvas), title, len(rows), cols - 1)
    for i, row in enumerate(rows):
        y = header + i * (tile + 14)
        q = _tile(images.get(row["key"]), tile, QUERY, border, f"q {names.get(row['label'], row['label'])}")
        canvas.paste(q, (0, y))
        for j, (key, label) in enumerate(row["neighbours"]):
            frame = GREEN if label == row["label"] else RED
            caption = str(names.get(label, label))
            canvas.paste(_tile(images.get(key), tile, frame, border, caption), (gap + (j + 1) * tile, y))
    canvas.save(path, format="PNG")


def _header(draw: ImageDraw.ImageDraw, title: str, queries: int, neighbours: int) -> None:
    """Title line and legend (frame colours) at the top of the retrieval grid."""
    font = ImageFont.load_default(size=13)
    draw.text((4, 2), f"{title}: {queries} queries (one class each where possible), top-{neighbours} "
                      "neighbours by cosine similarity", fill=(0, 0, 0), font=font)
    x = 4
    for colour, label in ((QUERY, "query"), (GREEN, "same class"), (RED, "other class"), (GREY, "image missing")):
        draw.rectangle([x, 22, x + 12, 34], fill=colour)
        draw.text((x + 16, 21), label, fill=(0, 0, 0), font=font)
        x += 28 + int(draw.textlength(label, font=font))


def recall_curve(history: Sequence[tuple[int, Mapping[int, float]]], path: str) -> tuple[float, float]:
    """Recall@K against K, one line per evaluation: history = [(step, {k: recall}), ...] (oldest first).
    The y axis is zoomed to the values (with a margin, within [0, 1]); returns its (low, high)."""
    if not history:
        raise ValueError("recall_curve: `history` is empty")
    fig = _figure(figsize=(6, 4))
    ax = fig.add_subplot()
    colours = _shades(len(history))
    for (step, recalls), colour in zip(history, colours):
        ks = sorted(recalls)
        ax.plot(ks, [recalls[k] for k in ks], marker="o", color=colour, label=f"step {step}")
    ax.set_xscale("log", base=2)
    ks = sorted({k for _, r in history for k in r})
    ax.set_xticks(ks, [str(k) for k in ks])
    ax.set_xlabel("K")
    ax.set_ylabel("Recall@K")
    values = [v for _, r in history for v in r.values()]
    low, high = min(values), max(values)
    pad = max(0.02, 0.1 * (high - low))
    ax.set_ylim(max(0.0, low - pad), min(1.0, high + pad))  # zoomed to the data: the differences show
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right", ncol=1 + len(history) // 10)
    ax.set_title("Recall@K per evaluation (darkest = latest)")
    _save(fig, path)
    return ax.get_ylim()


def _shades(n: int) -> list:
    from matplotlib import colormaps

    cmap = colormaps["Blues"]
    return [cmap(0.35 + 0.65 * (i + 1) / n) for i in range(n)]


def recall_histogram(recall: np.ndarray, path: str, *, title: str = "per-class Recall@1") -> None:
    """Histogram of per-class recall values in [0, 1] (NaNs, i.e. classes without a query, dropped)."""
    values = np.asarray(recall, dtype=float)
    values = values[~np.isnan(values)]
    fig = _figure(figsize=(6, 4))
    ax = fig.add_subplot()
    ax.hist(values, bins=np.linspace(0, 1, 21), color="#3a6fb0", edgecolor="white")
    if len(values):
        ax.axvline(values.mean(), color="black", linestyle="--", label=f"mean {values.mean():.3f}")
        ax.legend()
    ax.set_xlabel("Recall@1 of the class")
    ax.set_ylabel("classes")
    ax.set_title(f"{title} ({len(values)} classes)")
    _save(fig, path)


# ----------------------------------------------------------------------------- what the retrieval grid shows


def pick_queries(keys, labels: np.ndarray, n: int, seed: int = 0) -> np.ndarray:
    """A fixed set of n query indices spread over as many classes as possible: the classes in a seeded order,
    taken round-robin, each giving its samples in key order (the same for the same evaluation set)."""
    labels = np.asarray(labels)
    order = np.argsort(np.asarray([str(k) for k in keys]), kind="stable")
    classes = np.random.default_rng(seed).permutation(np.unique(labels))
    per_class: dict = {c: [] for c in classes}
    for i in order:  # one pass over the samples (not one per class: SOP has 11,318 classes)
        per_class[labels[i]].append(int(i))
    picks: list[int] = []
    for depth in range(max((len(v) for v in per_class.values()), default=0)):
        picks += [per_class[c][depth] for c in classes if depth < len(per_class[c])]
        if len(picks) >= n:
            break
    return np.asarray(picks[:n], dtype=np.int64)


def nearest_neighbours(embeddings, query_idx: np.ndarray, k: int = GRID_NEIGHBOURS) -> np.ndarray:
    """Indices of the k most similar samples (cosine, ranked as the evaluation ranks them:
    trainer.evaluation.knn) of each query, the query itself excluded."""
    import torch

    from trainer.evaluation.knn import neighbors_of

    emb = torch.as_tensor(np.asarray(embeddings) if not torch.is_tensor(embeddings) else embeddings)
    emb = torch.nn.functional.normalize(emb.detach().float().cpu(), dim=1)
    k = min(k, emb.shape[0] - 1)
    if k < 1:  # a single sample has no neighbour
        return np.zeros((len(query_idx), 0), dtype=np.int64)
    return neighbors_of(emb, torch.as_tensor(query_idx), k)[1].numpy()


def retrieval_grid_of(result, image_lookup: Callable[[list[str]], Mapping[str, Any]], n_rows: int, path: str,
                      title: str) -> None:
    """The retrieval grid of an evaluation result (keys, labels, embeddings, per_class): n_rows fixed queries,
    their GRID_NEIGHBOURS nearest neighbours, images from image_lookup (missing ones drawn grey)."""
    keys = [str(k) for k in result.keys]
    labels = np.asarray(result.labels.cpu() if hasattr(result.labels, "cpu") else result.labels)
    queries = pick_queries(keys, labels, n_rows)
    neighbours = nearest_neighbours(result.embeddings, queries)
    rows = [{"key": keys[q], "label": int(labels[q]),
             "neighbours": [(keys[j], int(labels[j])) for j in nb]} for q, nb in zip(queries, neighbours)]
    wanted = sorted({keys[q] for q in queries} | {keys[j] for nb in neighbours for j in nb})
    images = image_lookup(wanted)
    missing = [k for k in wanted if k not in images]
    if missing:
        log.warning("retrieval grid: %d of %d images not found (e.g. %r)", len(missing), len(wanted), missing[0])
    per_class, names = getattr(result, "per_class", None), None
    if per_class is not None and {"class_index", "class_name"} <= set(per_class.columns):
        names = dict(zip(per_class["class_index"].astype(int), per_class["class_name"].astype(str)))
    retrieval_grid(rows, images, path, names=names, title=title)
