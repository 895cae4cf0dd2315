"""
What every avjepa script shares, and none of it is the method: the clips' patch layout, argparse
range types and device checks, the arrays' reader, atomic writes, checkpoints (reading, resuming,
V-JEPA's format), processes under torchrun, a run's bookkeeping (its lock, log, FLOP count, collapse
monitor, stop signals), plots, and the pictures, video and sound written for people. As nanoGPT
keeps configurator.py beside train.py, this keeps the plumbing beside avjepa.py, so that the method
reads without it. It imports nothing of the project: prepare.py, avjepa.py and probe.py build on it.
"""
import argparse
import errno
import fcntl
import hashlib
import io
import glob
import json
import math
import os
import pickle
import queue
import shutil
import signal
import socket
import threading
import time
import warnings
import wave
from dataclasses import asdict
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

# The clip geometry every script agrees on: a video tubelet is 2 frames x 16 x 16 pixels, an audio
# patch 16 mel bins x 16 frames; and how the pixels and log-mel of a clip are laid out as its
# tokens' patches (probe.py's decoder draws them).
TUBELET, PATCH = 2, 16


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
    x = p.reshape(len(p), M // PATCH, Ta // PATCH, PATCH, PATCH)
    return x.permute(0, 1, 3, 2, 4).reshape(len(p), 1, M, Ta)


# -----------------------------------------------------------------------------
# Flags and devices

# dense bf16 peak by device-name substring, first match wins (so the PCIe H100 is not taken for an SXM)
GPU_PEAK_FLOPS = {"H100 PCIe": 756e12, "H100": 989e12, "H200": 989e12, "A100": 312e12,
                  "L40S": 362e12, "4090": 165e12}


def number(kind, low=-math.inf, high=math.inf, above=None):
    """An argparse type: a `kind` (int or float) in [low, high], or greater than `above`. A value
    out of range is an argparse error that names the flag and the range (exit 2), never a traceback
    later on."""
    rule = f"> {above}" if above is not None else f"in [{low}, {high}]" if high < math.inf else f">= {low}"
    def parse(text):
        try:
            x = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not "
                                             f"{'an integer' if kind is int else 'a number'}")
        if not (x > above if above is not None else low <= x <= high):   # NaN fails both
            raise argparse.ArgumentTypeError(f"{text} is out of range: it must be {rule}")
        return x
    parse.__name__ = kind.__name__
    return parse


COUNT, NONNEG_INT, POSITIVE = number(int, 1), number(int, 0), number(float, above=0.0)
NONNEG, FRACTION = number(float, 0.0), number(float, 0.0, 1.0)


def check_device(p, device):
    """--device names a device this machine has, or argparse says which it has."""
    try:
        dev = torch.device(device or "cpu")
    except RuntimeError:
        p.error(f"argument --device: {device!r} is not a device: use cpu, cuda or cuda:N")
    if dev.type not in ("cpu", "cuda"):
        p.error(f"argument --device: {device!r}: use cpu, cuda or cuda:N")
    if dev.type == "cuda" and (dev.index or 0) >= torch.cuda.device_count():
        p.error(f"argument --device: {device} is not available here "
                f"({torch.cuda.device_count()} CUDA devices): use cpu")


# -----------------------------------------------------------------------------
# Data: prepare.py's flat memmaps, video uint8 [N, T, H, W, 3], log-mel float16 [N, 128, Ta]

def load_split(root, split):
    """Memmaps of one split of a prepare.py dataset, plus its meta.json; a clear exit if it is not
    one."""
    root = Path(root)
    if not (root / "meta.json").exists():
        raise SystemExit(f"no dataset at {root}: run `python prepare.py` (synthetic default) "
                         f"or `python prepare.py --videos PATH --out {root}` first")
    try:
        meta = json.loads((root / "meta.json").read_text())
        n = meta["splits"][split]
        T, H, W, C = meta["video_shape"]
        if meta["frames"] % TUBELET or meta["size"] % PATCH:   # what the models cut clips into
            raise ValueError(f"its clips are {meta['frames']} frames of {meta['size']} px, and "
                             f"both must be multiples of the tubelet's {TUBELET} frames x {PATCH} x "
                             f"{PATCH} px")
        if (T, H, W, C) != (meta["frames"], meta["size"], meta["size"], 3) or meta["audio_shape"][0] != 128:
            raise ValueError(f"meta.json's video_shape {meta['video_shape']} and audio_shape "
                             f"{meta['audio_shape']} do not match its frames {meta['frames']} and "
                             f"size {meta['size']} (expected [{meta['frames']}, {meta['size']}, "
                             f"{meta['size']}, 3] and [128, time])")
        def mm(name, dtype, shape=()):
            path = root / f"{split}_{name}.bin"
            if path.stat().st_size != n * math.prod(shape) * np.dtype(dtype).itemsize:
                raise ValueError(f"{path.name} holds {path.stat().st_size} bytes, not the {n} "
                                 f"clips of {shape} {np.dtype(dtype).name} that meta.json "
                                 "describes")
            if not n:
                return np.zeros((0, *shape), dtype)
            return np.memmap(path, dtype=dtype, mode="r", shape=(n, *shape))
        for key in ("audio_mean", "audio_std"):
            value = meta[key]
            finite = isinstance(value, (int, float)) and math.isfinite(value)
            if not finite or key == "audio_std" and value <= 0:
                raise ValueError(f"meta.json's {key} is {value}, not a finite number (and "
                                 "audio_std above 0)")
        label = mm("label", np.int64)
        classes = len(meta.get("classes") or [])
        bad = np.flatnonzero((label < -1) | (label >= classes)) if classes and n else []
        if len(bad):
            raise ValueError(f"{split} clip {bad[0]} has label {label[bad[0]]}, outside the "
                             f"{classes} classes of meta.json (0 to {classes - 1}, or -1 for "
                             f"none); {len(bad)} such clips")
        return dict(meta=meta, n=n, video=mm("video", np.uint8, meta["video_shape"]),
                    audio=mm("audio", np.float16, meta["audio_shape"]), label=label,
                    has_audio=mm("has_audio", np.uint8))
    except (OSError, ValueError, KeyError) as e:   # a missing file, a short array, a missing key
        why = f"{root / 'meta.json'} has no {e}" if isinstance(e, KeyError) else str(e)
        raise SystemExit(f"the dataset at {root} is incomplete or not prepare.py's: {why}. Rerun "
                         "`python prepare.py` for it (it writes the arrays and meta.json "
                         "together)")


def to_device(x, device):
    """x on the device, without waiting: a host tensor bound for a GPU goes through page-locked
    memory, from which the copy runs in the background (non_blocking). Copies to the host wait, so
    they can be read."""
    device = torch.device(device)
    if x.device.type == "cpu" and device.type == "cuda":
        x = x.pin_memory()
    return x.to(device, non_blocking=device.type == "cuda")


def get_batch(data, idx, device):
    """Clips idx of a split, in that order, as tensors on the device (video still uint8; augmented
    there)."""
    def t(a):
        return to_device(torch.from_numpy(np.ascontiguousarray(a[idx])), device)
    return dict(video=t(data["video"]), audio=t(data["audio"]), label=t(data["label"]),
                has_audio=t(data["has_audio"]).bool())


def prefetch(make, steps, depth=2):
    """Yield make(step) for each step, built ahead in a background thread (reads overlap
    compute)."""
    q = queue.Queue(depth)
    def worker():
        try:
            for s in steps:
                q.put(make(s))
            q.put(None)
        except BaseException as e:   # handed to the main thread, which would otherwise wait forever
            q.put(e)
    threading.Thread(target=worker, daemon=True).start()
    while (item := q.get()) is not None:
        if isinstance(item, BaseException):
            raise item
        yield item


def setup_process(device_flag, deterministic=False, seed=0):
    """(device, rank, world size): one process, or under torchrun one per GPU (gloo on CPUs), torch's
    RNG seeded. deterministic: kernels that give bit-identical results from run to run."""
    torch.manual_seed(seed)
    if deterministic:   # cuBLAS needs a fixed workspace for it; set before its first use
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    if "RANK" not in os.environ:
        return torch.device(device_flag or ("cuda" if torch.cuda.is_available() else "cpu")), 0, 1
    import torch.distributed as dist
    cuda = torch.cuda.is_available() and device_flag != "cpu"
    dist.init_process_group("nccl" if cuda else "gloo")
    device = torch.device(f"cuda:{int(os.environ['LOCAL_RANK'])}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    return device, dist.get_rank(), dist.get_world_size()


def ddp(model, device):
    """The model as torchrun's processes train it (DistributedDataParallel: gradients averaged
    across processes in backward), or itself in a single process."""
    if not torch.distributed.is_initialized():
        return model
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def peak_flops(device):
    """The device's dense bf16 peak (GPU_PEAK_FLOPS), None where unknown (CPUs): the MFU's
    denominator."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else ""
    return next((v for k, v in GPU_PEAK_FLOPS.items() if k in name), None)


# -----------------------------------------------------------------------------
# Files: atomic writes and checkpoints

def process_alive(pid):
    try:
        os.kill(pid, 0)   # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:
        return True       # it exists, under another user
    return True


def remove_stale(pattern):
    """Remove the temporaries '<anything>.tmp-<pid>' matching a glob pattern whose process is gone:
    a process killed outright (kill -9, power loss) never reaches its cleanup. Those of live
    processes stay."""
    for stale in glob.glob(pattern):
        pid = stale.rsplit(".tmp-", 1)[-1]
        if pid.isdigit() and not process_alive(int(pid)):
            shutil.rmtree(stale, ignore_errors=True) if os.path.isdir(stale) else os.remove(stale)


def disk_full(e):
    """Whether an exception says the disk (or the user's quota) is full."""
    while e is not None:
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        # torch.save's own words for it
        if "No space left on device" in str(e) or "unexpected pos" in str(e):
            return True
        e = e.__cause__ or e.__context__
    return False


def no_space(path, needed=None, survives=""):
    """The message for a disk that filled up while writing `path`: what, where, how much, what
    survives (a string, or a function that says it, so that nothing is read for it unless the disk
    is full)."""
    survives = survives() if callable(survives) else survives
    free = shutil.disk_usage(Path(path).parent if Path(path).parent.exists() else ".").free
    need = f"about {needed / 1e6:.0f} MB needed, " if needed else ""
    return (f"no space left on the disk to write {path} ({need}{free / 1e6:.0f} MB free): "
            f"{survives or 'nothing was written'}. Free some space and rerun")


def check_space(path, needed, survives=""):
    """Fail early, before a large write of about `needed` bytes into `path`'s folder, if it cannot
    fit."""
    folder = Path(path).parent
    while not folder.exists():
        folder = folder.parent
    if shutil.disk_usage(folder).free < needed:
        raise SystemExit(no_space(path, needed, survives))


def write_atomic(path, write, needed=None, survives=""):
    """write(tmp) then rename: a crash never leaves half a file (checkpoint, result, picture) under
    the real name. A full disk ends the process with one line naming the path (and the bytes needed,
    if known) and what survives, the temporary removed; `needed` also checks the free space
    first."""
    remove_stale(f"{glob.escape(str(path))}.tmp-*")
    if needed:
        check_space(path, needed, survives)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        write(tmp)
        os.replace(tmp, path)
    except Exception as e:
        if disk_full(e):   # the temporary goes in `finally`, as after any failure
            raise SystemExit(no_space(path, needed, survives)) from None
        raise
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def read_checkpoint(path, digest=False):
    """A checkpoint's contents, read as tensors and plain values only (weights_only: no code runs on
    load). digest=True: also the SHA-256 of the very bytes the weights came from, a key that a save
    landing at the same moment cannot make wrong. Returns the contents, or (contents, digest)."""
    if not Path(path).is_file():
        raise SystemExit(f"no checkpoint at {path}: pass a run's ckpt.pt (out/<name>/ckpt.pt) or "
                         "a V-JEPA .pth.tar")
    try:
        if digest:
            # one read: the weights and the key come from the same bytes
            raw = Path(path).read_bytes()
            return torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True), hashlib.sha256(raw).hexdigest()
        return torch.load(path, map_location="cpu", weights_only=True)
    # zip, EOF, decode and key errors: whatever a file that is not a checkpoint raises
    except Exception as e:
        # a class, not a tensor
        if isinstance(e, pickle.UnpicklingError) and "Unsupported global" in str(e):
            raise SystemExit(f"{path} holds Python objects besides tensors and plain values, and "
                             "avjepa loads only those (a checkpoint must not run code when read): "
                             "save its state dicts alone with torch.save") from None
        raise SystemExit(f"{path} is not a checkpoint: it is not a file written by torch.save, or "
                         "it was cut short. Pass a run's ckpt.pt (out/<name>/ckpt.pt) or a V-JEPA "
                         ".pth.tar") from None


def check_resume(path, step, old, new, may_change=(), ignore=()):
    """A run resumes only with the settings it was trained with (old, new: dicts): exit naming each
    changed one's old and new value, except the may_change ones, which are printed; `ignore` says
    where the run is, not how it trains."""
    def flag(key):
        return f"--{key.replace('_', '-')}"
    changed = [f"{flag(k)} {old.get(k)}, not {v}" for k, v in new.items()
               if old.get(k) != v and k not in may_change + ignore]
    if changed:
        raise SystemExit(f"{path} was trained with other settings: {'; '.join(changed)}. Resume "
                         "with the flags it was trained with, or start a new --name")
    moved = [f"{flag(k)} {old[k]} -> {new[k]}" for k in may_change if k in old and old[k] != new[k]]
    print(f"resuming {path} at step {step}" + (f", with {', '.join(moved)}" if moved else ""))


def save_checkpoint(path, modules, opt, step, config):
    """modules (name -> nn.Module) by their state dicts, the optimizer, step, the run's config (a
    dict) and the RNG."""
    ckpt = {name: m.state_dict() for name, m in modules.items()}
    ckpt.update(opt=opt.state_dict(), step=step, config=config,
                rng=dict(torch=torch.get_rng_state()))
    needed = sum(t.nbytes for t in tensors(ckpt)) + (1 << 20)
    def survives():   # read only on a full disk
        return checkpoint_survives(path, "previous ")
    write_atomic(path, lambda tmp: torch.save(ckpt, tmp), needed, survives)


def checkpoint_survives(path, which=""):
    """What a full disk leaves of a run: its checkpoint (read only when this is said) or nothing."""
    if not Path(path).exists():
        return "no checkpoint of this run was written yet"
    step = read_checkpoint(path)["step"]
    return f"the {which}checkpoint at step {step} is intact, and --resume continues from it"


def tensors(obj):
    """Every tensor in nested dicts and lists."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from tensors(v)


def resume_or_init(cfg, ckpt_path, modules, opt, config_of):
    """The step to start from: a --resume'd run's, after loading its modules, optimizer and RNG;
    else 0, after --init's encoder weights if given (the target encoder starts as the encoder).
    Never overwrites a run by accident. config_of(checkpoint): the config it was trained with."""
    if cfg.resume:
        ck = read_checkpoint(ckpt_path)
        check_resume(ckpt_path, ck["step"], asdict(config_of(ck)), asdict(cfg), cfg.RESUME_MAY_CHANGE,
                     cfg.LOCATION)
        for name, module in modules.items():
            module.load_state_dict(ck[name])
        opt.load_state_dict(ck["opt"])   # takes the saved groups' settings, and their "decay" flags
        for group, decay in zip(opt.param_groups, (True, False)):
            group.setdefault("decay", decay)  # a checkpoint from before the groups carried the flag
        torch.set_rng_state(ck["rng"]["torch"])
        return ck["step"]
    if ckpt_path.exists():
        raise SystemExit(f"{ckpt_path} already exists: add --resume to continue that run, or pick "
                         "another --name")
    if cfg.init:
        init_from(modules["encoder"], cfg.init)
        modules["target_encoder"].load_state_dict(modules["encoder"].state_dict())
    return 0


def init_from(encoder, path):
    """--init: copy a checkpoint's video encoder weights into ours, or say why they don't fit."""
    sd = encoder_weights(read_checkpoint(path), path)
    own = encoder.state_dict()
    for k, v in sd.items():
        if k in own and own[k].shape != v.shape:
            raise SystemExit(f"{path} does not fit this model: {k} is {list(v.shape)} there but "
                             f"{list(own[k].shape)} here (width {encoder.width}); pick the --model, "
                             "--tokenizer and --crop it was trained with")
    missing = [k for k in own if k not in sd and not k.startswith(("audio_", "modality_"))]
    if missing:
        raise SystemExit(f"{path} lacks {len(missing)} encoder weights of this model (e.g. "
                         f"{missing[0]}): it was trained with a different --model or --tokenizer")
    encoder.load_state_dict({k: v for k, v in sd.items() if k in own}, strict=False)


def stop_non_finite(step, ckpt_path, data=None, idx=None):
    """Stop on a non-finite loss, saying whether the inputs of that step's batch (clips `idx` of
    `data`) were finite: bad data is not the optimiser's fault."""
    kept = checkpoint_survives(ckpt_path, "last good ")
    if data is not None and idx is not None:
        bad = [int(i) for i in np.unique(idx) if not np.isfinite(np.asarray(data["audio"][i],
                                                                            np.float32)).all()]
        if bad:
            raise SystemExit(f"loss became non-finite at step {step} because its inputs were not: "
                             "train clips "
                             f"{', '.join(map(str, bad[:10]))}{' ...' if len(bad) > 10 else ''} "
                             "hold NaN or Inf in their audio. The dataset is damaged: rerun "
                             f"prepare.py for it; {kept}")
        kept = f"the batch's inputs were finite; {kept}"
    raise SystemExit(f"loss became non-finite at step {step}; stopping, {kept}. "
                     f"Try a lower --lr or a higher --ema start.")


def saved_config(ckpt):
    """The config a checkpoint of ours was trained with, as a dict. Before there was one Config,
    checkpoints kept the flags as given beside a dict of the model's settings (its "crop" the frames'
    side); the oldest lack settings that came later (they ran with fuse 0). Settings since removed
    are refused by name."""
    saved = ckpt["config"]
    if "flags" in ckpt:
        flags = {k: v for k, v in ckpt["flags"].items() if v is not None}
        saved = {"fuse": 0, **flags, **saved, "size": saved["crop"], "crop": flags.get("crop", 0)}
    if saved.get("pred_pass", "joint") != "joint" or "window" in saved["masks"]:
        raise SystemExit("this checkpoint was trained with --pred-pass separate or the window masks, "
                         "which avjepa no longer has: use the version of avjepa that trained it")
    return saved


def vjepa_shapes(sd, path, models):
    """The model name (of `models`: name -> (width, depth, heads)), frames and side of a V-JEPA video
    ViT's state dict, read off its tensor shapes (16 frames, as all released V-JEPA models see)."""
    if "patch_embed.proj.weight" not in sd or "pos_embed" not in sd:
        raise SystemExit(f"{path}: its encoder has no patch_embed.proj.weight/pos_embed: not a V-JEPA video ViT")
    width, _, tubelet, patch, _ = sd["patch_embed.proj.weight"].shape
    depth = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
    size = int(math.isqrt(sd["pos_embed"].shape[1] // (16 // tubelet))) * patch
    model = [name for name, (w, d, _) in models.items() if (w, d) == (width, depth)]
    if not model:
        raise SystemExit(f"{path}: a ViT {width} wide and {depth} deep is none of {', '.join(models)}")
    return dict(model=model[0], frames=16, size=size)


def encoder_weights(ckpt, path):
    """The EMA target encoder's state dict from our checkpoints or V-JEPA's (.pth.tar:
    'target_encoder' or 'encoder', under 'module.' and 'backbone.' prefixes), prefixes stripped."""
    for key in ("target_encoder", "encoder"):
        if isinstance(ckpt, dict) and key in ckpt:
            sd = ckpt[key]
            break
    else:
        raise SystemExit(f"{path} holds no 'target_encoder' or 'encoder': not an avjepa or V-JEPA "
                         "checkpoint")
    return {k.replace("module.", "").replace("backbone.", ""): v for k, v in sd.items()}


# -----------------------------------------------------------------------------
# Runs: what they log besides the loss (collapse monitor, MFU, summary), one process per run
# folder, the log and its plot, and stopping on a signal

@torch.no_grad()
def rankme(x):
    """RankMe (Garrido et al.): exp of the entropy of the normalised singular values of x [n, D].
    About how many directions the features use: up to min(n, D) when healthy, towards 1 as they
    collapse. Costs an SVD and a host sync, so it runs on log steps only."""
    if len(x) < 2:
        return math.nan
    s = torch.linalg.svdvals(x.float())
    p = s / s.sum() + 1e-7
    return math.exp(-(p * p.log()).sum().item())


def step_flops(encoder, predictor, masks, batch, target_pass="separate"):
    """Matmul FLOPs of one training step, for the MFU: 6 per weight per trained token (fwd + bwd), 2
    per target token (EMA encoder, forward only), plus attention's 4*L^2*D per layer and sequence (x3
    if trained), over the segments each pass really attends within. masks on the CPU."""
    def lin(m):   # weights applied per token
        return sum(p.numel() for n, p in m.named_parameters() if p.dim() == 2 and "blocks" in n)
    def attn(m, cu):
        L = (cu[1:] - cu[:-1]).double()
        return 4 * len(m.blocks) * m.norm.normalized_shape[0] * float((L * L).sum())
    ctx, tgt, N, nv = masks.context, masks.targets, encoder.n_tokens(), encoder.nv
    parts = [nv, N - nv] if target_pass == "separate" and N > nv else [N]   # the targets' segments
    whole_cu = torch.tensor([0] + [L for _ in range(batch) for L in parts]).cumsum(0)
    tc, tt = len(ctx.index), len(tgt.index)
    return (6 * lin(encoder) * tc + 3 * attn(encoder, masks.context_passes.cu) + 6 * lin(predictor)
            * (tc + tt) + 3 * attn(predictor, ctx.cu + tgt.cu) + 2 * lin(encoder) * batch * N
            + attn(encoder, whole_cu))


def collapse_monitor(target_feats, nv, heard, rows=4096):
    """RankMe of the target features [B, N, D] per modality: video tokens of every clip, audio
    tokens of the clips with sound (heard [B] bool); nan for an absent modality. At most `rows`
    evenly spaced tokens each: the SVD of a 50k x 768 matrix would cost more than the step it
    watches."""
    D = target_feats.shape[-1]
    def sample(x):
        return x[::max(1, len(x) // rows)][:rows]
    video = rankme(sample(target_feats[:, :nv].reshape(-1, D)))
    audio = rankme(sample(target_feats[heard, nv:].reshape(-1, D))) if target_feats.shape[1] > nv else math.nan
    return video, audio


def summary_line(args, last, width, run_dir, end):
    """What a finished (or stopped) run prints: its last logged losses and ranks, speed, its
    files."""
    audio_loss = f", audio {last['loss_audio']:.4f}" if args.audio else ""
    audio_rank = f", audio {last['rank_audio']:.0f}" if args.audio else ""
    stopped = f" (stopped of {args.steps}: --resume continues)" if end < args.steps else ""
    return (f"trained {args.name} to step {end}{stopped}: loss {last['loss']:.4f} (video "
            f"{last['loss_video']:.4f}{audio_loss}), RankMe video "
            f"{last['rank_video']:.0f}{audio_rank} of {width}, {last['clips_per_s']:.1f} clips/s; "
            f"checkpoint {run_dir / 'ckpt.pt'}, curves {run_dir / 'training.png'}, masks "
            f"{run_dir / 'masks.png'}")


HELD_LOCKS = {}   # run folder -> the lock file this process holds on it


def lock_run(run_dir):
    """One process per run folder (made if new). An exclusive flock on <run>/lock, which holds the
    owner's pid: the kernel drops it when that process ends, however it ends, so a lock left by a
    dead run is simply taken over. Held until unlock_run or the process's end; a process that
    already holds it (train() called again) keeps it."""
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    take_lock(Path(run_dir).resolve(), Path(run_dir) / "lock",
              lambda owner: f"{run_dir} is in use by another run (pid {owner}): wait for it to "
                            "end, or pick another --name")


def take_lock(key, lock_file, busy):
    """An exclusive flock on lock_file, held under `key` in HELD_LOCKS; busy(owner) is the exit
    message when another process holds it. The file holds the owner's pid."""
    if str(key) in HELD_LOCKS:
        return
    fd = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        owner = os.read(fd, 100).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise SystemExit(busy(owner)) from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()} on {socket.gethostname()}\n".encode())
    HELD_LOCKS[str(key)] = fd


def unlock_run(run_dir):
    fd = HELD_LOCKS.pop(str(Path(run_dir).resolve()), None)
    if fd is not None:
        os.close(fd)   # closing the file drops the flock


def end_run(run_dir):
    """A run's last act: leave torchrun's process group, if in one, and let the run folder go."""
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    unlock_run(run_dir)


def start_log(log_path, step):
    """The run's log.jsonl from `step` on: a resumed run keeps the lines before its checkpoint's
    step (so the steps only increase), a new run starts an empty log. Returns (the open log, its
    last kept record)."""
    kept = []
    if step and log_path.exists():
        for line in log_path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:   # a line cut short by a kill
                continue
            if rec["step"] < step:
                kept.append(rec)
    write_atomic(log_path, lambda tmp: Path(tmp).write_text("".join(json.dumps(r) + "\n" for r in kept)))
    return open(log_path, "a"), (kept[-1] if kept else None)


def write_log_line(log, rec):
    """One JSON line; a modality with no targets this step has no loss (nan): written as null, so it
    stays JSON."""
    rec = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in rec.items()}
    try:
        log.write(json.dumps(rec) + "\n")
        log.flush()
    except OSError as e:
        if not disk_full(e):
            raise
        survives = checkpoint_survives(Path(log.name).parent / "ckpt.pt")
        raise SystemExit(no_space(log.name, None, survives)) from None


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend: plots are written as PNG, never shown."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save_figure(fig, png_path):
    plt = pyplot()
    write_atomic(png_path, lambda tmp: fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight"))
    plt.close(fig)


def plot_log(log_path, png_path):
    """training.png: loss per modality, RankMe of the targets per modality, and the lr and EMA
    schedules against steps, to see at a glance whether a run learns (loss down, rank holding) or
    collapses (rank falling towards 1)."""
    plt = pyplot()
    recs = [json.loads(line) for line in Path(log_path).read_text().splitlines() if line.strip()]
    steps = [r["step"] for r in recs]
    def curve(ax, key, label, **kw):
        pts = [(r["step"], r[key]) for r in recs if r.get(key) is not None]
        if pts:
            ax.plot(*zip(*pts), label=label, **kw)
    # room for the labels
    fig, (loss, rank, sched) = plt.subplots(1, 3, figsize=(13, 3.6), layout="constrained")
    curve(loss, "loss", "total (with the regulariser)", color="0.4", lw=1)
    curve(loss, "loss_video", "video", color="C0")
    curve(loss, "loss_audio", "audio", color="C1")
    loss.set(title="prediction loss (L1 to the targets)", xlabel="step", ylabel="loss")
    curve(rank, "rank_video", "video", color="C0")
    curve(rank, "rank_audio", "audio", color="C1")
    rank.set(title="RankMe of the target features", xlabel="step", ylabel="effective rank")
    curve(sched, "lr", "learning rate", color="C2")
    sched.set(title="schedules", xlabel="step", ylabel="learning rate")
    ema = sched.twinx()
    curve(ema, "ema", "EMA momentum", color="C3")
    ema.set_ylabel("EMA momentum")
    sched.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))   # 6e-4, not 0.0006
    # where the two curves are not
    sched.legend(handles=sched.lines + ema.lines, loc="lower center")
    for ax in (loss, rank):
        ax.legend()
    for ax in (loss, rank, sched):
        ax.set_xlim(min(steps, default=0), max(max(steps, default=0), 1))
        ax.grid(alpha=0.3)
    save_figure(fig, png_path)


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
        if "labels" in res:   # the ceiling: its own heads, or the linear readout of its frozen tokens
            ceiling = pick(res["labels"]) if "linear" in res["labels"] else res["labels"]
            encoders.append((f"labels ({res['labels']['steps']} steps)", ceiling))
        w = 0.8 / len(encoders)
        for i, (label, r) in enumerate(encoders):
            scores = [r["top1"]] + [r.get("factors", {}).get(f, 0) for f in names[1:]]
            ax.bar(x + (i - (len(encoders) - 1) / 2) * w, [100 * v for v in scores], 0.95 * w,
                   label=label, color={"pretrained": "C0", "random": "0.65"}.get(label, "C2"))
        ax.scatter(x, [100 * c for c in chance], marker="_", s=400, color="C3", label="chance", zorder=3)
        ax.set(title=f"{title}, {res['modalities']}", xticks=x, xticklabels=names,
               ylabel="val accuracy (%)", ylim=(0, 100))
        ax.grid(axis="y", alpha=0.3)
        ax.legend(loc="lower right", fontsize=8)
    save_figure(fig, png_path)


def plot_masks(png_path, data, audio, video_grid, audio_grid, targets):
    """masks.png: one row per mask config, of the split's first clip: its frames (the first of each
    tubelet) and, with audio, its log-mel spectrogram. The targets, which the predictor must fill
    in, are painted in the config's colour; the context, what the encoder sees, is left clear.
    targets {config: (colour, bool [Nv + Na])}."""
    frames = np.asarray(data["video"][0])                                  # uint8 [T, H, W, 3]
    mel = np.asarray(data["audio"][0], np.float32) if audio else None      # [128, Ta]
    plt = pyplot()
    from matplotlib.colors import to_rgb
    T, H, W = video_grid
    nv = T * H * W
    cols = T + (mel is not None)
    fig, axes = plt.subplots(len(targets), cols, figsize=(1.7 * cols + 1.3 * (mel is not None),
                             1.8 * len(targets)), squeeze=False,
                             gridspec_kw=dict(width_ratios=[1] * T + ([2] if mel is not None else [])))
    for i, (row, (config, (colour, is_target))) in enumerate(zip(axes, targets.items())):
        colour = np.array(to_rgb(colour))
        hidden = is_target[:nv].reshape(T, H, W)
        for t in range(T):
            img = frames[t * len(frames) // T].astype(np.float32) / 255
            # each token's cell of pixels (the grid is the crop's; the frame is shown whole)
            cover = np.repeat(np.repeat(hidden[t], -(-img.shape[0] // H), 0),
                              -(-img.shape[1] // W), 1)
            cover = cover[:img.shape[0], :img.shape[1], None]
            row[t].imshow(np.where(cover, 0.35 * img + 0.65 * colour, img))
            row[t].set(xticks=[], yticks=[], title="" if i else f"tubelet {t}")
        row[0].set_ylabel(config, color=colour, fontsize=12, fontweight="bold")
        if mel is not None:
            Fa, Ca = audio_grid
            ax = row[-1]
            ax.imshow(mel[:Fa * PATCH, :Ca * PATCH], origin="lower", aspect="auto", cmap="gray")
            hidden_a = is_target[nv:].reshape(Fa, Ca)
            paint = np.zeros((Fa, Ca, 4))
            paint[hidden_a] = (*colour, 0.6)
            ax.imshow(paint, origin="lower", aspect="auto",
                      extent=(-0.5, Ca * PATCH - 0.5, -0.5, Fa * PATCH - 0.5))
            ax.set(xticks=[], yticks=[], title="" if i else "log-mel spectrogram")
    fig.suptitle("what the encoder sees (clear) and the targets the predictor fills in "
                 "(coloured), per mask config")
    save_figure(fig, png_path)


def catch_stop_signals():
    """Ctrl-C (SIGINT) and SIGTERM ask the loop to stop after the current step; a second one ends
    the process at once. Returns the list the handler appends the signal to, and a function that
    restores."""
    caught, before = [], {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    def handler(signum, frame):
        caught.append(signum)
        signal.signal(signum, signal.SIG_DFL)
    for sig in before:
        signal.signal(sig, handler)
    return caught, lambda: [signal.signal(sig, h) for sig, h in before.items()]


def stop_requested(caught, log_step, world, device):
    """Whether to stop after this step. Alone, as soon as a signal came. Under torchrun every rank
    must stop at the same step, so they agree by an all-reduce on log steps only (no collective on
    the others)."""
    if world == 1:
        return bool(caught)
    if not log_step:
        return False
    flag = torch.tensor(float(bool(caught)), device=device)
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    return flag.item() > 0


def keeps(step, cfg):
    """Whether the checkpoint of `step` is kept beside the latest (--keep-every)."""
    return bool(cfg.keep_every) and step % cfg.keep_every == 0


class Run:
    """A training run's bookkeeping, kept out of the loop: its folder (one process at a time), where
    it starts (its checkpoint when resumed, else --init's weights or the init), the bar and
    log.jsonl (written by the main process), the speed, the stop signals, the non-finite loss check,
    its checkpoints, and at the end the curves, the summary line and the exit code. nets: (encoder,
    predictor, target encoder); clips_of(step): the train clips of a step on this process;
    config_of(checkpoint): the config it was trained with, for --resume."""
    def __init__(self, cfg, nets, opt, device, rank, world, data, clips_of, config_of):
        modules = dict(zip(("encoder", "predictor", "target_encoder"), nets))
        self.cfg, self.modules, self.opt, self.world, self.device = cfg, modules, opt, world, device
        self.dir, self.master, self.data, self.clips_of = Path(cfg.out) / cfg.name, rank == 0, data, clips_of
        self.ckpt_path = self.dir / "ckpt.pt"
        if self.master:
            lock_run(self.dir)
        self.start = self.end = resume_or_init(cfg, self.ckpt_path, modules, opt, config_of)
        self.log, self.last = start_log(self.dir / "log.jsonl", self.start) if self.master else (None, None)
        self.bar = tqdm(total=cfg.steps, initial=self.start, disable=not self.master, desc=cfg.name,
                        dynamic_ncols=True)
        self.caught, self.restore_signals = catch_stop_signals()
        # the first step whose loss was not finite
        self.first_bad = torch.tensor(-1, device=device)
        self.t0, self.clips, self.peak = time.time(), 0, peak_flops(device)

    def step(self, s, loss):
        """After step s: (log it, stop after it); saves on save steps. Nothing waits for the device
        but on log, save and stop steps, which check once that every loss so far was finite."""
        cfg, self.end = self.cfg, s + 1
        first = (self.first_bad < 0) & ~torch.isfinite(loss.detach())
        self.first_bad = torch.where(first, s, self.first_bad)
        self.clips += cfg.batch_size * self.world
        self.bar.update(1)
        log = s % cfg.log_every == 0 or s == cfg.steps - 1
        save = ((s + 1) % cfg.save_every == 0 or keeps(s + 1, cfg)) and s + 1 < cfg.steps
        stop = stop_requested(self.caught, log, self.world, self.device)   # Ctrl-C or SIGTERM came
        if (log or save or stop) and self.first_bad.item() >= 0:
            bad = self.first_bad.item()   # the clips of that step, read again
            stop_non_finite(bad, self.ckpt_path, self.data, self.clips_of(bad))
        if save and not stop:
            self.save(s + 1)
        return log, stop

    def clips_per_s(self):
        """Clips per second, all processes together, since the last record."""
        return self.clips / (time.time() - self.t0)

    def write(self, s, losses, schedule, target_feats, masks, has_audio):
        """What log.jsonl keeps of step s: the losses and schedules (lr, wd, ema), the target
        features' RankMe per sense (they collapse if it falls towards 1), the speed and, on a GPU,
        the MFU."""
        cfg, B = self.cfg, self.cfg.batch_size
        rec = dict(step=s, loss=losses[0].item(), loss_video=losses[1].item(),
                   loss_audio=losses[2].item() if cfg.audio else None, clips_per_s=self.clips_per_s(),
                   **dict(zip(("lr", "wd", "ema"), schedule)))
        encoder, predictor = self.modules["encoder"], self.modules["predictor"]
        rec["rank_video"], rec["rank_audio"] = collapse_monitor(target_feats, encoder.nv, has_audio)
        if self.peak:   # this step's FLOPs per process, times its steps per second
            flops = step_flops(encoder, predictor, masks.to("cpu"), B, cfg.target_pass)
            rec["mfu"] = flops * rec["clips_per_s"] / (B * self.world) / self.peak
        self.bar.set_postfix(loss=f"{rec['loss']:.4f}", clips_s=f"{rec['clips_per_s']:.1f}")
        if self.log:
            write_log_line(self.log, rec)
        self.last, self.t0, self.clips = rec, time.time(), 0

    def save(self, step):
        if self.master:
            save_checkpoint(self.ckpt_path, self.modules, self.opt, step, asdict(self.cfg))
            if keeps(step, self.cfg):   # a copy that later saves leave alone
                kept = self.dir / "steps" / f"{step:06d}" / "ckpt.pt"
                kept.parent.mkdir(parents=True, exist_ok=True)
                write_atomic(kept, lambda tmp: shutil.copyfile(self.ckpt_path, tmp),
                             self.ckpt_path.stat().st_size, "the run's latest checkpoint is intact")

    def close(self):
        """Also when an error ends the loop: the caller's own Ctrl-C handling comes back."""
        self.restore_signals()
        self.bar.close()

    def finish(self, width):
        """The last checkpoint, the curves and the summary (width: the encoder's, for its RankMe); a
        run stopped by a signal exits with 128 + its number, as a shell reports it."""
        self.save(self.end)
        if self.master and self.last:
            plot_log(self.dir / "log.jsonl", self.dir / "training.png")
            print(summary_line(self.cfg, self.last, width, self.dir, self.end))
        end_run(self.dir)
        if self.end < self.cfg.steps:
            raise SystemExit(128 + (self.caught[0] if self.caught else signal.SIGTERM))


# -----------------------------------------------------------------------------
# Pictures, video and sound: what probe.py writes for people to look at and listen to, and the
# built-in set's videos (prepare.py)

def colormap(x, lo, hi):
    """[H, W] values -> uint8 RGB, dark blue (low) -> red -> yellow (high)."""
    anchors = np.array([[0, 0, 4], [80, 18, 123], [183, 55, 121], [252, 137, 97], [252, 253, 191]],
                       float)
    t = np.clip((x - lo) / max(hi - lo, 1e-6), 0, 1) * (len(anchors) - 1)
    return np.stack([np.interp(t, np.arange(len(anchors)), anchors[:, c]) for c in range(3)], -1).astype(np.uint8)


def example_png(rows, specs, names, k):
    """A picture of one example: a row of (up to 8 of) the frames of each entry of `rows` (uint8
    [T, S, S, 3], drawn k times larger), labelled with `names`, then the log-mel spectrograms
    `specs` ([128, Ta] each, all on the first's colour scale, low pitch at the bottom) side by side."""
    from PIL import Image, ImageDraw
    T, S = rows[0].shape[:2]
    shown = np.linspace(0, T - 1, min(T, 8)).round().astype(int)
    tile, label, gap, n = S * k, 110, 4, len(rows)
    lo, hi = (specs[0].min(), specs[0].max()) if specs else (0, 1)
    images = [Image.fromarray(colormap(x[::-1], lo, hi)).resize((x.shape[1] * 2, 256), Image.NEAREST)
              for x in specs]
    width = label + max(len(shown) * (tile + gap), sum(s.width + gap for s in images))
    canvas = Image.new("RGB", (width, n * (tile + gap) + (256 + 20 + gap if images else 0)), "white")
    draw = ImageDraw.Draw(canvas)
    for r, (name, frames) in enumerate(zip(names, rows)):
        draw.text((4, r * (tile + gap) + tile // 2), name, fill="black")
        for c, t in enumerate(shown):   # small frames: nearest, visible
            frame = Image.fromarray(frames[t]).resize((tile, tile), Image.NEAREST)
            canvas.paste(frame, (label + c * (tile + gap), r * (tile + gap)))
    x = label
    for name, s in zip(names, images):
        draw.text((x, n * (tile + gap) + 4), f"{name} log-mel", fill="black")
        canvas.paste(s, (x, n * (tile + gap) + 20))
        x += s.width + gap
    return canvas


def write_media(stem, rows, specs, meta, has_audio, names=("original", "hidden", "reconstruction")):
    """One example, for people to look at and listen to: stem.png (example_png of the frames `rows`
    and the log-mel `specs`, [128, Ta] tensors); stem.mp4 (the first row beside the last, with the
    last log-mel's sound); stem.wav and stem_original.wav (the first log-mel through the same
    resynthesis, to compare like with like)."""
    S = rows[0].shape[1]
    k = max(1, math.ceil(128 / S))                       # scale-up factor for small frames
    picture = example_png(rows, [x.numpy() for x in specs], names, k)
    write_atomic(f"{stem}.png", lambda t: picture.save(t, format="PNG"))
    sr, sound = meta.get("sample_rate", 16000), None
    if specs:
        waves = [mel_to_wave(x, meta).numpy() if has_audio else np.zeros(x.shape[1] * 160, np.float32)
                 for x in (specs[-1], specs[0])]
        for w, suffix in zip(waves, ("", "_original")):
            write_atomic(f"{stem}{suffix}.wav", lambda t, w=w: write_wav(t, w, sr))
        sound = waves[0]
    gap = np.full((S, 4, 3), 255, np.uint8)
    side = np.stack([np.concatenate([a, gap, b], 1) for a, b in zip(rows[0], rows[-1])]).repeat(k, 1).repeat(k, 2)
    write_atomic(f"{stem}.mp4", lambda t: write_mp4(t, side, 1 / meta["frame_seconds"], sound, sr))


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


def write_wav(path, w, sr):
    """16-bit mono PCM with the standard library's wave module."""
    with wave.open(str(path), "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(2)
        f.setframerate(sr)
        f.writeframes((np.clip(w, -1, 1) * 32767).astype("<i2").tobytes())


def write_mp4(path, frames, fps, wave, sample_rate):
    """H.264 (+ AAC when wave is not None) mp4 from frames [T, H, W, 3] uint8 and a mono waveform,
    with PyAV (imported here: training and the GPU image need no PyAV)."""
    import av
    rate = Fraction(fps).limit_denominator(1000)
    with av.open(str(path), "w", format="mp4") as c:
        # constant quantiser, not crf: this x264's crf mode gives slightly different bytes from run to run
        v = c.add_stream("libx264", rate=rate, options={"qp": "20", "preset": "veryfast"})
        # even, for 4:2:0
        v.width, v.height, v.pix_fmt = frames.shape[2] // 2 * 2, frames.shape[1] // 2 * 2, "yuv420p"
        # streams first
        a = c.add_stream("aac", rate=sample_rate, layout="mono") if wave is not None else None
        for i, img in enumerate(frames):
            f = av.VideoFrame.from_ndarray(np.ascontiguousarray(img[:v.height, :v.width]),
                                           format="rgb24")
            f.pts, f.time_base = i, 1 / rate
            c.mux(v.encode(f))
        c.mux(v.encode())
        if a is not None:
            f = av.AudioFrame.from_ndarray(wave[None].astype(np.float32), format="fltp",
                                           layout="mono")
            f.sample_rate, f.pts, f.time_base = sample_rate, 0, Fraction(1, sample_rate)
            c.mux(a.encode(f))
            c.mux(a.encode())
