"""What the quick start's budget can teach with labels: the ceiling for any pretraining at that budget.
Trains the quick start's encoder (vit_tiny, both senses in one attention pass, so that a feature can
relate sight to sound) from random weights on the synthetic set's labels, a linear head per factor on
its mean-pooled tokens, with the quick start's clips, steps, augmentation and learning rate; then
reads each factor on the val clips.

    python assets/supervised.py [--steps 600] [--seed 0]
"""
import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import avjepa  # noqa: E402
from common import TUBELET, PATCH, batch_indices, get_batch, load_split  # noqa: E402

p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
p.add_argument("--data", default="data/synthetic", help="dataset folder written by prepare.py (with factors)")
p.add_argument("--steps", type=int, default=600, help="optimizer steps of --batch-size clips")
p.add_argument("--batch-size", type=int, default=16, help="clips per step")
p.add_argument("--lr", type=float, default=6.25e-4, help="AdamW learning rate, after a 10%% warmup, cosine to 0")
p.add_argument("--seed", type=int, default=0, help="seed of the weights, the batches and the crops")
args = p.parse_args()
torch.manual_seed(args.seed)
train, val = load_split(args.data, "train"), load_split(args.data, "val")
meta = train["meta"]
factors = torch.tensor(meta["class_factors"])                                # [classes, factors]
sizes = [len(f["values"]) for f in meta["factors"].values()]
width, depth, heads = avjepa.MODELS["vit_tiny"]
encoder = avjepa.Encoder(width, depth, heads, meta["frames"], meta["size"], meta["audio_shape"][1],
                         TUBELET * meta["frame_seconds"], PATCH * meta["audio_hop_seconds"])
head = nn.Linear(width, sum(sizes))
params = list(encoder.parameters()) + list(head.parameters())
opt = torch.optim.AdamW([q for q in params if q.requires_grad], lr=args.lr, weight_decay=0.05)


def logits(batch, theta=None):
    video = avjepa.augment_video(batch["video"], meta["size"], theta)
    audio = avjepa.normalize_audio(batch["audio"], meta)
    return head(encoder(video, audio).mean(1)).split(sizes, -1)              # keep=None: one joint pass


t0 = time.time()
for step in range(args.steps):
    warm = 0.1 * args.steps
    lr = args.lr * (step / warm if step < warm else 0.5 * (1 + np.cos(np.pi * (step - warm) / (args.steps - warm))))
    for g in opt.param_groups:
        g["lr"] = lr
    rng = np.random.default_rng([args.seed, step])
    batch = get_batch(train, batch_indices(train["n"], args.batch_size, step, args.seed), "cpu")
    y = factors[batch["label"]]
    loss = sum(F.cross_entropy(out, y[:, j]) for j, out in enumerate(logits(batch, avjepa.crop_params(rng, args.batch_size))))
    opt.zero_grad()
    loss.backward()
    opt.step()
    if step % 100 == 0:
        print(f"step {step}: loss {loss.item():.3f}", flush=True)

encoder.eval()
right = []
with torch.no_grad():
    for i in range(0, val["n"], 64):
        batch = get_batch(val, np.arange(i, min(i + 64, val["n"])), "cpu")
        pred = torch.stack([out.argmax(-1) for out in logits(batch)], 1)
        right.append(pred == factors[batch["label"]])
right = torch.cat(right).float()
scores = ", ".join(f"{f} {100 * right[:, j].mean():.0f}%" for j, f in enumerate(meta["factors"]))
print(f"supervised vit_tiny, {args.steps} steps of {args.batch_size} clips, seed {args.seed}: top-1 "
      f"{100 * right.all(1).float().mean():.1f}% ({scores}) on {val['n']} val clips in {time.time() - t0:.0f} s")
