"""
Probes of a trained avjepa checkpoint: what did the frozen networks learn?

    python probe.py --task classify       # attentive probe on the frozen encoder: top-1 on val
    python probe.py --task reconstruct    # a decoder on the predictor: pixels and sound under the mask
    python probe.py --task retrieve       # cross-modal retrieval through the predictor

classify is V-JEPA's frozen evaluation. The EMA target encoder turns every clip into tokens once
(cached), video and audio each in a pass of its own by default (--read); each channel is
standardised with train-split statistics, per modality, and a small attentive probe (a learned
query, one cross-attention block, a linear layer) is trained on them. --init random runs the
identical probe on an untrained encoder of the same size, read the same way: the gap is what
pretraining bought. On the synthetic set the label is a product of factors (colour is only seen,
rhythm only heard, the direction of motion only seen across frames); the probe gives each factor its
own query and head and scores each.

retrieve asks the predictor, the JEPA way, which sound goes with a picture: hide all of a val clip's
audio, predict its audio features from its video, and rank every val clip's audio (encoded alone) by
distance to the prediction; and the reverse. R@1, R@5 and median rank, against chance, and beside
them the same ranking through a ridge map fit on the train clips' features (what they carry).

reconstruct makes the predictions visible. JEPA never predicts pixels, so with the encoder and
predictor frozen we fit a linear decoder from one token to its patch: the predictor's output at
hidden tokens -> pixel tubelets and spectrogram patches. It is scored only where tokens were hidden,
next to the trivial answer (every hidden patch = the mean visible patch of its clip), and drawn:
PNG, MP4 with the resynthesised sound, WAV.
"""
import argparse
import json
import math
import os
import time
import warnings
import wave
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import avjepa
import kernels
from common import (COUNT, IMAGENET_MEAN, IMAGENET_STD, NONNEG, NONNEG_INT, PATCH, POSITIVE,
                    TUBELET,
                    augment_video, batch_indices, check_device, crop_params, get_batch, load_split,
                    normalize_audio, pyplot, read_checkpoint, save_figure, write_atomic)


def get_args(argv=None):
    p = argparse.ArgumentParser(description="Probe an avjepa checkpoint: attentive "
                                            "classification or masked reconstruction.")
    p.add_argument("--task", choices=["classify", "reconstruct", "retrieve", "refit"],
                   required=True,
                   help="which probe to run; refit: the diagnostic that tells a hidden part not "
                        "inferable from one not learned yet")
    p.add_argument("--ckpt", default="", help="checkpoint to probe (default: the newest "
                                              "<runs>/*/ckpt.pt)")
    p.add_argument("--runs", default="out", help="folder searched for the newest run when --ckpt "
                                                 "is not given")
    p.add_argument("--data", default="", help="dataset folder (default: the one the checkpoint "
                                              "was trained on)")
    p.add_argument("--init", choices=["pretrained", "random"], default="pretrained",
                   help="random: the same probe on a freshly initialised model of the same "
                        "config (the baseline)")
    p.add_argument("--baseline", action=argparse.BooleanOptionalAction, default=True,
                   help="classify, retrieve: also run the identical probe on a random encoder of "
                        "the same config and print its figure beside the pretrained one")
    p.add_argument("--probe-seeds", type=NONNEG_INT, default=3,
                   help="classify: train the attentive probe this many times (seeds --seed, "
                        "--seed + 1, ...) and report the mean and the spread (0: the seedless "
                        "linear readout alone, in seconds)")
    p.add_argument("--modalities", choices=["video", "audio", "both"], default="",
                   help="classify: tokens the probe sees (default: both for AV checkpoints, "
                        "video otherwise)")
    p.add_argument("--read", choices=["separate", "joint", "both"], default="separate",
                   help="classify: encode video and audio in one pass each (separate), in one "
                        "pass together (joint), or both sets of tokens side by side")
    p.add_argument("--labels", action=argparse.BooleanOptionalAction, default=True,
                   help="classify: also print the ceiling: the same encoder trained on the labels "
                        "from the same random init (cached in the dataset folder, so it is "
                        "trained once per dataset)")
    p.add_argument("--labels-steps", type=NONNEG_INT, default=0,
                   help="classify: steps of the labels' run (0: the checkpoint's own steps, the "
                        "same budget)")
    p.add_argument("--mask", default="", help="reconstruct, refit: mask config to score "
                                              "(default: the checkpoint's first)")
    p.add_argument("--refit-steps", type=NONNEG_INT, default=0,
                   help="refit: steps of predictor training on the frozen encoders (0: the "
                        "checkpoint's own steps)")
    p.add_argument("--epochs", type=COUNT, default=100,
                   help="classify: probe training epochs (V-JEPA runs 20 over Kinetics' "
                   "240k clips; 20 over the synthetic set's 960 leave the probe underfit)")
    p.add_argument("--lr", type=POSITIVE, default=1e-3,
                   help="classify: peak learning rate of the probe (AdamW, cosine to 0)")
    p.add_argument("--wd", type=NONNEG, default=0.01, help="classify: weight decay of the probe")
    p.add_argument("--batch-size", type=COUNT, default=32,
                   help="clips per batch through the frozen networks and the probe")
    p.add_argument("--clips", type=NONNEG_INT, default=0, help="use at most this many clips of "
                                                               "each split (0: all)")
    p.add_argument("--examples", type=NONNEG_INT, default=4, help="reconstruct: val clips "
                                                                  "written as PNG, MP4 and WAV")
    p.add_argument("--no-cache", action="store_true", help="classify: recompute the features; "
                                                           "read and write no cache")
    p.add_argument("--device", default="", help="cpu or cuda (default: cuda when available)")
    p.add_argument("--deterministic", action="store_true",
                   help="deterministic kernels: a rerun with the same seed gives bit-identical "
                        "probes and scores")
    p.add_argument("--seed", type=NONNEG_INT, default=0, help="seed for masks, random init and "
                                                              "probe training")
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
    # exits with a message if missing or unreadable
    ckpt, digest = read_checkpoint(path, digest=True)
    if not (isinstance(ckpt, dict) and {"config", "encoder", "predictor", "target_encoder"} <= ckpt.keys()):
        raise SystemExit(f"{path} is not an avjepa checkpoint (no "
                         "encoder/predictor/target_encoder/config): pass a ckpt.pt written by "
                         "avjepa.py")
    ckpt["config"] = avjepa.Config.of(ckpt)   # the run's settings, whatever the checkpoint's age
    data = Path(args.data or ckpt["config"].data)
    if not (data / "meta.json").exists():
        raise SystemExit(f"no dataset at {data}: run prepare.py, or pass --data")
    print(f"probing {path} (step {ckpt['step']}) on {data}")
    ckpt["sha256"] = digest   # the feature cache's key: what was read, not what the file is by now
    return path, ckpt, data


def frozen_models(ckpt, init, seed):
    """(online encoder, predictor, EMA target encoder), frozen. The online pair was trained
    together, so it is the one to ask for predictions; the EMA encoder is the one to read features
    from (as V-JEPA). init=random: the same architecture with the same initialisation training
    starts from."""
    torch.manual_seed(seed)
    nets = avjepa.build(ckpt["config"])
    if init == "pretrained":
        for net, key in zip(nets, ("encoder", "predictor", "target_encoder")):
            net.load_state_dict(ckpt[key])
    return [net.eval().requires_grad_(False) for net in nets]


def check_data(meta, encoder, audio):
    if meta["frames"] != encoder.cfg.frames:
        raise SystemExit(f"the dataset has {meta['frames']} frames per clip, the model "
                         f"{encoder.cfg.frames}")
    if audio and meta["audio_shape"][1] // PATCH != encoder.audio_grid[1]:
        raise SystemExit(f"the dataset has {meta['audio_shape'][1]} log-mel frames per clip, the "
                         f"model {encoder.cfg.audio_frames}")


def clip_ids(data, n_max, labelled=False, sounding=False):
    """Clips to use (only labelled ones, only those with sound, if asked), sorted (memmap-friendly).
    A --clips subset is drawn at random, as splits are often stored class by class and their first
    clips would all share one label."""
    keep = np.ones(data["n"], bool)
    if labelled:
        keep &= np.asarray(data["label"]) >= 0
    if sounding:   # a silent clip has no sound to find
        keep &= np.asarray(data["has_audio"]).astype(bool)
    ids = np.flatnonzero(keep)
    return np.sort(np.random.default_rng(0).choice(ids, n_max, replace=False)) if 0 < n_max < len(ids) else ids


def autocast(device):
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")


def write_json(obj, path):
    write_atomic(path, lambda t: Path(t).write_text(json.dumps(obj, indent=1) + "\n"))

# -----------------------------------------------------------------------------
# Classification: frozen tokens, once, then V-JEPA's attentive probe on them

def encode(encoder, video, audio, has_audio, separate=False):
    """Tokens [B, N, D] of whole clips and which of them exist [B, N]. As in training, a silent clip
    has no audio tokens (its spectrogram is padding) - unless audio is all the probe sees, then it
    is the input. separate: video and audio attend only within their own modality (one packed
    segment each)."""
    B = len(has_audio)
    nv = encoder.nv if video is not None else 0
    N = nv + (math.prod(encoder.audio_grid) if audio is not None else 0)
    valid = torch.ones(B, N, dtype=torch.bool, device=has_audio.device)
    if video is not None and audio is not None:
        valid[~has_audio, nv:] = False
    lists = [r.nonzero()[:, 0].cpu().numpy() for r in valid]
    keep = kernels.pack(lists, N, B, split_at=nv if separate else None).to(valid.device)
    # whole clips, for the encoder's fused last blocks
    fused = kernels.pack(lists, N, B).to(valid.device)
    out = encoder(video, audio, tokens=keep, clips=fused)
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
    """Scale every channel of the frozen tokens to zero mean and unit variance over the train split,
    video tokens and audio tokens (the ranges between `bounds`) each with their own statistics
    (MAE's BatchNorm without affine before its linear probe, per modality). A pretrained JEPA's
    tokens share a large common part, and what tells clips apart can sit in channels of small
    variance, on which the probe's LayerNorm alone left the probe underfit; the two modalities'
    tokens differ in both."""
    for f in (train, val):
        f["x"] = f["x"].float()                                                  # [n, N, D]
    # token ranges with one modality each
    for part in (slice(a, b) for a, b in zip(bounds[:-1], bounds[1:])):
        x = train["x"][:, part][train["valid"][:, part]]                         # [tokens, D]
        if len(x) < 2:
            continue
        mean, std = x.mean(0), x.std(0).clamp(min=1e-6)
        for f in (train, val):
            f["x"][:, part] = (f["x"][:, part] - mean) / std


class AttentiveProbe(nn.Module):
    """V-JEPA's attentive classifier: a learned query cross-attends to the frozen tokens (keys and
    values layer-normed), a residual MLP refines it, a linear layer gives the class logits. With a
    label made of several factors (the synthetic set), each factor gets its own query and linear
    head over the same keys and values, so each is learned from every clip instead of from the few
    clips of each combination.

    The same function and parameters as V-JEPA's, computed in another order. Keys and values are
    linear in the normed tokens x^ = (x - mean) / std, so a query's score on a token is x^ @ (what
    the key map sends the query back to), plus a constant that softmax ignores; and the value of the
    attention-weighted mean of the tokens is the value map of their weighted mean. So nothing is
    projected per token: per token the probe does 2 x width x (heads x queries) multiply-adds
    instead of 2 x width^2, 13x fewer for vit_tiny with the synthetic set's 5 queries (a test checks
    it against the plain form)."""
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


def label_heads(classes, meta):
    """What the probe predicts: the class, or each factor of it when the classes are products of
    factors. Returns (sizes of the heads, [classes, heads] value of each head for each class)."""
    if "class_factors" in meta:
        cf = torch.tensor(meta["class_factors"])
        return [len(f["values"]) for f in meta["factors"].values()], cf
    return [classes], torch.arange(classes)[:, None]


def train_probe(train, outputs, targets, heads, args, device, seed):
    """AdamW, cosine to 0, no warmup: V-JEPA's probe recipe. targets [classes, heads] maps labels to
    heads."""
    torch.manual_seed(seed)
    probe = AttentiveProbe(train["x"].shape[-1], heads, outputs).to(device)
    opt = torch.optim.AdamW(probe.parameters(), lr=args.lr, weight_decay=args.wd)
    per_epoch = math.ceil(len(train["y"]) / args.batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, args.epochs * per_epoch)
    x, valid, y = train["x"].to(device).float(), train["valid"].to(device), targets[train["y"]].to(device)   # y [n, heads]
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


def factor_accuracy(pred, labels, meta):
    """Accuracy on each factor of the label (synthetic set): a prediction that gets the colour right
    but the rhythm wrong still counts for colour. Tells which modality a probe really reads."""
    cf = torch.tensor(meta["class_factors"])
    return {name: (cf[pred, j] == cf[labels, j]).float().mean().item() for j, name in enumerate(meta["factors"])}


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
    video token v_t and the mean audio token a_t over the audio columns playing during t; then, over
    t, the mean of the outer products of their random projections (P v_t)(Q a_t)^T, sight and sound
    at one moment (sync), and (P v_t)(P v_t+1)^T, sight now and a tubelet later (direction, order).
    A linear map of these is a bilinear form: it can ask "does the sound now go with the picture
    now?" and "where did it go next?", which no linear map of pooled tokens can. P, Q: fixed
    Gaussian [D, k] (seeded). [n, 2 k^2] (only the video pair without audio)."""
    x, valid = feats["x"], feats["valid"].float()[..., None]
    T, H, W = encoder.video_grid
    n, D, nv = len(x), x.shape[-1], encoder.nv
    g = torch.Generator().manual_seed(seed)
    P, Q = (torch.randn(D, k, generator=g) / math.sqrt(D) for _ in range(2))
    v = (x[:, :nv] * valid[:, :nv]).view(n, T, H * W, D).sum(2) / valid[:, :nv].view(n, T, H * W, 1).sum(2).clamp(min=1)
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
    """The seedless readout: least squares from mean-pooled features to one-hot labels, ridge lam
    relative to the mean diagonal (fixed, not tuned on val). One closed-form solve, no seed, no
    epochs. A linear map of pooled features cannot find a relation between tokens that the features
    do not already hold. train_y [n, heads], sizes: values per head -> predicted value of every head
    for val, [n_val, heads]."""
    mean = train_x.mean(0)
    x = F.pad(train_x - mean, (0, 1), value=1.0).double()                          # a bias column
    y = torch.cat([F.one_hot(train_y[:, h], n) for h, n in enumerate(sizes)], 1).double()
    xx = x.T @ x
    w = torch.linalg.solve(xx + lam * xx.diagonal().mean() * torch.eye(len(xx), dtype=xx.dtype),
                           x.T @ y)
    scores = F.pad(val_x - mean, (0, 1), value=1.0).double() @ w
    return torch.stack([part.argmax(1) for part in scores.split(sizes, 1)], 1)


def classify_one(args, path, ckpt, data_dir, device, init):
    """Frozen features of one encoder (pretrained or random), then the attentive probe over
    --probe-seeds seeds and the seedless linear readout. Returns the scores as a dict."""
    cfg = ckpt["config"]
    train_data, val_data = load_split(data_dir, "train"), load_split(data_dir, "val")
    meta = train_data["meta"]
    train_ids = clip_ids(train_data, args.clips, labelled=True)
    val_ids = clip_ids(val_data, args.clips, labelled=True)
    for split, ids, data in (("train", train_ids, train_data), ("val", val_ids, val_data)):
        if not len(ids):
            held = f"its {data['n']} {split} clips have no labels" if data["n"] else f"it has 0 {split} clips"
            raise SystemExit(f"{data_dir} cannot be classified: {held}. Prepare a labelled dataset "
                             "with both splits (class folders or a CSV with labels; "
                             "--val-fraction > 0 when the source has no split)")
    classes = len(meta.get("classes") or []) or int(max(train_data["label"].max(),
                                                        val_data["label"].max())) + 1
    encoder = frozen_models(ckpt, init, args.seed)[2].to(device)
    check_data(meta, encoder, args.modalities != "video")

    t0 = time.time()
    # one modality: the passes are the same
    read = args.read if args.modalities == "both" else "joint"
    name = f"{args.modalities}_{read}_{init}" if args.modalities == "both" else f"{args.modalities}_{init}"
    cache = path.parent / f"probe_features_{name}.pt"
    key = dict(ckpt=str(path.resolve()), ckpt_sha256=ckpt["sha256"], data=str(data_dir.resolve()),
               data_mtime=(data_dir / "meta.json").stat().st_mtime_ns, seed=args.seed,
               clips=args.clips)
    feats = torch.load(cache, weights_only=True) if cache.exists() and not args.no_cache else None
    if feats is not None and feats["key"] == key:
        print(f"features from {cache}")
    else:
        feats = dict(key=key, **{split: extract(encoder, d, ids, args.modalities, read, device,
                                                args.batch_size, split)
                                 for split, d, ids in (("train", train_data, train_ids),
                                                       ("val", val_data, val_ids))})
        if not args.no_cache:
            write_atomic(cache, lambda t: torch.save(feats, t))
    nv = 0 if args.modalities == "audio" else encoder.nv
    N = feats["train"]["x"].shape[1] // (2 if read == "both" else 1)
    bounds = [0, nv, N, N + nv, 2 * N][:5 if read == "both" else 3]
    # no empty modality range
    bounds = [b for i, b in enumerate(bounds) if i == 0 or b > bounds[i - 1]]
    standardize(feats["train"], feats["val"], bounds)
    outputs, targets = label_heads(classes, meta)
    labels = feats["val"]["y"]
    runs = []
    # the probe is a trained network too: its seed moves its score
    for k in range(args.probe_seeds):
        probe = train_probe(feats["train"], outputs, targets, encoder.heads, args, device,
                            args.seed + k)
        logits = predict_classes(probe, feats["val"], targets, device)
        run = dict(top1=top_k(logits, labels, 1),
                   train_top1=top_k(predict_classes(probe, feats["train"], targets, device),
                                    feats["train"]["y"], 1))
        if classes >= 10:
            run["top5"] = top_k(logits, labels, 5)
        if "class_factors" in meta:
            run["factors"] = factor_accuracy(logits.argmax(-1), labels, meta)
        runs.append(run)
    res = dict(task="classify", run=path.parent.name, ckpt=str(path), step=ckpt["step"],
               data=str(data_dir),
               modalities=args.modalities, read=read, init=init, epochs=args.epochs,
               classes=classes,
               train_clips=len(train_ids), val_clips=len(labels), chance_top1=1 / classes,
               probe_runs=runs,
               **(mean_of(runs) if runs else {}))
    if runs:
        res["top1_spread"] = max(r["top1"] for r in runs) - min(r["top1"] for r in runs)
    # the seedless readout: each head's value from a linear map of the pooled features and their pairs
    def readout_features(f):   # pooled tokens, and the pairs that a relation between tokens needs
        x = pooled(f, bounds)
        if args.modalities != "audio" and read != "both":
            x = torch.cat([x, paired(f, encoder)], 1)
        return x
    head_pred = linear_readout(readout_features(feats["train"]), targets[feats["train"]["y"]],
                               readout_features(feats["val"]), outputs)
    # [n_val, heads]
    right = head_pred == targets[labels]
    res["linear"] = dict(top1=right.all(1).float().mean().item())
    if "class_factors" in meta:
        res["linear"]["factors"] = {f: right[:, j].float().mean().item() for j, f in enumerate(meta["factors"])}
        res["chance_factors"] = {f: 1 / len(v["values"]) for f, v in meta["factors"].items()}
    res["seconds"] = time.time() - t0
    write_json(res, path.parent / f"probe_classify_{name}.json")
    return res


@torch.enable_grad()
def labels_ceiling(args, ckpt, data_dir, device):
    """The ceiling: the checkpoint's encoder, from the same random init, trained on the labels
    instead of the JEPA loss, with the same clips per step, steps (or --labels-steps) and peak
    learning rate; both senses in one attention pass, so that a feature can relate sight to sound,
    and a linear head per label factor on the mean of its tokens. Augmented as in training, but a
    flip swaps the direction label (it stays true) and a crop keeps 80% of the frame or more (the
    object stays in view). Scored on val, its own heads, and cached in the dataset folder (keyed by
    the dataset, the config and the budget)."""
    cfg = ckpt["config"]
    steps, batch, lr, seed = args.labels_steps or ckpt["step"], cfg.batch_size, cfg.lr, args.seed
    train, val = load_split(data_dir, "train"), load_split(data_dir, "val")
    meta = train["meta"]
    key = dict(data=str(data_dir.resolve()), data_mtime=(data_dir / "meta.json").stat().st_mtime_ns,
               model=cfg.model, audio=cfg.audio, crop=cfg.size, fuse=cfg.fuse, steps=steps,
               batch=batch, lr=lr, seed=seed)
    cache = data_dir / f"labels_{cfg.model}_{'av' if cfg.audio else 'v'}_{steps}steps_seed{seed}.json"
    if cache.exists():
        res = json.loads(cache.read_text())
        if res.get("key") == key:
            return res
    classes = len(meta.get("classes") or []) or int(max(train["label"].max(),
                                                        val["label"].max())) + 1
    sizes, targets = label_heads(classes, meta)
    factors = list(meta.get("factors", {}))
    flip_swaps = factors.index("direction") if "direction" in factors else None
    torch.manual_seed(seed)
    encoder = avjepa.build(cfg)[0].to(device)
    head = nn.Linear(encoder.width, sum(sizes)).to(device)
    params = [p for p in list(encoder.parameters()) + list(head.parameters()) if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.05)
    ids = clip_ids(train, 0, labelled=True)

    def logits(b, theta=None):
        video = augment_video(b["video"], cfg.size, theta)
        audio = normalize_audio(b["audio"], meta) if cfg.audio else None
        with autocast(device):
            return head(encoder(video, audio).float().mean(1)).split(sizes, -1)   # one joint pass

    print(f"the labels' ceiling: training the same encoder on the labels for {steps} steps, once "
          f"for this dataset (cached in {cache}; --no-labels skips it)")
    t0, warm = time.time(), max(1, steps // 10)
    for step in tqdm(range(steps), desc="labels' ceiling", dynamic_ncols=True):
        lr_now = lr * (step / warm if step < warm else 0.5 * (1 + math.cos(math.pi * (step - warm) / max(steps - warm, 1))))
        for g in opt.param_groups:
            g["lr"] = lr_now
        rng = np.random.default_rng([seed, step])
        idx = np.sort(ids[np.random.default_rng([seed, step, 1]).choice(len(ids), min(batch, len(ids)), replace=False)])
        b = get_batch(train, idx, device)
        theta = crop_params(rng, len(idx), area=(0.8, 1.0))
        y = targets[b["label"].cpu()].clone()
        if flip_swaps is not None:   # a flipped clip moves the other way
            flipped = theta[:, 0, 0] < 0
            y[flipped, flip_swaps] = 1 - y[flipped, flip_swaps]
        y = y.to(device)
        loss = sum(F.cross_entropy(out, y[:, h]) for h, out in enumerate(logits(b,
                                                                                theta.to(device))))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    encoder.eval()
    right, val_ids = [], clip_ids(val, 0, labelled=True)
    with torch.no_grad():
        for i in range(0, len(val_ids), args.batch_size):
            b = get_batch(val, val_ids[i:i + args.batch_size], device)
            pred = torch.stack([out.argmax(-1).cpu() for out in logits(b)], 1)
            right.append(pred == targets[b["label"].cpu()])
    right = torch.cat(right)
    res = dict(key=key, steps=steps, top1=right.all(1).float().mean().item(),
               seconds=time.time() - t0,
               final_loss=loss.item())
    if "class_factors" in meta:
        res["factors"] = {f: right[:, j].float().mean().item() for j, f in enumerate(factors)}
    write_json(res, cache)
    return res


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
    """task_one on the checkpoint's networks and, with --baseline, on random ones of the same
    config, read the same way (under res["random"]). Returns (res, describe): describe(fmt) is
    fmt(res), and fmt of the random run beside it, for the summary line; and the seconds both
    took."""
    res = task_one(args, path, ckpt, data_dir, device, args.init)
    if args.baseline and args.init == "pretrained":
        res["random"] = task_one(args, path, ckpt, data_dir, device, "random")
    def describe(fmt):
        return fmt(res) + (f" [random: {fmt(res['random'])}]" if "random" in res else "")
    return res, describe, res["seconds"] + res.get("random", {}).get("seconds", 0)


def classify(args, path, ckpt, data_dir, device):
    """The attentive probe and the linear readout on the checkpoint's encoder and, with --baseline,
    on a random encoder of the same config read the same way; one summary line with both."""
    cfg = ckpt["config"]
    args.modalities = args.modalities or ("both" if cfg.audio else "video")
    if args.modalities != "video" and not cfg.audio:
        raise SystemExit(f"{path} is a video-only checkpoint: use --modalities video")
    res, describe, secs = with_baseline(classify_one, args, path, ckpt, data_dir, device)
    labels = ""
    # the ceiling: the same encoder taught by the labels
    if args.labels and args.init == "pretrained":
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
        labels = f" [labels: {scores(res['labels'])}]; the labels' encoder trained {res['labels']['steps']} steps"
    passes = f", {res['read']} passes" if args.modalities == "both" else ""
    chances = res.get("chance_factors", {}).items()
    factor_chance = "".join(f", {k} {100 * c:.0f}%" for k, c in chances)
    chart = path.parent / f"probe_classify_{res['modalities']}.png"
    plot_classify(res, chart)
    print(f"classify {res['run']} [{args.modalities}{passes}, {args.init}]: {attentive}linear "
          f"readout {describe(lambda r: scores(r['linear']))}{labels}; on {res['val_clips']} val "
          f"clips (chance top-1 {100 * res['chance_top1']:.1f}%{factor_chance}) in {secs:.0f} s; "
          f"chart {chart}")
    return res


def plot_classify(res, png_path):
    """The classify chart: accuracy per factor (and top-1), pretrained beside random, for the
    attentive probe (when it ran) and the linear readout, with chance marked."""
    plt = pyplot()
    readouts = [("attentive probe", lambda r: r)] if "top1" in res else []
    readouts.append(("linear readout", lambda r: r["linear"]))
    names = ["top-1"] + list(res.get("chance_factors", {}))
    chance = [res["chance_top1"]] + list(res.get("chance_factors", {}).values())
    fig, axes = plt.subplots(1, len(readouts), figsize=(1.2 * len(names) * len(readouts) + 2, 3.4),
                             squeeze=False)
    for ax, (title, pick) in zip(axes[0], readouts):
        x = np.arange(len(names))
        encoders = [(res["init"], pick(res))] + ([("random", pick(res["random"]))] if "random" in res else [])
        if "labels" in res:   # the ceiling, the same bars on every panel: its own heads read it
            encoders.append((f"labels ({res['labels']['steps']} steps)", res["labels"]))
        w = 0.8 / len(encoders)
        for i, (label, r) in enumerate(encoders):
            scores = [r["top1"]] + [r.get("factors", {}).get(f, 0) for f in names[1:]]
            ax.bar(x + (i - (len(encoders) - 1) / 2) * w, [100 * v for v in scores], 0.95 * w,
                   label=label,
                   color={"pretrained": "C0", "random": "0.65"}.get(label, "C2"))
        ax.scatter(x, [100 * c for c in chance], marker="_", s=400, color="C3", label="chance",
                   zorder=3)
        ax.set(title=f"{title}, {res['modalities']}", xticks=x, xticklabels=names,
               ylabel="val accuracy (%)",
               ylim=(0, 100))
        ax.grid(axis="y", alpha=0.3)
        ax.legend(loc="lower right", fontsize=8)
    save_figure(fig, png_path)

# -----------------------------------------------------------------------------
# Cross-modal retrieval through the predictor: the JEPA way to ask "which sound goes with this picture?"

@torch.no_grad()
def cross_predict(jepa, video, audio, config, to_audio):
    """Hide one whole modality of every clip and predict it from the other, with the predictor's
    mask token of mask config number `config`: [B, N_hidden, D] predicted target features of the
    hidden modality."""
    encoder = jepa.encoder
    B, nv, N = video.shape[0], encoder.nv, encoder.n_tokens()
    video_rows, audio_rows = np.arange(nv), np.arange(nv, N)
    shown, hidden = (video_rows, audio_rows) if to_audio else (audio_rows, video_rows)
    # one modality shown
    masks = avjepa.pack_masks([shown] * B, [hidden] * B, B, nv, N).to(video.device)
    masks.target_config.fill_(config)
    pred, _ = jepa(video, audio, masks)
    return pred.view(B, len(hidden), -1)


def ranks(query, gallery):
    """Rank (1 = first) of each query's own clip among all gallery clips, by Euclidean distance over
    all tokens: query, gallery [n, T, D] -> [n]."""
    d = torch.cdist(query.flatten(1).float(), gallery.flatten(1).float())       # [n, n]
    return 1 + (d < d.diag()[:, None]).sum(1)


def ridge_ranks(train_x, train_y, query, gallery, lam=1.0):
    """The same ranking through a linear map instead of the predictor: kernel ridge from one
    modality's features of the train clips to the other's, applied to the val queries. It says how
    much of one sense the features carry about the other, whether or not the predictor has learned
    to use it. lam is relative to the kernel's mean diagonal (fixed, not tuned on val)."""
    x, y = train_x.flatten(1), train_y.flatten(1)
    mx, my = x.mean(0), y.mean(0)
    x = x - mx
    # [n_train, n_train]
    K = (x @ x.T).double()
    alpha = torch.linalg.solve(K + lam * K.diagonal().mean() * torch.eye(len(K), dtype=K.dtype),
                               (y - my).double())
    return ranks((query.flatten(1) - mx) @ x.T @ alpha.float() + my, gallery)


def shuffled_gap(query, gallery):
    """How much nearer the predictions are to their own clip's targets than to other clips': 1 -
    (mean distance to the own clip) / (mean distance to the others). 0 for a predictor that says the
    same for every clip."""
    d = torch.cdist(query.flatten(1).float(), gallery.flatten(1).float())       # [n, n]
    n = len(d)
    return 1 - d.diag().mean().item() / ((d.sum() - d.diag().sum()) / (n * (n - 1))).item()


def retrieve(args, path, ckpt, data_dir, device):
    """Retrieval through the checkpoint's networks and, with --baseline, through random ones of the
    same config."""
    res, describe, secs = with_baseline(retrieve_one, args, path, ckpt, data_dir, device)
    def scores(d):
        def fmt(r):
            x, ridge = r[d], r.get(d + "_ridge")
            return (f"R@1 {100 * x['r1']:.1f}%, median rank {x['median_rank']:.0f}, spread "
                    f"{x['spread']:.2f}, gap {x['gap']:.3f}" + (f", ridge R@1 {100 * ridge['r1']:.1f}%" if ridge else ""))
        return describe(fmt)
    n = res["val_clips"]
    print(f"retrieve {res['run']} [{args.init}]: video->audio {scores('v2a')}; audio->video "
          f"{scores('a2v')}; among {n} val clips (chance: R@1 {100 / n:.1f}%, median rank "
          f"{(n + 1) / 2:.0f}, gap 0) in {secs:.0f} s")
    return res


def retrieve_one(args, path, ckpt, data_dir, device, init):
    """Video -> audio: each val clip's predicted audio features, from its video alone, against the
    target features of every val clip's audio alone (and the reverse). The gallery is encoded
    without the other modality, so a match can only come from what the predictor inferred across the
    senses. Beside it, the same ranking through a ridge map fit on the train clips' features
    (ridge_ranks)."""
    cfg = ckpt["config"]
    if not cfg.audio:
        raise SystemExit(f"{path} is a video-only checkpoint: retrieval needs an audio-visual one "
                         "(--audio)")
    # the mask token of the cross-modal config if the predictor has one; otherwise of the one that hides the most
    configs = {d: next((m for m in (d, "long") if m in cfg.masks), cfg.masks[0])
               for d in ("v2a", "a2v")}
    encoder, predictor, target_encoder = frozen_models(ckpt, init, args.seed)
    jepa, target_encoder = avjepa.JEPA(encoder, predictor).to(device), target_encoder.to(device)
    val, train = load_split(data_dir, "val"), load_split(data_dir, "train")
    check_data(val["meta"], encoder, True)
    ids = clip_ids(val, args.clips, sounding=True)
    if len(ids) < 2:
        raise SystemExit(f"{data_dir} has fewer than 2 val clips with sound: nothing to retrieve "
                         "among")
    t0, D = time.time(), encoder.width
    out = {k: [] for k in ("pred_audio", "audio", "pred_video", "video", "train_audio",
                           "train_video")}
    # the ridge map's train clips: those with sound, at most --clips or 1024 (their features are kept)
    jobs = [("val", val, ids[i:i + args.batch_size]) for i in range(0, len(ids), args.batch_size)]
    train_ids = clip_ids(train, args.clips or 1024, sounding=True)
    jobs += [("train", train, train_ids[i:i + args.batch_size])
             for i in range(0, len(train_ids), args.batch_size)]
    for split, data, batch_ids in tqdm(jobs, desc="retrieve", dynamic_ncols=True):
        b = get_batch(data, batch_ids, device)
        video = augment_video(b["video"], cfg.size)
        audio = normalize_audio(b["audio"], data["meta"])
        with autocast(device), torch.no_grad():
            for direction, name in (("v2a", "audio"), ("a2v", "video")):
                if split == "val":
                    c = cfg.masks.index(configs[direction])
                    out["pred_" + name].append(cross_predict(jepa, video, audio, c, name == "audio").float().cpu())
                alone = target_encoder(None, audio) if name == "audio" else target_encoder(video)
                into = name if split == "val" else "train_" + name
                out[into].append(F.layer_norm(alone.float(), (D,)).cpu())
    out = {k: torch.cat(v) if v else None for k, v in out.items()}   # None: no train clip has sound
    n = len(ids)
    res = dict(task="retrieve", run=path.parent.name, ckpt=str(path), step=ckpt["step"],
               data=str(data_dir),
               init=init, mask_tokens=configs, val_clips=n, train_clips=len(train_ids),
               chance_r1=1 / n,
               chance_r5=min(5 / n, 1.0), chance_median_rank=(n + 1) / 2)
    for direction, name, other in (("v2a", "audio", "video"), ("a2v", "video", "audio")):
        pred, gallery = out["pred_" + name], out[name]
        r = ranks(pred, gallery).float()
        # spread: how much the predictions differ from clip to clip, against how much the real features do.
        # Near 0, the predictor says the same for every clip (the mean), and nothing can be retrieved.
        res[direction] = dict(r1=(r <= 1).float().mean().item(), r5=(r <= 5).float().mean().item(),
                              median_rank=r.median().item(),
                              spread=(pred.var(0).mean() / gallery.var(0).mean()).item(),
                              gap=shuffled_gap(pred, gallery))
        if out["train_" + name] is not None:
            r = ridge_ranks(out["train_" + other], out["train_" + name], out[other],
                            gallery).float()
            res[direction + "_ridge"] = dict(r1=(r <= 1).float().mean().item(),
                                             median_rank=r.median().item())
    res["seconds"] = time.time() - t0
    write_json(res, path.parent / f"probe_retrieve_{init}.json")
    return res

# -----------------------------------------------------------------------------
# Reconstruction. Patches are laid out exactly as the encoder's tokens: video [t, h, w] raster of
# 2x16x16 tubelets, audio [mel band, time column] raster of 16x16 patches.

def patchify_video(x):
    """[B, C, T, H, W] -> [B, Nv, 2*16*16*C], one row per token, (dt, dy, dx, c) inside a row."""
    B, C, T, H, W = x.shape
    x = x.reshape(B, C, T // TUBELET, TUBELET, H // PATCH, PATCH, W // PATCH, PATCH)
    return x.permute(0, 2, 4, 6, 3, 5, 7, 1).reshape(B, -1, TUBELET * PATCH * PATCH * C)


def unpatchify_video(p, C, T, H, W):
    x = p.reshape(len(p), T // TUBELET, H // PATCH, W // PATCH, TUBELET, PATCH, PATCH, C)
    return x.permute(0, 7, 1, 4, 2, 5, 3, 6).reshape(len(p), C, T, H, W)


def patchify_audio(x):
    """[B, 1, M, Ta] -> [B, Na, 16*16], (mel, time) inside a row. The row order is band-major: a
    reshape without this permute would scramble the spectrogram. Columns past the last patch are
    dropped."""
    B, _, M, Ta = x.shape
    x = x[..., :Ta // PATCH * PATCH].reshape(B, M // PATCH, PATCH, Ta // PATCH, PATCH)
    return x.permute(0, 1, 3, 2, 4).reshape(B, -1, PATCH * PATCH)


def unpatchify_audio(p, M, Ta):
    return p.reshape(len(p), M // PATCH, Ta // PATCH, PATCH, PATCH).permute(0, 1, 3, 2, 4).reshape(len(p), 1, M, Ta)


# Metrics: per clip over the hidden patches only. pred, target [B, N, P]; mask [B, N] True = hidden.
# A clip with nothing hidden gives nan (averages skip it).
def masked_mean(err, mask):
    return (err * mask).sum(1) / mask.sum(1)


def masked_psnr(pred, target, mask, peak=1.0):
    return 10 * torch.log10(peak ** 2 / masked_mean(((pred - target) ** 2).mean(-1), mask))


def masked_l1(pred, target, mask):
    return masked_mean((pred - target).abs().mean(-1), mask)


def masked_snr(pred, target, mask):
    return 10 * torch.log10(masked_mean((target ** 2).mean(-1), mask) / masked_mean(((pred - target) ** 2).mean(-1), mask))


def mean_fill(patches, mask):
    """The trivial reconstruction: every hidden patch is the mean of its clip's visible patches."""
    seen = (~mask).float()[..., None]
    mean = (patches * seen).sum(1, keepdim=True) / seen.sum(1, keepdim=True).clamp(min=1)
    return torch.where(mask[..., None], mean, patches)


class Decoder(nn.Module):
    """One token -> one patch: LayerNorm (no affine) + Linear. It sees a single token (no
    neighbours, no position), so what it draws is what that token carries. Being linear, it has a
    closed-form best fit: least squares over every hidden token of the train pass, from normal
    equations summed batch by batch (ridge-regularised). No learning rate, no epochs, and one pass
    of the frozen networks is all it costs."""
    def __init__(self, dim, out, ridge=1e-3):
        super().__init__()
        self.norm, self.proj, self.ridge = nn.LayerNorm(dim, eps=1e-6, elementwise_affine=False), nn.Linear(dim, out), ridge
        self.register_buffer("xx", torch.zeros(dim + 1, dim + 1, dtype=torch.float64))
        self.register_buffer("xy", torch.zeros(dim + 1, out, dtype=torch.float64))

    def accumulate(self, x, y):
        # a constant column for the bias
        f = F.pad(self.norm(x.float()), (0, 1), value=1.0)
        self.xx += (f.T @ f).double()
        self.xy += (f.T @ y.float()).double()

    def solve(self):
        reg = self.ridge * self.xx.diagonal().mean() * torch.eye(len(self.xx), dtype=torch.float64)
        w = torch.linalg.solve(self.xx + reg, self.xy)                    # [dim + 1, out]
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
    masks = avjepa.sample_masks(rng, cfg, len(ids), encoder.video_grid, encoder.audio_grid,
                                has_audio)
    return video, audio, masks.to(device)


def predict(jepa, target_encoder, cfg, data, ids, rng, device):
    """Mask clips `ids` with every mask config the predictor knows (each config has its own mask
    token), run the frozen encoder + predictor, and the target encoder over the whole clips. Returns
    the clips' patches (pixels in [0, 1], normalised log-mel) and one row per hidden token: its
    config, clip, token number, predicted embedding (x) and the target encoder's own embedding there
    (target)."""
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
                config=masks.target_config.cpu(), clip=(index // N).cpu(), token=(index % N).cpu(),
                x=pred.float().cpu(),
                target=target.flatten(0, 1)[index].float().cpu())


def decode_into(patches, rows, keep, decoder, offset=0, source="x"):
    """Hidden patches replaced by the decoder's guess from rows[source] (the predictions, or the
    targets): returns (reconstruction, hidden mask [B, N])."""
    out, mask = patches.clone(), torch.zeros(patches.shape[:2], dtype=torch.bool)
    clip, token = rows["clip"][keep], rows["token"][keep] - offset
    with torch.no_grad():
        out[clip, token] = decoder(rows[source][keep]).to(out.dtype)
    mask[clip, token] = True
    return out, mask


def reconstruct(args, path, ckpt, data_dir, device):
    """Reconstruction through the checkpoint's networks beside its floor (random networks of the
    same config, read the same way) and its ceiling (the oracle: the target encoder's own features
    at the hidden tokens, through a decoder fit the same way: what a perfect predictor could
    show)."""
    cfg = ckpt["config"]
    args.mask = args.mask or cfg.masks[0]
    if args.mask not in cfg.masks:
        raise SystemExit(f"the predictor has mask tokens for {', '.join(cfg.masks)} only, not "
                         f"{args.mask!r}")
    res, describe, secs = with_baseline(reconstruct_one, args, path, ckpt, data_dir, device)
    rnd = res.get("random", {})
    def beside(k, fmt, unit=""):
        extra = f", random {fmt(rnd[k])}" if k in rnd else ""
        return f"{fmt(res[k])}{unit} (mean-fill {fmt(res[k + '_mean_fill'])}{extra}, oracle {fmt(res[k + '_oracle'])})"
    audio_part = f", audio L1 {beside('l1', '{:.3f}'.format)}" if cfg.audio else ""
    print(f"reconstruct {res['run']} [{args.mask}, {args.init}]: hidden video PSNR "
          f"{beside('psnr', '{:.1f}'.format, ' dB')}{audio_part} on {res['val_clips']} val clips "
          f"in {secs:.0f} s; examples in {path.parent / 'reconstruct'}")
    return res


def reconstruct_one(args, path, ckpt, data_dir, device, init):
    cfg = ckpt["config"]
    config_id = cfg.masks.index(args.mask)
    encoder, predictor, target_encoder = frozen_models(ckpt, init, args.seed)
    jepa, target_encoder = avjepa.JEPA(encoder, predictor).to(device), target_encoder.to(device)
    train_data, val_data = load_split(data_dir, "train"), load_split(data_dir, "val")
    meta = train_data["meta"]
    check_data(meta, encoder, cfg.audio)
    nv, D, bs = encoder.nv, encoder.width, args.batch_size
    t0 = time.time()

    # 1. One frozen pass over the train clips, fresh masks per batch; every hidden token of every mask
    #    config is a (token -> patch) example for the decoders: one from the predictions, one (the
    #    oracle) from the target encoder's features at the same tokens.
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
                decoders[s, "audio"].accumulate(r[s][~v],
                                                r["mel"][r["clip"][~v], r["token"][~v] - nv])
    for d in decoders.values():
        d.solve()

    # 2. Val clips, masks of the chosen config only, scored on hidden patches next to the mean-fill answer
    #    and the oracle's.
    scores, examples = {}, []
    def score(name, value):
        scores.setdefault(name, []).append(value)
    ids = clip_ids(val_data, args.clips)
    shown = set(ids[np.linspace(0, len(ids) - 1, min(args.examples, len(ids))).round().astype(int)].tolist())
    for i in tqdm(range(0, len(ids), bs), desc=f"val ({init})", dynamic_ncols=True):
        r = predict(jepa, target_encoder, cfg, val_data, ids[i:i + bs],
                    np.random.default_rng([args.seed, 1, i]),
                    device)
        keep = r["config"] == config_id
        for s, suffix in zip(sources, ("", "_oracle")):
            vid, vmask = decode_into(r["pix"], r, keep & (r["token"] < nv), decoders[s, "video"],
                                     source=s)
            vid = vid.clamp(0, 1)
            score("psnr" + suffix, masked_psnr(vid, r["pix"], vmask))
            if cfg.audio:
                mel, amask = decode_into(r["mel"], r, keep & (r["token"] >= nv),
                                         decoders[s, "audio"], nv, source=s)
                for name, fn in (("l1", masked_l1), ("snr", masked_snr)):
                    score(name + suffix, fn(mel, r["mel"], amask))
            if s == "x":
                pred_vid, pred_mel = vid, mel if cfg.audio else None
        score("psnr_mean_fill", masked_psnr(mean_fill(r["pix"], vmask), r["pix"], vmask))
        if cfg.audio:
            fill = mean_fill(r["mel"], amask)
            for name, fn in (("l1", masked_l1), ("snr", masked_snr)):
                score(name + "_mean_fill", fn(fill, r["mel"], amask))
        # examples spread over the split
        for j in [j for j, c in enumerate(ids[i:i + bs]) if c in shown]:
            examples.append(dict(pix=r["pix"][j], vid=pred_vid[j], vmask=vmask[j],
                                 has_audio=bool(val_data["has_audio"][ids[i + j]]),
                                 **(dict(mel=r["mel"][j], rec=pred_mel[j], amask=amask[j],
                                         Ta=encoder.audio_grid[1] * PATCH) if cfg.audio else {})))

    res = dict(task="reconstruct", run=path.parent.name, ckpt=str(path), step=ckpt["step"],
               data=str(data_dir),
               mask=args.mask, init=init, train_clips=len(train_ids), val_clips=len(ids),
               **{k: torch.cat(v).nanmean().item() for k, v in scores.items() if v})
    out_dir = path.parent / "reconstruct"
    out_dir.mkdir(exist_ok=True)
    for n, ex in enumerate(tqdm(examples, desc="examples", dynamic_ncols=True)):
        write_example(out_dir / f"{args.mask}_{init}_{n}", ex, cfg, meta)
    res["seconds"] = time.time() - t0
    write_json(res, path.parent / f"probe_reconstruct_{args.mask}_{init}.json")
    return res

# -----------------------------------------------------------------------------
# Refit: is the hidden part not inferable, or not learned yet?

REFIT_LEARNED = 0.25   # share of the gap to the oracle that more predictor training must close


def refit(args, path, ckpt, data_dir, device):
    """The diagnostic to run on a new set: train the checkpoint's predictor on for --refit-steps,
    with the encoder and the target encoder frozen, then reconstruct again. If the hidden part comes
    much closer to the oracle (the target features decoded), the predictor had not finished
    learning: train longer. If it barely moves, the context these masks leave does not pin the
    hidden content down: smaller masks, or a set whose hidden parts follow from what is seen. Writes
    <run>/refit/ckpt.pt (the refit predictor)."""
    cfg = ckpt["config"]
    args.mask = args.mask or cfg.masks[0]
    steps = args.refit_steps or ckpt["step"]
    encoder, predictor, target_encoder = frozen_models(ckpt, "pretrained", args.seed)
    jepa, target_encoder = avjepa.JEPA(encoder, predictor).to(device), target_encoder.to(device)
    train_data, val_data = load_split(data_dir, "train"), load_split(data_dir, "val")
    check_data(train_data["meta"], encoder, cfg.audio)
    val_ids = clip_ids(val_data, args.clips)
    jepa_loss_only = replace(cfg, reg="none", nce_weight=0.0)   # training's loss, less the extras

    def predictor_loss(data, ids, rng, crop=False):   # the encoders stay frozen: only it learns
        inputs = masked_clips(encoder, cfg, data, ids, rng, device, crop)
        return avjepa.step_loss(jepa, target_encoder, *inputs, jepa_loss_only)[0]

    @torch.no_grad()
    def val_loss():   # the same val clips and masks before and after
        losses = [predictor_loss(val_data, val_ids[i:i + args.batch_size],
                                 np.random.default_rng([args.seed, 3, i]))
                  for i in range(0, len(val_ids), args.batch_size)]
        return torch.stack(losses).mean().item()

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
    res = dict(task="refit", run=path.parent.name, ckpt=str(refit_path), steps=steps,
               mask=args.mask,
               loss_before=before, loss_after=after, before=old, after=new, video_closed=v_closed,
               audio_closed=a_closed)
    write_json(res, path.parent / f"probe_refit_{args.mask}.json")
    print(f"refit {res['run']} [{args.mask}]: predictor val loss {before:.3f} -> {after:.3f} over "
          f"{steps} steps (encoder and target encoder frozen); hidden video PSNR {video}"
          + (f"; audio L1 {audio}" if audio else "") + f"; refit checkpoint {refit_path}")
    return res

# -----------------------------------------------------------------------------
# Pictures and sound of one example

def mel_to_wave(mel, meta, iters=32):
    """Normalised log-mel [128, Ta] -> 16 kHz waveform, roughly: undo the normalisation and the log,
    spread the mel energies back over FFT bins by least squares on kaldi's own filterbank (the one
    prepare.py's fbank used: 25 ms window, 10 ms hop, 512-point FFT, 20 Hz - 8 kHz), guess phases by
    Griffin-Lim, and undo kaldi's 0.97 pre-emphasis."""
    import torchaudio
    from torchaudio.compliance.kaldi import get_mel_banks
    power = (mel.float() * 2 * meta["audio_std"] + meta["audio_mean"]).exp()
    # its own filterbank, replaced below, has empty low bands at 128 mels
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        inverse = torchaudio.transforms.InverseMelScale(257, 128, 16000, driver="gelsd")
    # [257, 128]
    inverse.fb = F.pad(get_mel_banks(128, 512, 16000.0, 20.0, 0.0, 100.0, -500.0, 1.0)[0], (0, 1)).T
    spec = inverse(power)
    griffin_lim = torchaudio.transforms.GriffinLim(n_fft=512, win_length=400, hop_length=160,
                                                   power=2.0, n_iter=iters)
    torch.manual_seed(0)   # Griffin-Lim starts from random phases
    return torchaudio.functional.deemphasis(griffin_lim(spec)[None], 0.97)[0].clamp(-1, 1)


def colormap(x, lo, hi):
    """[H, W] values -> uint8 RGB, dark blue (low) -> red -> yellow (high)."""
    anchors = np.array([[0, 0, 4], [80, 18, 123], [183, 55, 121], [252, 137, 97], [252, 253, 191]],
                       float)
    t = np.clip((x - lo) / max(hi - lo, 1e-6), 0, 1) * (len(anchors) - 1)
    return np.stack([np.interp(t, np.arange(len(anchors)), anchors[:, c]) for c in range(3)], -1).astype(np.uint8)


def example_png(rows, ex, cfg, k):
    """original | hidden | reconstruction over (up to 8 of) the frames, then the three
    spectrograms."""
    from PIL import Image, ImageDraw
    T, S = cfg.frames, cfg.size
    shown = np.linspace(0, T - 1, min(T, 8)).round().astype(int)
    tile, label, gap, names = S * k, 110, 4, ("original", "hidden", "reconstruction")
    specs = []
    if cfg.audio:
        # one colour scale for all three
        lo, hi = ex["mel"].min().item(), ex["mel"].max().item()
        for p in (ex["mel"], torch.where(ex["amask"][:, None], lo, ex["mel"]), ex["rec"]):
            # low pitch at the bottom
            mel = unpatchify_audio(p[None].float(), 128, ex["Ta"])[0, 0].flip(0)
            img = Image.fromarray(colormap(mel.numpy(), lo, hi))
            specs.append(img.resize((ex["Ta"] * 2, 256), Image.NEAREST))
    width = label + max(len(shown) * (tile + gap), sum(s.width + gap for s in specs))
    canvas = Image.new("RGB", (width, 3 * (tile + gap) + (256 + 20 + gap if specs else 0)), "white")
    draw = ImageDraw.Draw(canvas)
    for r, (name, frames) in enumerate(zip(names, rows)):
        draw.text((4, r * (tile + gap) + tile // 2), name, fill="black")
        for c, t in enumerate(shown):
            # small frames: nearest, visible
            frame = Image.fromarray(frames[t]).resize((tile, tile), Image.NEAREST)
            canvas.paste(frame, (label + c * (tile + gap), r * (tile + gap)))
    x = label
    for name, s in zip(names, specs):
        draw.text((x, 3 * (tile + gap) + 4), f"{name} log-mel", fill="black")
        canvas.paste(s, (x, 3 * (tile + gap) + 20))
        x += s.width + gap
    return canvas


def write_example(stem, ex, cfg, meta):
    """stem.png; stem.mp4: original beside reconstruction, with the reconstructed sound; stem.wav
    and stem_original.wav (the original log-mel through the same resynthesis, to compare like with
    like)."""
    T, S = cfg.frames, cfg.size
    def frames(p):   # patches -> uint8 frames [T, S, S, 3]
        return (unpatchify_video(p[None], 3, T, S, S)[0].permute(1, 2, 3, 0).clamp(0, 1) * 255).round().byte().numpy()
    rows = [frames(ex["pix"]), frames(torch.where(ex["vmask"][:, None], 0.5, ex["pix"])),
            frames(ex["vid"])]
    k = max(1, math.ceil(128 / S))                       # scale-up factor for small frames
    write_atomic(f"{stem}.png", lambda t: example_png(rows, ex, cfg, k).save(t, format="PNG"))
    sr, sound = meta.get("sample_rate", 16000), None
    if cfg.audio:
        waves = [mel_to_wave(unpatchify_audio(p[None].float(), 128, ex["Ta"])[0, 0], meta).numpy() if ex["has_audio"]
                 else np.zeros(ex["Ta"] * 160, np.float32) for p in (ex["rec"], ex["mel"])]
        for w, suffix in zip(waves, ("", "_original")):
            write_atomic(f"{stem}{suffix}.wav", lambda t, w=w: write_wav(t, w, sr))
        sound = waves[0]
    side = np.stack([np.concatenate([a, np.full((S, 4, 3), 255, np.uint8), b], 1) for a, b in zip(rows[0], rows[2])])
    # prepare.py holds the PyAV code; importing it here keeps av optional
    from prepare import write_mp4
    write_atomic(f"{stem}.mp4", lambda t: write_mp4(t, side.repeat(k, 1).repeat(k, 2),
                                                    1 / meta["frame_seconds"], sound, sr))


def write_wav(path, w, sr):
    """16-bit mono PCM with the standard library's wave module."""
    with wave.open(str(path), "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(2)
        f.setframerate(sr)
        f.writeframes((np.clip(w, -1, 1) * 32767).astype("<i2").tobytes())


def main(argv=None):
    args = get_args(argv)
    if args.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    path, ckpt, data_dir = open_run(args)
    task = dict(classify=classify, reconstruct=reconstruct, retrieve=retrieve,
                refit=refit)[args.task]
    return task(args, path, ckpt, data_dir, device)


if __name__ == "__main__":
    main()
