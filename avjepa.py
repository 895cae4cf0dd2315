"""
AV-JEPA: audio-video joint-embedding predictive architecture, in one file.

A clip is cut into tokens: tubelets of 2 frames x 16 x 16 pixels for the video, 16 x 16 patches of
its log-mel spectrogram for the sound. Each step hides blocks of tokens (the *targets*). A shared
ViT, the *encoder*, sees only what is left (the *context*). A narrow ViT, the *predictor*, is asked
to fill in, in embedding space, what an *EMA* copy of the encoder (the *target encoder*) says about
the targets when it sees the whole clip. No gradient reaches the target encoder (stop-gradient): it
only follows the encoder, slowly. Nothing is ever reconstructed in pixels. Without --audio: V-JEPA.

Read top to bottom: config -> data -> masks -> model -> loss -> loop -> using what you trained.
What is only plumbing (the arrays' reader, checkpoints, logs, locks, signals, FLOP counts) lives in
common.py.

    python avjepa.py --model vit_tiny --audio           # AV-JEPA on data/synthetic
    torchrun --nproc_per_node 8 avjepa.py --data data/k400 --model vit_base --audio
"""
import argparse
import math
from functools import partial
from dataclasses import dataclass, field, fields, replace
from typing import NamedTuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import kernels
from common import (COUNT, FRACTION, NONNEG, NONNEG_INT, PATCH, POSITIVE, TUBELET, Run, check_device,
                    ddp, encoder_weights, get_batch, load_split, number, plot_masks, prefetch,
                    patchify_audio, patchify_video, read_checkpoint, saved_config, setup_process, to_device,
                    vjepa_shapes)

# -----------------------------------------------------------------------------
# Config

# name: (width, depth, heads), V-JEPA's encoders: mlp ratio 4, qkv bias, LayerNorm eps 1e-6, GELU.
# vit_micro: for the tests, and a first look in seconds.
MODELS = {"vit_micro": (32, 2, 2), "vit_tiny": (192, 12, 3), "vit_small": (384, 12, 6),
          "vit_base": (768, 12, 12), "vit_large": (1024, 24, 16), "vit_huge": (1280, 32, 16)}


# A predictor about a tenth of its encoder: half as wide (at most V-JEPA's 384) and 6 deep (12 from
# vit_large up, as V-JEPA). A 384 x 12 predictor would be 4x ViT-Tiny's encoder: a predictor that
# strong can solve the task by itself, and the encoder, the part we keep, learns less.
def predictor_size(cfg):
    """The predictor's width and depth: --pred-width and --pred-depth, else the sizes above."""
    width, depth, _ = MODELS[cfg.model]
    return cfg.pred_width or min(width // 2, 384), cfg.pred_depth or (12 if depth >= 24 else 6)


class MaskConfig(NamedTuple):
    """How a mask config picks the targets. multiblock: `blocks` rectangles of `scale` of the grid
    each, through all time (V-JEPA); all_audio / all_video: one sense whole, predicted from the
    other; future: the second half of the clip, in both senses; later_audio: the second half of the
    sound, with the whole picture and the first half of the sound as context."""
    kind: str
    blocks: int = 0          # multiblock: V-JEPA's count, for its 14 x 14 grid (grid_blocks)
    scale: float = 0.0       # multiblock: each rectangle's share of the grid
    colour: str = "#7f7f7f"  # in masks.png; the cross-modal ones in reds and purples


# V-JEPA uses "short" and "long" every step.
MASKS = {"short": MaskConfig("multiblock", 8, 0.15, "#1f77b4"),
         "long": MaskConfig("multiblock", 2, 0.7, "#2ca02c"),
         "v2a": MaskConfig("all_audio", colour="#d62728"), "a2v": MaskConfig("all_video", colour="#9467bd"),
         "future": MaskConfig("future", colour="#ff7f0e"), "later_audio": MaskConfig("later_audio", colour="#e377c2")}
ASPECT = (0.75, 1.5)      # block aspect ratio range (both modalities)
PASSES = ["joint", "separate"]   # one attention pass over both senses, or one per sense


def mask_names(text):   # an argparse type: "short,long" -> ("short", "long")
    names = tuple(text.split(","))
    for m in names:
        if m not in MASKS:
            raise argparse.ArgumentTypeError(f"unknown mask config {m!r}: pick from {', '.join(MASKS)}")
    return names


def flag(default, help, **argparse_settings):   # a Config field that is a command-line flag
    return field(default=default, metadata=dict(help=help, **argparse_settings))


@dataclass
class Config:
    """A run, whole: its flags (make_parser is generated from these fields) and its clips' geometry,
    read off the dataset (with_data). Checkpoints store it as a dict, which Config.of reads back."""
    data: str = flag("data/synthetic", "dataset folder written by prepare.py")
    model: str = flag("vit_tiny", "encoder size", choices=list(MODELS))
    tokenizer: str = flag("patch", "pixels and log-mel to tokens: one linear map per patch (V-JEPA), or "
                          "a small convolution stack inside each patch", choices=["patch", "conv"])
    audio: bool = flag(False, "train on video + audio (AV-JEPA); without it, V-JEPA")
    masks: tuple = flag(("short", "long"), f"mask configs of every step: {', '.join(MASKS)}", type=mask_names)
    truncate: bool = flag(False, "cut masks to the batch minimum, as V-JEPA does")
    pred_width: int = flag(0, "predictor width (0: half the encoder's)", type=NONNEG_INT)
    pred_depth: int = flag(0, "predictor depth (0: 6, or 12)", type=NONNEG_INT)
    crop: int = flag(0, "crop size, a multiple of 16 (0: none)", type=NONNEG_INT)
    batch_size: int = flag(16, "clips per step per process", type=COUNT)
    steps: int = flag(600, "optimizer steps (600: ~10 min on a 2-core CPU)", type=COUNT)
    context_pass: str = flag("separate", "the context: a pass per sense, or one over both", choices=PASSES)
    target_pass: str = flag("separate", "the same, for the targets", choices=PASSES)
    fuse: int = flag(0, "last blocks that attend across senses (CAV-MAE)", type=NONNEG_INT)
    moment_blocks: int = flag(0, "first blocks that attend within one moment: a tubelet's video tokens and "
                              "the audio playing then (0: every block sees the whole clip, as V-JEPA)",
                              type=NONNEG_INT)
    pred_moment_blocks: int = flag(0, "the predictor's first blocks that attend within one moment, as "
                                   "--moment-blocks does in the encoder: a hidden token first gathers what is "
                                   "seen and heard at its own instant (0: none, as V-JEPA)", type=NONNEG_INT)
    target_layers: int = flag(1, "targets: mean of this many last blocks (data2vec 2)", type=COUNT)
    nce_weight: float = flag(0.0, "InfoNCE of pooled predictions and targets (CAV-MAE)", type=NONNEG)
    nce_per: str = flag("clip", "--nce-weight pools each clip, or each moment with the same clip's other "
                        "moments among the negatives (Synchformer)", choices=["clip", "moment"])
    reg: str = flag("sigreg", "anti-collapse term: SIGReg (LeJEPA) or none (V-JEPA)", choices=["none", "sigreg"])
    reg_weight: float = flag(1.0, "weight of --reg", type=NONNEG)
    reg_on: str = flag("tokens", "what --reg reads: the context tokens, or a projector's output (an MLP, as "
                       "LeJEPA's), which leaves the tokens free of its shape", choices=["tokens", "projector"])
    schedule: str = flag("vjepa1", "vjepa1: cosine lr, rising EMA; vjepa2: constant, then a cool-down",
                         choices=["vjepa1", "vjepa2"])
    cooldown: float = flag(0.2, "vjepa2: fraction of steps cooling down", type=FRACTION)
    lr: float = flag(6.25e-4, "peak learning rate", type=POSITIVE)
    start_lr: float = flag(2e-4, "learning rate at the start of warmup", type=NONNEG)
    final_lr: float = flag(1e-6, "learning rate at the end", type=NONNEG)
    warmup: float = flag(40 / 300, "warmup fraction (V-JEPA: 40/300)", type=FRACTION)
    wd: tuple = flag((0.04, 0.4), "weight decay, cosine from/to", type=NONNEG, nargs=2)
    ema: tuple = flag(None, "EMA momentum from/to (default: ema_range)", type=FRACTION, nargs=2)
    schedule_scale: float = flag(1.25, "schedules span steps x this (V-JEPA)", type=number(float, 1))
    clip_grad: float = flag(10.0, "gradient norm clipping (0: off)", type=NONNEG)
    init: str = flag("", "video encoder to start from (ours, or V-JEPA's)")
    out: str = flag("out", "folder for runs")
    # not --run: torchrun's parser would take it for an abbreviation of its own --run-path
    name: str = flag("", "run name, its folder under --out (default: <model>-av or -v)")
    resume: bool = flag(False, "continue the run from its checkpoint")
    save_every: int = flag(200, "checkpoint every this many steps", type=COUNT)
    keep_every: int = flag(0, "also keep the checkpoint of every this many steps, as <run>/steps/<step>/ckpt.pt "
                              "(for assets/plot_steps.py; 0: only the latest)", type=NONNEG_INT)
    log_every: int = flag(10, "a log.jsonl line every this many steps", type=COUNT)
    device: str = flag("", "cpu, cuda or cuda:N (default: cuda when available)")
    compile: bool = flag(False, "torch.compile the step's forward as one graph")
    deterministic: bool = flag(False, "bit-identical reruns and resumes (about 5%% slower)")
    seed: int = flag(0, "seed: init, data order, masks, crops", type=NONNEG_INT)
    frames: int = field(default=0, metadata=dict(flag=False))   # from here on, the clips' geometry:
    size: int = field(default=0, metadata=dict(flag=False))     # the side the encoder sees (--crop)
    audio_frames: int = field(default=0, metadata=dict(flag=False))           # log-mel columns
    tubelet_seconds: float = field(default=1.0, metadata=dict(flag=False))
    audio_patch_seconds: float = field(default=1.0, metadata=dict(flag=False))

    # what --resume lets change (and prints), and what says where a run is rather than how it trains
    RESUME_MAY_CHANGE = ("steps", "save_every", "keep_every", "log_every", "device")
    LOCATION = ("resume", "name", "out")

    def __post_init__(self):   # lists (argparse's nargs, a checkpoint's dict) are kept as tuples
        for f in fields(self):
            if type(getattr(self, f.name)) is list:
                setattr(self, f.name, tuple(getattr(self, f.name)))

    def check(self, error):
        """Settings that are each valid but do not fit together: error(message), argparse's exit."""
        _, depth, heads = MODELS[self.model]
        for m in self.masks:
            if MASKS[m].kind in ("all_audio", "all_video", "later_audio") and not self.audio:
                error(f"mask config {m!r} predicts across the senses: it needs --audio")
        if self.pred_width % heads:
            error(f"argument --pred-width: {self.pred_width} must be a multiple of {self.model}'s {heads} heads")
        if self.crop % PATCH:
            error(f"argument --crop: {self.crop} must be a multiple of {PATCH}")
        for name in ("fuse", "target_layers", "moment_blocks"):
            if getattr(self, name) > depth:
                error(f"argument --{name.replace('_', '-')}: {getattr(self, name)} is more than {depth} blocks")
        pred_depth = predictor_size(self)[1]
        if self.pred_moment_blocks > pred_depth:
            error(f"argument --pred-moment-blocks: {self.pred_moment_blocks} is more than the predictor's "
                  f"{pred_depth} blocks")
        self.name = self.name or f"{self.model}-{'av' if self.audio else 'v'}"

    def with_data(self, meta):
        """This config with the geometry of the dataset's clips (meta.json)."""
        return replace(self, frames=meta["frames"], size=self.crop or meta["size"],
                       audio_frames=meta["audio_shape"][1], tubelet_seconds=TUBELET * meta["frame_seconds"],
                       audio_patch_seconds=PATCH * meta["audio_hop_seconds"])

    @classmethod
    def of(cls, ckpt):
        """The Config a checkpoint was trained with (common.saved_config reads the older forms)."""
        return cls(**{k: v for k, v in saved_config(ckpt).items() if k in cls.__dataclass_fields__})


def make_parser():
    p = argparse.ArgumentParser(description="Pretrain AV-JEPA (V-JEPA without --audio) on prepare.py's data.")
    for f in fields(Config):   # a flag per field, but the geometry's
        settings = dict(f.metadata, **({"action": "store_true"} if f.default is False else {}))
        if settings.pop("flag", True):
            p.add_argument(f"--{f.name.replace('_', '-')}", default=f.default, **settings)
    return p


def get_config(argv=None):
    p = make_parser()
    cfg = Config(**vars(p.parse_args(argv)))
    cfg.check(p.error)
    check_device(p, cfg.device)
    return cfg


def ema_range(steps):
    """Default EMA start and end. An EMA of m averages about the last 1 / (1 - m) steps and keeps
    m^steps of the random init (V-JEPA's 0.998: a third after 600): a sixth of the run, 10 to 500."""
    return min(0.998, max(0.9, 1 - 6 / steps)), 1.0

# -----------------------------------------------------------------------------
# Data. prepare.py's arrays (video uint8 [N, T, H, W, 3], log-mel [N, 128, Ta]; common.load_split)
# are read B clips a step, without replacement, epoch after epoch; on the device each clip gets a
# random resized crop and flip (V-JEPA's augmentation) and its log-mel is normalised (AudioMAE's).

def batch_indices(n, batch_size, step, seed, rank=0, world=1):
    """The clips of `step` on `rank`: a seeded permutation per epoch, each rank its own slice.
    Stateless, so a resumed run reads exactly the batches it would have read."""
    per_step = batch_size * world
    epoch, i = divmod(step, max(n // per_step, 1))
    perm = np.random.default_rng([seed, epoch]).permutation(n)
    start = i * per_step + rank * batch_size
    return np.sort(perm[np.arange(start, start + batch_size) % n])   # sorted: kinder to a memmap


def crop_params(rng, B, area=(0.3, 1.0)):
    """The augmentation of B clips, drawn on the host: random resized crop (area in `area`, aspect
    0.75-1.35) and horizontal flip, the same for all frames of a clip, as affine maps [B, 2, 3]."""
    theta = torch.zeros(B, 2, 3)
    area = rng.uniform(*area, B)
    ratio = np.exp(rng.uniform(math.log(0.75), math.log(1.35), B))
    w, h = np.minimum(np.sqrt(area * ratio), 1), np.minimum(np.sqrt(area / ratio), 1)
    flip = np.where(rng.random(B) < 0.5, -1.0, 1.0)
    theta[:, 0, 0], theta[:, 1, 1] = torch.tensor(w * flip), torch.tensor(h)
    theta[:, 0, 2] = torch.tensor(rng.uniform(-1, 1, B) * (1 - w))   # crop centre, in [-1, 1] units
    theta[:, 1, 2] = torch.tensor(rng.uniform(-1, 1, B) * (1 - h))
    return theta


IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def augment_video(video, size, theta=None):
    """uint8 [B, T, H, W, 3] -> float [B, 3, T, size, size], ImageNet-normalised. theta [B, 2, 3]
    (crop_params, on the video's device): each clip's crop and flip as one batched affine resample.
    None: resize only."""
    B, T, H, W, _ = video.shape
    x = video.permute(0, 1, 4, 2, 3).reshape(B, T * 3, H, W).float().div_(255)  # frames as channels
    if theta is None:
        theta = torch.eye(2, 3, device=x.device).expand(B, 2, 3)
    grid = F.affine_grid(theta, (B, T * 3, size, size), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    x = x.view(B, T, 3, size, size).transpose(1, 2)                          # [B, 3, T, S, S]
    # per channel with Python scalars: no host-to-device copy of the constants
    stats = zip(IMAGENET_MEAN, IMAGENET_STD)
    return torch.stack([(x[:, c] - m) / s for c, (m, s) in enumerate(stats)], 1)


def normalize_audio(audio, meta):
    """float16 log-mel [B, 128, Ta] -> [B, 1, 128, Ta]: (x - mean) / (2 std) with the train split's
    statistics, as AudioMAE and CAV-MAE."""
    return ((audio.float() - meta["audio_mean"]) / (2 * meta["audio_std"])).unsqueeze(1)

# -----------------------------------------------------------------------------
# Masks. Tokens are numbered video first, then audio: [t, h, w] raster, then [mel, time] raster.
# A mask config picks *target* tokens per clip; the *context* is everything else. The kept tokens of
# every clip are packed into one flat index list with cu_seqlens offsets (kernels.Packed, made by
# kernels.pack): nothing is truncated or padded.

def block_mask(rng, grid_h, grid_w, blocks, scale):
    """Union of `blocks` random rectangles of area scale*h*w on an [h, w] grid (True = target).
    As V-JEPA's multiblock: aspect ratio uniform in ASPECT, sides kept below the grid's."""
    mask = np.zeros((grid_h, grid_w), bool)
    for _ in range(blocks):
        area, ar = scale * grid_h * grid_w, rng.uniform(*ASPECT)
        h = min(max(round(math.sqrt(area * ar)), 1), max(grid_h - 1, 1))
        w = min(max(round(math.sqrt(area / ar)), 1), max(grid_w - 1, 1))
        top, left = rng.integers(0, grid_h - h + 1), rng.integers(0, grid_w - w + 1)
        mask[top:top + h, left:left + w] = True
    return mask


def grid_blocks(blocks, area):
    """V-JEPA's block counts are for its 14 x 14 grid (224 px); elsewhere they scale with the grid's
    area: one block per config on the built-in set's 4 x 4, so that context is left."""
    return max(1, round(blocks * area / 196))


def sample_targets(rng, mask, video_grid, audio_grid):
    """Target mask [Nv + Na] of one clip under the mask config `mask` (its name). Video blocks span
    all time (V-JEPA's temporal scale 1.0); audio blocks are rectangles over (mel, time)."""
    T, H, W = video_grid
    Fa, Ca = audio_grid or (0, 0)
    kind = MASKS[mask].kind
    if kind in ("all_audio", "all_video"):   # one modality is the whole target
        v, a = np.full(T * H * W, kind == "all_video"), np.full(Fa * Ca, kind == "all_audio")
    elif kind in ("future", "later_audio"):   # the later audio columns, and for future the later tubelets.
        # later_audio leaves the whole picture seen: which sound goes with the later picture, its own
        # moment's or an earlier one's, only the earlier sound against the earlier picture can tell, so
        # the context must hold how sight and sound line up (sync)
        v = np.repeat(np.arange(T) >= T - T // 2, H * W) & (kind == "future")
        a = np.tile(np.arange(Ca) >= Ca - Ca // 2, Fa)
    else:
        _, blocks, scale, _ = MASKS[mask]
        v = block_mask(rng, H, W, grid_blocks(blocks, H * W), scale)
        v = np.broadcast_to(v, (T, H, W)).reshape(-1)
        a = block_mask(rng, Fa, Ca, grid_blocks(blocks, Fa * Ca), scale).ravel() if Ca else v[:0]
    return np.concatenate([v, a])


def whole_clips(batch, nv, n_tokens, device, separate):
    """Every token of every clip, packed: one segment per clip, or (separate) one per clip and
    modality, so that video and audio are encoded apart: cu = [0, nv, N, N + nv, 2N, ...]."""
    index = torch.arange(batch * n_tokens, device=device)
    if not separate or nv == n_tokens:
        cu = torch.arange(batch + 1, device=device, dtype=torch.int32) * n_tokens
        return kernels.Packed(index, cu, n_tokens)
    i = torch.arange(2 * batch + 1, device=device)
    cu = (i // 2 * n_tokens + i % 2 * nv).int()   # arithmetic on the device: no copy, no sync
    return kernels.Packed(index, cu, max(nv, n_tokens - nv))


@dataclass
class Masks:
    """One step's masks, packed. Segment s of context and targets: (mask config s // B, clip s % B)."""
    context: kernels.Packed         # the tokens the encoder sees
    context_passes: kernels.Packed  # the same rows, cut where the encoder's attention passes stop
    targets: kernels.Packed         # the tokens the predictor fills in
    target_mask: torch.Tensor       # [Tt] the number of each target's mask config: picks its mask token
    target_modality: torch.Tensor   # [Tt] 0 video, 1 audio
    predictor_max_len: int          # the longest [context ; targets] segment of the predictor

    def to(self, device):
        """On the device, without waiting; where the context passes are the context, moved once."""
        context = self.context.to(device)
        passes = context if self.context_passes is self.context else self.context_passes.to(device)
        return replace(self, context=context, context_passes=passes, targets=self.targets.to(device),
                       target_mask=to_device(self.target_mask, device),
                       target_modality=to_device(self.target_modality, device))


def pack_masks(ctx, tgt, batch, nv, n_tokens, separate=False):
    """Context and target token lists of every (mask config, clip) segment -> Masks. separate: the
    encoder attends within each sense, so its passes are cut where the video ends."""
    packed_ctx, packed_tgt = kernels.pack(ctx, n_tokens, batch), kernels.pack(tgt, n_tokens, batch)
    mask = np.repeat(np.arange(len(tgt)) // batch, [len(x) for x in tgt])                # [Tt]
    modality = (packed_tgt.index.numpy() % n_tokens >= nv).astype(np.int64)               # [Tt]
    passes = kernels.pack(ctx, n_tokens, batch, nv) if separate else packed_ctx
    return Masks(context=packed_ctx, context_passes=passes, targets=packed_tgt,
                 target_mask=torch.from_numpy(mask), target_modality=torch.from_numpy(modality),
                 predictor_max_len=int((packed_ctx.cu.diff() + packed_tgt.cu.diff()).max()))


def sample_masks(rng, cfg, batch, video_grid, audio_grid, has_audio):
    """Sample the context and targets of each (mask config, clip) pair -> Masks (see pack_masks)."""
    nv = math.prod(video_grid)
    N = nv + (math.prod(audio_grid) if audio_grid else 0)
    ctx, tgt = [], []
    for mask in cfg.masks:
        for b in range(batch):
            exists = np.ones(N, bool)
            exists[nv:] = bool(has_audio[b])      # silent clips drop their audio tokens entirely
            for _ in range(20):                   # resample until the context is not empty
                is_target = sample_targets(rng, mask, video_grid, audio_grid) & exists
                if (exists & ~is_target).any():
                    break
            else:  # only a2v on a silent clip: keep one video token visible
                is_target[rng.choice(np.flatnonzero(is_target))] = False
            ctx.append(np.flatnonzero(exists & ~is_target))
            tgt.append(np.flatnonzero(is_target))
    if cfg.truncate:   # V-JEPA's collation, for comparison: cut to their config's batch minimum
        for lists in (ctx, tgt):
            for c in range(0, len(lists), batch):
                keep = min(len(x) for x in lists[c:c + batch])
                lists[c:c + batch] = [x[:keep] for x in lists[c:c + batch]]
    return pack_masks(ctx, tgt, batch, nv, N, cfg.context_pass == "separate" and bool(audio_grid))

# -----------------------------------------------------------------------------
# Positions: fixed sin-cos, V-JEPA's 3D table for video. Audio reuses the same three axes: its time
# axis is measured in tubelets, so an audio column and the video tubelet playing at the same instant
# share their temporal code; its mel band takes the height axis. A learned modality embedding tells
# the two apart.

def sincos(coords, dim):
    """coords [N, 3] (t, h, w) -> [N, dim]: per axis 2*ceil(dim/6) dims of [sin(p w), cos(p w)],
    w_i = 1/10000^(i/(d/2)); concatenated (t, h, w) and cut to dim (V-JEPA, uniform_power=True)."""
    d = 2 * math.ceil(dim / 6)
    omega = 1.0 / 10000 ** (torch.arange(d // 2, dtype=torch.float64) / (d / 2))
    out = coords.double()[:, :, None] * omega                            # [N, 3, d/2]
    return torch.cat([torch.sin(out), torch.cos(out)], -1).flatten(1)[:, :dim].float()


def token_coords(video_grid, audio_grid=None, tubelet_seconds=1.0, audio_patch_seconds=1.0):
    """(t, h, w) coordinates of each token: video in [t, h, w] raster, then audio in [mel, time]."""
    T, H, W = video_grid
    t, h, w = torch.meshgrid(torch.arange(T), torch.arange(H), torch.arange(W), indexing="ij")
    coords = [torch.stack([t, h, w], -1).reshape(-1, 3).double()]
    if audio_grid:
        mel, col = torch.meshgrid(*map(torch.arange, audio_grid), indexing="ij")
        # centre of audio column c, in tubelet units (tubelet t is centred at t + 0.5)
        t_audio = (col.double() + 0.5) * audio_patch_seconds / tubelet_seconds - 0.5
        audio = torch.stack([t_audio, mel.double(), torch.zeros_like(t_audio)], -1)
        coords.append(audio.reshape(-1, 3))
    return torch.cat(coords)

# -----------------------------------------------------------------------------
# Model. Every sequence is packed: x is [total, D], cu_seqlens marking where each segment starts.

class Attention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, cu_seqlens, max_seqlen):
        q, k, v = self.qkv(x).unflatten(-1, (3, self.heads, -1)).unbind(1)   # 3 x [total, H, hd]
        x = kernels.attention(q, k, v, cu_seqlens, max_seqlen)  # each segment to itself
        return self.proj(x.flatten(1))


class MLP(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim, eps=1e-6), nn.LayerNorm(dim, eps=1e-6)
        self.attn, self.mlp = Attention(dim, heads), MLP(dim)

    def forward(self, x, cu_seqlens, max_seqlen):
        x = x + self.attn(self.norm1(x), cu_seqlens, max_seqlen)
        return x + self.mlp(self.norm2(x))


def init_weights(module, blocks):
    """V-JEPA's init: trunc-normal(0.02) weights, zero biases, block outputs by 1/sqrt(2 layer)."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d, nn.Conv3d)):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    for layer, block in enumerate(blocks, start=1):
        block.attn.proj.weight.data.div_(math.sqrt(2.0 * layer))
        block.mlp.fc2.weight.data.div_(math.sqrt(2.0 * layer))


class PatchEmbed(nn.Module):
    """Non-overlapping patches -> tokens by a strided convolution (Conv3d tubelets, Conv2d patches)."""
    def __init__(self, conv, in_ch, dim, kernel):
        super().__init__()
        self.proj = conv(in_ch, dim, kernel_size=kernel, stride=kernel)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)  # [B, N, D] in raster order


class ConvPatchEmbed(nn.Module):
    """A convolutional tokenizer: inside each patch, two 3x3 convolutions at stride 2 (16 -> 8 -> 4 px;
    the second also joins a tubelet's frames), then a linear map to the token. Like PatchEmbed, a token
    sees its own patch only (zero padding at the patch's edges), so nothing of a hidden patch reaches
    a visible token. Unlike it, its filters are shared across the positions inside the patch: an edge,
    or a thing that moved, looks alike wherever it falls, which a linear patch embedding must learn at
    each of its 256 offsets apart (Xiao et al. 2021, "Early convolutions help transformers see better":
    it helps a ViT from scratch on little data)."""
    def __init__(self, conv, in_ch, dim, kernel):
        super().__init__()
        self.kernel, video = kernel, len(kernel) == 3
        k1, k2, stride, pad = ((1, 3, 3), (kernel[0], 3, 3), (1, 2, 2), (0, 1, 1)) if video else (3, 3, 2, 1)
        self.convs = nn.Sequential(conv(in_ch, 32, k1, stride, pad), nn.GELU(),
                                   conv(32, 64, k2, stride, pad), nn.GELU())
        self.proj = nn.Linear(64 * (kernel[-1] // 4) ** 2, dim)

    def init_convs(self):   # He init: the signal keeps its scale through the GELUs
        for m in self.convs:
            if isinstance(m, (nn.Conv2d, nn.Conv3d)):
                nn.init.kaiming_normal_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x):   # [B, C, T, H, W] or [B, 1, 128, Ta] -> [B, N, D], N in raster order
        B, C = x.shape[:2]
        if len(self.kernel) == 3:   # the tokens' rows, (dt, dy, dx, c) -> [B * N, C, dt, dy, dx]
            patches = patchify_video(x).reshape(-1, *self.kernel, C).permute(0, 4, 1, 2, 3)
        else:                       # (mel, time) -> [B * N, 1, mel, time]
            patches = patchify_audio(x).reshape(-1, 1, *self.kernel)
        x = self.convs(patches)                                                    # [B * N, 64, (1,) 4, 4]
        return self.proj(x.flatten(1)).view(B, -1, self.proj.out_features)


class Encoder(nn.Module):
    """The shared ViT of cfg.model over cfg's clips. Video-only with the patch tokenizer, its state
    dict is V-JEPA's VisionTransformer's, key for key."""
    def __init__(self, cfg):
        super().__init__()
        self.cfg, (self.width, depth, self.heads) = cfg, MODELS[cfg.model]
        self.fuse_from = depth - (cfg.fuse if cfg.audio else 0)  # from here on, across the senses
        self.video_grid = (cfg.frames // TUBELET, cfg.size // PATCH, cfg.size // PATCH)
        self.audio_grid = (128 // PATCH, cfg.audio_frames // PATCH) if cfg.audio else None
        Embed = ConvPatchEmbed if cfg.tokenizer == "conv" else PatchEmbed
        self.patch_embed = Embed(nn.Conv3d, 3, self.width, (TUBELET, PATCH, PATCH))
        coords = token_coords(self.video_grid, self.audio_grid, cfg.tubelet_seconds, cfg.audio_patch_seconds)
        pos = sincos(coords, self.width)
        self.nv = math.prod(self.video_grid)
        # each token's moment: its tubelet, or for audio the tubelet its column's centre plays in
        moment = (coords[:, 0] + 0.5).floor().clamp(0, self.video_grid[0] - 1).long()   # [N]
        self.register_buffer("moment", moment, persistent=False)
        # the most tokens one moment holds, for each pass: video alone, audio alone, or both (known
        # here, so that a forward pass never waits for the device to count them)
        self.longest_moment = {(True, False): int(moment[:self.nv].bincount().max())}
        if cfg.audio:
            self.longest_moment[False, True] = int(moment[self.nv:].bincount().max())
            self.longest_moment[True, True] = int(moment.bincount().max())
        self.pos_embed = nn.Parameter(pos[None, :self.nv], requires_grad=False)   # [1, Nv, D]: V-JEPA
        if cfg.audio:
            self.audio_patch_embed = Embed(nn.Conv2d, 1, self.width, (PATCH, PATCH))
            self.register_buffer("audio_pos_embed", pos[None, self.nv:], persistent=False)
            self.modality_embed = nn.Parameter(torch.zeros(2, self.width))   # [video, audio]
        self.blocks = nn.ModuleList(Block(self.width, self.heads) for _ in range(depth))
        self.norm = nn.LayerNorm(self.width, eps=1e-6)
        init_weights(self, self.blocks)
        for m in self.modules():
            if isinstance(m, ConvPatchEmbed):
                m.init_convs()
        if cfg.audio:
            nn.init.trunc_normal_(self.modality_embed, std=0.02)

    def n_tokens(self, audio=True):
        """Tokens per clip: video, plus audio when it is given."""
        return self.nv + (math.prod(self.audio_grid) if audio and self.audio_grid else 0)

    @staticmethod
    def check_shape(name, x, expected):
        """A clip must fit the model's grid: positions go by token number, else silently wrong."""
        if tuple(x.shape[1:]) != tuple(expected):
            raise ValueError(f"{name} of shape {list(x.shape)} does not fit this model, which expects "
                             f"[batch, {', '.join(map(str, expected))}]")

    def embed(self, video=None, audio=None):
        """Patch tokens [B, N, D] of the given modalities, and their positions [N, D]."""
        tokens, pos = [], []
        c = self.cfg
        if video is not None:
            self.check_shape("video", video, (3, c.frames, c.size, c.size))
            tokens.append(self.patch_embed(video))
            pos.append(self.pos_embed[0] + (self.modality_embed[0] if self.audio_grid else 0))
        if audio is not None:
            if not self.audio_grid:
                raise ValueError("this encoder was built for video only, and was given audio")
            self.check_shape("audio", audio, (1, 128, c.audio_frames))
            tokens.append(self.audio_patch_embed(audio))
            pos.append(self.audio_pos_embed[0] + self.modality_embed[1])
        return torch.cat(tokens, 1), torch.cat(pos, 0)

    def forward(self, video=None, audio=None, segments=None, fused_segments=None, average_last=1):
        """video [B, 3, T, H, W] and/or audio [B, 1, 128, Ta]. segments=None: every token of every
        clip, returns [B, N, D]. segments (kernels.Packed): only those rows of the flattened [B * N]
        tokens, each segment attending within itself, returns [total, D]. fused_segments: the same
        rows cut into whole clips, for the last `fuse` blocks (segments may be one per sense).
        average_last=k > 1: the mean of the last k blocks' outputs, each layer-normed (data2vec)."""
        x, pos = self.embed(video, audio)
        B, N, D = x.shape
        index, cu, max_len = segments or whole_clips(B, N, N, x.device, separate=False)
        # Only the kept tokens go on: the context encoder never sees a target, so nothing about the
        # hidden pixels can reach the context features (a test checks it)
        if self.cfg.moment_blocks:   # rows sorted by moment within each segment, so that a moment is a segment too
            moment = self.moment if video is not None else self.moment[self.nv:]   # audio alone: its own
            order, cu_moments = by_moment(index, cu, moment[index % N], self.video_grid[0])
            moments = (cu_moments, self.longest_moment[video is not None, audio is not None])
            index = index[order]
        x = kernels.gather(x.reshape(B * N, D), index, pos.to(x.dtype))  # x[index] + pos[index % N]
        earlier = []   # the outputs of the blocks averaged with the last (average_last > 1), normed
        for i, block in enumerate(self.blocks):
            if i == self.fuse_from and fused_segments is not None:   # late fusion: the senses meet
                cu, max_len = fused_segments.cu, fused_segments.max_len
            x = block(x, *(moments if i < self.cfg.moment_blocks else (cu, max_len)))
            if len(self.blocks) - average_last <= i < len(self.blocks) - 1:
                earlier.append(F.layer_norm(x, (D,)))
        x = self.norm(x)
        if earlier:
            x = torch.stack(earlier + [F.layer_norm(x, (D,))]).mean(0)
        if self.cfg.moment_blocks:   # back to the rows' order
            x = torch.empty_like(x).index_copy(0, order, x)
        return x.view(B, N, D) if segments is None else x


def by_moment(index, cu, moment, n_moments):
    """Divided attention over time (TimeSformer's, here across the senses): the rows of each segment
    cut by moment, so that the first blocks join what is seen and heard at the same instant before any
    block relates instants to one another. index [R] rows, cu [S + 1] segments, moment [R] each row's
    moment. Returns the order that sorts each segment's rows by moment (a segment's rows stay in its
    span, so cu still cuts the sorted rows) and the cu of the moments as segments."""
    segment = kernels.segment_ids(cu, len(index))                             # [R]
    key = segment * n_moments + moment                                       # [R]
    order = torch.argsort(key, stable=True)
    counts = torch.bincount(key, minlength=(len(cu) - 1) * n_moments)
    counts = counts[counts > 0]                                              # moments a segment lacks
    return order, F.pad(counts.cumsum(0), (1, 0)).int()


def predictor_slots(ctx, tgt):
    """Where each context and target row goes when every segment becomes [its context ; its
    targets]. A row's slot is its place among its own kind plus the rows of the other kind before
    it: for a context row of segment s, every target of the segments before s (tgt.cu[s]); for a
    target row, every context row up to and including its own segment (ctx.cu[s + 1]). Two segments,
    contexts of 3 and 2 rows (cu [0, 3, 5]), targets of 1 and 2 (cu [0, 1, 3]):
        packed sequence  c0 c1 c2 t0 | c3 c4 t1 t2    cu = ctx.cu + tgt.cu = [0, 4, 8]
        ctx_slot = [0, 1, 2, 3, 4] + [0, 0, 0, 1, 1] = [0, 1, 2, 4, 5]
        tgt_slot = [0, 1, 2] + [3, 5, 5]             = [3, 6, 7]"""
    ctx_slot = torch.arange(len(ctx.index), device=ctx.index.device) + tgt.cu[ctx.segment_ids()]
    tgt_slot = torch.arange(len(tgt.index), device=tgt.index.device) + ctx.cu[tgt.segment_ids() + 1]
    return ctx_slot, tgt_slot


class Predictor(nn.Module):
    """Narrow ViT over [context ; mask tokens] per segment: predicts the targets' embeddings."""
    def __init__(self, cfg, encoder):
        super().__init__()
        width, depth = predictor_size(cfg)
        coords = token_coords(encoder.video_grid, encoder.audio_grid, cfg.tubelet_seconds,
                              cfg.audio_patch_seconds)
        self.register_buffer("pos_embed", sincos(coords, width), persistent=False)  # [N, Dp]
        # --pred-moment-blocks: each token's moment, as the encoder counts them; a segment here holds
        # a clip's context and targets, each token at most once, so a moment holds at most all of its own
        self.moment_blocks, self.n_moments = cfg.pred_moment_blocks, encoder.video_grid[0]
        self.register_buffer("moment", encoder.moment.clone(), persistent=False)   # [N]
        self.longest_moment = encoder.longest_moment[True, bool(encoder.audio_grid)]
        self.predictor_embed = nn.Linear(encoder.width, width)
        # one learned mask token per mask config and modality, zero at start (V-JEPA)
        self.mask_tokens = nn.Parameter(torch.zeros(len(cfg.masks), 2 if encoder.audio_grid else 1, width))
        self.blocks = nn.ModuleList(Block(width, encoder.heads) for _ in range(depth))
        self.norm = nn.LayerNorm(width, eps=1e-6)
        self.predictor_proj = nn.Linear(width, encoder.width)
        # --reg-on projector: SIGReg reads the context through this MLP, trained by SIGReg alone
        D = encoder.width
        self.projector = (nn.Sequential(nn.Linear(D, 2 * D), nn.GELU(), nn.Linear(2 * D, D))
                          if cfg.reg_on == "projector" else None)
        init_weights(self, self.blocks)

    def forward(self, context, masks):
        """context [Tc, D] packed encoder output -> predictions [Tt, D] for the packed targets."""
        N = self.pos_embed.shape[0]
        ctx, tgt = masks.context, masks.targets
        if context.shape != (len(ctx.index), self.predictor_embed.in_features):
            raise ValueError(f"context of shape {list(context.shape)} does not fit the masks and this "
                             f"predictor, which expect [{len(ctx.index)}, {self.predictor_embed.in_features}]")
        # the context with its positions; a mask token (of the target's config and modality) with
        # its position in place of each target. kernels.gather(x, rows) is x[rows], fused
        pos_ctx, pos_tgt = (kernels.gather(self.pos_embed, p.index % N) for p in (ctx, tgt))
        x_ctx = self.predictor_embed(context) + pos_ctx                                   # [Tc, Dp]
        x_tgt = self.mask_tokens[masks.target_mask, masks.target_modality] + pos_tgt     # [Tt, Dp]
        ctx_slot, tgt_slot = predictor_slots(ctx, tgt)   # interleave: x[slot] = row, fused
        x = kernels.scatter(torch.cat([x_ctx, x_tgt]), torch.cat([ctx_slot, tgt_slot]),
                            len(ctx_slot) + len(tgt_slot))
        cu, max_len = ctx.cu + tgt.cu, masks.predictor_max_len
        if self.moment_blocks:   # rows sorted by moment within each segment (by_moment, as the encoder)
            token = torch.empty(len(x), dtype=torch.long, device=x.device)     # each row's token number
            token[ctx_slot], token[tgt_slot] = ctx.index % N, tgt.index % N
            order, cu_moments = by_moment(token, cu, self.moment[token], self.n_moments)
            x = x[order]
        for i, block in enumerate(self.blocks):
            x = block(x, *((cu_moments, self.longest_moment) if i < self.moment_blocks else (cu, max_len)))
        if self.moment_blocks:   # back to the rows' order
            x = torch.empty_like(x).index_copy(0, order, x)
        return self.predictor_proj(self.norm(kernels.gather(x, tgt_slot)))  # [Tt, D]


class JEPA(nn.Module):
    """The trained half: context encoder + predictor (one module, so DDP syncs both)."""
    def __init__(self, encoder, predictor):
        super().__init__()
        self.encoder, self.predictor = encoder, predictor

    def forward(self, video, audio, masks):
        """-> the predictions [Tt, D] and what the anti-collapse term reads: the context [Tc, D], or
        its projection (--reg-on projector)."""
        context = self.encoder(video, audio, masks.context_passes, masks.context)  # [Tc, D]
        projector = self.predictor.projector
        return self.predictor(context, masks), context if projector is None else projector(context)


def build(cfg):
    """Encoder, predictor and EMA target encoder of a Config."""
    encoder = Encoder(cfg)
    predictor, target_encoder = Predictor(cfg, encoder), Encoder(cfg)   # in the seed's init order
    target_encoder.load_state_dict(encoder.state_dict())
    target_encoder.requires_grad_(False)   # stop-gradient: no optimizer updates it, the EMA does
    return encoder, predictor, target_encoder

# -----------------------------------------------------------------------------
# Loss and schedules

def target_weights(masks, n_masks):
    """Each target's weight in the loss [Tt], summing to 1: every mask config counts the same, and
    within a config video and audio each count the same whatever their token counts, so that the few
    audio tokens are not drowned by the many video ones. Counted on the device: nothing waits."""
    group = masks.target_mask * 2 + masks.target_modality                  # [Tt] (config, sense)
    count = torch.zeros(2 * n_masks, dtype=torch.float64, device=group.device)
    count.index_add_(0, group, torch.ones_like(group, dtype=torch.float64))   # targets per group
    senses = (count.view(n_masks, 2) > 0).sum(1)                          # senses with targets
    return (1.0 / count[group] / senses[masks.target_mask] / n_masks).float()


def jepa_loss(pred, targets, masks, n_masks):
    """The JEPA loss: L1 distance between predicted and target features, a weighted mean over the
    target tokens (target_weights). Returns it and, for the log, the plain mean per modality
    (video, audio; nan if it has none)."""
    err = (pred.float() - targets.float()).abs().mean(-1)  # [Tt] L1 of each target
    audio = masks.target_modality.float()
    per_modality = [(err * m).sum() / m.sum() for m in (1 - audio, audio)]   # video, audio
    return (target_weights(masks, n_masks) * err).sum(), *per_modality


def clip_contrast(pred, targets, masks, batch, moment=None, n_moments=1, temperature=0.05):
    """InfoNCE between pooled predictions and targets: per (mask config, modality), a clip's mean
    prediction over its hidden tokens must be nearer (cosine) its own mean target than the batch's
    other clips', both ways (CAV-MAE). L1 alone is content with the median of what the context
    allows, nearly the same for every clip; this asks each prediction to tell its clip apart.
    moment [Tt] (--nce-per moment): pooled per moment of each clip instead, so that the negatives
    are also the same clip's other moments (Synchformer's segment-level contrast): the predicted
    sound of one moment must tell the sound then from the sound a moment later."""
    M = n_moments if moment is not None else 1
    group = masks.targets.segment_ids() * 2 + masks.target_modality  # [Tt] (config, clip, modality)
    group = group * M + (moment if moment is not None else 0)        # ... and moment
    G = len(masks.targets.cu) - 1                                               # configs x clips
    n = batch * M                                                               # parts per config

    def pool(x):  # [Tt, d] -> [configs, 2, B * M, d]
        s = x.new_zeros(2 * G * M, x.shape[-1]).index_add_(0, group, x)
        return s.view(G // batch, batch, 2, M, -1).transpose(1, 2).flatten(2, 3)
    count = pool(torch.ones_like(pred[:, :1], dtype=torch.float)).squeeze(-1) > 0  # [configs, 2, n]
    p, t = F.normalize(pool(pred.float()), dim=-1), F.normalize(pool(targets.float()), dim=-1)
    both = count[..., :, None] & count[..., None, :]  # both parts exist
    logits = (p @ t.transpose(-1, -2) / temperature).masked_fill(~both, -1e4)   # [configs, 2, n, n]
    pair = count & (count.sum(-1, keepdim=True) > 1)  # a part with others to tell from
    labels = torch.arange(n, device=pred.device).expand_as(count)
    loss = F.cross_entropy(logits.flatten(0, 2), labels.flatten(), reduction="none") + (
        F.cross_entropy(logits.transpose(-1, -2).flatten(0, 2), labels.flatten(), reduction="none"))
    return (loss * pair.flatten()).sum() / pair.sum().clamp(min=1) / 2


def sigreg(x, directions=256, knots=17):
    """LeJEPA's SIGReg: how far the rows of x [n, D] are from an isotropic standard Gaussian. x is
    projected on random unit directions (new ones each call); for each 1-D projection the
    Epps-Pulley statistic n * integral |phi_hat(t) - exp(-t^2/2)|^2 w(t) dt compares its empirical
    characteristic function with the Gaussian's, on 17 trapezoid knots over [0, 3] with the Gaussian
    window w. Collapsed features (all rows alike, or a few directions only) are far from it."""
    x = x.float()
    a = torch.randn(x.shape[1], directions, device=x.device)
    proj = x @ (a / a.norm(dim=0))                                        # [n, M]
    t = torch.linspace(0, 3, knots, device=x.device)
    xt = proj[..., None] * t                                              # [n, M, K]
    gauss = torch.exp(-t ** 2 / 2)
    err = (xt.cos().mean(0) - gauss) ** 2 + xt.sin().mean(0) ** 2          # [M, K]
    # LeJEPA multiplies by n; the mean alone keeps --reg-weight independent of the token count
    return torch.trapezoid(err * gauss, t, dim=-1).mean()


def schedules(step, cfg):
    """lr, weight decay and EMA momentum at `step`. vjepa1: warmup then cosine lr, cosine weight
    decay up, linear EMA up, over steps * schedule_scale (V-JEPA stretches by 1.25 and stops at
    80%). vjepa2: warmup, then a constant lr, weight decay and EMA (V-JEPA 2), and a linear
    cool-down of the lr over the last --cooldown of the steps."""
    v2 = cfg.schedule == "vjepa2"
    total = cfg.steps * (1 if v2 else cfg.schedule_scale)
    warm, cool = cfg.warmup * total, (1 - cfg.cooldown) * cfg.steps
    if step < warm:
        lr = cfg.start_lr + (cfg.lr - cfg.start_lr) * step / warm
    elif v2:   # constant, then the cool-down
        lr = cfg.lr + (cfg.final_lr - cfg.lr) * max(step - cool, 0) / max(cfg.steps - cool, 1)
    else:
        cos = math.cos(math.pi * (step - warm) / (total - warm))
        lr = cfg.final_lr + 0.5 * (cfg.lr - cfg.final_lr) * (1 + cos)
    ema = cfg.ema or ema_range(cfg.steps)
    if v2:
        return lr, cfg.wd[0], ema[0]
    wd = cfg.wd[1] + 0.5 * (cfg.wd[0] - cfg.wd[1]) * (1 + math.cos(math.pi * step / total))
    ema = ema[0] + (ema[1] - ema[0]) * step / total
    return lr, wd, ema

# -----------------------------------------------------------------------------
# Training loop

@torch.no_grad()   # stop-gradient: the targets are constants to the loss; no grad reaches them
def target_features(target_encoder, video, audio, cfg):
    """The targets: layer-normed features [B, N, D] of the EMA target encoder over whole clips, each
    sense in an attention pass of its own (--target-pass separate) or both in one. --target-layers
    k > 1: the mean of the last k blocks (data2vec 2.0), which holds detail the last alone may drop."""
    B, D, nv = video.shape[0], target_encoder.width, target_encoder.nv
    N = target_encoder.n_tokens(audio is not None)
    whole = whole_clips(B, nv, N, video.device, cfg.target_pass == "separate")
    joint = whole_clips(B, nv, N, video.device, False)
    feats = target_encoder(video, audio, whole, joint, average_last=cfg.target_layers)
    return F.layer_norm(feats.float(), (D,)).view(B, N, D)


@torch.no_grad()
def ema_update(target_encoder, encoder, momentum):
    """target_encoder <- momentum * target_encoder + (1 - momentum) * encoder, in one call."""
    torch._foreach_lerp_(list(target_encoder.parameters()), list(encoder.parameters()), 1 - momentum)


def step_loss(model, target_encoder, video, audio, masks, cfg):
    """The forward half of a step: targets -> prediction -> loss. What --compile compiles, as one
    graph. Returns (loss, video loss, audio loss, target features [B, N, D])."""
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=video.is_cuda):
        target_feats = target_features(target_encoder, video, audio, cfg)
        pred, context = model(video, audio, masks)                              # [Tt, D], [Tc, D]
        targets = kernels.gather(target_feats.flatten(0, 1), masks.targets.index)   # [Tt, D], fused
        loss, loss_v, loss_a = jepa_loss(pred, targets, masks, len(cfg.masks))
        if cfg.reg == "sigreg":   # keeps the context features spread out (README: what helps)
            loss = loss + cfg.reg_weight * sigreg(context)
        if cfg.nce_weight:        # predictions that tell clips (or moments) apart
            moment = None
            if cfg.nce_per == "moment":   # each target's moment: its tubelet, or when its sound plays
                moment = target_encoder.moment[masks.targets.index % target_feats.shape[1]]
            loss = loss + cfg.nce_weight * clip_contrast(pred, targets, masks, video.shape[0], moment,
                                                         target_encoder.video_grid[0])
    return loss, loss_v, loss_a, target_feats


def train_step(model, target_encoder, opt, video, audio, masks, momentum, cfg, loss_fn=step_loss):
    """One JEPA step: targets -> prediction -> loss -> update -> EMA. model is the JEPA (maybe in
    DDP); loss_fn is step_loss, or its compiled self. Returns what step_loss does. Nothing here
    waits for the device: the loop checks that the loss stayed finite on log and save steps."""
    jepa = getattr(model, "module", model)
    loss, loss_v, loss_a, target_feats = loss_fn(model, target_encoder, video, audio, masks, cfg)
    opt.zero_grad(set_to_none=True)
    loss.backward()   # into the encoder and the predictor only: the targets carry no graph
    if cfg.clip_grad:
        torch.nn.utils.clip_grad_norm_(jepa.parameters(), cfg.clip_grad)
    opt.step()
    ema_update(target_encoder, jepa.encoder, momentum)   # the teacher follows the student, slowly
    return loss, loss_v, loss_a, target_feats


def make_optimizer(model, lr):
    """AdamW (0.9, 0.999); as V-JEPA, biases and norms get no weight decay (their group's "decay" is
    False). On CUDA the fused kernel: one launch for the update instead of several per tensor."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]   # biases, norms
    return torch.optim.AdamW([{"params": decay, "decay": True},
                              {"params": no_decay, "decay": False, "weight_decay": 0.0}], lr=lr,
                             betas=(0.9, 0.999), fused=next(model.parameters()).is_cuda or None)


def train(argv=None):
    cfg = get_config(argv)
    device, rank, world = setup_process(cfg.device, cfg.deterministic, cfg.seed)
    data = load_split(cfg.data, "train")
    if data["n"] == 0:
        raise SystemExit(f"{cfg.data} has no training clips: rerun prepare.py")
    cfg = cfg.with_data(data["meta"])
    encoder, predictor, target_encoder = build(cfg)
    jepa, target_encoder = JEPA(encoder, predictor).to(device), target_encoder.to(device)
    opt = make_optimizer(jepa, cfg.lr)   # after the move: a fused optimizer needs them there
    model = ddp(jepa, device)   # under torchrun, the JEPA whose gradients the processes average
    loss_fn = torch.compile(step_loss, dynamic=True) if cfg.compile else step_loss

    clips_of = partial(batch_indices, data["n"], cfg.batch_size, seed=cfg.seed, rank=rank, world=world)

    def make_batch(s):   # step s's clips, masks and crops, made in the prefetch thread, sent without
        # waiting; all that is random comes from (seed, step, rank), so a resumed run replays it
        rng, idx = np.random.default_rng([cfg.seed, s, rank]), clips_of(s)
        heard = data["has_audio"][idx].astype(bool) & cfg.audio
        masks = sample_masks(rng, cfg, len(idx), encoder.video_grid, encoder.audio_grid, heard)
        return get_batch(data, idx, device), masks.to(device), to_device(crop_params(rng, len(idx)), device)

    run = Run(cfg, (encoder, predictor, target_encoder), opt, device, rank, world, data, clips_of, Config.of)
    if rank == 0:   # masks.png: the first clip under each mask config's targets, in its colour
        rng, grids = np.random.default_rng(cfg.seed), (encoder.video_grid, encoder.audio_grid)
        drawn = {m: (MASKS[m].colour, sample_targets(rng, m, *grids)) for m in cfg.masks}
        plot_masks(run.dir / "masks.png", data, cfg.audio, *grids, drawn)
    try:
        steps = range(run.start, cfg.steps)
        for s, (batch, masks, theta) in zip(steps, prefetch(make_batch, steps)):
            lr, wd, momentum = schedules(s, cfg)
            for g in opt.param_groups:
                g["lr"], g["weight_decay"] = lr, (wd if g["decay"] else 0.0)
            video = augment_video(batch["video"], cfg.size, theta)
            audio = normalize_audio(batch["audio"], data["meta"]) if cfg.audio else None
            *losses, target_feats = train_step(model, target_encoder, opt, video, audio, masks,
                                               momentum, cfg, loss_fn)
            log, stop = run.step(s, losses[0])   # saves on save steps; stop: Ctrl-C or SIGTERM came
            if log:   # the losses, schedules, collapse monitor and speed
                run.write(s, losses, (lr, wd, momentum), target_feats, masks, batch["has_audio"])
            if stop:   # finish saves, draws the curves, sums up, and exits with 128 + the signal
                break
    finally:
        run.close()
    run.finish(encoder.width)
    return encoder, predictor, target_encoder

# -----------------------------------------------------------------------------
# Using what you trained: the frozen EMA encoder as a feature extractor

def load_encoder(path, device="cpu"):
    """The frozen target encoder of a checkpoint, in eval mode: `load_encoder(p)(video, audio)`
    gives features. Reads our checkpoints and V-JEPA's (.pth.tar; common.encoder_weights strips its
    key prefixes); a V-JEPA encoder's size comes from its tensor shapes (common.vjepa_shapes)."""
    ckpt = read_checkpoint(path)
    sd = encoder_weights(ckpt, path)
    encoder = Encoder(Config.of(ckpt) if "config" in ckpt else Config(**vjepa_shapes(sd, path, MODELS)))
    try:
        encoder.load_state_dict(sd)
    except RuntimeError as e:
        raise SystemExit(f"{path} does not fit the encoder it describes: {str(e).splitlines()[0]}")
    return encoder.to(device).eval().requires_grad_(False)


if __name__ == "__main__":
    train()
