"""torch.distributed for a scope: the world it runs in, and the reduction that makes every rank's activation-side
buffers those of all ranks together (one ``all_reduce`` per collected step)."""

from __future__ import annotations

import dataclasses

import torch

from .collect import StepBuffers
from .stats import saturation_sums, sum_by_key


def world_size() -> int:
    """Processes in the default ``torch.distributed`` group (1 when it is not initialised)."""
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    dist = torch.distributed
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def reduce_buffers(b: StepBuffers, loss=None, sums: dict | None = None) -> tuple[StepBuffers, object, dict]:
    """This step's activation-side buffers ``b`` (and ``loss``: the mean over ranks, the loss DDP optimises) of all
    ranks together, identical on every rank: buffers in, new buffers out. ``sums``: vectors to add up over ranks in
    the same ``all_reduce`` (sharded parameters' squared norms and counts, :meth:`gradscope.sharded.Shards.summands`),
    returned added up.

    One ``all_reduce`` (SUM) of every site's numbers in one float64 vector, preceded by a check that all ranks hold
    the same number of them (else the collective would hang or mix sites). Dead-unit counts and sample counts,
    saturation counts, totals and sizes and output checks add up over ranks, so "dead" means dead on every rank's
    data. Backprop signals and through-time profiles are of the loss DDP optimises, the mean of the ranks' losses:
    dLoss/d(output) on rank r is 1/W of its local gradient, so squared norms add up divided by W**2 (equal per-rank
    batches make the through-time batch mean the same). Parameter gradients need nothing: DDP all-reduced them.
    """
    dist = torch.distributed
    world = dist.get_world_size()
    sums = sums or {}
    sum_names = list(sums)
    sig_sites, sig = sum_by_key(b.signal_parts) if b.signal_parts else ([], None)
    out_sites, out = sum_by_key(b.output_parts) if b.output_parts else ([], None)
    sat_sites, sat_k, sat_tot, sat_numel = saturation_sums(b.saturation_parts)
    time_sites = list(b.through_time)
    pieces = [t for t in (sig, out, sat_k, sat_tot) if t is not None]
    pieces += [counts for _, counts, _ in b.dead_parts] + [b.through_time[s] for s in time_sites]
    pieces += [sums[n] for n in sum_names]
    if not pieces and loss is None:
        return b, loss, sums
    device = pieces[0].device if pieces else loss.device if isinstance(loss, torch.Tensor) else torch.device("cpu")
    if loss is not None:
        pieces.append(torch.as_tensor(loss, dtype=torch.float64, device=device).reshape(1))
    host = [float(v) for v in sat_numel.values()] + [float(n) for _, _, n in b.dead_parts]
    flat = torch.cat([t.reshape(-1).to(device, torch.float64) for t in pieces] +
                     [torch.tensor(host, dtype=torch.float64, device=device)])
    size = torch.tensor([flat.numel(), -flat.numel()], dtype=torch.float64, device=device)
    dist.all_reduce(size, op=dist.ReduceOp.MAX)
    if size[0].item() != -size[1].item():
        raise RuntimeError("gradscope: the ranks collected different call sites this step (a branch taken on some "
                           "ranks only? a loss given on some ranks only?); every rank must call the same modules in "
                           "the same order, as DDP itself expects without find_unused_parameters")
    dist.all_reduce(flat)
    parts = list(flat.split([t.numel() for t in pieces] + [len(host)]))
    host_sums = [int(round(v)) for v in parts.pop().tolist()]
    if loss is not None:
        loss = parts.pop() / world
    summed = dict(zip(sum_names, parts[len(parts) - len(sum_names):]))
    del parts[len(parts) - len(sum_names):]
    k, new = 0, {}
    if sig is not None:
        new["signal_parts"] = list(zip(sig_sites, parts[k] / world ** 2))  # float64: tiny signals stay nonzero
        k += 1
    if out is not None:
        new["output_parts"] = list(zip(out_sites, parts[k].float()))
        k += 1
    if sat_k is not None:
        numel = dict(zip(sat_numel, host_sums[:len(sat_numel)]))
        new["saturation_parts"] = [(site, kk, tot, numel[site])  # (counts: float64, exact)
                                   for site, kk, tot in zip(sat_sites, parts[k], parts[k + 1].float())]
        k += 2
    ns = host_sums[len(sat_numel):]
    new["dead_parts"] = [(site, parts[k + i].float(), n) for i, ((site, _, _), n) in enumerate(zip(b.dead_parts, ns))]
    k += len(ns)
    new["through_time"] = {}
    for site in time_sites:
        old = b.through_time[site]
        new["through_time"][site] = (parts[k] / world ** 2).to(old.dtype).reshape(old.shape)
        k += 1
    return dataclasses.replace(b, **new), loss, summed
