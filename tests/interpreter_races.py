"""What the Triton interpreter cannot show by itself: it runs a launch's programs one after another, in x-major
order, so a program that reads what another program of the same launch writes sees it "already written" on
the CPU, while on a GPU the programs run concurrently, in no fixed order (a race).

`checked(order)`: within the block, every interpreted launch runs its programs in another order ("reverse",
or "shuffle": seeded by the grid size), and records the bytes each program loads and stores (masked-off lanes
left out); a launch in which a byte stored by one program is loaded or stored by another fails with an
AssertionError naming the kernel. `LAUNCHES` counts the launches checked (a test can tell it checked some).
The patches go on the interpreter's builder instance, over whatever its class holds (tests/interpreter_bf16.py
patches the class), and are removed at the end of the block. Written for the interpreters of Triton 3.2-3.8
(InterpreterBuilder.set_grid_dim / set_grid_idx / create_masked_load / create_masked_store,
GridExecutor.__call__); `PROBLEM` says why it cannot be used with the installed one (None: it can).
"""
import contextlib
import random

import numpy as np

LAUNCHES = [0]
_NAMES = ("set_grid_dim", "set_grid_idx", "create_masked_load", "create_masked_store")


def _problem():
    try:
        from triton.runtime import interpreter as ti
    except Exception as e:  # pragma: no cover - Triton missing
        return f"triton cannot be imported: {e}"
    builder = getattr(ti, "interpreter_builder", None)
    missing = [n for n in _NAMES if builder is None or not hasattr(builder, n)]
    if missing or not hasattr(getattr(ti, "GridExecutor", None), "__call__"):
        return f"this Triton's interpreter lacks {missing or ['GridExecutor']}"
    return None


PROBLEM = _problem()


def _bytes(ptrs, mask) -> np.ndarray:
    """The byte addresses a masked load / store touches."""
    addrs = np.asarray(ptrs.data).reshape(-1).astype(np.uint64)
    if mask is not None:
        addrs = addrs[np.broadcast_to(np.asarray(mask.data).astype(bool), ptrs.data.shape).reshape(-1)]
    size = max(1, ptrs.get_element_ty().primitive_bitwidth // 8)
    return (addrs[:, None] + np.arange(size, dtype=np.uint64)[None, :]).reshape(-1)


def _flatten(accesses):
    """[(program, addresses)] -> the distinct (address, program) pairs, as an (n, 2) uint64 array."""
    if not accesses:
        return np.zeros((0, 2), np.uint64)
    pairs = np.concatenate([np.stack([a, np.full(a.size, p, np.uint64)], 1) for p, a in accesses if a.size]
                           or [np.zeros((0, 2), np.uint64)])
    return np.unique(pairs, axis=0)


def _check(kernel: str, loads, stores) -> None:
    writes = _flatten(stores)
    if not len(writes):
        return
    addrs, writers = np.unique(writes[:, 0], return_counts=True)
    both = addrs[writers > 1]
    reads = _flatten(loads)
    reads = reads[np.isin(reads[:, 0], addrs)]
    # a read of a byte that a program other than the reader stores (writes is sorted by address, then program)
    lo = np.searchsorted(writes[:, 0], reads[:, 0], "left")
    hi = np.searchsorted(writes[:, 0], reads[:, 0], "right")
    foreign = (hi - lo > 1) | (writes[lo, 1] != reads[:, 1]) if len(reads) else np.zeros(0, bool)
    if len(both) or foreign.any():
        first = reads[np.nonzero(foreign)[0][0]] if foreign.any() else None
        raise AssertionError(
            f"race in kernel {kernel}: {len(both)} bytes stored by more than one program, "
            f"{int(foreign.sum())} bytes loaded by a program while another stores them"
            + (f" (first: byte {int(first[0])}, loaded by program {int(first[1])})" if first is not None else ""))


@contextlib.contextmanager
def checked(order: str = "shuffle"):
    """Run the block's interpreted launches with their programs in `order` ("reverse" | "shuffle") and check
    that no program touches what another program of its launch stores."""
    if PROBLEM:
        raise RuntimeError(PROBLEM)
    if order not in ("reverse", "shuffle"):
        raise ValueError(f"order must be 'reverse' or 'shuffle', got {order!r}")
    from triton.runtime import interpreter as ti
    b = ti.interpreter_builder
    real = {n: getattr(b, n) for n in _NAMES}
    own = {n for n in _NAMES if n in vars(b)}   # (instance attributes to put back; the rest are the class's)
    state = {"grid": None, "perm": None, "next": 0, "pid": 0, "loads": None, "stores": None}

    def set_grid_dim(nx, ny, nz):
        perm = list(range(nx * ny * nz))
        if order == "reverse":
            perm.reverse()
        else:
            random.Random(nx * ny * nz).shuffle(perm)
        state.update(grid=(nx, ny, nz), perm=perm, next=0)
        return real["set_grid_dim"](nx, ny, nz)

    def set_grid_idx(x, y, z):   # the interpreter's loop still counts x-major; the program run is perm[count]
        _, ny, nz = state["grid"]
        pid = state["perm"][state["next"]]
        state["next"] += 1
        state["pid"] = pid
        x, rest = divmod(pid, ny * nz)
        y, z = divmod(rest, nz)
        return real["set_grid_idx"](x, y, z)

    def create_masked_load(ptrs, mask, *args, **kwargs):
        if state["loads"] is not None:
            state["loads"].append((state["pid"], _bytes(ptrs, mask)))
        return real["create_masked_load"](ptrs, mask, *args, **kwargs)

    def create_masked_store(ptrs, value, mask, *args, **kwargs):
        if state["stores"] is not None:
            state["stores"].append((state["pid"], _bytes(ptrs, mask)))
        return real["create_masked_store"](ptrs, value, mask, *args, **kwargs)

    real_call = ti.GridExecutor.__call__

    def call(self, *args, **kwargs):
        state.update(loads=[], stores=[])
        try:
            result = real_call(self, *args, **kwargs)
            loads, stores = state["loads"], state["stores"]
        finally:
            state.update(loads=None, stores=None)
        LAUNCHES[0] += 1
        _check(getattr(self.fn, "__name__", "?"), loads, stores)
        return result

    patched = dict(set_grid_dim=set_grid_dim, set_grid_idx=set_grid_idx, create_masked_load=create_masked_load,
                   create_masked_store=create_masked_store)
    for n, f in patched.items():
        setattr(b, n, f)
    ti.GridExecutor.__call__ = call
    try:
        yield
    finally:
        ti.GridExecutor.__call__ = real_call
        for n in _NAMES:
            if n in own:
                setattr(b, n, real[n])
            else:
                delattr(b, n)
