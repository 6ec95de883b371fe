# The PyTorch DDP reference for `peerless bench p2p --against ddp`: one rank of a DDP training run.
# Started once per rank by peerless (W separate processes, no torch multiprocessing):
#   python -c SCRIPT RANK WORLD PORT STEPS FEATURES HIDDEN BATCH LR MOMENTUM
# MLP FEATURES-HIDDEN…-10 (ReLU), BATCH samples per rank, cross-entropy, SGD; one thread per rank;
# torch.distributed over gloo, rendezvous at tcp://127.0.0.1:PORT; WORLD = 1 runs without DDP.
# The data are random tensors of the right shape (the step's cost does not depend on the values).
# Every step is timed: forward + backward (with DDP this includes the gradient all-reduce it
# overlaps and waits for) and the optimizer step. Then the same number of steps runs on the plain
# model, all ranks at once, with no communication: the bare compute, so comm ≈ step − bare.
# Rank 0 prints one JSON line of medians over the steady state (the first sixth skipped), in ms.
import json, statistics, sys, time
from datetime import timedelta

import torch
import torch.distributed as dist


def mlp(features, hidden):
    layers, width = [], features
    for h in hidden:
        layers += [torch.nn.Linear(width, h), torch.nn.ReLU()]
        width = h
    return torch.nn.Sequential(*layers, torch.nn.Linear(width, 10))


def timed_steps(net, opt, xs, ys, steps, batch):
    """Trains `steps` steps; per step (fwd+bwd seconds, optimizer seconds)."""
    loss_fn, n, out = torch.nn.CrossEntropyLoss(), xs.shape[0] // batch, []
    for s in range(steps):
        i = (s % n) * batch
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=False)
        loss_fn(net(xs[i:i + batch]), ys[i:i + batch]).backward()
        t1 = time.perf_counter()
        opt.step()
        out.append((t1 - t0, time.perf_counter() - t1))
    return out


def steady_ms(values):
    """Median of the steady state (the first sixth skipped), ms."""
    return statistics.median(values[len(values) // 6:]) * 1e3


def main():
    rank, world, port, steps, features = (int(a) for a in sys.argv[1:6])
    hidden = [int(h) for h in sys.argv[6].split(",") if h]
    batch, lr, momentum = int(sys.argv[7]), float(sys.argv[8]), float(sys.argv[9])
    torch.set_num_threads(1)
    if world > 1:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=world, timeout=timedelta(seconds=60))
    torch.manual_seed(0)
    model = mlp(features, hidden)
    net = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    g = torch.Generator().manual_seed(rank)
    xs = torch.rand(batch * 32, features, generator=g)
    ys = torch.randint(0, 10, (batch * 32,), generator=g)
    ddp = timed_steps(net, torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum),
                      xs, ys, steps, batch)
    if world > 1:
        dist.barrier()
    bare_model = mlp(features, hidden)
    bare = timed_steps(bare_model, torch.optim.SGD(bare_model.parameters(), lr=lr, momentum=momentum),
                       xs, ys, steps, batch)
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    if rank == 0:
        step = steady_ms([a + b for a, b in ddp])
        bare_step = steady_ms([a + b for a, b in bare])
        print(json.dumps({
            "world": world, "steps": steps, "batch": batch, "torch": torch.__version__,
            "step_ms": step, "fwd_bwd_ms": steady_ms([a for a, _ in ddp]),
            "optim_ms": steady_ms([b for _, b in ddp]), "bare_ms": bare_step,
            "comm_ms": step - bare_step,
        }), flush=True)


main()
