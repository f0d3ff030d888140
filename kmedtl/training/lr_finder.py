"""The learning-rate range test (Smith 2017; fastai's ``lr_find``).

Train for up to ``steps`` batches while the learning rate grows exponentially from
``start_lr`` to ``end_lr``; record the loss of every batch, smooth it (exponential moving
average with bias correction) and stop once it exceeds ``diverge`` times its minimum.
Suggestions: the rate of **steepest descent** of the smoothed loss (per log-LR) and
**min/10**, a tenth of the rate at the minimum.  The model's weights are restored
afterwards.

Every batch is its own one-step Keras epoch (``steps_per_epoch=1``), so the logged loss
is exactly that batch's loss (Keras' per-batch logs are running means).

Example::

    >>> import numpy as np
    >>> from kmedtl.models import FlatClassifier, backbone
    >>> model = FlatClassifier(backbone("cbr_tiny", input_shape=(32, 32, 1)), 2)
    >>> x, y = np.random.rand(32, 32, 32, 1).astype("float32"), np.arange(32) % 2
    >>> res = lr_find(model, (x, y), steps=20, batch_size=8, jit_compile=False)
    >>> len(res.lrs) <= 20 and res.suggestion > 0
    True
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from pathlib import Path

import keras
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from kmedtl.errors import ConfigError
from kmedtl.training.schedules import ExponentialSweep
from kmedtl.training.trainer import Trainer

SUGGESTIONS = ("steepest", "min10")


@dataclass
class LRFinderResult:
    lrs: np.ndarray
    losses: np.ndarray
    smoothed: np.ndarray
    steepest: float | None
    min10: float
    suggestion: float
    method: str
    stopped_early: bool = False
    meta: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"suggestion": self.suggestion, "method": self.method,
                "steepest": self.steepest, "min10": self.min10,
                "steps": int(len(self.lrs)), "stopped_early": self.stopped_early,
                "lrs": [float(v) for v in self.lrs],
                "losses": [float(v) for v in self.losses]}

    def plot(self, path) -> Path:
        """Loss vs learning rate (log x axis) with the suggestions marked, as a PNG (drawn
        with matplotlib's object API and the Agg canvas: no pyplot, no global state)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig = Figure(figsize=(6, 4), dpi=100)
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        ax.plot(self.lrs, self.losses, color="0.75", lw=1, label="loss (per batch)")
        ax.plot(self.lrs, self.smoothed, color="C0", lw=2, label="smoothed")
        if self.steepest is not None:
            ax.axvline(self.steepest, color="C1", ls="--",
                       label=f"steepest descent {self.steepest:.2e}")
        ax.axvline(self.min10, color="C2", ls=":", label=f"min/10 {self.min10:.2e}")
        ax.set_xscale("log")
        ax.set_xlabel("learning rate")
        ax.set_ylabel("loss")
        finite = self.smoothed[np.isfinite(self.smoothed)]
        if finite.size:
            lo, hi = float(finite.min()), float(np.percentile(finite, 95))
            ax.set_ylim(lo - 0.05 * (hi - lo + 1e-9), hi + 0.25 * (hi - lo + 1e-9))
        ax.set_title(f"LR finder: suggested {self.suggestion:.2e} ({self.method})")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(path)
        return path


class _Recorder(keras.callbacks.Callback):
    def __init__(self, schedule, beta, diverge, skip):
        super().__init__()
        self.schedule, self.beta, self.diverge, self.skip = schedule, beta, diverge, skip
        self.lrs, self.losses, self.smoothed = [], [], []
        self._avg, self._best = 0.0, np.inf
        self.stopped = False

    def on_epoch_end(self, epoch, logs=None):
        loss = float((logs or {}).get("loss", np.nan))
        self.lrs.append(float(keras.ops.convert_to_numpy(self.schedule(epoch))))
        self.losses.append(loss)
        i = len(self.losses)
        self._avg = self.beta * self._avg + (1 - self.beta) * loss
        smooth = self._avg / (1 - self.beta ** i)
        self.smoothed.append(smooth)
        if not np.isfinite(smooth) or (i > self.skip and smooth > self.diverge * self._best):
            self.stopped = True
            self.model.stop_training = True
        self._best = min(self._best, smooth) if np.isfinite(smooth) else self._best


def _forever(train, batch_size):
    """An endless source of batches (``steps_per_epoch=1`` takes one per epoch)."""
    if isinstance(train, tuple):
        x, y = train[0], train[1]
        n = len(x)

        def gen():
            rng = np.random.default_rng(0)
            while True:
                idx = rng.permutation(n)
                for i in range(0, n - batch_size + 1 if n >= batch_size else 1, batch_size):
                    sel = idx[i:i + batch_size]
                    yy = {k: v[sel] for k, v in y.items()} if isinstance(y, dict) else y[sel]
                    yield x[sel], yy

        return gen()
    if hasattr(train, "repeat"):
        return train.repeat()
    return itertools.cycle(train)


def suggest(lrs, smoothed, skip_start: int = 5, skip_end: int = 3):
    """``(steepest, min10)`` from a sweep."""
    lrs, smoothed = np.asarray(lrs, float), np.asarray(smoothed, float)
    ok = np.isfinite(smoothed)
    i_min = int(np.nanargmin(np.where(ok, smoothed, np.nan)))
    min10 = float(lrs[i_min] / 10.0)
    lo, hi = min(skip_start, max(i_min - 1, 0)), max(i_min, 1)
    steepest = None
    if hi - lo >= 2:
        seg = smoothed[lo:hi + 1]
        grads = np.gradient(seg, np.log10(lrs[lo:hi + 1]))
        steepest = float(lrs[lo + int(np.argmin(grads))])
    return steepest, min10


def lr_find(model, train, *, start_lr: float = 1e-7, end_lr: float = 10.0, steps: int = 200,
            beta: float = 0.98, diverge: float = 4.0, method: str = "steepest",
            config=None, restore: bool = True, **overrides) -> LRFinderResult:
    """Run the LR range test on ``model`` with ``train`` (dataset or ``(x, y)`` arrays).

    ``config``/``overrides`` are ``train.*`` settings (optimizer, batch_size, label
    smoothing, jit_compile ...); ``restore`` puts the initial weights back.
    """
    if method not in SUGGESTIONS:
        raise ConfigError(f"lr_find: method={method!r} is not one of {list(SUGGESTIONS)}")
    if steps < 8:
        raise ConfigError(f"lr_find: steps={steps} is too few for a sweep (use >= 8)")
    overrides.setdefault("verbose", 0)
    trainer = Trainer(model, config, **overrides)
    sweep = ExponentialSweep(start_lr, end_lr, steps)
    saved = model.get_weights()
    trainer.compile(sweep)
    rec = _Recorder(sweep, beta, diverge, skip=min(10, steps // 10))
    try:
        model.fit(_forever(train, trainer.cfg.batch_size), steps_per_epoch=1, epochs=steps,
                  callbacks=[rec], verbose=0, shuffle=False)
    finally:
        if restore:
            model.set_weights(saved)
    if len(rec.losses) < 3:
        raise ConfigError(f"lr_find: the loss diverged after {len(rec.losses)} step(s); "
                          "lower start_lr")
    steepest, min10 = suggest(rec.lrs, rec.smoothed)
    chosen = steepest if method == "steepest" and steepest is not None else min10
    used = "steepest" if chosen == steepest and steepest is not None else "min10"
    return LRFinderResult(np.array(rec.lrs), np.array(rec.losses), np.array(rec.smoothed),
                          steepest, min10, chosen, used, rec.stopped)
