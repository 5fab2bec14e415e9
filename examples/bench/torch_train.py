"""PyTorch eager against covey-bench-train: the same McMahan CNN, SGD, one
epoch over random MNIST-shaped data, samples/s per batch size.

    python3 -m venv /tmp/torch && /tmp/torch/bin/pip install torch
    /tmp/torch/bin/python examples/bench/torch_train.py --device cpu --batches 10,50
"""
import argparse
import json
import time

import torch
from torch import nn


def cnn():
    # 'same' padding: 1,663,370 parameters, as covey's spec.
    return nn.Sequential(
        nn.Conv2d(1, 32, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(64 * 7 * 7, 512), nn.ReLU(), nn.Linear(512, 10),
    )


def epoch(model, opt, images, labels, batch):
    perm = torch.randperm(len(images), device=images.device)
    for i in range(0, len(images), batch):
        idx = perm[i:i + batch]
        opt.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(model(images[idx]), labels[idx])
        loss.backward()
        opt.step()
    if images.device.type == "cuda":
        torch.cuda.synchronize()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cpu")
    p.add_argument("--batches", default="10,50")
    p.add_argument("--examples", type=int, default=2000)
    p.add_argument("--warmup", type=int, default=1)
    args = p.parse_args()
    dev = torch.device(args.device)
    torch.manual_seed(7)
    images = torch.rand(args.examples, 1, 28, 28, device=dev)
    labels = torch.randint(0, 10, (args.examples,), device=dev)
    model = cnn().to(dev)
    assert sum(p.numel() for p in model.parameters()) == 1_663_370
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    for batch in [int(b) for b in args.batches.split(",")]:
        for _ in range(args.warmup):
            epoch(model, opt, images, labels, batch)
        start = time.perf_counter()
        epoch(model, opt, images, labels, batch)
        seconds = time.perf_counter() - start
        print(json.dumps({
            "framework": f"pytorch {torch.__version__}", "device": args.device,
            "threads": torch.get_num_threads(), "batch": batch,
            "examples": args.examples, "seconds": seconds,
            "samples_per_sec": args.examples / seconds,
        }))


if __name__ == "__main__":
    main()
