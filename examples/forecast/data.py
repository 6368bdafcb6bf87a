"""Mauna Loa CO2 as forecasting windows: statsmodels ships the series, nothing is downloaded.

The weekly record (March 1958 - December 2001, 2,284 weeks, 59 missing) is averaged to 526
months; the 5 months without any reading are filled by linear interpolation. Each window holds
`past_len` months of history and the `horizon` months that follow. Values enter the model
relative to the last observed month and divided by one scale fitted on the train split, so a
series that trends out of its training range (CO2 does, by ~1.5 ppm a year) stays in range.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

PAST_LEN = 36
HORIZON = 12
# Chronological split of the months: the first 70% train, the next 15% validation, the rest test.
TRAIN_FRACTION = 0.70
VAL_FRACTION = 0.15
# past: relative value, sin(month), cos(month). future: sin(month), cos(month), step / horizon.
PAST_FEATURES = 3
FUTURE_FEATURES = 3


@dataclass(frozen=True)
class WindowSplit:
    """One chronological split, as model inputs plus what turns outputs back into ppm."""

    past: np.ndarray  # (N, P, 3) float32
    future: np.ndarray  # (N, H, 3) float32
    target: np.ndarray  # (N, H) float32, (value - level) / scale
    level: np.ndarray  # (N,) float32 ppm, the last observed month of each window
    truth: np.ndarray  # (N, H) float32 ppm
    months: np.ndarray  # (N, H) datetime64[M], the month of every forecast step

    def inputs(self) -> dict[str, np.ndarray]:
        """The model's inputs by name."""
        return {"past": self.past, "future": self.future}

    def __len__(self) -> int:
        return len(self.target)


@dataclass(frozen=True)
class ForecastData:
    train: WindowSplit
    val: WindowSplit
    test: WindowSplit
    scale: float  # ppm per model unit, fitted on the train split
    past_len: int
    horizon: int

    def to_ppm(self, split: WindowSplit, outputs: np.ndarray) -> np.ndarray:
        """Model outputs `(N, H)` (or `(N, H, 1)`) of `split` -> ppm `(N, H)`."""
        outputs = np.asarray(outputs, np.float64).reshape(len(split), self.horizon)
        return (split.level[:, None] + self.scale * outputs).astype(np.float32)


def load_monthly_co2() -> tuple[np.ndarray, np.ndarray]:
    """(months datetime64[M], ppm float64) of the monthly Mauna Loa record, gaps filled."""
    # statsmodels (and pandas under it) is imported only when the data is needed.
    from statsmodels.datasets import co2

    weekly = co2.load_pandas().data["co2"]
    monthly = weekly.resample("MS").mean().interpolate(method="linear")
    months = monthly.index.to_numpy().astype("datetime64[M]")
    return months, monthly.to_numpy(np.float64)


def _month_angle(months: np.ndarray) -> np.ndarray:
    month_of_year = months.astype(int) % 12  # datetime64[M] counts months since 1970-01
    return 2.0 * np.pi * month_of_year / 12.0


def _windows(values, months, origins, past_len, horizon, scale) -> WindowSplit:
    """Windows whose last observed month is each of `origins`."""
    origins = np.asarray(origins)
    past_idx = origins[:, None] + np.arange(-past_len + 1, 1)[None, :]  # (N, P)
    future_idx = origins[:, None] + np.arange(1, horizon + 1)[None, :]  # (N, H)
    level = values[origins]
    past_angle = _month_angle(months[past_idx])
    future_angle = _month_angle(months[future_idx])
    past = np.stack(
        [(values[past_idx] - level[:, None]) / scale, np.sin(past_angle), np.cos(past_angle)], axis=-1
    )
    step = np.broadcast_to(np.arange(1, horizon + 1) / horizon, future_idx.shape)
    future = np.stack([np.sin(future_angle), np.cos(future_angle), step], axis=-1)
    truth = values[future_idx]
    return WindowSplit(
        past=past.astype(np.float32),
        future=future.astype(np.float32),
        target=((truth - level[:, None]) / scale).astype(np.float32),
        level=level.astype(np.float32),
        truth=truth.astype(np.float32),
        months=months[future_idx],
    )


def split_bounds(n: int) -> tuple[int, int]:
    """First month index of the validation and of the test split."""
    return int(n * TRAIN_FRACTION), int(n * (TRAIN_FRACTION + VAL_FRACTION))


def make_windows(past_len: int = PAST_LEN, horizon: int = HORIZON) -> ForecastData:
    """Train/val/test windows. Every target month of a split lies in that split's months (the
    past may reach back into the previous split, as it would in deployment)."""
    months, values = load_monthly_co2()
    n = len(values)
    val_start, test_start = split_bounds(n)
    # Origin t predicts months t+1 .. t+H; a split takes the origins whose targets are all its own.
    train_origins = np.arange(past_len - 1, val_start - horizon)
    val_origins = np.arange(val_start - 1, test_start - horizon)
    test_origins = np.arange(test_start - 1, n - horizon)
    # The one fitted statistic: the spread of the train targets (ppm change from the last month).
    train_deltas = values[train_origins[:, None] + np.arange(1, horizon + 1)] - values[train_origins, None]
    scale = float(np.std(train_deltas))
    return ForecastData(
        train=_windows(values, months, train_origins, past_len, horizon, scale),
        val=_windows(values, months, val_origins, past_len, horizon, scale),
        test=_windows(values, months, test_origins, past_len, horizon, scale),
        scale=scale,
        past_len=past_len,
        horizon=horizon,
    )


def naive_forecasts(split: WindowSplit, data: ForecastData) -> dict[str, np.ndarray]:
    """Baselines in ppm `(N, H)`: the last observed month; the same month a year earlier
    (seasonal naive); and that plus the change over the last year (seasonal naive with drift,
    which is hard to beat on CO2). Needs `horizon <= 12` and `past_len >= 24`."""
    last = np.repeat(split.level[:, None], data.horizon, axis=1)
    # past[:, -12 + h] is the month one year before forecast step h (h = 0 .. H-1).
    year_ago = split.past[:, data.past_len - 12 : data.past_len - 12 + data.horizon, 0]
    seasonal = split.level[:, None] + data.scale * year_ago
    # past[:, -13] is the month one year before the last one: its relative value is minus the
    # last year's change.
    drift = -data.scale * split.past[:, data.past_len - 13, 0]
    return {
        "last value": last.astype(np.float32),
        "seasonal naive": seasonal.astype(np.float32),
        "seasonal naive + drift": (seasonal + drift[:, None]).astype(np.float32),
    }
