"""BEiT's relative position index and table resampling.

Layout (unilm `beit/modeling_finetune.py`): tokens are [cls, patch_0, ..., patch_{Wh*Ww-1}], the table has
R = (2Wh-1)(2Ww-1) + 3 rows; the last three are cls->token (R-3), token->cls (R-2) and cls->cls (R-1).
"""
from __future__ import annotations

import functools
import math
import weakref

import torch


def num_relative_distance(window_size) -> int:
    wh, ww = window_size
    return (2 * wh - 1) * (2 * ww - 1) + 3


@functools.lru_cache(maxsize=32)
@torch.inference_mode(False)   # cached for every later caller: never an inference tensor, whoever asks first
def _index_cpu(wh: int, ww: int) -> torch.Tensor:
    coords = torch.stack(torch.meshgrid(torch.arange(wh), torch.arange(ww), indexing="ij")).flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0)
    rel[..., 0] += wh - 1
    rel[..., 1] += ww - 1
    rel[..., 0] *= 2 * ww - 1
    r = num_relative_distance((wh, ww))
    n = wh * ww + 1
    index = torch.zeros((n, n), dtype=torch.long)
    index[1:, 1:] = rel.sum(-1)
    # Same write order as unilm: row 0, then column 0 (overwriting [0, 0]), then [0, 0].
    index[0, 0:] = r - 3
    index[0:, 0] = r - 2
    index[0, 0] = r - 1
    return index


def relative_position_index(window_size) -> torch.Tensor:
    """(N, N) long index into the (R, H) table, N = Wh*Ww + 1; a fresh tensor the caller may move."""
    wh, ww = (int(x) for x in window_size)
    if wh < 1 or ww < 1:
        raise ValueError(f"window_size must be two positive ints (Wh, Ww), got {window_size}")
    return _index_cpu(wh, ww).clone()


def gather_bias(table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """(R, H) table, (N, N) index -> (H, N, N) bias."""
    n = index.shape[0]
    return table[index.reshape(-1)].view(n, n, -1).permute(2, 0, 1).contiguous()


def _geometric_ratio(src_half: int, dst_half: int) -> float:
    # unilm: find q with 1 + q + ... + q^(src_half-1) = dst_half by bisection on [1.01, 1.5]; like unilm,
    # the ratio used is the last midpoint evaluated (not the final interval's centre), so tables resample
    # bit for bit as unilm's fine-tuning and segmentation code resamples them.
    def series(r):
        return (1.0 - r ** src_half) / (1.0 - r)

    lo, hi = 1.01, 1.5
    while hi - lo > 1e-6:
        q = (lo + hi) / 2.0
        if series(q) > dst_half:
            hi = q
        else:
            lo = q
    return q


def _source_coords(src: int, dst: int) -> list[float]:
    src_half, dst_half = src // 2, dst // 2
    if dst_half == src_half:  # this axis keeps its size (a non-square window changing the other): as it is
        return [float(i - src_half) for i in range(src)]
    q = _geometric_ratio(src_half, dst_half)   # (shrinking too, as unilm and timm: q ends at 1.01)
    dis, cur = [], 1.0
    for i in range(src_half):
        dis.append(cur)
        cur += q ** (i + 1)
    return [-d for d in reversed(dis)] + [0.0] + dis


def resize_rel_pos_bias_table(table: torch.Tensor, src_window, dst_window) -> torch.Tensor:
    """Resample a (R_src, H) table from one window to another, keeping the 3 cls rows.

    Interpolation: unilm's scheme (the one its fine-tuning and segmentation results were obtained with):
    source offsets are placed on a geometric grid (small offsets keep their values, large offsets are
    stretched, ratio q found by bisection) and the table is evaluated on the integer target grid with a
    bicubic spline per head (scipy RectBivariateSpline, kx=ky=3, the successor SciPy names for the
    removed interp2d(kind='cubic')). Shrinking runs the same bisection, which then ends at its lower bound
    (q = 1.01): offsets keep their own values near the centre, as unilm's and timm's resampling keep them.
    An axis whose size does not change (one of a non-square window's) keeps its integer grid.
    """
    src_window = tuple(int(x) for x in src_window)
    dst_window = tuple(int(x) for x in dst_window)
    r_src = num_relative_distance(src_window)
    if table.shape[0] != r_src:
        raise ValueError(f"table has {table.shape[0]} rows; window {src_window} needs {r_src} rows")
    if src_window == dst_window:
        return table.clone()
    from scipy.interpolate import RectBivariateSpline

    sh, sw = 2 * src_window[0] - 1, 2 * src_window[1] - 1
    dh, dw = 2 * dst_window[0] - 1, 2 * dst_window[1] - 1
    ys, xs = _source_coords(sh, dh), _source_coords(sw, dw)
    ty = [float(i - dh // 2) for i in range(dh)]
    tx = [float(i - dw // 2) for i in range(dw)]
    body = table[:-3].detach().double().cpu().numpy()
    cols = []
    ky, kx = min(3, sh - 1), min(3, sw - 1)
    for h in range(table.shape[1]):
        grid = body[:, h].reshape(sh, sw)
        if ky < 1 or kx < 1:  # a 1-wide source grid: nothing to interpolate along, repeat
            vals = torch.from_numpy(grid).expand(dh, dw) if grid.size == 1 else None
            if vals is None:
                raise ValueError(f"cannot resample a table from window {src_window}")
        else:
            spline = RectBivariateSpline(ys, xs, grid, kx=kx, ky=ky)
            vals = torch.from_numpy(spline(ty, tx))
        cols.append(vals.reshape(-1))
    new = torch.stack(cols, dim=1).to(table.dtype).to(table.device)
    return torch.cat([new, table[-3:].detach()], dim=0)


def window_from_table_rows(rows: int, hint=None):
    """The square window whose table has `rows` rows (None when there is none)."""
    if hint is not None and num_relative_distance(hint) == rows:
        return tuple(hint)
    side = math.isqrt(rows - 3)
    if side * side != rows - 3 or side % 2 == 0:
        return None
    w = (side + 1) // 2
    return (w, w)


# ---------------------------------------------------------------------------------------- explicit indexes

def check_index_range(index: torch.Tensor, num_rel: int) -> None:
    """An explicit index must address rows of the table: the kernels gather through it unchecked, and the
    reference's indexing would wrap negative values (or trip a device-side assert on a GPU). One host sync;
    only explicit (non-BEiT) layouts pay it."""
    if index.numel() == 0 or index.device.type == "meta":
        return
    lo, hi = (int(v) for v in torch.aminmax(index))
    if lo < 0 or hi >= num_rel:
        raise ValueError(f"rel_index values must lie in [0, R) = [0, {num_rel}) (rows of bias_table), "
                         f"got values in [{lo}, {hi}]")


class PerIndexTensor:
    """A value per live index tensor and version counter. Keyed by id() with a weak reference whose callback
    drops the entry when the tensor dies (before its id can be reused), so an index freed and another
    allocated in its place is never a stale hit; an in-place change bumps the version, and `t.data = other`
    changes the data pointer: a miss. A change that bypasses the version counter (`t.data.copy_(...)`, writes
    through a numpy or DLPack view of the same memory) is not seen: the cached value goes stale. (Tensors
    cannot be WeakKeyDictionary keys: weakref equality compares them elementwise.) Inference tensors
    (made under torch.inference_mode) have no version counter: they are never cached."""

    def __init__(self):
        self._entries = {}

    def get(self, t: torch.Tensor, tag):
        if t.is_inference():   # no version counter: never cached (see put)
            return None
        entry = self._entries.get(id(t))
        if entry is None or entry[0]() is not t or entry[1] != (t._version, t.data_ptr(), tag):
            return None
        return entry[2]

    def put(self, t: torch.Tensor, tag, value) -> None:
        if t.device.type == "meta" or t.is_inference():   # an inference tensor has no version to key on
            return
        key, entries = id(t), self._entries

        def forget(ref):
            if entries.get(key, (None,))[0] is ref:
                del entries[key]
        entries[key] = (weakref.ref(t, forget), (t._version, t.data_ptr(), tag), value)


_CHECKED_INDEXES = PerIndexTensor()     # explicit index -> True once its values are checked against R


def check_index_range_once(index: torch.Tensor, num_rel: int) -> None:
    """check_index_range, once per index tensor and version: a model passing the same index every step
    pays the host sync on the first call only."""
    if _CHECKED_INDEXES.get(index, num_rel) is None:
        check_index_range(index, num_rel)
        _CHECKED_INDEXES.put(index, num_rel, True)
