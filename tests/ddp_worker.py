"""One rank of tests/test_torch_dropin.py's DistributedDataParallel test (run as a
script, one process per rank): trains an nn.LSTM model and the same model with
rnnkernels.torch.LSTM under DDP on gloo, and writes both final parameters to
``<out>/rank<r>.pt``. Arguments: rank world_size port out_dir."""

import os
import sys

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

import rnnkernels.torch as rtorch


class Model(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lstm = torch.nn.LSTM(4, 6, num_layers=2, batch_first=True)
        self.head = torch.nn.Linear(6, 1)

    def forward(self, x):
        y, _ = self.lstm(x)
        return self.head(y[:, -1])


def train(model, rank):
    ddp = DistributedDataParallel(model)
    optimizer = torch.optim.SGD(ddp.parameters(), lr=0.2)
    generator = torch.Generator().manual_seed(100 + rank)  # each rank its own data
    for _ in range(4):
        x = torch.randn(3, 5, 4, generator=generator)
        target = torch.randn(3, 1, generator=generator)
        optimizer.zero_grad()
        torch.nn.functional.mse_loss(ddp(x), target).backward()
        optimizer.step()
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def main():
    rank, world, port, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.manual_seed(0)  # the same initial weights on every rank
    stock = Model()
    ours = Model()
    ours.load_state_dict(stock.state_dict())
    assert rtorch.replace_lstm(ours) == ["lstm"]
    results = {"stock": train(stock, rank), "ours": train(ours, rank)}
    torch.save(results, os.path.join(out, f"rank{rank}.pt"))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
