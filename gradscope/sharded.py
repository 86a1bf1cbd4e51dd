"""Sharded parameters: FSDP2 (``torch.distributed.fsdp.fully_shard``) and other ``DTensor`` parameters, each rank
holding one shard of every parameter and of its ``.grad``.

A layer's statistics are of the whole parameter, as one process would compute them: each rank measures its local
shard (:func:`local`), and the ranks' numbers are combined (squared norms and counts summed, maxima taken) in the
step's reduction (:func:`gradscope.distributed.reduce_buffers`, or :func:`reduce_sums` when the activation side is
not reduced). No gradient is ever gathered. Also the stacks gradscope refuses, with what to do instead
(:func:`refuse_unsupported`).
"""

from __future__ import annotations

import sys

import torch
from torch import Tensor, nn

from .stats import nonfinite_counts


def dtensor_type():
    """The ``DTensor`` class, or None while no module has imported it (then no tensor can be one): checking costs a
    dictionary lookup and imports nothing."""
    for name in ("torch.distributed.tensor", "torch.distributed._tensor"):
        cls = getattr(sys.modules.get(name), "DTensor", None)
        if cls is not None:
            return cls
    return None


def is_sharded(t) -> bool:
    cls = dtensor_type()
    return cls is not None and isinstance(t, cls)


_PLAIN = (Tensor, nn.Parameter)


def local(t):
    """The part of ``t`` this rank holds: a DTensor's local shard (no copy, no communication), else ``t``."""
    if type(t) in _PLAIN:  # the usual case, on the per-parameter path of every collected step
        return t
    if t is not None and is_sharded(t):
        with torch.no_grad():
            return t.to_local()
    return t


def copies(p: Tensor) -> int:
    """How many ranks hold each entry of sharded parameter ``p`` (1 for FSDP2, the replicas for HSDP): summing a
    number over all ranks counts each shard this many times.

    Raises RuntimeError for what the one world-wide sum cannot combine: a mesh that leaves out some ranks (pipeline
    stages), or a ``Partial`` placement (a gradient not reduced yet).
    """
    mesh, world = p.device_mesh, torch.distributed.get_world_size()
    if mesh.size() != world:
        raise RuntimeError(f"gradscope: a sharded parameter lives on a device mesh of {mesh.size()} of the {world} "
                           "ranks (pipeline stages?), and gradscope combines shards over all ranks only: shard over "
                           "every rank of the job (FSDP2, or HSDP's 2-D mesh) to monitor it")
    shards = 1
    for d, placement in enumerate(p.placements):
        if placement.is_partial():
            raise RuntimeError("gradscope: a DTensor parameter has a Partial placement (a sum not yet reduced); "
                               "call scope.step() after the backward pass, once FSDP has reduced the gradients")
        if placement.is_shard():
            shards *= mesh.size(d)
    return world // shards


class Shards:
    """Which of a step's parameters are sharded, and how each measure of theirs combines over ranks.

    ``counts[k]``: how many ranks hold each entry of parameter ``k`` (0: not sharded, its numbers are this rank's
    alone and stay as they are). A measure combines as its :attr:`gradscope.statistics.Measure.across_shards` says:
    ``"norm"`` (an L2 norm: squares summed, then the square root), ``"sum"`` (a count) or ``"max"``.
    """

    def __init__(self, params: list):
        self.counts = [copies(p) if is_sharded(p) else 0 for p in params]
        self.any = any(self.counts)
        self._mask = self._div = None

    def _vectors(self, device):
        if self._mask is None or self._mask.device != device:
            counts = torch.tensor(self.counts, dtype=torch.float64, device=device)
            self._mask, self._div = counts > 0, counts.clamp(min=1)
        return self._mask, self._div

    def summands(self, measured: dict, kinds: dict) -> dict:
        """The numbers of ``measured`` (``{measure: per-parameter vector}``) that the ranks add up: for each measure
        that combines by ``"norm"`` or ``"sum"``, this rank's squares (or counts) of its sharded parameters, 0 for
        the others."""
        out = {}
        for name, v in measured.items():
            if kinds[name] in ("norm", "sum"):
                mask, _ = self._vectors(v.device)
                x = v.double().square() if kinds[name] == "norm" else v.double()
                out[name] = torch.where(mask, x, torch.zeros_like(x))
        return out

    def combine(self, measured: dict, kinds: dict, sums: dict) -> dict:
        """``measured`` with its sharded parameters' numbers replaced by those of the whole parameters: from ``sums``
        (:meth:`summands` added up over all ranks) and a max over ranks (one more ``all_reduce``, only when a
        measure combines by ``"max"``: the optional ``grad_max``)."""
        dist = torch.distributed
        out = dict(measured)
        for name, v in measured.items():
            mask, div = self._vectors(v.device)
            if kinds[name] == "max":
                # NaN does not survive a MAX reduction everywhere: keep it, via the summed norm, as one process would
                m = torch.where(mask, v.double(), torch.full_like(v, -1.0, dtype=torch.float64))
                dist.all_reduce(m, op=dist.ReduceOp.MAX)
                nan = torch.isnan(sums["grad_norm"]) if "grad_norm" in sums else torch.zeros_like(mask)
                whole = torch.where(nan & mask, torch.full_like(m, float("nan")), m)
            elif kinds[name] == "norm":
                whole = (sums[name] / div).sqrt()
            else:
                whole = sums[name] / div
            out[name] = torch.where(mask, whole.to(v.dtype), v)
        return out

    def nonfinite_counts(self, grads: list) -> list[int]:
        """NaN/Inf entries of each ``(gradient, index)`` in ``grads`` (this step's parameters with a non-finite norm):
        of the whole parameter for a sharded one (one ``all_reduce``; every rank asks for the same sharded ones, since
        their norms were reduced), this rank's for the others."""
        local_counts = nonfinite_counts([local(g) for g, _ in grads])
        sharded = [i for i, (_, k) in enumerate(grads) if self.counts[k]]
        if not sharded:
            return local_counts
        dist = torch.distributed
        t = torch.tensor([float(local_counts[i]) for i in sharded], dtype=torch.float64,
                         device=local(grads[sharded[0]][0]).device)
        dist.all_reduce(t)
        for i, v in zip(sharded, t.tolist()):
            local_counts[i] = int(round(v / self.counts[grads[i][1]]))
        return local_counts


def reduce_sums(sums: dict) -> dict:
    """``sums`` (:meth:`Shards.summands`) added up over all ranks: one ``all_reduce``."""
    if not sums:
        return sums
    names = list(sums)
    flat = torch.cat([sums[n].reshape(-1) for n in names])
    torch.distributed.all_reduce(flat)
    return dict(zip(names, flat.split([sums[n].numel() for n in names])))


def uses_fsdp2(model: nn.Module) -> bool:
    """Whether ``fully_shard`` was applied to ``model`` or one of its submodules (FSDP2)."""
    fsdp = sys.modules.get("torch.distributed.fsdp")
    cls = getattr(fsdp, "FSDPModule", None)
    return cls is not None and any(isinstance(m, cls) for m in model.modules())


def _class_names(obj) -> set[str]:
    return {f"{c.__module__}.{c.__qualname__}" for c in type(obj).__mro__}


def refuse_unsupported(model: nn.Module) -> None:
    """Raise a clear error for the sharded stacks whose gradients gradscope cannot read per layer: FSDP1
    (``FullyShardedDataParallel``: flattened parameters) and DeepSpeed engines (ZeRO partitions gradients outside
    ``.grad``), rather than report one rank's numbers as the layer's."""
    for name, m in model.named_modules():
        names = _class_names(m)
        if any(n.startswith("torch.distributed.fsdp") and n.endswith(".FullyShardedDataParallel") for n in names):
            where = f" (module {name!r})" if name else ""
            raise TypeError(f"gradscope does not support FSDP1's FullyShardedDataParallel{where}: its flattened, "
                            "sharded parameters hide the per-layer gradients. Shard with FSDP2 instead, "
                            "torch.distributed.fsdp.fully_shard(module) on each block and on the root, which "
                            "gradscope.watch(model) supports; or use DistributedDataParallel")
        if any(n.startswith("deepspeed.") and n.endswith("DeepSpeedEngine") for n in names):
            raise TypeError("gradscope does not support DeepSpeed engines: ZeRO partitions the gradients outside "
                            "each parameter's .grad, so per-layer statistics would be one rank's or none. Use FSDP2 "
                            "(torch.distributed.fsdp.fully_shard) or DistributedDataParallel to monitor training")
    for pname, p in model.named_parameters():
        if hasattr(p, "ds_id") or hasattr(p, "ds_status"):
            raise TypeError(f"gradscope does not support DeepSpeed ZeRO-3 parameters ({pname!r} is partitioned by "
                            "DeepSpeed); use FSDP2 (torch.distributed.fsdp.fully_shard) or DistributedDataParallel")
