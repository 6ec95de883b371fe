#!/usr/bin/env python3
# Would overlapping DiLoCo's exchange with the next inner steps pay on MNIST? A PyTorch
# simulation (one process, no network) of 4 workers training the MLP 784-256-128-10 with DiLoCo
# as peerless does (H inner SGD steps, lr 0.05, momentum 0.9, batch 64, the inner optimizer
# fresh every outer round; outer SGD with Nesterov momentum), counting outer rounds to 97 %
# test accuracy, with the outer step applying the mean delta of this round (--delay 0) or of
# the round before (--delay 1: each round's inner steps start from the parameters before the
# previous outer step, which is what hides the exchange behind them while every replica stays
# identical). --bits 8 or 4 quantizes each delta per block of 1024 with error feedback.
#
#   V/bin/python3 scripts/diloco-overlap-sim.py --delay 1 [--inner-steps 200] [--outer-lr 0.7]
#       [--outer-momentum 0.9] [--bits 0] [--rounds 8] [--seed 1]
import argparse, importlib.util, torch
from pathlib import Path

def idx(path):
    # The IDX reader of time-to-accuracy.py (a file name with hyphens: loaded by path).
    spec = importlib.util.spec_from_file_location("tta", Path(__file__).with_name("time-to-accuracy.py"))
    tta = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tta)
    return tta.idx(path)

def load(d, img, lbl):
    x, (n, h, w) = idx(d / img)
    y, _ = idx(d / lbl)
    return torch.frombuffer(bytearray(x), dtype=torch.uint8).reshape(n, h * w).float() / 255, \
        torch.frombuffer(bytearray(y), dtype=torch.uint8).long()

def mlp():
    return torch.nn.Sequential(torch.nn.Linear(784, 256), torch.nn.ReLU(), torch.nn.Linear(256, 128),
                               torch.nn.ReLU(), torch.nn.Linear(128, 10))

def flat(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])

def load_flat(model, v):
    i = 0
    for p in model.parameters():
        p.data.copy_(v[i:i + p.numel()].reshape(p.shape))
        i += p.numel()

def quantize(x, bits):
    levels = 2 ** (bits - 1) - 1
    n = x.numel()
    blocks = torch.cat([x, torch.zeros((-n) % 1024)]).reshape(-1, 1024)
    scale = blocks.abs().max(1, keepdim=True).values / levels
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    return ((blocks / safe).round().clamp(-levels, levels) * scale).reshape(-1)[:n]

def main():
    p = argparse.ArgumentParser()
    p.add_argument("--delay", type=int, default=0)
    p.add_argument("--inner-steps", type=int, default=200)
    p.add_argument("--outer-lr", type=float, default=0.7)
    p.add_argument("--outer-momentum", type=float, default=0.9)
    p.add_argument("--bits", type=int, default=0)
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--data-dir", default=str(Path.home() / ".local/share/peerless"))
    a = p.parse_args()
    torch.set_num_threads(1)
    d = Path(a.data_dir) / "mnist"
    xtr, ytr = load(d, "train-images-idx3-ubyte", "train-labels-idx1-ubyte")
    xte, yte = load(d, "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
    mean, std = xtr.mean(), xtr.std(unbiased=False)
    xtr, xte = (xtr - mean) / std, (xte - mean) / std
    torch.manual_seed(a.seed)
    model = mlp()
    outer = torch.optim.SGD(model.parameters(), lr=a.outer_lr, momentum=a.outer_momentum,
                            nesterov=a.outer_momentum > 0)
    order = torch.randperm(len(xtr), generator=torch.Generator().manual_seed(a.seed))
    loss_fn = torch.nn.CrossEntropyLoss()
    W, H, B = a.workers, a.inner_steps, 64
    residual = [torch.zeros(flat(model).numel()) for _ in range(W)]
    history = [flat(model).clone()]
    for r in range(a.rounds):
        start = history[max(0, r - a.delay)]
        deltas = []
        for w in range(W):
            local = mlp()
            load_flat(local, start)
            opt = torch.optim.SGD(local.parameters(), lr=0.05, momentum=0.9)
            for k in range(H):
                i = ((r * H + k) * W + w) * B % (len(xtr) - B)
                b = order[i:i + B]
                opt.zero_grad()
                loss_fn(local(xtr[b]), ytr[b]).backward()
                opt.step()
            delta = start - flat(local)
            if a.bits:
                corrected = delta + residual[w]
                delta = quantize(corrected, a.bits)
                residual[w] = corrected - delta
            deltas.append(delta)
        mean_delta = torch.stack(deltas).mean(0)
        outer.zero_grad()
        i = 0
        for prm in model.parameters():
            prm.grad = mean_delta[i:i + prm.numel()].reshape(prm.shape).clone()
            i += prm.numel()
        outer.step()
        history.append(flat(model).clone())
        with torch.no_grad():
            acc = (model(xte).argmax(1) == yte).float().mean().item()
        print(f"delay {a.delay}, H = {H}, outer lr {a.outer_lr}, momentum {a.outer_momentum}, bits {a.bits or 32}: "
              f"outer round {r + 1}: test accuracy {acc:.4f}", flush=True)
        if acc >= 0.97:
            print(f"97 % after {r + 1} outer rounds")
            return
    print(f"97 % not reached in {a.rounds} outer rounds")

if __name__ == "__main__":
    main()
