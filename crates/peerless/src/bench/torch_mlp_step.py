# The PyTorch reference for `peerless bench step`: the same MLP step, measured in the same run.
# MLP in-256-128-10, batch 64, cross-entropy, SGD; 1 thread; each step flattens all gradients into
# one vector and writes that vector back as the gradients (what peerless does with flat vectors).
import json, sys, time
import torch

steps, warmup, features = int(sys.argv[1]), 20, int(sys.argv[2]) if len(sys.argv) > 2 else 784
torch.set_num_threads(1)
torch.manual_seed(0)
model = torch.nn.Sequential(
    torch.nn.Linear(features, 256), torch.nn.ReLU(),
    torch.nn.Linear(256, 128), torch.nn.ReLU(),
    torch.nn.Linear(128, 10))
params = list(model.parameters())
opt = torch.optim.SGD(params, lr=0.01, momentum=0.9)
x = torch.rand(64, features)
y = torch.randint(0, 10, (64,))
loss_fn = torch.nn.CrossEntropyLoss()

def step():
    opt.zero_grad(set_to_none=False)
    loss = loss_fn(model(x), y)
    loss.backward()
    flat = torch.cat([p.grad.reshape(-1) for p in params])
    off = 0
    for p in params:
        n = p.numel()
        p.grad.copy_(flat[off:off + n].view_as(p))
        off += n
    opt.step()

for _ in range(warmup):
    step()
t = time.perf_counter()
for _ in range(steps):
    step()
dt = time.perf_counter() - t
print(json.dumps({"steps_per_s": steps / dt, "torch": torch.__version__}))
