"""
What every avjepa script shares, and none of it is the method: argparse range types and device checks,
atomic writes, reading checkpoints, the run lock, run logs and their plot, and stop signals. As nanoGPT
keeps configurator.py beside train.py, this keeps the plumbing beside avjepa.py, so that the method reads
without it, and so that prepare.py and probe.py need not import the trainer for it.
"""
import argparse
import fcntl
import glob
import json
import math
import os
import pickle
import shutil
import signal
import socket
from pathlib import Path

import torch

# The clip geometry every script agrees on: a video tubelet is 2 frames x 16 x 16 pixels, an audio
# patch 16 mel bins x 16 frames.
TUBELET, PATCH = 2, 16

# -----------------------------------------------------------------------------
# Flags and devices

# dense bf16 peak by device-name substring, first match wins (so the PCIe H100 is not taken for an SXM)
GPU_PEAK_FLOPS = {"H100 PCIe": 756e12, "H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "4090": 165e12}


def number(kind, low=-math.inf, high=math.inf, above=None):
    """An argparse type: a `kind` (int or float) in [low, high], or greater than `above`. A value out of
    range is an argparse error that names the flag and the range (exit 2), never a traceback later on."""
    rule = f"> {above}" if above is not None else f"in [{low}, {high}]" if high < math.inf else f">= {low}"
    def parse(text):
        try:
            x = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}")
        if not (x > above if above is not None else low <= x <= high):   # NaN fails both
            raise argparse.ArgumentTypeError(f"{text} is out of range: it must be {rule}")
        return x
    parse.__name__ = kind.__name__
    return parse


COUNT, NONNEG_INT, POSITIVE, NONNEG, FRACTION = number(int, 1), number(int, 0), number(float, above=0.0), \
    number(float, 0.0), number(float, 0.0, 1.0)


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
    """Remove the temporaries '<anything>.tmp-<pid>' matching a glob pattern whose process is gone: a process
    killed outright (kill -9, power loss) never reaches its cleanup. Those of live processes stay."""
    for stale in glob.glob(pattern):
        pid = stale.rsplit(".tmp-", 1)[-1]
        if pid.isdigit() and not process_alive(int(pid)):
            shutil.rmtree(stale, ignore_errors=True) if os.path.isdir(stale) else os.remove(stale)


def write_atomic(path, write):
    """write(tmp) then rename: a crash never leaves half a file (checkpoint, result, picture) under the real name."""
    remove_stale(f"{glob.escape(str(path))}.tmp-*")
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def read_checkpoint(path):
    """A checkpoint's contents, read as tensors and plain values only (weights_only: no code runs on load)."""
    if not Path(path).is_file():
        raise SystemExit(f"no checkpoint at {path}: pass a run's ckpt.pt (out/<name>/ckpt.pt) or a V-JEPA .pth.tar")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:   # zip, EOF, decode and key errors: whatever a file that is not a checkpoint raises
        if isinstance(e, pickle.UnpicklingError) and "Unsupported global" in str(e):   # a class, not a tensor
            raise SystemExit(f"{path} holds Python objects besides tensors and plain values, and avjepa loads "
                             f"only those (a checkpoint must not run code when read): save its state dicts "
                             f"alone with torch.save") from None
        raise SystemExit(f"{path} is not a checkpoint: it is not a file written by torch.save, or it was cut "
                         f"short. Pass a run's ckpt.pt (out/<name>/ckpt.pt) or a V-JEPA .pth.tar") from None


# -----------------------------------------------------------------------------
# Runs: one process per run folder, its log and plot, and stopping on a signal

HELD_LOCKS = {}   # run folder -> the lock file this process holds on it


def lock_run(run_dir):
    """One process per run folder. An exclusive flock on <run>/lock, which holds the owner's pid: the kernel
    drops it when that process ends, however it ends, so a lock left by a dead run is simply taken over.
    Held until unlock_run or the process's end; a process that already holds it (train() called again) keeps it."""
    key = str(Path(run_dir).resolve())
    if key in HELD_LOCKS:
        return
    fd = os.open(run_dir / "lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        owner = os.read(fd, 100).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise SystemExit(f"{run_dir} is in use by another run (pid {owner}): wait for it to end, "
                         f"or pick another --name") from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()} on {socket.gethostname()}\n".encode())
    HELD_LOCKS[key] = fd


def unlock_run(run_dir):
    fd = HELD_LOCKS.pop(str(Path(run_dir).resolve()), None)
    if fd is not None:
        os.close(fd)   # closing the file drops the flock


def start_log(log_path, step):
    """The run's log.jsonl from `step` on: a resumed run keeps the lines before its checkpoint's step (so the
    steps only increase), a new run starts an empty log. Returns (the open log, its last kept record)."""
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
    """One JSON line; a modality with no targets this step has no loss (nan): written as null, so it stays JSON."""
    rec = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in rec.items()}
    log.write(json.dumps(rec) + "\n")
    log.flush()


def plot_log(log_path, png_path, size=(360, 240)):
    """Loss and RankMe against steps, one panel each, video in blue and audio in orange: a PNG next to the
    log, to see at a glance whether a run learns (loss down, rank holding) or collapses (rank falling)."""
    from PIL import Image, ImageDraw
    recs = [json.loads(line) for line in Path(log_path).read_text().splitlines() if line.strip()]
    panels = [("loss", "loss_video", "loss_audio"), ("RankMe of the targets", "rank_video", "rank_audio")]
    W, H = size
    img = Image.new("RGB", (W * len(panels), H), "white")
    draw = ImageDraw.Draw(img)
    steps = [r["step"] for r in recs]
    x0, x1 = min(steps), max(max(steps), min(steps) + 1)
    for i, (title, *keys) in enumerate(panels):
        left, top, right, bottom = i * W + 40, 20, i * W + W - 10, H - 25
        values = [r[k] for r in recs for k in keys if r.get(k) is not None]
        lo, hi = (min(values), max(values)) if values else (0.0, 1.0)
        hi = hi if hi > lo else lo + 1
        draw.rectangle([left, top, right, bottom], outline="black")
        draw.text((left, 4), f"{title}: video blue, audio orange", fill="black")
        draw.text((i * W + 2, top), f"{hi:.3g}", fill="black")
        draw.text((i * W + 2, bottom - 10), f"{lo:.3g}", fill="black")
        draw.text((left, bottom + 5), f"step {x0}", fill="black")
        draw.text((right - 60, bottom + 5), f"step {x1}", fill="black")
        for key, colour in zip(keys, ("#1f77b4", "#ff7f0e")):
            pts = [(left + (r["step"] - x0) / (x1 - x0) * (right - left),
                    bottom - (r[key] - lo) / (hi - lo) * (bottom - top)) for r in recs if r.get(key) is not None]
            if len(pts) > 1:
                draw.line(pts, fill=colour, width=2)
    write_atomic(png_path, lambda tmp: img.save(tmp, format="PNG"))


def catch_stop_signals():
    """Ctrl-C (SIGINT) and SIGTERM ask the loop to stop after the current step; a second one ends the
    process at once. Returns the list the handler appends the signal to, and a function that restores."""
    caught, before = [], {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    def handler(signum, frame):
        caught.append(signum)
        signal.signal(signum, signal.SIG_DFL)
    for sig in before:
        signal.signal(sig, handler)
    return caught, lambda: [signal.signal(sig, h) for sig, h in before.items()]


def stop_requested(caught, log_step, world, device):
    """Whether to stop after this step. Alone, as soon as a signal came. Under torchrun every rank must stop
    at the same step, so they agree by an all-reduce on log steps only (no collective on the others)."""
    if world == 1:
        return bool(caught)
    if not log_step:
        return False
    flag = torch.tensor(float(bool(caught)), device=device)
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    return flag.item() > 0
