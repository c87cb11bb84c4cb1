"""Spectral fine-tuning under FSDP2 with torchrun: a toy regression model, every rank filtering its own rows.

    torchrun --nproc-per-node 2 examples/distributed_fsdp2.py [--steps 20] [--checkpoint DIR] [--resume]

Runs on GPUs (NCCL, one per rank) or, without CUDA, on the CPU (gloo). The lines that differ from an ordinary
FSDP2 loop are marked "spectral". With --checkpoint the model, optimizer and filter are saved through
torch.distributed.checkpoint at the end; --resume loads them first — on any number of ranks whose shard boundaries
are block boundaries (here 1, 2 and 4: ``align_shards``).
"""
from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

import spectralkern as sk
from spectralkern.optim.checkpoint import load_checkpoint, save_checkpoint


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--checkpoint", default=None, help="DCP checkpoint folder to save to (and resume from)")
    parser.add_argument("--resume", action="store_true")
    args = parser.parse_args()

    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    mesh = init_device_mesh(device.type, (world,))

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 512), nn.GELU(), nn.Linear(512, 512), nn.GELU(), nn.Linear(512, 8)).to(device)
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)

    # spectral: after fully_shard. Each rank builds graphs and bases of its own rows (blocks of 128 cut at the
    # shard boundaries of 1, 2 and 4 ranks), so filtering needs no communication.
    filt = sk.SpectralGradientFilter(model, ["0", "2"], block_size=128, k=16, gains=sk.heat(2.0), reg_weight=1e-3,
                                     refresh_every=10, align_shards=(1, 2, 4))
    opt = sk.SpectralAdamW(model.parameters(), lr=1e-3, spectral_filter=filt)  # spectral
    if args.resume:
        load_checkpoint(args.checkpoint, model, opt, filt)  # spectral: model, optimizer and filter, resharded

    gen = torch.Generator().manual_seed(1000 * filt.steps + rank)  # a different share of the data on every rank
    for _ in range(args.steps):
        x = torch.randn(32, 64, generator=gen).to(device)
        loss = (model(x) - x[:, :8].sin()).square().mean() + filt.regularization()  # spectral: + one all-reduce
        loss.backward()
        opt.step()
        opt.zero_grad()
    if rank == 0:
        print(f"{world} ranks, step {filt.steps}: loss {loss.item():.4f}")
    if args.checkpoint:
        save_checkpoint(args.checkpoint, model, opt, filt)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
