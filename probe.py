"""
Probes of a trained avjepa checkpoint: what did the frozen networks learn? Each figure is printed
beside its floor (random networks of the same config, read the same way) and its ceiling.

    python probe.py --task classify      # attentive probe and linear readout of the frozen encoder
    python probe.py --task reconstruct   # a decoder on the predictor: pixels and sound under the mask
    python probe.py --task retrieve      # which sound goes with this picture, through the predictor
    python probe.py --task refit         # a hidden part not inferable, or not learned yet?

classify is V-JEPA's frozen evaluation: the EMA target encoder's tokens of every clip (cached),
standardised per channel and modality, read by the attentive probe (a learned query per label
factor, one cross-attention block, a linear head) and by a seedless linear readout of pooled tokens
and time-aligned pairs of them. Its ceiling: the same encoder trained on the labels. retrieve hides
all of a clip's sound, predicts its features from the picture and ranks every val clip's real sound
by them (and the reverse). reconstruct fits a linear decoder from one predicted token to its patch
and scores it where tokens were hidden, beside mean-fill and the oracle (the target features
decoded); it writes PNG, MP4 and WAV. refit trains the predictor on with the encoders frozen.
"""
import argparse
import json
import math
import os
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import avjepa
import kernels
from avjepa import (IMAGENET_MEAN, IMAGENET_STD, augment_video, batch_indices, crop_params,
                    normalize_audio, schedules)
from common import (COUNT, NONNEG, NONNEG_INT, PATCH, POSITIVE, TUBELET, check_device, get_batch,
                    load_split, patchify_audio, patchify_video, plot_classify, read_checkpoint,
                    unpatchify_audio, unpatchify_video, write_atomic, write_media)


def get_args(argv=None):
    p = argparse.ArgumentParser(description="Probe an avjepa checkpoint's frozen networks.")
    p.add_argument("--task", choices=["classify", "reconstruct", "retrieve", "refit"], required=True,
                   help="which probe; refit: is a hidden part not inferable, or not learned yet?")
    p.add_argument("--ckpt", default="", help="checkpoint to probe (default: the newest <runs>/*/ckpt.pt)")
    p.add_argument("--runs", default="out", help="folder searched for the newest run without --ckpt")
    p.add_argument("--data", default="", help="dataset folder (default: the checkpoint's)")
    p.add_argument("--init", choices=["pretrained", "random"], default="pretrained",
                   help="random: the same probe on an untrained model of the same config")
    p.add_argument("--baseline", action=argparse.BooleanOptionalAction, default=True,
                   help="also probe random networks of the same config (the floor) and print them beside")
    p.add_argument("--probe-seeds", type=NONNEG_INT, default=3,
                   help="classify: attentive probes trained, seeds --seed on (0: the linear readout only)")
    p.add_argument("--modalities", choices=["video", "audio", "both"], default="",
                   help="classify: tokens the probe sees (default: both for AV checkpoints)")
    p.add_argument("--read", choices=["separate", "joint", "both"], default="separate",
                   help="classify: an encoder pass per sense, one over both, or both side by side")
    p.add_argument("--labels", action=argparse.BooleanOptionalAction, default=True,
                   help="classify: also the ceiling, the encoder trained on the labels (cached per dataset)")
    p.add_argument("--labels-steps", type=NONNEG_INT, default=0,
                   help="classify: steps of the labels' run (0: the checkpoint's, the same budget)")
    p.add_argument("--labels-lr", type=NONNEG, default=0,
                   help="classify: the labels' run's peak lr (0: the checkpoint's; over thousands of "
                        "steps a supervised ViT is steadier at 1e-4: docs/results.md)")
    p.add_argument("--mask", default="", help="reconstruct, refit: mask config to score (default: the first)")
    p.add_argument("--refit-steps", type=NONNEG_INT, default=0,
                   help="refit: steps of predictor training, encoders frozen (0: the checkpoint's)")
    p.add_argument("--epochs", type=COUNT, default=100,
                   help="classify: probe epochs (V-JEPA's 20 are for 240k clips, and underfit 960)")
    p.add_argument("--lr", type=POSITIVE, default=1e-3, help="classify: the probe's peak lr (AdamW, cosine)")
    p.add_argument("--wd", type=NONNEG, default=0.01, help="classify: weight decay of the probe")
    p.add_argument("--batch-size", type=COUNT, default=32, help="clips per batch through the networks")
    p.add_argument("--clips", type=NONNEG_INT, default=0, help="at most this many clips per split (0: all)")
    p.add_argument("--examples", type=NONNEG_INT, default=4, help="reconstruct: val clips drawn and played")
    p.add_argument("--no-cache", action="store_true", help="classify: recompute the features, cache nothing")
    p.add_argument("--device", default="", help="cpu or cuda (default: cuda when available)")
    p.add_argument("--deterministic", action="store_true", help="bit-identical reruns with the same seed")
    p.add_argument("--seed", type=NONNEG_INT, default=0, help="seed of masks, random init and probe training")
    args = p.parse_args(argv)
    check_device(p, args.device)
    return args

# -----------------------------------------------------------------------------
# The run: which checkpoint, which data, which networks

def newest_checkpoint(runs):
    found = sorted(Path(runs).glob("*/ckpt.pt"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise SystemExit(f"no checkpoint under {runs}/: train first with `python avjepa.py --model "
                         "vit_tiny --audio`, or pass --ckpt")
    return found[-1]


def open_run(args):
    path = Path(args.ckpt) if args.ckpt else newest_checkpoint(args.runs)
    ckpt, digest = read_checkpoint(path, digest=True)   # exits with a message if missing or unreadable
    if not (isinstance(ckpt, dict) and {"config", "encoder", "predictor", "target_encoder"} <= ckpt.keys()):
        raise SystemExit(f"{path} is not an avjepa checkpoint (no encoder/predictor/target_encoder/"
                         "config): pass a ckpt.pt written by avjepa.py")
    ckpt["config"] = avjepa.Config.of(ckpt)   # the run's settings, whatever the checkpoint's age
    data = Path(args.data or ckpt["config"].data)
    if not (data / "meta.json").exists():
        raise SystemExit(f"no dataset at {data}: run prepare.py, or pass --data")
    print(f"probing {path} (step {ckpt['step']}) on {data}")
    ckpt["sha256"] = digest   # the feature cache's key: what was read, not what the file is by now
    return path, ckpt, data


def frozen_models(ckpt, init, seed, device):
    """The JEPA (encoder + predictor) and the EMA target encoder, frozen, on the device. The online
    pair was trained together, so it is the one to ask for predictions; the EMA encoder is the one
    to read features from (as V-JEPA). init=random: the initialisation training starts from."""
    torch.manual_seed(seed)
    nets = avjepa.build(ckpt["config"])
    if init == "pretrained":
        for net, key in zip(nets, ("encoder", "predictor", "target_encoder")):
            net.load_state_dict(ckpt[key])
    encoder, predictor, target_encoder = [net.eval().requires_grad_(False) for net in nets]
    return avjepa.JEPA(encoder, predictor).to(device), target_encoder.to(device)


def open_data(data_dir, encoder, audio):
    """The train and val splits, checked against the model's clips."""
    train, val = load_split(data_dir, "train"), load_split(data_dir, "val")
    meta = train["meta"]
    if meta["frames"] != encoder.cfg.frames:
        raise SystemExit(f"the dataset has {meta['frames']} frames per clip, the model {encoder.cfg.frames}")
    if audio and meta["audio_shape"][1] // PATCH != encoder.audio_grid[1]:
        raise SystemExit(f"the dataset has {meta['audio_shape'][1]} log-mel frames per clip, the "
                         f"model {encoder.cfg.audio_frames}")
    return train, val


def clip_ids(data, n_max, labelled=False, sounding=False):
    """Clips to use (only labelled ones, only those with sound, if asked), sorted (memmap-friendly);
    a --clips subset at random, as a split stored class by class would start with one label."""
    keep = np.ones(data["n"], bool)
    if labelled:
        keep &= np.asarray(data["label"]) >= 0
    if sounding:   # a silent clip has no sound to find
        keep &= np.asarray(data["has_audio"]).astype(bool)
    ids = np.flatnonzero(keep)
    if 0 < n_max < len(ids):
        ids = np.sort(np.random.default_rng(0).choice(ids, n_max, replace=False))
    return ids


def data_key(data_dir):
    """What a cache of results on a dataset is keyed by: its folder, and when it was written."""
    return dict(data=str(data_dir.resolve()), data_mtime=(data_dir / "meta.json").stat().st_mtime_ns)


def header(task, path, ckpt, data_dir, init):
    """What every task's result (JSON) begins with."""
    return dict(task=task, run=path.parent.name, ckpt=str(path), step=ckpt["step"], data=str(data_dir),
                init=init)


def ridge_solve(a, b, lam):
    """w = (a + lam m I)^-1 b in float64, m the mean of a's diagonal (so lam is relative to the
    features' scale, fixed, never tuned on val): least squares from the normal equations (a = x^T x,
    b = x^T y), or kernel ridge (a = x x^T, b = y). The one solve behind the linear readout, the
    retrieval's ridge map and the reconstruction's decoder."""
    a = a.double()
    return torch.linalg.solve(a + lam * a.diagonal().mean() * torch.eye(len(a), dtype=a.dtype),
                              b.double())


def autocast(device):
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")


def write_json(obj, path):
    write_atomic(path, lambda t: Path(t).write_text(json.dumps(obj, indent=1) + "\n"))

# -----------------------------------------------------------------------------
# Classification: frozen tokens, once, then V-JEPA's attentive probe on them

def encode(encoder, video, audio, has_audio, separate=False):
    """Tokens [B, N, D] of whole clips and which of them exist [B, N]. As in training, a silent clip
    has no audio tokens, unless audio is all the probe sees. separate: each sense attends within
    itself (a packed segment each)."""
    B = len(has_audio)
    nv = encoder.nv if video is not None else 0
    N = nv + (math.prod(encoder.audio_grid) if audio is not None else 0)
    valid = torch.ones(B, N, dtype=torch.bool, device=has_audio.device)
    if video is not None and audio is not None:
        valid[~has_audio, nv:] = False
    lists = [r.nonzero()[:, 0].cpu().numpy() for r in valid]
    keep = kernels.pack(lists, N, B, split_at=nv if separate else None).to(valid.device)
    fused = kernels.pack(lists, N, B).to(valid.device)   # whole clips, for the fused last blocks
    out = encoder(video, audio, keep, fused)
    return out.new_zeros(B * N, out.shape[-1]).index_copy(0, keep.index, out).view(B, N, -1), valid


@torch.no_grad()
def extract(encoder, data, ids, modalities, read, device, batch_size, desc):
    """Frozen tokens of clips `ids`: x fp16 [n, N, D], valid [n, N], y labels [n]. No augmentation:
    the probe sees each clip as it is, so one pass suffices and every probe epoch after it is cheap.
    read=both puts the separate-pass tokens and the joint-pass tokens side by side: [n, 2N, D]."""
    xs, valids = [], []
    for i in tqdm(range(0, len(ids), batch_size), desc=desc, dynamic_ncols=True):
        b = get_batch(data, ids[i:i + batch_size], device)
        video = augment_video(b["video"], encoder.cfg.size) if modalities != "audio" else None
        audio = normalize_audio(b["audio"], data["meta"]) if modalities != "video" else None
        with autocast(device):
            parts = [encode(encoder, video, audio, b["has_audio"], separate=r == "separate")
                     for r in (["separate", "joint"] if read == "both" else [read])]
        xs.append(torch.cat([x for x, _ in parts], 1).half().cpu())
        valids.append(torch.cat([v for _, v in parts], 1).cpu())
    return dict(x=torch.cat(xs), valid=torch.cat(valids),
                y=torch.from_numpy(np.asarray(data["label"])[ids]))


def standardize(train, val, bounds):
    """Every channel of the frozen tokens to zero mean and unit variance over the train split, each
    sense's tokens (the ranges between `bounds`) apart (MAE's BatchNorm before its linear probe): what
    tells clips apart can sit in channels of small variance, and LayerNorm alone left the probe underfit."""
    for f in (train, val):
        f["x"] = f["x"].float()                                                  # [n, N, D]
    for part in (slice(a, b) for a, b in zip(bounds[:-1], bounds[1:])):
        x = train["x"][:, part][train["valid"][:, part]]                         # [tokens, D]
        if len(x) < 2:
            continue
        mean, std = x.mean(0), x.std(0).clamp(min=1e-6)
        for f in (train, val):
            f["x"][:, part] = (f["x"][:, part] - mean) / std


class AttentiveProbe(nn.Module):
    """V-JEPA's attentive classifier: a learned query cross-attends to the frozen tokens (keys and
    values layer-normed), a residual MLP refines it, a linear layer gives the logits. A label made of
    factors gets a query and a head per factor, each learned from every clip.

    V-JEPA's function and parameters, computed in another order: keys and values are linear in the
    normed tokens x^, so a score is x^ @ (the key map applied back to the query) plus a constant that
    softmax ignores, and the value of the weighted mean is the value map of the weighted mean. So
    nothing is projected per token: 2 x width x (heads x queries) multiply-adds per token instead of
    2 x width^2, 13x fewer for vit_tiny's 5 queries (a test checks it against the plain form)."""
    def __init__(self, dim, heads, outputs):
        super().__init__()
        self.heads = heads
        # one query per head
        self.query = nn.Parameter(torch.zeros(1, len(outputs), dim))
        self.norm1, self.norm2 = nn.LayerNorm(dim, eps=1e-6), nn.LayerNorm(dim, eps=1e-6)
        self.q, self.proj = nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.mlp = avjepa.MLP(dim)
        self.out = nn.ModuleList(nn.Linear(dim, n) for n in outputs)
        avjepa.init_weights(self, [])
        nn.init.trunc_normal_(self.query, std=0.02)

    def forward(self, x, valid):
        """x [B, N, D], valid [B, N] -> logits of every head, [B, n_i] each."""
        B, N, D = x.shape
        Q, H = self.query.shape[1], self.heads
        gamma, beta = self.norm1.weight, self.norm1.bias
        # [H, hd, D] each
        w_k, w_v = self.kv.weight.view(2, H, D // H, D)
        q = self.q(self.query[0]).view(Q, H, D // H)                                  # [Q, H, hd]
        # scores: <q, W_k (gamma x^ + beta) + b_k> = x^ . (gamma W_k^T q) + (the same for every token)
        a = torch.einsum("qhe,hed->qhd", q, w_k).reshape(Q * H, D) * gamma / math.sqrt(D // H)
        x_hat = F.layer_norm(x, (D,), eps=self.norm1.eps)                             # [B, N, D]
        scores = (x_hat @ a.T).masked_fill(~valid[..., None], -math.inf)              # [B, N, Q*H]
        mean = scores.softmax(1).transpose(1, 2) @ x_hat                              # [B, Q*H, D]
        # value of the weighted mean = weighted mean of the values (the weights sum to 1)
        y = torch.einsum("bqhd,hed->bqhe", (mean * gamma + beta).view(B, Q, H, D), w_v)
        y = y.reshape(B, Q, D) + self.kv.bias[D:]
        h = self.query + self.proj(y)
        h = h + self.mlp(self.norm2(h))
        return [head(h[:, i]) for i, head in enumerate(self.out)]


def label_heads(train, val):
    """What is predicted of a labelled dataset: the class, or each factor of it when the classes
    are products of factors (meta.json's class_factors). Returns the classes (meta.json's names, or
    the largest label + 1), the sizes of the heads and each head's value for each class [classes,
    heads]."""
    meta = train["meta"]
    classes = len(meta.get("classes") or []) or int(max(train["label"].max(), val["label"].max())) + 1
    if "class_factors" in meta:
        sizes = [len(f["values"]) for f in meta["factors"].values()]
        return classes, sizes, torch.tensor(meta["class_factors"])
    return classes, [classes], torch.arange(classes)[:, None]


def train_probe(train, outputs, targets, heads, args, device, seed):
    """AdamW, cosine to 0, no warmup: V-JEPA's probe recipe. targets [classes, heads] maps labels to
    heads."""
    torch.manual_seed(seed)
    probe = AttentiveProbe(train["x"].shape[-1], heads, outputs).to(device)
    opt = torch.optim.AdamW(probe.parameters(), lr=args.lr, weight_decay=args.wd)
    per_epoch = math.ceil(len(train["y"]) / args.batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, args.epochs * per_epoch)
    x, valid = train["x"].to(device).float(), train["valid"].to(device)
    y = targets[train["y"]].to(device)                                            # [n, heads]
    for epoch in tqdm(range(args.epochs), desc="probe", dynamic_ncols=True):
        perm = torch.randperm(len(y), device=device)
        for i in range(per_epoch):
            j = perm[i * args.batch_size:(i + 1) * args.batch_size]
            logits = probe(x[j], valid[j])
            loss = sum(F.cross_entropy(l, y[j, h]) for h, l in enumerate(logits))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return probe


@torch.no_grad()
def predict_classes(probe, feats, targets, device):
    """Class scores [n, classes]: the log-probability each head gives the class's value, summed over
    heads (for one head, its log-softmax), so a full ranking of the classes comes out either way."""
    scores = []
    for i in range(0, len(feats["y"]), 256):
        logits = probe(feats["x"][i:i + 256].to(device).float(),
                       feats["valid"][i:i + 256].to(device))
        logp = [F.log_softmax(l, -1).cpu() for l in logits]
        scores.append(sum(lp[:, targets[:, h]] for h, lp in enumerate(logp)))
    return torch.cat(scores)


def top_k(logits, labels, k):
    return (logits.topk(k, -1).indices == labels[:, None]).any(-1).float().mean().item()


def head_scores(right, meta):
    """right [n, heads]: whether each head's value was right. Top-1 (every head right) and, when the
    label is a product of factors, the accuracy per factor."""
    res = dict(top1=right.all(1).float().mean().item())
    if "class_factors" in meta:
        res["factors"] = {f: right[:, j].float().mean().item() for j, f in enumerate(meta["factors"])}
    return res


def pooled(feats, bounds):
    """Mean of each modality's valid tokens, side by side: [n, parts * D]. What a linear map can
    read."""
    parts = []
    for a, b in zip(bounds[:-1], bounds[1:]):
        v = feats["valid"][:, a:b, None].float()
        parts.append((feats["x"][:, a:b] * v).sum(1) / v.sum(1).clamp(min=1))
    return torch.cat(parts, 1)


def paired(feats, encoder, k=16, seed=0):
    """What a linear map needs to read a relation between moments or senses: per tubelet t, the mean
    video token v_t and the mean audio token a_t of the columns playing during t; over t, the mean of
    (P v_t)(Q a_t)^T, sight and sound at one moment (sync), and of (P v_t)(P v_t+1)^T, sight now and a
    tubelet later (direction). A linear map of these is a bilinear form, which can ask "does this
    sound go with this picture?" and "where did it go next?"; no map of pooled tokens can. P, Q: fixed
    Gaussian [D, k]. Returns [n, 2 k^2] (k^2 without audio)."""
    x, valid = feats["x"], feats["valid"].float()[..., None]
    T, H, W = encoder.video_grid
    n, D, nv = len(x), x.shape[-1], encoder.nv
    g = torch.Generator().manual_seed(seed)
    P, Q = (torch.randn(D, k, generator=g) / math.sqrt(D) for _ in range(2))
    v = (x[:, :nv] * valid[:, :nv]).view(n, T, H * W, D).sum(2)
    v = v / valid[:, :nv].view(n, T, H * W, 1).sum(2).clamp(min=1)                 # [n, T, D]
    pv = v @ P                                                                       # [n, T, k]
    pairs = [torch.einsum("ntk,ntl->nkl", pv[:, :-1], pv[:, 1:]).flatten(1) / max(T - 1, 1)]
    if x.shape[1] > nv and encoder.audio_grid:
        Fa, C = encoder.audio_grid
        c = encoder.cfg
        col_t = ((torch.arange(C) + 0.5) * c.audio_patch_seconds / c.tubelet_seconds).long().clamp(max=T - 1)
        onehot = F.one_hot(col_t, T).float()                                         # [C, T]
        a = (x[:, nv:nv + Fa * C] * valid[:, nv:nv + Fa * C]).view(n, Fa, C, D).sum(1)   # [n, C, D]
        cnt = valid[:, nv:nv + Fa * C].view(n, Fa, C, 1).sum(1)
        a = torch.einsum("ncd,ct->ntd", a, onehot) / torch.einsum("ncd,ct->ntd", cnt,
                                                                  onehot).clamp(min=1)
        pairs.append(torch.einsum("ntk,ntl->nkl", pv, a @ Q).flatten(1) / T)
    return torch.cat(pairs, 1)


def linear_readout(train_x, train_y, val_x, sizes, lam=0.1):
    """The seedless readout: ridge least squares (ridge_solve) from features to one-hot labels, one
    closed-form solve, no seed, no epochs. train_y [n, heads], sizes: values per head -> the
    predicted value of every head for val, [n_val, heads]."""
    mean = train_x.mean(0)
    x = F.pad(train_x - mean, (0, 1), value=1.0).double()                          # a bias column
    y = torch.cat([F.one_hot(train_y[:, h], n) for h, n in enumerate(sizes)], 1).double()
    w = ridge_solve(x.T @ x, x.T @ y, lam)
    scores = F.pad(val_x - mean, (0, 1), value=1.0).double() @ w
    return torch.stack([part.argmax(1) for part in scores.split(sizes, 1)], 1)


def classify_one(args, path, ckpt, data_dir, device, init):
    """Frozen features of one encoder (pretrained or random), then the attentive probe over
    --probe-seeds seeds and the seedless linear readout. Returns the scores as a dict."""
    encoder = frozen_models(ckpt, init, args.seed, device)[1]
    train_data, val_data = open_data(data_dir, encoder, args.modalities != "video")
    meta, splits = train_data["meta"], {}
    for split, data in (("train", train_data), ("val", val_data)):
        splits[split] = data, clip_ids(data, args.clips, labelled=True)
        if not len(splits[split][1]):
            held = f"its {data['n']} {split} clips have no labels" if data["n"] else f"it has 0 {split} clips"
            raise SystemExit(f"{data_dir} cannot be classified: {held}. Prepare a labelled dataset "
                             "with both splits (class folders or a CSV with labels; "
                             "--val-fraction > 0 when the source has no split)")
    (classes, outputs, targets), t0 = label_heads(train_data, val_data), time.time()
    read = args.read if args.modalities == "both" else "joint"   # one modality: the passes are the same
    name = f"{args.modalities}_{read}_{init}" if args.modalities == "both" else f"{args.modalities}_{init}"
    cache = path.parent / f"probe_features_{name}.pt"
    key = dict(ckpt=str(path.resolve()), ckpt_sha256=ckpt["sha256"], **data_key(data_dir),
               seed=args.seed, clips=args.clips)
    feats = torch.load(cache, weights_only=True) if cache.exists() and not args.no_cache else None
    if feats is not None and feats["key"] == key:
        print(f"features from {cache}")
    else:
        feats = dict(key=key, **{split: extract(encoder, d, ids, args.modalities, read, device,
                                                args.batch_size, split) for split, (d, ids) in splits.items()})
        if not args.no_cache:
            write_atomic(cache, lambda t: torch.save(feats, t))
    bounds = token_bounds(feats, encoder, args.modalities, read)
    standardize(feats["train"], feats["val"], bounds)
    labels = feats["val"]["y"]
    runs = attentive_runs(feats, classes, outputs, targets, encoder.heads, meta, args, device)
    res = dict(header("classify", path, ckpt, data_dir, init), modalities=args.modalities, read=read,
               epochs=args.epochs, classes=classes, train_clips=len(splits["train"][1]), val_clips=len(labels),
               chance_top1=1 / classes, probe_runs=runs, **(mean_of(runs) if runs else {}))
    if runs:
        res["top1_spread"] = max(r["top1"] for r in runs) - min(r["top1"] for r in runs)
    res["linear"] = linear_scores(feats, encoder, bounds, args.modalities, read, targets, outputs, meta)
    if "class_factors" in meta:
        res["chance_factors"] = {f: 1 / len(v["values"]) for f, v in meta["factors"].items()}
    res["seconds"] = time.time() - t0
    write_json(res, path.parent / f"probe_classify_{name}.json")
    return res


def attentive_runs(feats, classes, outputs, targets, heads, meta, args, device):
    """The attentive probe on standardized features, once per probe seed (the probe is a trained
    network too: its seed moves its score): a list of score dicts."""
    labels, runs = feats["val"]["y"], []
    for k in range(args.probe_seeds):
        probe = train_probe(feats["train"], outputs, targets, heads, args, device, args.seed + k)
        logits = predict_classes(probe, feats["val"], targets, device)
        train_logits = predict_classes(probe, feats["train"], targets, device)
        run = dict(top1=top_k(logits, labels, 1), train_top1=top_k(train_logits, feats["train"]["y"], 1))
        if classes >= 10:
            run["top5"] = top_k(logits, labels, 5)
        if "class_factors" in meta:   # a class right on colour, wrong on rhythm, counts for colour
            run["factors"] = head_scores(targets[logits.argmax(-1)] == targets[labels], meta)["factors"]
        runs.append(run)
    return runs


def token_bounds(feats, encoder, modalities, read):
    """Where each sense's tokens start and end in extracted features (read=both: two passes side by
    side), without empty ranges: [0, nv, N] for both senses in one pass."""
    nv = 0 if modalities == "audio" else encoder.nv
    N = feats["train"]["x"].shape[1] // (2 if read == "both" else 1)
    bounds = [0, nv, N, N + nv, 2 * N][:5 if read == "both" else 3]
    return [b for i, b in enumerate(bounds) if i == 0 or b > bounds[i - 1]]


def linear_scores(feats, encoder, bounds, modalities, read, targets, outputs, meta):
    """The seedless readout of standardized features: each head's value from a linear map of the
    pooled tokens and of their time-aligned pairs (the pairs that a relation between tokens needs)."""
    def readout_features(f):
        x = pooled(f, bounds)
        if modalities != "audio" and read != "both":
            x = torch.cat([x, paired(f, encoder)], 1)
        return x
    head_pred = linear_readout(readout_features(feats["train"]), targets[feats["train"]["y"]],
                               readout_features(feats["val"]), outputs)                 # [n_val, heads]
    return head_scores(head_pred == targets[feats["val"]["y"]], meta)


def labels_recipe(cfg):
    """How the labels train: as pretraining, but with the schedule run to its end (V-JEPA's stretch
    stops at an eighth of the peak lr: at 600 steps, the ceiling's rhythm 66% against 99%)."""
    return replace(cfg, schedule_scale=1.0)


@torch.enable_grad()
def labels_ceiling(args, ckpt, data_dir, device):
    """The ceiling: the checkpoint's encoder, from the same random init, trained on the labels instead
    of the JEPA loss (train_on_labels, LabelsNet) for the checkpoint's steps (or --labels-steps), at
    its peak lr (or --labels-lr). Scored on val by its own heads and, as the checkpoint's encoder is,
    by the linear readout and the attentive probe of its frozen tokens (the ceiling read the same
    way as the checkpoint's encoder); cached in the dataset
    folder (keyed by data, config, budget and how it is read)."""
    steps, seed = args.labels_steps or ckpt["step"], args.seed
    lr = args.labels_lr or ckpt["config"].lr
    modalities = args.modalities or ("both" if ckpt["config"].audio else "video")
    read = args.read if modalities == "both" else "joint"
    cfg = labels_recipe(replace(ckpt["config"], steps=steps, seed=seed, lr=lr))
    train, val = load_split(data_dir, "train"), load_split(data_dir, "val")
    schedule = [cfg.schedule, cfg.lr, cfg.start_lr, cfg.final_lr, cfg.warmup, cfg.schedule_scale, cfg.cooldown]
    key = dict(**data_key(data_dir), model=cfg.model, tokenizer=cfg.tokenizer, audio=cfg.audio,
               crop=cfg.size, fuse=cfg.fuse, moment_blocks=cfg.moment_blocks, steps=steps, batch=cfg.batch_size,
               seed=seed, schedule=schedule, sampler="avjepa.batch_indices",
               read=dict(modalities=modalities, read=read, clips=args.clips,
                         attentive=[args.probe_seeds, args.epochs, args.lr, args.wd, args.batch_size]))
    tok = ("" if cfg.tokenizer == "patch" else f"_{cfg.tokenizer}") + (f"_moments{cfg.moment_blocks}"
                                                                       if cfg.moment_blocks else "")
    cache = data_dir / f"labels_{cfg.model}{tok}_{'av' if cfg.audio else 'v'}_{steps}steps_seed{seed}.json"
    cached = json.loads(cache.read_text()) if cache.exists() else {}
    if cached.get("key") == key:
        return cached
    torch.manual_seed(seed)
    net = LabelsNet(avjepa.build(cfg)[0], label_heads(train, val)[1]).to(device)
    print(f"the labels' ceiling: training the same encoder on the labels for {steps} steps, once "
          f"for this dataset (cached in {cache}; --no-labels skips it)")
    t0 = time.time()
    loss = train_on_labels(net, cfg, train, val, device, "labels' ceiling")
    res = dict(key=key, steps=steps, **score_on_labels(net, cfg, val, val, device, args.batch_size),
               seconds=time.time() - t0, final_loss=loss)
    net.eval()
    classes, outputs, targets = label_heads(train, val)
    feats = {split: extract(net.encoder, d, clip_ids(d, args.clips, labelled=True), modalities, read,
                            device, args.batch_size, f"labels' encoder, {split}")
             for split, d in (("train", train), ("val", val))}
    bounds = token_bounds(feats, net.encoder, modalities, read)
    standardize(feats["train"], feats["val"], bounds)
    res["linear"] = linear_scores(feats, net.encoder, bounds, modalities, read, targets, outputs,
                                  train["meta"])
    runs = attentive_runs(feats, classes, outputs, targets, net.encoder.heads, train["meta"], args, device)
    if runs:
        res["attentive"] = mean_of(runs)
    write_json(res, cache)
    return res


class LabelsNet(nn.Module):
    """The labels' ceiling's network: the encoder over both senses in one pass, then a linear head
    per label factor on the mean of its tokens: (video, audio) -> logits [B, sum of head sizes]."""
    def __init__(self, encoder, sizes):
        super().__init__()
        self.encoder, self.head = encoder, nn.Linear(encoder.width, sum(sizes))

    def forward(self, video, audio):
        return self.head(self.encoder(video, audio).float().mean(1))


def labelled_batch(net, cfg, data, idx, heads, device, theta=None):
    """net's logits of clips idx of `data` (split per head), and the labels' head values [B, heads].
    theta: the clips' crops and flips (crop_params); None: each clip whole."""
    _, sizes, targets = heads
    b = get_batch(data, idx, device)
    video = augment_video(b["video"], cfg.size, None if theta is None else theta.to(device))
    audio = normalize_audio(b["audio"], data["meta"]) if cfg.audio else None
    with autocast(device):
        return net(video, audio).float().split(sizes, -1), targets[b["label"].cpu()].clone()


def train_on_labels(net, cfg, train, val, device, desc, report=None):
    """Train net ((video, audio) -> logits of every head) on the train split's labels, as
    labels_recipe(cfg) says: avjepa.batch_indices and avjepa.schedules, AdamW. Crops keep 80% of the
    frame or more (the object stays in view), and a flip swaps the direction label (it stays true).
    report(step, loss) after each step. Returns the last loss."""
    cfg = labels_recipe(cfg)
    heads, factors = label_heads(train, val), list(train["meta"].get("factors", {}))
    flip_swaps = factors.index("direction") if "direction" in factors else None
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=cfg.lr, weight_decay=0.05)
    ids = clip_ids(train, 0, labelled=True)
    net.train()
    for step in tqdm(range(cfg.steps), desc=desc, dynamic_ncols=True):
        for g in opt.param_groups:
            g["lr"] = schedules(step, cfg)[0]
        idx = ids[batch_indices(len(ids), min(cfg.batch_size, len(ids)), step, cfg.seed)]
        theta = crop_params(np.random.default_rng([cfg.seed, step]), len(idx), area=(0.8, 1.0))
        out, y = labelled_batch(net, cfg, train, idx, heads, device, theta)
        if flip_swaps is not None:   # a flipped clip moves the other way
            flipped = theta[:, 0, 0] < 0
            y[flipped, flip_swaps] = 1 - y[flipped, flip_swaps]
        loss = sum(F.cross_entropy(o, y[:, h].to(device)) for h, o in enumerate(out))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if report:
            report(step + 1, loss.item())
    return loss.item()


@torch.no_grad()
def score_on_labels(net, cfg, data, val, device, batch_size, n_max=0):
    """head_scores of train_on_labels' net on (at most n_max of) the labelled clips of `data`, seen
    whole (no crop, no flip)."""
    heads, ids, right = label_heads(data, val), clip_ids(data, n_max, labelled=True), []
    net.eval()
    for i in range(0, len(ids), batch_size):
        out, y = labelled_batch(net, cfg, data, ids[i:i + batch_size], heads, device)
        right.append(torch.stack([o.argmax(-1).cpu() for o in out], 1) == y)
    net.train()
    return head_scores(torch.cat(right), data["meta"])


def mean_of(runs):
    """The mean of a list of score dicts (nested one level, for the factors)."""
    out = {}
    for k, v in runs[0].items():
        if isinstance(v, dict):
            out[k] = {f: sum(r[k][f] for r in runs) / len(runs) for f in v}
        else:
            out[k] = sum(r[k] for r in runs) / len(runs)
    return out


def with_baseline(task_one, args, path, ckpt, data_dir, device):
    """task_one on the checkpoint's networks and, with --baseline, on random ones of the same config
    (res["random"]). Returns res, describe (describe(fmt): fmt(res) with fmt of the random run
    beside it, for the summary line) and the seconds both took."""
    res = task_one(args, path, ckpt, data_dir, device, args.init)
    if args.baseline and args.init == "pretrained":
        res["random"] = task_one(args, path, ckpt, data_dir, device, "random")
    def describe(fmt):
        return fmt(res) + (f" [random: {fmt(res['random'])}]" if "random" in res else "")
    return res, describe, res["seconds"] + res.get("random", {}).get("seconds", 0)


def classify(args, path, ckpt, data_dir, device):
    """The attentive probe and the linear readout, beside the floor and the ceiling, in one line."""
    cfg = ckpt["config"]
    args.modalities = args.modalities or ("both" if cfg.audio else "video")
    if args.modalities != "video" and not cfg.audio:
        raise SystemExit(f"{path} is a video-only checkpoint: use --modalities video")
    res, describe, secs = with_baseline(classify_one, args, path, ckpt, data_dir, device)
    labels = ""
    if args.labels and args.init == "pretrained":   # the ceiling: the same encoder taught by the labels
        t0 = time.time()
        res["labels"] = labels_ceiling(args, ckpt, data_dir, device)
        secs += time.time() - t0   # this command's time: nothing when it was cached
    def scores(r):
        factors = ", ".join(f"{k} {100 * v:.0f}%" for k, v in r.get("factors", {}).items())
        return f"top-1 {100 * r['top1']:.1f}%" + (f" ({factors})" if factors else "")
    seeds = "1 probe seed"
    if args.probe_seeds > 1:
        seeds = f"{args.probe_seeds} probe seeds, spread {100 * res['top1_spread']:.1f} pts"
    attentive = f"attentive probe {describe(scores)}, {seeds}; " if args.probe_seeds else ""
    if "labels" in res:
        ceiling = res["labels"]
        attentive_ceiling = (f"; by the attentive probe: {scores(ceiling['attentive'])}"
                             if "attentive" in ceiling else "")
        labels = (f" [labels: {scores(ceiling)}; read by the linear readout: {scores(ceiling['linear'])}"
                  f"{attentive_ceiling}]; the labels' encoder trained {ceiling['steps']} steps")
    passes = f", {res['read']} passes" if args.modalities == "both" else ""
    factor_chance = "".join(f", {k} {100 * c:.0f}%" for k, c in res.get("chance_factors", {}).items())
    chart = path.parent / f"probe_classify_{res['modalities']}.png"
    plot_classify(res, chart)
    print(f"classify {res['run']} [{args.modalities}{passes}, {args.init}]: {attentive}linear "
          f"readout {describe(lambda r: scores(r['linear']))}{labels}; on {res['val_clips']} val "
          f"clips (chance top-1 {100 * res['chance_top1']:.1f}%{factor_chance}) in {secs:.0f} s; "
          f"chart {chart}")
    return res


# -----------------------------------------------------------------------------
# Cross-modal retrieval through the predictor: the JEPA way to ask "which sound goes with this picture?"

@torch.no_grad()
def cross_predict(jepa, video, audio, mask, to_audio):
    """Hide one whole sense of every clip and predict it from the other with the mask token of mask
    config number `mask`: the hidden sense's predicted target features [B, N_hidden, D]."""
    B, nv, N = video.shape[0], jepa.encoder.nv, jepa.encoder.n_tokens()
    shown, hidden = (np.arange(nv), np.arange(nv, N))[::1 if to_audio else -1]
    masks = avjepa.pack_masks([shown] * B, [hidden] * B, B, nv, N).to(video.device)
    masks.target_mask.fill_(mask)
    pred, _ = jepa(video, audio, masks)
    return pred.view(B, len(hidden), -1)


def ranks(query, gallery):
    """Rank (1 = first) of each query's own clip among all gallery clips, by Euclidean distance over
    all tokens: query, gallery [n, T, D] -> [n]."""
    d = torch.cdist(query.flatten(1).float(), gallery.flatten(1).float())       # [n, n]
    return 1 + (d < d.diag()[:, None]).sum(1)


def rank_scores(r):
    """R@1, R@5 and the median rank of ranks r [n]."""
    r = r.float()
    return dict(r1=(r <= 1).float().mean().item(), r5=(r <= 5).float().mean().item(), median_rank=r.median().item())


def ridge_ranks(train_x, train_y, query, gallery, lam=1.0):
    """The same ranking through a linear map instead of the predictor: kernel ridge from one sense's
    features of the train clips to the other's, applied to the val queries: how much of one sense
    the features carry about the other, whether or not the predictor has learned to use it."""
    x, y = train_x.flatten(1), train_y.flatten(1)
    mx, my = x.mean(0), y.mean(0)
    x = x - mx
    alpha = ridge_solve(x @ x.T, y - my, lam)                                     # [n_train, d]
    return ranks((query.flatten(1) - mx) @ x.T @ alpha.float() + my, gallery)


def shuffled_gap(query, gallery):
    """How much nearer the predictions are to their own clip's targets than to other clips': 1 -
    (mean distance to the own clip) / (mean distance to the others). 0 for a predictor that says the
    same for every clip."""
    d = torch.cdist(query.flatten(1).float(), gallery.flatten(1).float())       # [n, n]
    n = len(d)
    return 1 - d.diag().mean().item() / ((d.sum() - d.diag().sum()) / (n * (n - 1))).item()


def retrieve(args, path, ckpt, data_dir, device):
    """Retrieval through the checkpoint's networks, beside random ones of the same config."""
    res, describe, secs = with_baseline(retrieve_one, args, path, ckpt, data_dir, device)
    def scores(d):
        def fmt(r):
            x, ridge = r[d], r.get(d + "_ridge")
            return (f"R@1 {100 * x['r1']:.1f}%, median rank {x['median_rank']:.0f}, spread {x['spread']:.2f}, "
                    f"gap {x['gap']:.3f}" + (f", ridge R@1 {100 * ridge['r1']:.1f}%" if ridge else ""))
        return describe(fmt)
    n = res["val_clips"]
    said = "".join(f"; the {f} heard in the sound predicted from the picture " + describe(
        lambda r: f"{100 * r['heard'][f]['predicted']:.0f}% (real sound {100 * r['heard'][f]['real']:.0f}%)")
        + f", chance {100 * h['chance']:.0f}%" for f, h in res.get("heard", {}).items())
    said += "".join(f"; video->audio of the {name} clips " + describe(
        lambda r: f"R@1 {100 * r['v2a_by'][name]['r1']:.1f}%, median rank {r['v2a_by'][name]['median_rank']:.0f}")
        for name in res.get("v2a_by", {}))
    print(f"retrieve {res['run']} [{args.init}]: video->audio {scores('v2a')}; audio->video "
          f"{scores('a2v')}; among {n} val clips (chance: R@1 {100 / n:.1f}%, median rank "
          f"{(n + 1) / 2:.0f}, gap 0){said} in {secs:.0f} s")
    return res


def retrieve_one(args, path, ckpt, data_dir, device, init):
    """Video -> audio: each val clip's audio features predicted from its video alone, ranked against
    every val clip's audio encoded alone (and the reverse): a match can only come from what the
    predictor inferred across the senses. Beside it, the ranking through a ridge map (ridge_ranks)."""
    cfg = ckpt["config"]
    if not cfg.audio:
        raise SystemExit(f"{path} is a video-only checkpoint: retrieval needs an audio-visual one (--audio)")
    # the mask token of the cross-modal config if the predictor has one; else of the one that hides the most
    asked = {d: next((m for m in (d, "long") if m in cfg.masks), cfg.masks[0]) for d in ("v2a", "a2v")}
    jepa, target_encoder = frozen_models(ckpt, init, args.seed, device)
    train, val = open_data(data_dir, jepa.encoder, True)
    ids = clip_ids(val, args.clips, sounding=True)
    if len(ids) < 2:
        raise SystemExit(f"{data_dir} has fewer than 2 val clips with sound: nothing to retrieve among")
    t0, D, bs = time.time(), jepa.encoder.width, args.batch_size
    out = {k: [] for k in ("pred_audio", "audio", "pred_video", "video", "train_audio", "train_video",
                           "train_pred_audio")}
    # the ridge map's train clips: those with sound, at most --clips or 1024 (their features are kept)
    train_ids = clip_ids(train, args.clips or 1024, sounding=True)
    jobs = ([("val", val, ids[i:i + bs]) for i in range(0, len(ids), bs)]
            + [("train", train, train_ids[i:i + bs]) for i in range(0, len(train_ids), bs)])
    for split, data, batch_ids in tqdm(jobs, desc="retrieve", dynamic_ncols=True):
        b = get_batch(data, batch_ids, device)
        video = augment_video(b["video"], cfg.size)
        audio = normalize_audio(b["audio"], data["meta"])
        with autocast(device), torch.no_grad():
            for direction, name in (("v2a", "audio"), ("a2v", "video")):
                if split == "val" or name == "audio":   # the train clips' predicted sound: for `heard`
                    pred = cross_predict(jepa, video, audio, cfg.masks.index(asked[direction]), name == "audio")
                    out[("pred_" if split == "val" else "train_pred_") + name].append(pred.float().cpu())
                alone = target_encoder(None, audio) if name == "audio" else target_encoder(video)
                into = name if split == "val" else "train_" + name
                out[into].append(F.layer_norm(alone.float(), (D,)).cpu())
    out = {k: torch.cat(v) if v else None for k, v in out.items()}   # None: no train clip has sound
    n = len(ids)
    res = dict(header("retrieve", path, ckpt, data_dir, init), mask_tokens=asked, val_clips=n,
               train_clips=len(train_ids), chance_r1=1 / n, chance_r5=min(5 / n, 1.0),
               chance_median_rank=(n + 1) / 2)
    for direction, name, other in (("v2a", "audio", "video"), ("a2v", "video", "audio")):
        pred, gallery = out["pred_" + name], out[name]
        # spread: how much the predictions differ from clip to clip, against how much the real features
        # do. Near 0, the predictor says the same for every clip (the mean): nothing can be retrieved.
        r = ranks(pred, gallery)
        res[direction] = dict(rank_scores(r), gap=shuffled_gap(pred, gallery),
                              spread=(pred.var(0).mean() / gallery.var(0).mean()).item())
        if direction == "v2a":
            res["v2a_by"] = ranks_by_timing(r, val, ids)
        if out["train_" + name] is not None:
            res[direction + "_ridge"] = rank_scores(ridge_ranks(out["train_" + other], out["train_" + name],
                                                                out[other], gallery))
    if out["train_audio"] is not None:
        res["heard"] = heard(out, train, train_ids, val, ids, jepa.encoder)
    res["seconds"] = time.time() - t0
    write_json(res, path.parent / f"probe_retrieve_{init}.json")
    return res


def ranks_by_timing(r, val, ids):
    """The video -> audio ranks r [n] split by the factor that only the timing of sight against sound
    carries (on the built-in set, `sync`): a late soundtrack is the picture's sound some moments on,
    which the picture alone cannot tell, so only synced clips can be found from their picture in full.
    {value: rank_scores}; empty without such a factor or labels."""
    meta = val["meta"]
    factors = [f for f, v in meta.get("factors", {}).items() if v.get("modality") == "video against audio"]
    if "class_factors" not in meta or not factors:
        return {}
    f = factors[0]
    labels = torch.as_tensor(np.asarray(val["label"])[ids].astype(np.int64))
    value = torch.tensor(meta["class_factors"])[labels.clamp(min=0), list(meta["factors"]).index(f)]
    groups = {name: (labels >= 0) & (value == k) for k, name in enumerate(meta["factors"][f]["values"])}
    return {name: dict(rank_scores(r[m]), clips=int(m.sum())) for name, m in groups.items() if m.any()}


def heard(out, train, train_ids, val, ids, encoder):
    """The first sign that the predictor crosses the senses: what the sound it predicts from the
    picture alone says of a factor that both senses carry (on the built-in set, the shape: it sets the
    timbre). A linear readout of each mel band's mean feature (a timbre is which bands sound), fit on
    the train clips' predicted sound and scored on val's, beside the same readout of the real sound's
    features. {factor: {predicted, real, chance}}; empty without such a factor or labels."""
    meta = train["meta"]
    factors = [f for f, v in meta.get("factors", {}).items() if v.get("modality") == "both"]
    if "class_factors" not in meta or not factors:
        return {}
    targets = torch.tensor(meta["class_factors"])                                 # [classes, heads]
    Fa, C = encoder.audio_grid

    def bands(x):   # [n, Fa * C, D] -> [n, Fa * D]
        return x.view(len(x), Fa, C, -1).mean(2).flatten(1)
    labels = {s: torch.as_tensor(np.asarray(d["label"])[i].astype(np.int64)) for s, d, i in
              (("train", train, train_ids), ("val", val, ids))}
    kept = {s: labels[s] >= 0 for s in labels}
    if not kept["train"].any() or not kept["val"].any():
        return {}
    res = {}
    for f in factors:
        j = list(meta["factors"]).index(f)
        y = {s: targets[labels[s][kept[s]], j] for s in labels}
        size = len(meta["factors"][f]["values"])
        res[f] = dict(chance=1 / size)
        for name, tr, va in (("predicted", out["train_pred_audio"], out["pred_audio"]),
                             ("real", out["train_audio"], out["audio"])):
            guess = linear_readout(bands(tr)[kept["train"]], y["train"][:, None], bands(va)[kept["val"]], [size])
            res[f][name] = (guess[:, 0] == y["val"]).float().mean().item()
    return res

# -----------------------------------------------------------------------------
# Reconstruction. Patches are laid out exactly as the encoder's tokens (common.patchify_video,
# patchify_audio): video [t, h, w] raster of 2x16x16 tubelets, audio [mel band, time column] raster.

# Metrics: per clip over the hidden patches only. pred, target [B, N, P]; mask [B, N] True = hidden.
# A clip with nothing hidden gives nan (averages skip it).
def masked_mean(err, mask):
    return (err * mask).sum(1) / mask.sum(1)


def masked_psnr(pred, target, mask, peak=1.0):
    return 10 * torch.log10(peak ** 2 / masked_mean(((pred - target) ** 2).mean(-1), mask))


def masked_l1(pred, target, mask):
    return masked_mean((pred - target).abs().mean(-1), mask)


def masked_snr(pred, target, mask):
    noise = masked_mean(((pred - target) ** 2).mean(-1), mask)
    return 10 * torch.log10(masked_mean((target ** 2).mean(-1), mask) / noise)


def mean_fill(patches, mask):
    """The trivial reconstruction: every hidden patch is the mean of its clip's visible patches."""
    seen = (~mask).float()[..., None]
    mean = (patches * seen).sum(1, keepdim=True) / seen.sum(1, keepdim=True).clamp(min=1)
    return torch.where(mask[..., None], mean, patches)


class Decoder(nn.Module):
    """One token -> one patch: LayerNorm (no affine) + Linear, so what it draws is what that token
    carries. Fit in closed form: ridge least squares, normal equations summed batch by batch."""
    def __init__(self, dim, out, ridge=1e-3):
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=1e-6, elementwise_affine=False)
        self.proj, self.ridge = nn.Linear(dim, out), ridge
        self.register_buffer("xx", torch.zeros(dim + 1, dim + 1, dtype=torch.float64))
        self.register_buffer("xy", torch.zeros(dim + 1, out, dtype=torch.float64))

    def accumulate(self, x, y):
        f = F.pad(self.norm(x.float()), (0, 1), value=1.0)   # a constant column for the bias
        self.xx += (f.T @ f).double()
        self.xy += (f.T @ y.float()).double()

    def solve(self):
        w = ridge_solve(self.xx, self.xy, self.ridge)                    # [dim + 1, out]
        self.proj.weight.data, self.proj.bias.data = w[:-1].T.float(), w[-1].float()

    def forward(self, x):
        return self.proj(self.norm(x.float()))


@torch.no_grad()
def masked_clips(encoder, cfg, data, ids, rng, device, crop=False):
    """Clips `ids` as the networks take them (video normalised, audio normalised or None) and their
    masks, drawn from `rng` for every mask config of the checkpoint; crop=True: training's random
    crops too."""
    b = get_batch(data, ids, device)
    theta = crop_params(rng, len(ids)).to(device) if crop else None
    video = augment_video(b["video"], cfg.size, theta)
    audio = normalize_audio(b["audio"], data["meta"]) if cfg.audio else None
    has_audio = b["has_audio"].cpu().numpy() if cfg.audio else np.zeros(len(ids), bool)
    masks = avjepa.sample_masks(rng, cfg, len(ids), encoder.video_grid, encoder.audio_grid, has_audio)
    return video, audio, masks.to(device)


def predict(jepa, target_encoder, cfg, data, ids, rng, device):
    """Clips `ids` under every mask config the predictor knows, through the frozen networks. Returns
    their patches (pixels in [0, 1], normalised log-mel) and per hidden token its mask config number,
    clip, token number, prediction (x) and the target encoder's feature there (target)."""
    encoder = jepa.encoder
    video, audio, masks = masked_clips(encoder, cfg, data, ids, rng, device)
    with autocast(device):
        pred, _ = jepa(video, audio, masks)
        target = avjepa.target_features(target_encoder, video, audio, replace(cfg, target_layers=1))
    index, N = masks.targets.index, encoder.n_tokens(audio is not None)
    mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1, 1)
    return dict(pix=patchify_video(video * std + mean).cpu(),
                mel=patchify_audio(audio).cpu() if audio is not None else None,
                mask=masks.target_mask.cpu(), clip=(index // N).cpu(), token=(index % N).cpu(),
                x=pred.float().cpu(), target=target.flatten(0, 1)[index].float().cpu())


def decode_into(patches, rows, keep, decoder, offset=0, source="x"):
    """Hidden patches replaced by the decoder's guess from rows[source] (the predictions, or the
    targets): returns (reconstruction, hidden mask [B, N])."""
    out, mask = patches.clone(), torch.zeros(patches.shape[:2], dtype=torch.bool)
    clip, token = rows["clip"][keep], rows["token"][keep] - offset
    with torch.no_grad():
        out[clip, token] = decoder(rows[source][keep]).to(out.dtype)
    mask[clip, token] = True
    return out, mask


def pick_mask(args, cfg):
    """--mask, the mask config to score: one the predictor has a mask token for (default: its first)."""
    args.mask = args.mask or cfg.masks[0]
    if args.mask not in cfg.masks:
        raise SystemExit(f"the predictor has mask tokens for {', '.join(cfg.masks)} only, not {args.mask!r}")


def reconstruct(args, path, ckpt, data_dir, device):
    """Reconstruction through the checkpoint's networks beside its floor (random networks of the same
    config) and its ceiling (the oracle: the target features at the hidden tokens, decoded the same
    way: what a perfect predictor could show)."""
    cfg = ckpt["config"]
    pick_mask(args, cfg)
    res, describe, secs = with_baseline(reconstruct_one, args, path, ckpt, data_dir, device)
    rnd = res.get("random", {})
    def beside(k, fmt, unit=""):
        extra = f", random {fmt(rnd[k])}" if k in rnd else ""
        fill, oracle = fmt(res[k + "_mean_fill"]), fmt(res[k + "_oracle"])
        return f"{fmt(res[k])}{unit} (mean-fill {fill}{extra}, oracle {oracle})"
    audio_part = f", audio L1 {beside('l1', '{:.3f}'.format)}" if cfg.audio else ""
    print(f"reconstruct {res['run']} [{args.mask}, {args.init}]: hidden video PSNR "
          f"{beside('psnr', '{:.1f}'.format, ' dB')}{audio_part} on {res['val_clips']} val clips "
          f"in {secs:.0f} s; examples in {path.parent / 'reconstruct'}")
    return res


def reconstruct_one(args, path, ckpt, data_dir, device, init):
    cfg, t0 = ckpt["config"], time.time()
    jepa, target_encoder = frozen_models(ckpt, init, args.seed, device)
    train_data, val_data = open_data(data_dir, jepa.encoder, cfg.audio)
    encoder, meta, mask_number = jepa.encoder, train_data["meta"], cfg.masks.index(args.mask)
    nv, D, bs = encoder.nv, encoder.width, args.batch_size

    # 1. One frozen pass over the train clips: every hidden token of every mask config is a (token ->
    #    patch) example for two decoders, of the predictions and (the oracle) of the target features.
    sources = ("x", "target")
    decoders = {(s, "video"): Decoder(D, TUBELET * PATCH * PATCH * 3) for s in sources}
    if cfg.audio:
        decoders.update({(s, "audio"): Decoder(D, PATCH * PATCH) for s in sources})
    train_ids = clip_ids(train_data, args.clips)
    for i in tqdm(range(0, len(train_ids), bs), desc=f"fit decoders ({init})", dynamic_ncols=True):
        r = predict(jepa, target_encoder, cfg, train_data, train_ids[i:i + bs],
                    np.random.default_rng([args.seed, 0, i]), device)
        v = r["token"] < nv
        for s in sources:
            decoders[s, "video"].accumulate(r[s][v], r["pix"][r["clip"][v], r["token"][v]])
            if cfg.audio:
                decoders[s, "audio"].accumulate(r[s][~v], r["mel"][r["clip"][~v], r["token"][~v] - nv])
    for d in decoders.values():
        d.solve()

    # 2. Val clips, masks of the chosen config only, scored on the hidden patches beside the mean-fill
    #    answer and the oracle's: {"pix" or "mel": (reconstruction, hidden [B, N])} of each.
    scores, examples = {}, []
    def score(r, out, suffix):
        for name, kind, fn in (("psnr", "pix", masked_psnr), ("l1", "mel", masked_l1), ("snr", "mel", masked_snr)):
            if kind in out:
                scores.setdefault(name + suffix, []).append(fn(out[kind][0], r[kind], out[kind][1]))
    ids = clip_ids(val_data, args.clips)
    shown = set(ids[np.linspace(0, len(ids) - 1, min(args.examples, len(ids))).round().astype(int)].tolist())
    for i in tqdm(range(0, len(ids), bs), desc=f"val ({init})", dynamic_ncols=True):
        r = predict(jepa, target_encoder, cfg, val_data, ids[i:i + bs], np.random.default_rng([args.seed, 1, i]),
                    device)
        keep, outs = r["mask"] == mask_number, {}
        for s, suffix in zip(sources, ("", "_oracle")):
            vid, vmask = decode_into(r["pix"], r, keep & (r["token"] < nv), decoders[s, "video"], source=s)
            out = dict(pix=(vid.clamp(0, 1), vmask))
            if cfg.audio:
                out["mel"] = decode_into(r["mel"], r, keep & (r["token"] >= nv), decoders[s, "audio"], nv, s)
            score(r, out, suffix)
            outs[s] = out
        pred = outs["x"]
        score(r, {k: (mean_fill(r[k], hidden), hidden) for k, (_, hidden) in pred.items()}, "_mean_fill")
        examples += [(r, pred, j, bool(val_data["has_audio"][c]))   # spread over the split
                     for j, c in enumerate(ids[i:i + bs]) if c in shown]

    res = dict(header("reconstruct", path, ckpt, data_dir, init), mask=args.mask,
               train_clips=len(train_ids), val_clips=len(ids),
               **{k: torch.cat(v).nanmean().item() for k, v in scores.items() if v})
    out_dir = path.parent / "reconstruct"
    out_dir.mkdir(exist_ok=True)
    for n, ex in enumerate(tqdm(examples, desc="examples", dynamic_ncols=True)):
        write_example(out_dir / f"{args.mask}_{init}_{n}", *ex, cfg, meta)
    res["seconds"] = time.time() - t0
    write_json(res, path.parent / f"probe_reconstruct_{args.mask}_{init}.json")
    return res

# -----------------------------------------------------------------------------
# Refit: is the hidden part not inferable, or not learned yet?

REFIT_LEARNED = 0.25   # share of the gap to the oracle that more predictor training must close


def refit(args, path, ckpt, data_dir, device):
    """The diagnostic to run on a new set: train the checkpoint's predictor on for --refit-steps,
    encoders frozen, then reconstruct again. Much closer to the oracle: the predictor had not
    finished learning (train longer). Barely moved: the context these masks leave does not pin the
    hidden content down. Writes <run>/refit/ckpt.pt (the refit predictor)."""
    cfg, steps = ckpt["config"], args.refit_steps or ckpt["step"]
    pick_mask(args, cfg)
    jepa, target_encoder = frozen_models(ckpt, "pretrained", args.seed, device)
    encoder, predictor = jepa.encoder, jepa.predictor
    train_data, val_data = open_data(data_dir, encoder, cfg.audio)
    val_ids = clip_ids(val_data, args.clips)
    jepa_loss_only = replace(cfg, reg="none", nce_weight=0.0)   # training's loss, less the extras

    def predictor_loss(data, ids, rng, crop=False):   # the encoders stay frozen: only it learns
        inputs = masked_clips(encoder, cfg, data, ids, rng, device, crop)
        return avjepa.step_loss(jepa, target_encoder, *inputs, jepa_loss_only)[0]

    @torch.no_grad()
    def val_loss():   # the same val clips and masks before and after
        bs = args.batch_size
        return torch.stack([predictor_loss(val_data, val_ids[i:i + bs], np.random.default_rng([args.seed, 3, i]))
                            for i in range(0, len(val_ids), bs)]).mean().item()

    before = val_loss()
    predictor.train().requires_grad_(True)
    opt = torch.optim.AdamW(predictor.parameters(), lr=cfg.lr, weight_decay=cfg.wd[0])
    n, B = train_data["n"], min(cfg.batch_size, train_data["n"])
    for s in tqdm(range(steps), desc="refit the predictor", dynamic_ncols=True):
        ids = batch_indices(n, B, s, args.seed)
        loss = predictor_loss(train_data, ids, np.random.default_rng([args.seed, 2, s]), crop=True)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    predictor.eval().requires_grad_(False)
    after = val_loss()

    refit_path = path.parent / "refit" / "ckpt.pt"
    refit_ckpt = {**ckpt, "predictor": predictor.state_dict(), "refit_steps": steps}
    saved = {k: v for k, v in refit_ckpt.items() if k != "sha256"}
    refit_path.parent.mkdir(exist_ok=True)
    write_atomic(refit_path, lambda tmp: torch.save({**saved, "config": asdict(cfg)}, tmp))
    args.baseline = False
    old = reconstruct_one(args, path, ckpt, data_dir, device, "pretrained")
    new = reconstruct_one(args, refit_path, refit_ckpt, data_dir, device, "pretrained")

    # before -> after (oracle): the share of the gap closed, and what it says
    def moved(k, fmt, unit=""):
        closed = (new[k] - old[k]) / (old[k + "_oracle"] - old[k]) if old[k + "_oracle"] != old[k] else 0.0
        verdict = "not learned yet" if closed >= REFIT_LEARNED else "not inferable from this context"
        return (f"{fmt(old[k])} -> {fmt(new[k])}{unit} (oracle {fmt(old[k + '_oracle'])}): "
                f"{closed:.0%} of the gap closed, {verdict}"), closed
    video, v_closed = moved("psnr", "{:.1f}".format, " dB")
    audio, a_closed = moved("l1", "{:.3f}".format) if cfg.audio else ("", None)
    res = dict(header("refit", path, ckpt, data_dir, "pretrained"), ckpt=str(refit_path), steps=steps,
               mask=args.mask, loss_before=before, loss_after=after, before=old, after=new,
               video_closed=v_closed, audio_closed=a_closed)
    write_json(res, path.parent / f"probe_refit_{args.mask}.json")
    print(f"refit {res['run']} [{args.mask}]: predictor val loss {before:.3f} -> {after:.3f} over "
          f"{steps} steps (encoder and target encoder frozen); hidden video PSNR {video}"
          + (f"; audio L1 {audio}" if audio else "") + f"; refit checkpoint {refit_path}")
    return res

# -----------------------------------------------------------------------------
# Pictures and sound of one example

def write_example(stem, r, pred, j, has_audio, cfg, meta):
    """Clip j of predict's rows r, what the mask hid (grey, and the lowest level) and its
    reconstruction pred ({"pix", "mel": (patches, hidden)}) as frames and log-mel, for write_media."""
    T, S = cfg.frames, cfg.size
    def frames(p):   # patches -> uint8 frames [T, S, S, 3]
        x = unpatchify_video(p[None], 3, T, S, S)[0].permute(1, 2, 3, 0)
        return (x.clamp(0, 1) * 255).round().byte().numpy()
    (vid, vmask), specs = pred["pix"], []
    rows = [frames(r["pix"][j]), frames(torch.where(vmask[j, :, None], 0.5, r["pix"][j])), frames(vid[j])]
    if cfg.audio:
        (rec, amask), mel = pred["mel"], r["mel"][j]
        hidden = torch.where(amask[j, :, None], mel.min(), mel)
        specs = [unpatchify_audio(x[None].float(), 128, cfg.audio_frames // PATCH * PATCH)[0, 0]
                 for x in (mel, hidden, rec[j])]
    write_media(stem, rows, specs, meta, has_audio)


def main(argv=None):
    args = get_args(argv)
    if args.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    path, ckpt, data_dir = open_run(args)
    task = dict(classify=classify, reconstruct=reconstruct, retrieve=retrieve, refit=refit)[args.task]
    return task(args, path, ckpt, data_dir, device)


if __name__ == "__main__":
    main()
