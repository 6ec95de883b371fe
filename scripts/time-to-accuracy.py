#!/usr/bin/env python3
# Time to a target test accuracy on MNIST (#18): PyTorch DDP (gloo, one thread per rank) against
# peerless P2P with every-step sync and with DiLoCo, W nodes on this machine, measured in one run.
#
#   python3 scripts/time-to-accuracy.py --python V/bin/python3 [--peerless target/release/peerless]
#       [--link 50,20]   # also over links capped at 50 Mbit/s with 20 ms delay (the fault proxy)
#       [--only 'diloco H=200 int4,diloco H=200 int4 @50,20']   # just these runs
#       [--repeat 3]   # each run 3 times, interleaved; the median is reported (every-step over
#                      # a capped link runs once: it takes minutes)
#       (every-step lanes: gradients on plain TCP lanes, --tensor-transport tcp; the capped runs
#       stay on libp2p, which the fault proxy stands between)
#
# Every side trains the MLP 784-256-128-10, batch 64 per node, SGD (lr, momentum 0.9) on the
# standardized training set, and evaluates on the whole test set every `eval_samples` training
# samples; the time to target is the wall time (from the start of training, evaluation
# excluded for DDP, whose rank 0 evaluates while the others wait) until the first evaluation at
# or above the target. Bytes are what one node sent until then: peerless counts them on its
# links; DDP's are a ring all-reduce's 2·(W−1)/W of the gradient per step (gloo's algorithm
# for this size), counted, not measured.
import argparse, gzip, json, os, re, shutil, socket, struct, subprocess, sys, time
from pathlib import Path

def idx(path):
    for p in (path, path.with_name(path.name + ".gz")):
        if p.exists():
            data = (gzip.open if p.suffix == ".gz" else open)(p, "rb").read()
            dims = data[3]
            shape = struct.unpack(">" + "I" * dims, data[4:4 + 4 * dims])
            return data[4 + 4 * dims:], shape
    sys.exit(f"no {path} (or .gz): run `peerless data fetch mnist`")

def ddp_rank(a):
    import torch, torch.distributed as dist
    torch.set_num_threads(1)
    d = Path(a.data_dir) / "mnist"
    def load(img, lbl):
        x, (n, h, w) = idx(d / img)
        y, _ = idx(d / lbl)
        return torch.frombuffer(bytearray(x), dtype=torch.uint8).reshape(n, h * w).float() / 255, \
            torch.frombuffer(bytearray(y), dtype=torch.uint8).long()
    xtr, ytr = load("train-images-idx3-ubyte", "train-labels-idx1-ubyte")
    xte, yte = load("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
    mean, std = xtr.mean(), xtr.std(unbiased=False)
    xtr, xte = (xtr - mean) / std, (xte - mean) / std
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{a.port}", rank=a.rank, world_size=a.world)
    torch.manual_seed(a.seed)
    model = torch.nn.Sequential(torch.nn.Linear(784, 256), torch.nn.ReLU(), torch.nn.Linear(256, 128),
                                torch.nn.ReLU(), torch.nn.Linear(128, 10))
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.SGD(model.parameters(), lr=a.lr, momentum=0.9)
    loss_fn = torch.nn.CrossEntropyLoss()
    params = sum(p.numel() for p in model.parameters())
    every = max(1, a.eval_samples // (64 * a.world))
    g = torch.Generator().manual_seed(a.seed)
    step, clock, hit, acc = 0, 0.0, None, 0.0
    stop = torch.zeros(1)
    dist.barrier()
    for epoch in range(a.max_epochs):
        perm = torch.randperm(len(xtr), generator=g)[a.rank::a.world]
        for i in range(0, len(perm) - 63, 64):
            t = time.perf_counter()
            b = perm[i:i + 64]
            opt.zero_grad(set_to_none=True)
            loss_fn(ddp(xtr[b]), ytr[b]).backward()
            opt.step()
            step += 1
            clock += time.perf_counter() - t
            if step % every == 0:
                if a.rank == 0:
                    with torch.no_grad():
                        acc = (model(xte).argmax(1) == yte).float().mean().item()
                    if hit is None and acc >= a.target:
                        hit = clock
                    stop[0] = 1.0 if hit is not None else 0.0
                dist.broadcast(stop, 0)
                if stop[0] > 0:
                    break
        if stop[0] > 0:
            break
    if a.rank == 0:
        sent = step * 2 * (a.world - 1) / a.world * params * 4
        print(json.dumps({"time_s": hit, "steps": step, "accuracy": acc, "bytes_per_node": sent,
                          "torch": torch.__version__}))
    dist.destroy_process_group()

def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]

def ddp(a):
    port = free_port()
    procs = [subprocess.Popen([a.python, __file__, "--rank", str(r), "--port", str(port)] + a.forward,
                              stdout=subprocess.PIPE, text=True) for r in range(a.world)]
    try:
        out = [p.communicate(timeout=1800)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    if any(p.returncode for p in procs):
        sys.exit("a DDP rank failed")
    return json.loads(out[0].strip().splitlines()[-1])

def link_scenario(a):
    # Every node's link capped from the start; detection and deadlines on the link's time scale.
    mbit, ms = a.link.split(",")
    nodes = ", ".join(f'"node:{i}"' for i in range(a.world))
    text = (f'description = "{mbit} Mbit/s, {ms} ms"\n[run]\np2p.detection_ms = 3000\n'
            f'cluster.deadline_floor_ms = 5000\n'
            f'[[fault]]\nkind = "bandwidth"\ntargets = [{nodes}]\nat_s = 0.0\nrate_mbit = {float(mbit)}\n'
            f'[[fault]]\nkind = "delay"\ntargets = [{nodes}]\nat_s = 0.0\ndelay_ms = {int(ms)}\n')
    path = Path(a.out) / "link.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return ["--scenario", str(path)]

def peerless(a, name, extra, epochs=None):
    out = Path(a.out) / name
    eval_every = max(1, a.eval_samples // (64 * a.world))
    if "diloco" in extra:
        eval_every = max(1, eval_every // a.inner_steps)
    cmd = [a.peerless, "train", "--arch", "p2p", "--peers", str(a.world), "--functions-per-peer", "1",
           "--compute", a.compute, "--dataset", "mnist", "--data-dir", a.data_dir, "--model", "mlp",
           "--batch-size", "64", "--lr", str(a.lr), "--seed", str(a.seed), "--epochs", str(epochs or a.max_epochs),
           "--eval-every", str(eval_every), "--out", str(out)] + extra
    # This script's own run directory: a run of an earlier invocation is replaced, not resumed.
    shutil.rmtree(out, ignore_errors=True)
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    rows = [l.split(",") for l in (out / "metrics.csv").read_text().splitlines()]
    h = {k: i for i, k in enumerate(rows[0])}
    hit, acc = None, 0.0
    for r in rows[1:]:
        if r[h["test_accuracy"]]:
            acc = float(r[h["test_accuracy"]])
            if hit is None and acc >= a.target:
                hit = (float(r[h["wall_s"]]), int(r[h["bytes_out"]]))
    return {"time_s": hit and hit[0], "bytes_per_node": hit and hit[1], "accuracy": acc}

def median(results):
    # The run whose time to target is the median (one not reached counts as the slowest), with
    # every run's time beside it.
    times = [r["time_s"] for r in results]
    ordered = sorted(results, key=lambda r: (r["time_s"] is None, r["time_s"] or 0.0))
    return dict(ordered[(len(ordered) - 1) // 2], times_s=times)

def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--python", default=os.environ.get("PEERLESS_PYTHON", sys.executable))
    p.add_argument("--peerless", default="target/release/peerless")
    p.add_argument("--data-dir", default=os.environ.get("PEERLESS_DATA_DIR", str(Path.home() / ".local/share/peerless")))
    p.add_argument("--world", type=int, default=4)
    p.add_argument("--target", type=float, default=0.97)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--inner-steps", type=int, default=100)
    p.add_argument("--compute", default="local")
    p.add_argument("--eval-samples", type=int, default=12800)
    p.add_argument("--max-epochs", type=int, default=10)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--link", help="MBIT,MS: also run over links capped at MBIT Mbit/s with MS ms delay")
    p.add_argument("--out", default="/tmp/peerless-time-to-accuracy")
    p.add_argument("--only", help="comma-separated run names to run (e.g. 'ddp,diloco H=200 int8'); default: all")
    p.add_argument("--repeat", type=int, default=1, help="run each N times, interleaved, and report the median")
    p.add_argument("--rank", type=int)
    p.add_argument("--port", type=int)
    a = p.parse_args()
    if a.rank is not None:
        return ddp_rank(a)
    a.forward = ["--data-dir", a.data_dir, "--world", str(a.world), "--target", str(a.target), "--lr", str(a.lr),
                 "--eval-samples", str(a.eval_samples), "--max-epochs", str(a.max_epochs), "--seed", str(a.seed)]
    print(f"time to {a.target:.0%} test accuracy, MNIST MLP, {a.world} nodes, batch 64 each", file=sys.stderr)
    diloco = ["--sync", "diloco", "--inner-steps", str(a.inner_steps)]
    h = f"diloco H={a.inner_steps}"
    runs = [("ddp", lambda: ddp(a)),
            ("every-step", lambda: peerless(a, "every-step", [])),
            ("every-step lanes", lambda: peerless(a, "every-step-lanes", ["--tensor-transport", "tcp"])),
            (h, lambda: peerless(a, "diloco", diloco)),
            (f"{h} int8", lambda: peerless(a, "diloco-int8", diloco + ["--compression", "int8"])),
            (f"{h} int4", lambda: peerless(a, "diloco-int4", diloco + ["--compression", "int4"])),
            (f"{h} topk 1%", lambda: peerless(a, "diloco-topk", diloco + ["--compression", "topk"]))]
    if a.link:
        capped = link_scenario(a)
        # Every-step over a slow link is slow: its run is cut at 2 epochs (≈ 470 rounds).
        runs += [(f"every-step @{a.link}", lambda: peerless(a, "every-step-link", capped, epochs=2)),
                 (f"{h} @{a.link}", lambda: peerless(a, "diloco-link", diloco + capped)),
                 (f"{h} int8 @{a.link}", lambda: peerless(a, "diloco-int8-link", diloco + ["--compression", "int8"] + capped)),
                 (f"{h} int4 @{a.link}", lambda: peerless(a, "diloco-int4-link", diloco + ["--compression", "int4"] + capped))]
    if a.only:
        # A comma before a digit belongs to a link ("@50,20"), not between names.
        wanted = [w.strip() for w in re.split(r",(?!\d)", a.only)]
        unknown = [w for w in wanted if w not in dict(runs)]
        if unknown:
            sys.exit(f"--only: no run named {unknown}; the runs are {[n for n, _ in runs]}")
        runs = [(n, r) for n, r in runs if n in wanted]
    if a.repeat < 1:
        sys.exit("--repeat: at least 1")
    tries = {name: [] for name, _ in runs}
    for k in range(a.repeat):
        for name, run in runs:
            if k > 0 and name.startswith("every-step @"):
                continue
            print(f"  running {name} ({k + 1} of {a.repeat}) …" if a.repeat > 1 else f"  running {name} …",
                  file=sys.stderr)
            tries[name].append(run())
    rows = [(name, median(tries[name])) for name, _ in runs]
    got = dict(rows)
    ddp_t = got.get("ddp", {}).get("time_s")
    every_b = got.get("every-step", {}).get("bytes_per_node")
    print(f"\n{'':<28}{'time to target':>15}{'vs DDP':>9}{'MB sent/node':>14}{'vs every-step':>15}{'last acc':>10}")
    for name, r in rows:
        t, b = r["time_s"], r["bytes_per_node"]
        # Not reached, or a run to compare with not among those run: "-" (never a false 0).
        fmt = lambda v, f: f.format(v) if v is not None else "-"
        print(f"{name:<28}{fmt(t, '{:>14.2f}s') if t is not None else 'not reached':>15}{fmt(t and ddp_t and ddp_t / t, '{:>8.2f}x'):>9}"
              f"{fmt(b and b / 1e6, '{:>14.1f}'):>14}{fmt(b and every_b and every_b / b, '{:>14.1f}x'):>15}"
              f"{r['accuracy']:>10.4f}")
    print("\n(vs DDP: DDP's time / this one's, > 1 is faster; vs every-step: bytes saved)")
    if a.repeat > 1:
        print("(each the median of its runs; times to target of each run:)")
        for name, r in rows:
            print(f"  {name:<26}" + " ".join(f"{t:.2f}" if t is not None else "-" for t in r["times_s"]))
    times = dict((n, r["time_s"]) for n, r in rows)
    for n in [n for n in times if "@" in n]:
        base = times.get(n.split(" @")[0])
        if base and times[n]:
            print(f"{n}: {times[n] / base:.2f}x its uncapped time to target")
    Path(a.out).mkdir(parents=True, exist_ok=True)
    (Path(a.out) / "time-to-accuracy.json").write_text(json.dumps(dict(rows), indent=1))

if __name__ == "__main__":
    main()
