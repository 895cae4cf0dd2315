"""Can the labels teach the relations at all? Supervised references for `direction` and `sync`.

Trains, on a prepare.py dataset's labels, per factor:
  vit   the labels' ceiling of probe.py: the ViT of --model, both senses in one attention pass, a
        linear head per factor on its mean-pooled tokens;
  cnn   a small audio-visual CNN: a 3D convolution stack over the frames (kernels 3 wide in time,
        so a unit sees where something was a frame ago) and a 2D one over the log-mel, each
        pooled to one feature vector per frame (keeping the height and the mel band), joined
        frame by frame, then two temporal convolutions and a linear head per factor. It can
        represent both relations: motion energy (a thing here, then there) for direction, and
        where the object is beside the pitch heard at the same moment for sync.
Both train as the ceiling does (probe.train_on_labels: pretraining's sampler and schedule, crops
keeping >= 80% of the frame, a flip that swaps the direction label) and are scored on 384 train clips
and 384 val clips at the steps given, so that underfitting (train at chance) can be told from
memorising (train high, val at chance); beside them the controls that must fail (controls).

    python assets/relations.py --net cnn --steps 500,1000,2000
    python assets/relations.py --net vit --steps 600,2000 --data data/synthetic
"""
import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import avjepa  # noqa: E402
import probe  # noqa: E402
from common import get_batch, load_split  # noqa: E402


class AVConvNet(nn.Module):
    """video [B, 3, T, 64, 64], audio [B, 1, 128, Ta] -> logits of every head. keep_axes: each frame's
    features keep the height (pooled over the width only) and the sound's keep the mel band, so that
    the fused layers can compare where the object is with the pitch heard; otherwise both are pooled
    whole (what a unit saw, not where)."""
    def __init__(self, frames, sizes, width=64, keep_axes=True):
        super().__init__()
        def conv3(i, o, k, s):
            return nn.Sequential(nn.Conv3d(i, o, k, s, [x // 2 for x in k]), nn.BatchNorm3d(o), nn.ReLU())
        def conv2(i, o, s):
            return nn.Sequential(nn.Conv2d(i, o, 3, s, 1), nn.BatchNorm2d(o), nn.ReLU())
        # spatial receptive field 5 -> 13 -> 29 -> 61 px: a step of 10-13 px between frames is seen;
        # 64 px -> 4 x 4 positions, 128 mel bins -> 8 bands
        self.video = nn.Sequential(conv3(3, 32, (1, 5, 5), (1, 2, 2)), conv3(32, 64, (3, 3, 3), (1, 2, 2)),
                                   conv3(64, width, (3, 3, 3), (1, 2, 2)), conv3(width, width, (3, 3, 3), (1, 2, 2)))
        self.audio = nn.Sequential(conv2(1, 32, (2, 1)), conv2(32, 64, (2, 1)), conv2(64, width, (2, 1)),
                                   conv2(width, width, (2, 1)))
        self.frames, self.keep_axes = frames, keep_axes
        joined = width * (4 + 8) if keep_axes else 2 * width
        self.time = nn.Sequential(nn.Conv1d(joined, 2 * width, 3, 1, 1), nn.ReLU(),
                                  nn.Conv1d(2 * width, 2 * width, 3, 1, 1), nn.ReLU())
        self.heads = nn.Linear(2 * width, sum(sizes))

    def forward(self, video, audio):
        v, a = self.video(video), self.audio(audio)                             # [B, C, T, 4, 4], [B, C, 8, Ta]
        if self.keep_axes:
            v = v.amax(4).transpose(2, 3).flatten(1, 2)                         # [B, C * 4 heights, T]
            a = a.flatten(1, 2)                                                 # [B, C * 8 bands, Ta]
        else:
            v, a = v.amax((3, 4)), a.mean(2)
        a = F.adaptive_avg_pool1d(a, self.frames)                               # the frames' moments
        return self.heads(self.time(torch.cat([v, a], 1)).mean(2))


@torch.no_grad()
def controls(net, cfg, val, device, n_max=384):
    """The controls that must fail, on val clips: each clip's sound swapped for another clip's at
    random (no sound goes with its picture: sync must read chance), and the frames in reverse order
    (the object moves the other way: direction must read its opposite, near 0%)."""
    _, sizes, targets = probe.label_heads(val, val)
    ids, right, g = probe.clip_ids(val, n_max, labelled=True), {}, torch.Generator().manual_seed(0)
    net.eval()
    for i in range(0, len(ids), 64):
        b = get_batch(val, ids[i:i + 64], device)
        video, audio = avjepa.augment_video(b["video"], cfg.size), avjepa.normalize_audio(b["audio"], val["meta"])
        shuffled = audio[torch.randperm(len(audio), generator=g)]
        for name, (v, a) in (("shuffled sound", (video, shuffled)), ("reversed time", (video.flip(2), audio))):
            pred = torch.stack([o.argmax(-1) for o in net(v, a).float().split(sizes, -1)], 1)
            right.setdefault(name, []).append(pred == targets[b["label"]])
    net.train()
    return {name: probe.head_scores(torch.cat(r), val["meta"]) for name, r in right.items()}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--net", choices=["vit", "cnn"], required=True, help="which supervised model")
    p.add_argument("--data", default="data/synthetic", help="a prepare.py dataset with factor labels")
    p.add_argument("--model", default="vit_tiny", help="--net vit: encoder size")
    p.add_argument("--tokenizer", choices=["patch", "conv"], default="patch",
                   help="--net vit: avjepa's --tokenizer")
    p.add_argument("--moment-blocks", type=int, default=0, help="--net vit: avjepa's --moment-blocks")
    p.add_argument("--pool-axes", action="store_true", help="--net cnn: pool away the height and the mel band")
    p.add_argument("--steps", default="600,2000", help="comma-separated steps at which to score; trains to the last")
    p.add_argument("--batch-size", type=int, default=16, help="clips per step")
    p.add_argument("--lr", type=float, default=6.25e-4, help="peak learning rate")
    p.add_argument("--seed", type=int, default=0, help="init, clip order and crops")
    p.add_argument("--out", default="", help="JSON of the scores (default: <data>/relations_<net>_seed<S>.json)")
    args = p.parse_args()
    marks = sorted(int(s) for s in args.steps.split(","))
    train, val = load_split(args.data, "train"), load_split(args.data, "val")
    sizes = probe.label_heads(train, val)[1]
    cfg = avjepa.Config(model=args.model, tokenizer=args.tokenizer, audio=True,
                        moment_blocks=args.moment_blocks, steps=marks[-1],
                        batch_size=args.batch_size, lr=args.lr, seed=args.seed).with_data(train["meta"])
    torch.manual_seed(args.seed)
    net = (probe.LabelsNet(avjepa.build(cfg)[0], sizes) if args.net == "vit"
           else AVConvNet(cfg.frames, sizes, keep_axes=not args.pool_axes))
    res = dict(net=args.net, model=args.model if args.net == "vit" else "AVConvNet", tokenizer=args.tokenizer,
               moment_blocks=args.moment_blocks, pool_axes=args.pool_axes, data=args.data,
               params=sum(p.numel() for p in net.parameters() if p.requires_grad), train_clips=train["n"],
               val_clips=val["n"], batch_size=args.batch_size, lr=args.lr, seed=args.seed, scores=[])
    name = args.net + ("_pooled" if args.net == "cnn" and args.pool_axes else "")
    out = Path(args.out or Path(args.data) / f"relations_{name}_seed{args.seed}.json")
    t0, device = time.time(), torch.device("cpu")

    def report(step, loss):   # train and val accuracy per factor at the marks
        if step in marks:
            row = dict(step=step, seconds=time.time() - t0, loss=loss,
                       **{split: probe.score_on_labels(net, cfg, data, val, device, 64, n_max=384)
                          for split, data in (("train", train), ("val", val))}, controls=controls(net, cfg, val, device))
            res["scores"].append(row)
            out.write_text(json.dumps(res, indent=1) + "\n")
            fmt = lambda r: ", ".join(f"{k} {100 * v:.0f}%" for k, v in [("top1", r["top1"]), *r["factors"].items()])  # noqa: E731
            tqdm.write(f"{args.net} step {step} ({row['seconds']:.0f} s, loss {loss:.3f}): "
                       f"train [{fmt(row['train'])}]; val [{fmt(row['val'])}]; "
                       + "; ".join(f"{k} [{fmt(v)}]" for k, v in row["controls"].items()))

    probe.train_on_labels(net, cfg, train, val, device, f"{args.net} on the labels", report)
    print(f"relations {args.net} on {args.data}: {json.dumps(res['scores'][-1])}; {out}")


if __name__ == "__main__":
    main()
