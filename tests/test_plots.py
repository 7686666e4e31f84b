"""Training plots from metrics.jsonl: valid PNGs of the expected size with real content; stages on one axis."""

import json
import math

import numpy as np
import pytest
from PIL import Image

from nemotune.recipes import plots

TRAIN_BLUE = (0x1F, 0x77, 0xB4)  # matplotlib C0: first series (train loss, lr, throughput)
VAL_ORANGE = (0xFF, 0x7F, 0x0E)  # matplotlib C1: second series (validation loss)


def write_stage(path, stage, steps, offset, lr0, val_every=5):
    path.mkdir(parents=True, exist_ok=True)
    lines = []
    for step in range(1, steps + 1):
        g = step + offset
        lines.append({"step": step, "global_step": g, "stage": stage, "train/loss": 3.0 * math.exp(-g / 10),
                      "train/lr": lr0 * (1 - step / (steps + 1)), "train/grad_norm": 1.0,
                      "train/tokens_per_sec_per_gpu": 1000.0 + 10 * step, "train/step_time": 0.1})
        if step % val_every == 0:
            lines.append({"step": step, "global_step": g, "stage": stage, "val/loss": 3.2 * math.exp(-g / 12)})
    (path / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))


def has_colour(img: np.ndarray, rgb, tol=30) -> bool:
    return bool((np.abs(img[..., :3].astype(int) - np.array(rgb)).max(axis=-1) < tol).sum() > 20)


def test_two_stage_plots(tmp_path):
    write_stage(tmp_path / "stage1", "stage1", 10, 0, 1e-3)
    write_stage(tmp_path / "stage2", "stage2", 8, 10, 2e-4)
    rows = plots.load_metrics(tmp_path)
    train_x = [r["x"] for r in rows if r["kind"] == "train"]
    assert train_x == list(range(1, 19))  # both stages on one global axis
    assert plots.stage_starts(rows) == [("stage1", 1), ("stage2", 11)]

    paths = plots.make_plots(tmp_path)
    assert [p.name for p in paths] == ["loss.png", "lr.png", "throughput.png"]
    for path in paths:
        assert path.parent == tmp_path
        with Image.open(path) as im:
            im.verify()  # a valid PNG
        with Image.open(path) as im:
            assert im.format == "PNG"
            assert im.size == (int(plots.FIGSIZE[0] * plots.DPI), int(plots.FIGSIZE[1] * plots.DPI))
            pixels = np.asarray(im.convert("RGB"))
        assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 10  # not one colour
        assert has_colour(pixels, TRAIN_BLUE)
    loss = np.asarray(Image.open(tmp_path / "loss.png").convert("RGB"))
    assert has_colour(loss, VAL_ORANGE)  # the validation curve is drawn too


def test_resumed_run_keeps_last_rows_and_skips_missing_series(tmp_path):
    rows = [{"step": s, "stage": "sft", "train/loss": 2.0, "train/lr": 1e-4} for s in (1, 2, 3)]
    rows += [{"step": 3, "stage": "sft", "train/loss": 1.5, "train/lr": 1e-4}]  # resumed: step 3 again
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    loaded = plots.load_metrics(tmp_path)
    assert [(r["x"], r["train/loss"]) for r in loaded] == [(1, 2.0), (2, 2.0), (3, 1.5)]
    paths = plots.make_plots(tmp_path)
    assert [p.name for p in paths] == ["loss.png", "lr.png"]  # no throughput logged -> no empty plot
    assert not (tmp_path / "throughput.png").exists()


def test_no_metrics_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="metrics.jsonl"):
        plots.make_plots(tmp_path)
    assert plots.main([str(tmp_path)]) == 2
