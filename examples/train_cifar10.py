"""A plain CIFAR-10 training script with gradscope added (lines marked ###): any model of the zoo, or your own.

    python examples/train_cifar10.py --model plain56 --steps 300
    python examples/train_cifar10.py --model rnn-pixels --steps 50 --lr 1e-3
    torchrun --nproc_per_node=2 examples/train_cifar10.py --model resnet20   # DDP: gloo on CPU, NCCL on CUDA
    torchrun --nproc_per_node=2 examples/train_cifar10.py --model resnet20 --fsdp   # FSDP2's fully_shard instead

The full comparison runner is `gradscope compare` (python -m gradscope.bench.compare); this is the same loop, unadorned.
"""

import argparse
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

import gradscope
from gradscope.bench.data import Batches, load_cifar10
from gradscope.bench.models import build_model


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="resnet20")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--subset", type=int, default=10_000)
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--fsdp", action="store_true", help="under torchrun: shard with FSDP2 (fully_shard on each "
                    "top-level block and on the root) instead of DDP")
    args = ap.parse_args(argv)

    rank, world = 0, int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:  # started by torchrun: one process per rank, each on its own shard of the data
        dist.init_process_group("nccl" if args.device.startswith("cuda") else "gloo")
        rank = dist.get_rank()
        if args.device.startswith("cuda"):
            args.device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
            torch.cuda.set_device(args.device)
    torch.manual_seed(0)  # the same initial weights on every rank
    data = load_cifar10(args.data_dir, train_subset=args.subset, test_subset=1000)
    model = build_model(args.model).to(args.device)
    if world > 1 and args.fsdp:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(torch.device(args.device).type, (world,))  # where the model is, CUDA or not
        for block in model.children():
            if any(p.requires_grad for p in block.parameters()):
                fully_shard(block, mesh=mesh)  # each rank keeps one shard of the block's parameters and gradients
        fully_shard(model, mesh=mesh)
        if rank == 0:
            print(f"FSDP2 over {world} processes, {args.batch_size} images per process and step")
    elif world > 1:
        model = DistributedDataParallel(model, device_ids=[args.device] if args.device.startswith("cuda") else None)
        if rank == 0:
            print(f"DDP over {world} processes, {args.batch_size} images per process and step")
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    batches = Batches(data.train_images[rank::world], data.train_labels[rank::world], args.batch_size, args.device,
                      augment=True, seed=rank)

    scope = gradscope.watch(model, optimizer=optimizer)  ### the one added line: steps close at optimizer.step()
    for step in range(args.steps):
        x, y = next(batches)
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 50 == 0 and rank == 0:
            print(f"step {step:4d}  loss {loss.item():.3f}")
    if rank == 0:
        print(scope.summary())  ### and what it found (the same on every rank under DDP and FSDP2)
    scope.detach()
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
