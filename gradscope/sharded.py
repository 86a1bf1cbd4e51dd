"""Sharded parameters: FSDP2 (``torch.distributed.fsdp.fully_shard``) and other ``DTensor`` parameters, each rank
holding one shard of every parameter and of its ``.grad``.

A layer's statistics are of the whole parameter, as one process would compute them: each rank measures its local
shard (:func:`local`), and the ranks' numbers are combined (squared norms and counts summed, maxima taken) in the
step's reduction (:func:`gradscope.distributed.reduce_buffers`, or :func:`reduce_sums` when the activation side is
not reduced). No gradient is ever gathered. Also the stacks gradscope refuses, with what to do instead
(:func:`refuse_unsupported`).
"""

from __future__ import annotations

import math
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


def copies(p: Tensor, grad=None) -> int:
    """How many ranks hold each entry of sharded parameter ``p`` (1 for FSDP2, the replicas for HSDP): summing a
    number over all ranks counts each shard this many times.

    Raises RuntimeError for what the one world-wide sum cannot combine: a mesh that leaves out some ranks (pipeline
    stages), or a ``Partial`` placement of the parameter or of its gradient ``grad`` (a sum not reduced yet, as
    tensor parallelism leaves some gradients).
    """
    mesh, world = p.device_mesh, torch.distributed.get_world_size()
    if mesh.size() != world:
        raise RuntimeError(f"gradscope: a sharded parameter lives on a device mesh of {mesh.size()} of the {world} "
                           "ranks (pipeline stages?), and gradscope combines shards over all ranks only: shard over "
                           "every rank of the job (FSDP2, or HSDP's 2-D mesh) to monitor it")
    for t in (p, grad):
        if is_sharded(t) and any(placement.is_partial() for placement in t.placements):
            raise RuntimeError("gradscope: a DTensor parameter or its gradient has a Partial placement (a sum not "
                               "yet reduced over ranks, as tensor parallelism leaves some); call scope.step() once "
                               "the gradients are reduced (after FSDP's reduce-scatter, or redistribute them)")
    shards = 1
    for d, placement in enumerate(p.placements):
        if placement.is_shard():
            shards *= mesh.size(d)
    return world // shards


def comm_device(t: Tensor) -> torch.device:
    """Where a collective on ``t`` must run: the current CUDA device under an NCCL-only process group (CPU tensors,
    e.g. FSDP2's ``CPUOffloadPolicy`` shards, cannot go through NCCL), else ``t``'s own device."""
    if t.device.type == "cpu" and torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return t.device


def _all_reduce(t: Tensor, op=None) -> Tensor:
    """``t`` reduced over all ranks, on ``t``'s device (through :func:`comm_device`)."""
    dist = torch.distributed
    where = comm_device(t)
    x = t.to(where)
    dist.all_reduce(x, op=op or dist.ReduceOp.SUM)
    return x.to(t.device)


class Shards:
    """Which of a step's parameters are sharded, and how each measure of theirs combines over ranks.

    ``index``: the positions of the sharded parameters among the step's parameters, in the scope's parameter order,
    the same on every rank (FSDP2 gives every rank a gradient shard of the same parameters). ``counts``: how many
    ranks hold each of their entries. The other parameters' numbers are this rank's and stay as they are. A measure
    combines as its :attr:`gradscope.statistics.Measure.across_shards` says: ``"norm"`` (an L2 norm: squares summed,
    then the square root), ``"sum"`` (a count) or ``"max"``. Built once per set of parameters with gradients (the
    scope keeps it), so its index vectors reach the device once, not every step.
    """

    def __init__(self, params: list, grads: list):
        self.index = [k for k, p in enumerate(params) if is_sharded(p)]
        self.counts = [copies(params[k], grads[k]) for k in self.index]
        self.any = bool(self.index)
        self._vectors_on: dict = {}

    def _vectors(self, device) -> tuple[Tensor, Tensor]:
        got = self._vectors_on.get(device)
        if got is None:
            got = self._vectors_on[device] = (torch.tensor(self.index, dtype=torch.long).to(device),
                                               torch.tensor(self.counts, dtype=torch.float64).to(device))
        return got

    def summands(self, measured: dict, kinds: dict) -> dict:
        """The numbers of ``measured`` (``{measure: per-parameter vector}``) that the ranks add up: for each measure
        that combines by ``"norm"`` or ``"sum"``, this rank's squares (or counts) of the sharded parameters only."""
        out = {}
        for name, v in measured.items():
            if kinds[name] in ("norm", "sum"):
                idx, _ = self._vectors(v.device)
                x = v.index_select(0, idx).double()
                out[name] = x.square() if kinds[name] == "norm" else x
        return out

    def combine(self, measured: dict, kinds: dict, sums: dict) -> dict:
        """``measured`` with its sharded parameters' numbers replaced by those of the whole parameters: from ``sums``
        (:meth:`summands` added up over all ranks) and a max over ranks (one more ``all_reduce``, only when a
        measure combines by ``"max"``: the optional ``grad_max``)."""
        dist = torch.distributed
        out = dict(measured)
        for name, v in measured.items():
            idx, div = self._vectors(v.device)
            if kinds[name] == "max":
                m = _all_reduce(v.index_select(0, idx).double(), dist.ReduceOp.MAX)
                if "grad_norm" in sums:  # NaN does not survive a MAX reduction everywhere: the summed norm keeps it
                    m = torch.where(torch.isnan(sums["grad_norm"].to(v.device)), torch.full_like(m, math.nan), m)
                whole = m
            elif kinds[name] == "norm":
                whole = (sums[name].to(v.device) / div).sqrt()
            else:
                whole = sums[name].to(v.device) / div
            out[name] = v.clone().index_copy_(0, idx, whole.to(v.dtype))
        return out

    def nonfinite_counts(self, grads: list) -> list[int]:
        """NaN/Inf entries of each ``(gradient, index)`` in ``grads`` (this step's parameters with a non-finite norm):
        of the whole parameter for a sharded one (one ``all_reduce``; every rank asks for the same sharded ones, since
        their norms were reduced), this rank's for the others."""
        local_counts = nonfinite_counts([local(g) for g, _ in grads])
        position = {k: j for j, k in enumerate(self.index)}
        sharded = [i for i, (_, k) in enumerate(grads) if k in position]
        if not sharded:
            return local_counts
        t = _all_reduce(torch.tensor([float(local_counts[i]) for i in sharded], dtype=torch.float64))
        for i, v in zip(sharded, t.tolist()):
            local_counts[i] = int(round(v / self.counts[position[grads[i][1]]]))
        return local_counts


def reduce_sums(sums: dict) -> dict:
    """``sums`` (:meth:`Shards.summands`) added up over all ranks: one ``all_reduce``."""
    if not sums:
        return sums
    names = list(sums)
    flat = _all_reduce(torch.cat([sums[n].reshape(-1) for n in names]))
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
