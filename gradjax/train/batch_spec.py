"""Batch specs: what a batch entry must be, checked on the host before it enters a compiled step.

:class:`ArraySpec` describes one entry (rank, dtype kind, per-example shape, label range, finiteness); a
:data:`BatchSpec` maps entry names to specs (:func:`image_batch_spec` is the default). :func:`validate_batch`
checks a batch (also a ``pmap`` batch with a device axis, or global arrays of a multi-process run, of which each
process checks its own rows); :func:`validate_frozen` checks the ``frozen`` argument of a step.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional

import jax
import numpy as np

PyTree = Any
Batch = Mapping[str, Any]


@dataclasses.dataclass(frozen=True)
class ArraySpec:
    """What one batch entry must be (checked on the host before the compiled step).

    Attributes:
      rank: number of axes *including* the batch axis (images 4, labels 1, 2-D points 2); ``None`` = any (>= 1).
      kind: ``"float"`` (a floating dtype), ``"int"`` (an integer dtype) or ``"any"``.
      shape: optional per-example shape (without the batch axis); ``None`` entries match any size.
      num_classes: for ``"int"`` entries, values must lie in ``[0, num_classes)``.
      finite: for ``"float"`` entries, no NaN/inf (scanned on a step's first call only; later NaNs are caught by
        the divergence guard).
      optional: the entry may be absent.
    """

    rank: Optional[int] = None
    kind: str = "float"
    shape: Optional[tuple] = None
    num_classes: Optional[int] = None
    finite: bool = True
    optional: bool = False

    def __post_init__(self):
        if self.kind not in ("float", "int", "any"):
            raise ValueError(f"ArraySpec.kind must be 'float', 'int' or 'any'; got {self.kind!r}.")
        if self.shape is not None:
            object.__setattr__(self, "shape", tuple(self.shape))
            if self.rank is not None and self.rank != len(self.shape) + 1:
                raise ValueError(f"ArraySpec: rank {self.rank} disagrees with per-example shape {self.shape}.")
            object.__setattr__(self, "rank", len(self.shape) + 1)
        if self.rank is not None and self.rank < 1:
            raise ValueError(f"ArraySpec.rank counts the batch axis and must be >= 1; got {self.rank}.")
        if self.num_classes is not None and self.kind != "int":
            raise ValueError("ArraySpec.num_classes applies to kind='int' entries only.")


BatchSpec = Mapping[str, ArraySpec]
"""``{entry name: ArraySpec}``. Every required entry must be present and no other entry is allowed (every entry is
split over devices along its leading axis, so it must be per-example); all share one batch size."""


def image_batch_spec(num_classes: Optional[int] = None, *, labels: bool = True) -> dict[str, ArraySpec]:
    """The default spec: ``image`` float ``[B, H, W, C]``, and ``label`` int ``[B]`` in ``[0, num_classes)``
    (required if ``labels``, else optional)."""
    return {"image": ArraySpec(rank=4, kind="float"),
            "label": ArraySpec(rank=1, kind="int", num_classes=num_classes, optional=not labels)}


def _leaf_name(path) -> str:
    return "".join(str(k) for k in path) or "frozen"


def _local_values(x) -> np.ndarray:
    """The values of ``x`` this process can read: all of it, or (a global array spanning other processes' devices,
    see :mod:`gradjax.distributed`) its addressable shards — each process checks the rows it supplied."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        shards = [np.asarray(sh.data).reshape(-1) for sh in x.addressable_shards]
        return np.concatenate(shards) if shards else np.zeros((0,), x.dtype)
    return np.asarray(x)


def validate_batch(batch: Batch, spec: Optional[BatchSpec] = None, *, num_classes: Optional[int] = None,
                   check_values: bool = True, leading_axes: int = 1, num_devices: Optional[int] = None,
                   divisible_by: Optional[int] = None) -> None:
    """Check ``batch`` against ``spec`` (default :func:`image_batch_spec` ``(num_classes, labels=False)``) before
    it enters a compiled step. ``leading_axes=2`` for a ``pmap`` batch ``[devices, B, ...]`` (the device axis must
    equal ``num_devices`` when given); ``divisible_by``: the global batch size must divide over that many devices.
    Value checks (label range, NaN/inf) run with ``check_values``. Raises ``ValueError`` saying what is wrong."""
    if spec is None:
        spec = image_batch_spec(num_classes, labels=False)
    elif num_classes is not None:
        raise ValueError("pass either a batch spec or num_classes (a shortcut for image_batch_spec), not both.")
    if not isinstance(batch, Mapping):
        raise ValueError(f"a batch must be a dict of arrays with entries {sorted(spec)}; got {type(batch).__name__}.")
    missing = [k for k, s in spec.items() if not s.optional and k not in batch]
    if missing:
        raise ValueError(f"the batch has no entry {missing} required by the batch spec (it has {sorted(batch)}).")
    extra = sorted(set(batch) - set(spec))
    if extra:
        raise ValueError(f"batch entries {extra} are not in the batch spec {sorted(spec)}. Every batch entry is "
                         "split along its leading (batch) axis: add it to the spec with an ArraySpec, or pass fixed "
                         "tensors through `frozen` instead.")
    lead_dims = None
    for name in spec:
        if name not in batch:
            continue
        s, x = spec[name], batch[name]
        label = f"batch[{name!r}]"
        if not hasattr(x, "shape") or not hasattr(x, "dtype"):
            raise ValueError(f"{label} must be an array; got {type(x).__name__}.")
        shape = tuple(np.shape(x))
        if len(shape) < leading_axes or (s.rank is not None and len(shape) != s.rank + leading_axes - 1):
            want = "a batch axis" if s.rank is None else f"rank {s.rank} (with the batch axis)"
            dev = " after the leading device axis" if leading_axes == 2 else ""
            raise ValueError(f"{label} must have {want}{dev}; got shape {shape}.")
        if lead_dims is None:
            lead_dims = (name, shape[:leading_axes])
        elif shape[:leading_axes] != lead_dims[1]:
            raise ValueError(f"{label} has leading (batch) shape {shape[:leading_axes]} but batch[{lead_dims[0]!r}] "
                             f"has {lead_dims[1]}: every entry must have the same batch size.")
        if s.shape is not None:
            per_example = shape[leading_axes:]
            if any(w is not None and w != d for w, d in zip(s.shape, per_example)):
                raise ValueError(f"{label} must have per-example shape {s.shape} (None = any); got {per_example}.")
        dtype = np.dtype(x.dtype)
        if s.kind == "float" and not np.issubdtype(dtype, np.floating):
            raise ValueError(f"{label} must be a floating-point array; got dtype {dtype}. Cast it, e.g. "
                             "x.astype(np.float32).")
        if s.kind == "int" and not np.issubdtype(dtype, np.integer):
            raise ValueError(f"{label} must be an integer array (class indices); got dtype {dtype}.")
        if check_values and s.kind == "int" and s.num_classes is not None and np.size(x):
            arr = _local_values(x)
            if arr.min() < 0 or arr.max() >= s.num_classes:
                raise ValueError(f"{label} must lie in [0, {s.num_classes}); got values in [{arr.min()}, {arr.max()}].")
        if check_values and s.kind == "float" and s.finite:
            arr = _local_values(x)
            n_bad = int(np.size(arr) - np.count_nonzero(np.isfinite(arr)))
            if n_bad:
                raise ValueError(f"{label} contains {n_bad} non-finite value(s) (NaN or inf).")
    if lead_dims is None:
        raise ValueError("the batch is empty: it has none of the spec's entries.")
    if lead_dims[1][-1] < 1:
        raise ValueError("the batch has no examples (batch size 0).")
    if leading_axes == 2 and num_devices is not None and lead_dims[1][0] != num_devices:
        raise ValueError(f"a pmap batch needs a leading device axis of size {num_devices} (use shard(batch, mesh, "
                         f"device_axis=True)); batch[{lead_dims[0]!r}] has leading shape {lead_dims[1]}.")
    if divisible_by and lead_dims[1][0] % divisible_by:
        raise ValueError(f"global batch size {lead_dims[1][0]} is not divisible by the {divisible_by} devices.")


def validate_frozen(frozen: PyTree, *, where: str = "jit") -> None:
    """Check ``frozen`` before it enters a compiled step: every leaf is an array (or a Python number) and none is
    split across devices. ``frozen`` is *one* copy, identical on every device, never split along a batch axis:

    * under ``pmap`` it is broadcast (``in_axes=None``), so a leaf must **not** carry a leading device axis — pass
      the un-replicated pytree, not ``replicate(frozen, mesh, device_axis=True)``;
    * under sharding it is placed with a replicated ``NamedSharding`` — a leaf sharded over the mesh (e.g. by
      :func:`~gradjax.train.placement.shard`) is an error.

    Per-example tensors (e.g. precomputed teacher logits ``[B, K]``) must go in the batch (with a spec entry) so
    that they are split with the examples they belong to. Raises ``ValueError``.
    """
    for path, leaf in jax.tree_util.tree_flatten_with_path(frozen)[0]:
        name = f"frozen{_leaf_name(path)}" if path else "frozen"
        if isinstance(leaf, (bool, int, float, complex, np.ndarray, np.generic)):
            continue
        if not isinstance(leaf, jax.Array):
            raise ValueError(f"{name} must be an array or a number (it is an argument of the compiled step); got "
                             f"{type(leaf).__name__}. Close over non-array configuration in loss_fn instead.")
        if not leaf.sharding.is_fully_replicated:
            fix = ("under pmap, frozen is broadcast to every device (in_axes=None) and must not carry a leading "
                   "device axis: pass the un-replicated pytree, not replicate(frozen, mesh, device_axis=True)"
                   if where == "pmap" else
                   "frozen inputs are one copy shared by every device, never split along a batch axis: pass a host "
                   "or single-device array, or replicate(frozen, mesh)")
            raise ValueError(f"{name} (shape {tuple(leaf.shape)}) is split across devices ({leaf.sharding}); {fix}. "
                             "Per-example tensors belong in the batch.")
