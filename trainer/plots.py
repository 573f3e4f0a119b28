"""Pictures the tracker logs: retrieval grid, recall curve, per-class recall histogram.

Pure functions that write PNG files; matplotlib is used through its object API (no pyplot, no global
backend switch), the grid is drawn with PIL.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image, ImageDraw, ImageFont, ImageOps

GREEN = (40, 170, 60)
RED = (215, 40, 40)
GREY = (150, 150, 150)
QUERY = (40, 90, 200)


def _save(fig: Figure, path: str) -> None:
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
    fig = Figure(figsize=(6, 4))
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
    fig = Figure(figsize=(6, 4))
    ax = fig.add_subplot()
    ax.hist(values, bins=np.linspace(0, 1, 21), color="#3a6fb0", edgecolor="white")
    if len(values):
        ax.axvline(values.mean(), color="black", linestyle="--", label=f"mean {values.mean():.3f}")
        ax.legend()
    ax.set_xlabel("Recall@1 of the class")
    ax.set_ylabel("classes")
    ax.set_title(f"{title} ({len(values)} classes)")
    _save(fig, path)
