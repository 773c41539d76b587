"""Training progress: a live tqdm bar, one JSON line per log call, an optional TensorBoard log, a loss plot.

    progress = Progress(total_steps=100, output_dir=Path("runs/x"))
    progress.log(1, {"loss": 2.31, "lr": 2e-4, "tokens": 1020})   # a training line
    progress.log(50, {"eval_loss": 2.05})                          # an evaluation line
    progress.close()                                               # runs/x/loss.png

Each line of output_dir/metrics.jsonl is `{"step", "time" (unix s), "elapsed_s" (since the run began, a resumed run continuing the count),
...metrics}`. A `tokens` metric (tokens processed since the previous line) also yields `tokens_per_s`.
A fresh run (start_step 0) starts the file anew; a resumed run appends to it, after dropping the lines a
crashed run wrote past the checkpoint it resumes from (step > start_step), so every step appears once.
"""
from __future__ import annotations

import importlib.util
import json
import math
import os
import time
from pathlib import Path
from typing import Any

METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "loss.png"


def _truncate(path: Path, last_step: int) -> None:
    """Keep the lines of `path` with step <= last_step; an unreadable (half-written) line is dropped too."""
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= last_step:
            kept.append(line)
    partial = path.with_name(path.name + ".partial")
    partial.write_text("".join(line + "\n" for line in kept))
    os.replace(partial, path)  # a crash here leaves either the old file or the new one


def _last_elapsed(path: Path) -> float:
    """The largest elapsed_s recorded in `path` (0 if none)."""
    best = 0.0
    for line in path.read_text().splitlines():
        try:
            value = json.loads(line).get("elapsed_s")
        except (json.JSONDecodeError, AttributeError):
            continue
        if isinstance(value, (int, float)) and math.isfinite(value):
            best = max(best, float(value))
    return best


def _tensorboard_writer(log_dir: Path):
    if importlib.util.find_spec("tensorboard") is None:
        raise ImportError("tensorboard: true needs the tensorboard package: pip install tensorboard "
                          "(or set tensorboard: false; metrics.jsonl and loss.png are written either way)")
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(log_dir=str(log_dir))


class Progress:
    """The bar, the JSONL file and the optional TensorBoard writer of one run; `enabled=False` (other ranks) does nothing."""

    def __init__(self, total_steps: int, output_dir: Path, *, tensorboard: bool = False, enabled: bool = True,
                 start_step: int = 0) -> None:
        self.enabled = enabled
        self.output_dir = Path(output_dir)
        self.jsonl = self.output_dir / METRICS_FILE
        self._start = self._last_time = time.perf_counter()
        self._closed = False
        self._bar = self._file = self._writer = None
        if not enabled:
            return
        self.output_dir.mkdir(parents=True, exist_ok=True)
        if start_step > 0 and self.jsonl.exists():
            _truncate(self.jsonl, start_step)
            self._start -= _last_elapsed(self.jsonl)  # a resumed run's elapsed_s continues from where it stopped
        self._writer = _tensorboard_writer(self.output_dir / "tensorboard") if tensorboard else None
        self._file = self.jsonl.open("a" if start_step > 0 else "w")
        from tqdm.auto import tqdm

        self._bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)
        self._bar.start_t -= time.perf_counter() - self._start  # the bar's elapsed too (its rate: a moving average)
        self._postfix: dict[str, str] = {}

    def log(self, step: int, metrics: dict[str, float]) -> None:
        """Append one JSON line (step, time, metrics) and refresh the bar; eval lines carry `eval_loss`."""
        if not self.enabled:
            return
        now = time.perf_counter()
        record: dict[str, Any] = {"step": int(step), "time": round(time.time(), 3), "elapsed_s": round(now - self._start, 3)}
        record.update({k: float(v) if isinstance(v, (int, float)) or hasattr(v, "item") else v for k, v in metrics.items()})
        if "tokens" in record and now > self._last_time:
            record["tokens_per_s"] = record["tokens"] / (now - self._last_time)
        if "loss" in record or "tokens" in record:
            self._last_time = now  # eval lines do not reset the throughput clock
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._writer is not None:
            for key, value in record.items():
                if key not in ("step", "time", "elapsed_s") and isinstance(value, float):
                    self._writer.add_scalar(key if key.startswith("eval") else f"train/{key}", value, step)
        self._update_bar(record)

    def _update_bar(self, record: dict[str, Any]) -> None:
        shown = {"loss": "{:.4f}", "eval_loss": "{:.4f}", "lr": "{:.2e}", "tokens_per_s": "{:.0f}"}
        for key, fmt in shown.items():
            if isinstance(record.get(key), float) and math.isfinite(record[key]):
                self._postfix["tok/s" if key == "tokens_per_s" else key] = fmt.format(record[key])
        self._bar.set_postfix(self._postfix, refresh=False)
        if record["step"] > self._bar.n:
            self._bar.update(record["step"] - self._bar.n)  # redraws at most every tqdm.mininterval
        else:
            self._bar.refresh()  # an eval line at the current step

    def close(self, plot: bool = True) -> None:
        """Close the bar and the files, then (with `plot`) draw output_dir/loss.png from metrics.jsonl. Only the
        first call acts. The loop passes plot=False after an error, so that no second error hides the first."""
        if not self.enabled or self._closed:
            return
        self._closed = True
        self._bar.close()
        self._file.close()
        if self._writer is not None:
            self._writer.close()
        if plot:
            plot_metrics(self.jsonl, self.output_dir / PLOT_FILE)

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        self.close(plot=exc_type is None)


def _read(jsonl: Path) -> list[dict[str, Any]]:
    records = []
    for line in jsonl.read_text().splitlines() if jsonl.exists() else []:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and "step" in record:
            records.append(record)
    return records


def _series(records: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    pairs = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
    return [s for s, _ in pairs], [v for _, v in pairs]


def _moving_average(values: list[float], window: int) -> list[float]:
    out, total = [], 0.0
    for i, value in enumerate(values):
        total += value - (values[i - window] if i >= window else 0.0)
        out.append(total / min(i + 1, window))
    return out


def plot_metrics(jsonl: Path, png: Path) -> None:
    """PNG with training loss (and eval-loss points) against step above, the learning rate below.

    Drawn with matplotlib's Agg canvas directly, so neither pyplot nor the process's backend is touched.
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise ImportError("plotting the loss curve needs matplotlib: pip install matplotlib") from None
    records = _read(Path(jsonl))
    fig = Figure(figsize=(8, 6), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    loss_ax, lr_ax = fig.subplots(2, 1, sharex=True, height_ratios=(3, 1))
    steps, loss = _series(records, "loss")
    if steps:
        window = max(1, len(loss) // 20)
        raw_alpha = 0.35 if window > 1 else 1.0
        loss_ax.plot(steps, loss, color="tab:blue", alpha=raw_alpha, linewidth=1, label="train loss")
        if window > 1:
            loss_ax.plot(steps, _moving_average(loss, window), color="tab:blue", linewidth=2,
                         label=f"train loss, mean of {window} logs")
    eval_steps, eval_loss = _series(records, "eval_loss")
    if eval_steps:
        loss_ax.plot(eval_steps, eval_loss, "o-", color="tab:orange", markersize=5, label="eval loss")
    if not (steps or eval_steps):
        loss_ax.text(0.5, 0.5, "no loss logged yet", ha="center", va="center", transform=loss_ax.transAxes)
    else:
        loss_ax.legend(loc="upper right")
    loss_ax.set_ylabel("loss (nats / token)")
    loss_ax.set_title(f"{Path(jsonl).parent.name or 'run'}: loss")
    loss_ax.grid(alpha=0.3)
    lr_steps, lr = _series(records, "lr")
    lr_ax.plot(lr_steps, lr, color="tab:green", linewidth=1.5)
    lr_ax.set_ylabel("learning rate")
    lr_ax.set_xlabel("optimizer step")
    lr_ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    lr_ax.grid(alpha=0.3)
    png = Path(png)
    png.parent.mkdir(parents=True, exist_ok=True)
    partial = png.with_name(png.stem + ".partial.png")
    fig.savefig(partial)
    os.replace(partial, png)
