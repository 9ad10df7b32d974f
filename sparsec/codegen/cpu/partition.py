"""Split a layer's rows over threads so that every thread gets the same work, not the same rows.

Pruned layers are uneven: some rows keep ten times the values of others, and a split by rows
leaves one core idle while the other finishes. Work per row is modeled as its kept values plus
a fixed cost for visiting the row's mask (``row_cost``, in values), and the rows are cut into
contiguous ranges of equal total work.
"""

from __future__ import annotations

import numpy as np


def balanced_row_split(nnz_per_row: np.ndarray, parts: int, row_cost: float = 0.0) -> np.ndarray:
    """Row boundaries ``b`` (int64, length ``parts + 1``, ``b[0] = 0``, ``b[-1] = rows``) so that
    ``sum(work[b[t]:b[t+1]])`` is as equal as contiguous ranges allow, with
    ``work[r] = nnz_per_row[r] + row_cost``. Ranges may be empty when there are fewer rows than parts.

    Example::

        >>> balanced_row_split(np.array([8, 0, 0, 0, 0, 0, 0, 8]), 2).tolist()
        [0, 4, 8]
    """
    if parts < 1:
        raise ValueError(f"parts must be >= 1, got {parts}")
    rows = int(nnz_per_row.shape[0])
    work = nnz_per_row.astype(np.float64) + float(row_cost)
    cum = np.concatenate([[0.0], np.cumsum(work)])
    total = cum[-1]
    if rows == 0 or total <= 0:
        bounds = np.linspace(0, rows, parts + 1).round()
        return bounds.astype(np.int64)
    targets = total * np.arange(1, parts) / parts
    # The row boundary whose prefix sum is closest to each target.
    right = np.searchsorted(cum, targets, side="left").clip(1, rows)
    left = right - 1
    pick = np.where(np.abs(cum[left] - targets) <= np.abs(cum[right] - targets), left, right)
    bounds = np.concatenate([[0], pick, [rows]]).astype(np.int64)
    return np.maximum.accumulate(bounds)
