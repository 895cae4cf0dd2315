"""
Turn video files into training-ready memmaps for avjepa.py, or build the built-in synthetic set.

    python prepare.py                                    # synthetic audio-visual set -> data/synthetic
    python prepare.py --videos ~/ucf101 --out data/ucf  # a folder, a V-JEPA list or a Kinetics CSV

Written to --out (nanoGPT style: flat arrays whose shapes are in meta.json), per split (train, val):
    {split}_video.bin      uint8   [N, T, S, S, 3]       RGB frames on a fixed time grid
    {split}_audio.bin      float16 [N, 128, audio_frames] log-mel, NOT normalised (meta has mean/std)
    {split}_label.bin      int64   [N]                    -1 = unlabeled
    {split}_has_audio.bin  uint8   [N]                    0 = no sound in the clip (silence stored)
    meta.json, report.json (which files were used, which were skipped and why)

The time grid: frame i of a clip is the frame shown at t0 + i * frame_step / 30 seconds, whatever
the file's fps, and the audio is cut from the same clock: audio_frames log-mel columns from t0 on
(10 ms hop, 25 ms windows; the clip's frames * frame_step / 30 seconds, rounded to whole patches
of 16 columns).
"""
import argparse
import csv
import glob
import json
import math
import multiprocessing
import os
import shutil
import signal
import time
from contextlib import nullcontext
from functools import partial
from pathlib import Path

import av
import numpy as np
import torch
import torchaudio.compliance.kaldi as kaldi
import torchaudio.functional as AF
from tqdm import tqdm

from common import (COUNT, NONNEG_INT, PATCH, TUBELET, check_space, disk_full, no_space,
                    remove_stale, take_lock, unlock_run, write_mp4)

VIDEO_EXTS = {".mp4", ".mkv", ".webm", ".avi", ".mov", ".m4v"}
AUDIO_EXTS = {".m4a", ".mp3", ".wav", ".flac", ".ogg", ".oga", ".opus", ".aac", ".wma"}
FPS = 30             # frame_step counts frames at this nominal rate (V-JEPA's assumption)
SAMPLE_RATE = 16000  # every file is resampled to this
MEL_BINS = 128
HOP = 0.01           # fbank frame shift: 100 log-mel columns per second
# timestamps closer than this are equal (float rounding, far below a frame interval)
EPS = 1e-4
# kaldi.fbank of digital silence is log(float32 eps) in every bin. Padding and missing audio use the
# same value, so they look like silence to the model rather than like some arbitrary number.
SILENCE = math.log(torch.finfo(torch.float32).eps)  # -15.94
SPLITS, KEYS = ("train", "val"), ("video", "audio", "label", "has_audio")


def audio_frames(clip_seconds):
    """Log-mel columns per clip: 100 per second, rounded to a multiple of 16 (one patch)."""
    return 16 * round(clip_seconds * 100 / 16)


# -----------------------------------------------------------------------------
# Decoding one file (runs in the worker processes)

def frames_from(container, stream, t):
    """Decoded frames of `stream`, starting at or before time t (seconds, the container's clock)."""
    # Seek to the keyframe before t: only the needed part of a long file is decoded. Some demuxers
    # (e.g. matroska audio) seek coarsely and land after t; then seek earlier, in the end to the start.
    for seek_to in [t - back for back in (0, 1, 10) if t - back > 0] + [None]:
        try:
            container.seek(0) if seek_to is None else container.seek(int(seek_to / stream.time_base), stream=stream)
        except av.FFmpegError:
            if seek_to is not None:
                continue  # try earlier; at the start, decode from wherever the demuxer is
        frames = container.decode(stream)
        first = next(frames, None)
        if first is not None and (seek_to is None or first.time is None or first.time <= t + EPS):
            yield first
            yield from frames
            return


def upright_turns(frame, stream):
    """Counter-clockwise quarter turns that show a frame upright: phones store portrait video
    sideways and say so in a display matrix (frame.rotation, counter-clockwise) or, in older files,
    a 'rotate' tag (clockwise degrees)."""
    degrees = frame.rotation or -float(stream.metadata.get("rotate", 0) or 0)
    return round(degrees / 90) % 4


def to_rgb(frame, size, turns=0):
    """Resize the short side to `size`, turn upright, centre-crop: any pixel format or shape ->
    [size, size, 3] uint8."""
    scale = size / min(frame.width, frame.height)
    w, h = max(size, round(frame.width * scale)), max(size, round(frame.height * scale))
    img = np.rot90(frame.to_ndarray(width=w, height=h, format="rgb24", interpolation="AREA"), turns)
    y, x = (img.shape[0] - size) // 2, (img.shape[1] - size) // 2
    return np.ascontiguousarray(img[y:y + size, x:x + size])


def read_frames(container, stream, times, end, size):
    """The frame shown at each of the sorted `times`: the last frame with pts <= t (the first if
    none). Sampling by timestamp instead of frame index is what makes the grid fps-independent and
    VFR-safe. Returns frames [len(times), size, size, 3] and whether the clip (until `end`) ran past
    the video."""
    frame_dur = 1 / float(stream.average_rate or FPS)
    picked, last, last_t = [], None, 0.0
    for frame in frames_from(container, stream, times[0]):
        t = frame.time if frame.time is not None else last_t + frame_dur
        # `frame` comes later: `last` is shown
        while len(picked) < len(times) and t > times[len(picked)] + EPS:
            picked.append(last if last is not None else frame)
        if len(picked) == len(times):
            break
        last, last_t = frame, t
    if last is None:
        raise ValueError("no decodable video frame")
    # the clip outlasts the video
    padded = len(picked) < len(times) and end > last_t + frame_dur + EPS
    picked += [last] * (len(times) - len(picked))  # past the end: repeat the last frame
    turns = upright_turns(picked[0], stream)
    rgb = {id(f): to_rgb(f, size, turns) for f in picked}  # each source frame is converted once
    return np.stack([rgb[id(f)] for f in picked]), padded


def to_mono(frame):
    """Average an audio frame's channels into float32 samples in [-1, 1]. Packed formats interleave
    the channels (L R L R ...): reading them as one channel was a seed defect that halved the clip's
    time."""
    x = frame.to_ndarray()
    if not frame.format.is_planar:
        x = x.reshape(-1, frame.layout.nb_channels).T
    if x.dtype.kind == "u":  # u8 is offset binary
        x = (x.astype(np.float32) - 128) / 128
    elif x.dtype.kind == "i":
        x = x.astype(np.float32) / -np.iinfo(x.dtype).min
    return x.astype(np.float32).mean(0)


def read_audio(container, stream, start, seconds):
    """Mono 16 kHz waveform of exactly [start, start + seconds) on the container's clock. Samples
    are placed by the stream's own timestamps, so audio that starts late stays aligned with the
    video; where the track has no samples the wave is 0. Returns (wave, whether any real sample fell
    inside)."""
    margin = 0.1  # decode a little more on both sides, so the resampling filter has context
    lo, hi = start - margin, start + seconds + margin
    buf, t_next, got = None, lo, False
    for frame in frames_from(container, stream, lo):
        t = frame.time if frame.time is not None else t_next
        if t >= hi:
            break
        if buf is None:
            sr = frame.sample_rate
            buf = np.zeros(round((hi - lo) * sr), np.float32)
        x = to_mono(frame)
        t_next = t + len(x) / sr
        i = round((t - lo) * sr)
        a, b = max(i, 0), min(i + len(x), len(buf))
        if a < b:
            buf[a:b] = x[a - i:b - i]
            got |= t < start + seconds and t_next > start
    n = round(seconds * SAMPLE_RATE)
    if buf is None:
        return np.zeros(n, np.float32), False
    wave = AF.resample(torch.from_numpy(buf), sr, SAMPLE_RATE).numpy()
    wave = wave[round(margin * SAMPLE_RATE):][:n]
    return np.pad(wave, (0, n - len(wave))), got


def log_mel(wave, n_frames):
    """The AST / AudioMAE / CAV-MAE front end: 128 kaldi fbanks, 25 ms window, 10 ms hop -> [128,
    n_frames]."""
    w = torch.from_numpy(wave)[None]
    mel = kaldi.fbank(w - w.mean(), htk_compat=True, sample_frequency=SAMPLE_RATE, use_energy=False,
                      window_type="hanning", num_mel_bins=MEL_BINS, dither=0.0,
                      frame_shift=HOP * 1000).T
    mel = torch.nn.functional.pad(mel, (0, max(0, n_frames - mel.shape[1])), value=SILENCE)
    return mel[:, :n_frames].numpy()


def Pool(workers, initializer):
    """A pool of fresh worker processes. Not forked: a fork copies a process whose thread pools
    (torch's, FFmpeg's) may hold a lock at that instant, and the child then waits on it forever."""
    return multiprocessing.get_context("spawn").Pool(workers, initializer)


def init_worker():
    """One thread per worker process, and Ctrl-C is left to the parent, which stops the pool."""
    torch.set_num_threads(1)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def skip_reason(e):
    """Why a file was skipped, in a user's words first, then the library's."""
    text = getattr(e, "strerror", None) or str(e)
    if isinstance(e, (av.error.InvalidDataError, UnicodeDecodeError)) or "moov atom not found" in text:
        words = "not a media file PyAV can open (corrupt, or not audio-video at all)"
    elif isinstance(e, (EOFError, av.error.EOFError)) or "End of file" in text or "truncat" in text.lower():
        words = "truncated: the file ends before its streams do"
    elif isinstance(e, av.FFmpegError):
        words = "damaged: PyAV opened it but could not decode it"
    else:
        words = "could not be read"
    return f"{words} ({type(e).__name__}: {text})"


def decode_video(path, frames, frame_step, size, clips_per_video):
    """All clips of one file as arrays, or {"error": reason} when the file cannot be used."""
    clip_seconds = frames * frame_step / FPS
    silent = np.full((MEL_BINS, audio_frames(clip_seconds)), SILENCE, np.float32)
    # the span whose 25 ms windows fill every log-mel column (just past the clip's end), so no column is padding
    audio_seconds = (silent.shape[1] - 1) * HOP + 0.025
    try:
        if not os.path.isfile(path) or os.path.getsize(path) == 0:
            return {"error": "file not found" if not os.path.isfile(path) else "empty file"}
        with av.open(str(path)) as container:
            if not container.streams.video:
                return {"error": "no video stream"}
            vs = container.streams.video[0]
            astream = container.streams.audio[0] if container.streams.audio else None
            v0 = float(vs.start_time * vs.time_base) if vs.start_time is not None else 0.0
            if vs.duration:
                duration = float(vs.duration * vs.time_base)
            else:  # some containers (webm, mkv) only know the file's duration
                duration = (container.duration or 0) / av.time_base
            # K clips at the centres of K equal parts of the video; a video shorter than a clip gives one
            k = clips_per_video if duration > clip_seconds else 1
            starts = [max(0.0, duration - clip_seconds) * (j + 0.5) / k for j in range(k)]
            clips = []
            for t0 in starts:
                # clip times are relative to the first frame; timestamps are the container's
                t0 += v0
                times = t0 + np.arange(frames) * frame_step / FPS
                v, pad = read_frames(container, vs, times, t0 + clip_seconds, size)
                mel, ok = silent, False
                if astream is not None:
                    try:
                        wave, ok = read_audio(container, astream, t0, audio_seconds)
                        mel = log_mel(wave, silent.shape[1]) if ok else silent
                        # a decoder that gave NaN or Inf: no sound to keep
                        if not np.isfinite(mel).all():
                            mel, ok = silent, False
                    except Exception:  # a broken audio track: keep the video, as silent
                        mel, ok = silent, False
                clips.append((v, mel, ok, pad))
    except Exception as e:  # whatever is wrong with one file must not stop a run over thousands
        return {"error": skip_reason(e)}
    video, audio, has_audio, padded = zip(*clips)
    return {"video": np.stack(video), "audio": np.stack(audio).astype(np.float16),
            "has_audio": np.array(has_audio, np.uint8), "padded": any(padded)}


# -----------------------------------------------------------------------------
# Finding the videos: a folder, a V-JEPA list or a Kinetics CSV -> [(path, label, split or None)]

def not_a_video(path):
    """Why a file a user put among their videos is not read, so that it can be named in the
    report."""
    ext = path.suffix.lower()
    if ext in AUDIO_EXTS:
        return f"audio only ({ext}): a clip needs pictures; put the sound in a video file"
    return f"not a video file ({ext or 'no extension'}): videos end in {', '.join(sorted(VIDEO_EXTS))}"


def from_folder(root):
    """Class subfolders give labels, train/ and val/ subfolders give splits, a flat folder is
    unlabeled. Every other file (not hidden ones) is named in the report, with the reason it was
    left out."""
    files = [p for p in sorted(root.rglob("*"))
             if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts)]
    split_dirs = ("train", "val") if (root / "train").is_dir() else ()
    found, skipped = [], []
    for p in files:
        parts = p.relative_to(root).parts
        if split_dirs and parts[0] not in split_dirs:
            skipped.append({"path": str(p), "reason": "outside train/ and val/"})
        elif p.suffix.lower() not in VIDEO_EXTS:
            skipped.append({"path": str(p), "reason": not_a_video(p)})
        else:
            split, parts = (parts[0], parts[1:]) if split_dirs else (None, parts)
            # class: the first folder below
            found.append((p, parts[0] if len(parts) > 1 else None, split))
    classes = sorted({c for _, c, _ in found if c is not None})
    index = {c: i for i, c in enumerate(classes)}
    items = [(p, index[c] if classes else -1, s) for p, c, s in found if c is not None or not classes]
    skipped += [{"path": str(p), "reason": "outside the class folders"} for p, c, _ in found if classes and c is None]
    return items, classes, skipped


def from_vjepa_list(path):
    """Lines '<path> <int label>': the label is the last token, so paths may contain spaces."""
    items, skipped = [], []
    for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        file, label = (line.strip().rsplit(None, 1) + [""])[:2]
        if not label.lstrip("-").isdigit():
            skipped.append({"path": line, "reason": f"line {n}: expected '<path> <int label>'"})
            continue
        file = Path(file).expanduser()
        items.append((file if file.is_absolute() else path.parent / file, int(label), None))
    n_classes = max([l for _, l, _ in items], default=-1) + 1
    # Name the classes after their folders when labels and folders match one to one, with at least
    # two videos each so that it is not chance (.../archery/a.mp4 0, .../archery/b.mp4 0, ...)
    pairs = {(l, p.parent.name) for p, l, _ in items if l >= 0}
    by_label, counts = dict(pairs), np.bincount([l for _, l, _ in items if l >= 0],
                                                minlength=n_classes)
    if len(pairs) == n_classes == len(by_label) == len(set(by_label.values())) and n_classes and counts.min() >= 2:
        return items, [by_label[i] for i in range(n_classes)], skipped
    return items, [str(i) for i in range(n_classes)], skipped


def from_kinetics_csv(path):
    """label,youtube_id,time_start,time_end,split[,is_cc] -> <id>_<start:06d>_<end:06d>.<ext>
    anywhere below."""
    with open(path, newline="", errors="replace") as f:
        rows = list(csv.DictReader(f))
    # one walk, by name
    files = {p.stem: p for p in path.parent.rglob("*") if p.suffix.lower() in VIDEO_EXTS}
    classes = sorted({r.get("label") for r in rows if r.get("label")})
    index = {c: i for i, c in enumerate(classes)}
    items, skipped = [], []
    for n, r in enumerate(rows, 2):
        try:
            stem = f"{r['youtube_id']}_{int(float(r['time_start'])):06d}_{int(float(r['time_end'])):06d}"
        except (KeyError, TypeError, ValueError):
            skipped.append({"path": str(path), "reason": f"line {n}: cannot read {r}"})
            continue
        if stem not in files:
            skipped.append({"path": str(path.parent / f"{stem}.mp4"), "reason": "file not found"})
            continue
        split = "train" if (r.get("split") or "").strip().lower() == "train" else "val"
        items.append((files[stem], index.get(r.get("label"), -1), split))
    return items, classes, skipped


def from_vggsound_csv(path):
    """youtube_id,start_sec,label,split with no header -> <id>_<start:06d>.<ext> anywhere below;
    split 'train' is train, 'test' is val. VGGSound is the audio-visual benchmark CAV-MAE and MAViL
    report on."""
    with open(path, newline="", errors="replace") as f:
        rows = [r for r in csv.reader(f) if r]
    files = {p.stem: p for p in path.parent.rglob("*") if p.suffix.lower() in VIDEO_EXTS}
    classes = sorted({r[2] for r in rows if len(r) == 4})
    index = {c: i for i, c in enumerate(classes)}
    items, skipped = [], []
    for n, r in enumerate(rows, 1):
        try:
            youtube_id, start, label, split = r
            stem = f"{youtube_id}_{int(float(start)):06d}"
        except ValueError:
            skipped.append({"path": str(path), "reason": f"line {n}: expected "
                                                         "youtube_id,start_sec,label,split"})
            continue
        if stem not in files:
            skipped.append({"path": str(path.parent / f"{stem}.mp4"), "reason": "file not found"})
            continue
        items.append((files[stem], index[label],
                      "train" if split.strip().lower() == "train" else "val"))
    return items, classes, skipped


def is_vggsound(first_line):
    row = next(csv.reader([first_line]), [])
    return len(row) == 4 and row[1].strip().replace(".", "", 1).isdigit() and row[3].strip().lower() in ("train", "test")


def find_videos(source):
    if source.is_dir():
        return from_folder(source)
    if source.suffix.lower() in VIDEO_EXTS:
        return [(source, -1, None)], [], []
    if source.suffix.lower() in AUDIO_EXTS:
        return [], [], [{"path": str(source), "reason": not_a_video(source)}]
    with open(source, errors="replace") as f:
        header = f.readline()
    if "youtube_id" in header:
        return from_kinetics_csv(source)
    return from_vggsound_csv(source) if is_vggsound(header) else from_vjepa_list(source)


def assign_splits(items, val_fraction, seed):
    """Videos without a split get one: a seeded val fraction of *videos*, so a video's clips stay
    together."""
    free = [i for i, (_, _, s) in enumerate(items) if s is None]
    n_val = min(len(free) - 1, max(1, round(val_fraction * len(free)))) if val_fraction > 0 and len(free) > 1 else 0
    val = set(np.random.default_rng(seed).permutation(free)[:n_val].tolist())
    return [(p, l, s if s is not None else "val" if i in val else "train") for i, (p, l, s) in enumerate(items)]


# -----------------------------------------------------------------------------
# Writing a dataset

def prepare(source, out, frames=16, frame_step=4, size=224, clips_per_video=1, val_fraction=0.1,
            workers=None, seed=0, extra_meta=None, generated_s=None):
    """Decode the videos of `source` into training-ready memmaps in `out`. generated_s: how long
    making the videos took (the synthetic set), for the summary line."""
    t_begin, source, out = time.time(), Path(source), Path(out)
    if not source.exists():
        raise SystemExit(f"error: {source} does not exist: pass a folder of videos, a list or a "
                         "Kinetics CSV")
    items, classes, skipped = find_videos(source)
    if not items and not skipped:
        raise SystemExit(f"error: no video files in {source} (looked for "
                         f"{', '.join(sorted(VIDEO_EXTS))}); point --videos at a folder of videos "
                         "or a list of them")
    items = assign_splits(items, val_fraction, seed)
    clip_seconds = frames * frame_step / FPS
    n_mel = audio_frames(clip_seconds)
    workers = workers or os.cpu_count()
    # One writer per dataset folder: a lock beside it (the folder itself is swapped at the end).
    out.parent.mkdir(parents=True, exist_ok=True)
    take_lock(out.resolve(), out.parent / f".{out.name}.lock",
              lambda owner: f"{out} is being written by another prepare.py (pid {owner}): wait for "
                            "it to end, or pick another --out")
    # Everything goes to a temporary folder that is renamed at the very end: an interrupted run
    # never leaves something that looks like a finished dataset, and an old one is replaced only then.
    # A run killed outright (kill -9, power loss) never reaches `finally`: its folder is removed here.
    remove_stale(str(out.parent / f".{glob.escape(out.name)}.tmp-*"))
    survives = f"the dataset already at {out} is intact" if out.exists() else "no dataset was written"
    needed = len(items) * clips_per_video * (frames * size * size * 3 + MEL_BINS * n_mel * 2 + 9)
    check_space(out / "meta.json", needed, survives)   # fail now, not after an hour of decoding
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    try:
        tmp.mkdir(parents=True)
        files = {(s, k): open(tmp / f"{s}_{k}.bin", "wb") for s in SPLITS for k in KEYS}
        # stats: n, sum, sum of squares
        counts, ingested, stats = dict.fromkeys(SPLITS, 0), [], np.zeros(3)
        work = partial(decode_video, frames=frames, frame_step=frame_step, size=size,
                       clips_per_video=clips_per_video)
        with Pool(workers, init_worker) if workers > 1 else nullcontext() as pool:
            # in order: deterministic
            results = (pool.imap if pool else map)(work, [p for p, _, _ in items])
            for (path, label, split), r in zip(items, tqdm(results, total=len(items), unit="video",
                                                           smoothing=0.1)):
                if "error" in r:
                    skipped.append({"path": str(path), "reason": r["error"]})
                    continue
                # workers return arrays, only this process writes: the files just grow
                n = len(r["video"])
                for key, arr in zip(KEYS, (r["video"], r["audio"], np.full(n, label, np.int64),
                                           r["has_audio"])):
                    files[split, key].write(np.ascontiguousarray(arr).tobytes())
                counts[split] += n
                if split == "train" and r["has_audio"].any():
                    a = r["audio"][r["has_audio"] == 1].astype(np.float64)
                    stats += (a.size, a.sum(), np.square(a).sum())
                ingested.append({"path": str(path), "clips": n,
                                 "has_audio": bool(r["has_audio"].all()),
                                 "padded": bool(r["padded"])})
        for f in files.values():
            f.close()
        if counts["train"] == 0:
            why = "; ".join(f"{s['path']}: {s['reason']}" for s in skipped[:3]) + ("; ..." if len(skipped) > 3 else "")
            what = f"no decodable video in {source}" if not ingested else f"no train clips from {source}"
            raise SystemExit(f"error: {what}: {len(skipped)} file(s) skipped ({why})")
        # Log-mel statistics of the train split (clips with audio), for avjepa's (x - mean) / (2 std).
        # Without any audio fall back to AudioSet's statistics.
        mean = stats[1] / stats[0] if stats[0] else -4.27
        std = math.sqrt(max(stats[2] / stats[0] - mean ** 2, 1e-12)) if stats[0] else 4.57
        meta = {"version": 1, "source": str(source), "frames": frames, "size": size,
                "frame_step": frame_step,
                "fps": FPS, "frame_seconds": frame_step / FPS, "clip_seconds": clip_seconds,
                "sample_rate": SAMPLE_RATE, "mel_bins": MEL_BINS, "audio_frames": n_mel,
                "audio_hop_seconds": HOP,
                "audio_mean": float(mean), "audio_std": float(std), "classes": classes,
                "splits": counts,
                "video_shape": [frames, size, size, 3], "audio_shape": [MEL_BINS, n_mel],
                **(extra_meta or {})}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        (tmp / "report.json").write_text(json.dumps({"ingested": ingested, "skipped": skipped},
                                                    indent=1))
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        if out.exists():
            out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    except Exception as e:
        if disk_full(e):
            raise SystemExit(no_space(out, needed, f"{survives}; the partial one was "
                                                   "removed")) from None
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        unlock_run(out)
    dt, n = time.time() - t_begin, counts["train"] + counts["val"]
    made = f"generated in {generated_s:.1f} s, then ingested " if generated_s is not None else ""
    print(f"prepared {out}: {counts['train']} train + {counts['val']} val clips from "
          f"{len(ingested)} videos ({len(skipped)} skipped, "
          f"{sum(not r['has_audio'] for r in ingested)} without audio, "
          f"{sum(r['padded'] for r in ingested)} padded), {made}in {dt:.1f} s, {n / dt:.1f} "
          "clips/s")
    return meta


# -----------------------------------------------------------------------------
# The built-in synthetic dataset: a small world whose every factor is known, and whose hidden parts can
# be inferred. What one token hides is seen at another moment (the camera pans over a smooth scene), or
# follows from its neighbours (sky above, ground below, a ridge between); the object moves at a steady
# pace, so where it is hidden follows from where it was; and the sound is made by what is seen.

COLOURS = {"red": (0.9, 0.15, 0.1), "green": (0.15, 0.75, 0.2), "blue": (0.15, 0.3, 0.95),
           "yellow": (0.9, 0.8, 0.1)}
SHAPES = ("circle", "square", "triangle")
RHYTHMS = {"slow": 2.0, "fast": 8.0}  # background ticks per second
DIRECTIONS = {"left": -1.0, "right": 1.0}  # sign of the object's motion across the screen
SYNCS = {"sync": 0, "late": 2}  # the sound's lag behind the picture, in tubelets (0.53 s when late)
SYNTH = dict(frames=8, frame_step=4, size=64, clips_per_video=1)  # 1.07 s clips at a 7.5 fps grid
SYNTH_VERSION = 4
TUBELET_FRAMES = TUBELET * SYNTH["frame_step"]  # source frames per tubelet: 8 at 30 fps, 0.267 s
# prepare takes the clip from the middle of the 36-frame video: source frames 2, 6, ..., 30
FIRST_FRAME = 2
MOVE_FRAME = 2   # the object steps sideways this many source frames into each tubelet: between its two frames
RADII = {"big": 22.0, "small": 11.0}   # the object's radius in each state, in pixels of the 80 px frame
PITCHES = {"big": 330.0, "small": 550.0}   # Hz: big things sound low; both in one mel patch band


def synth_world(colour, shape, rhythm, direction, sync, seed, width=80, fps=30, seconds=1.2):
    """One clip of the built-in world, as arrays: frames [T, width, width, 3] in [0, 1], a mono
    waveform and its sample rate, and the object's states (for the tests).

    The object lives in states, one per tubelet of the clip (prepare's grid: 2 frames 4 apart,
    source frames 8k + 2 and 8k + 6). In each state it has a size (big or small, at random) and a
    height (kept, or at random a jump to a new one). It steps sideways at a steady pace between each
    tubelet's two frames (MOVE_FRAME), as things move while a tubelet is filmed, wrapping round the
    screen edges, so where it starts says nothing of where it goes: a tubelet holds the motion, no
    single frame does. The sound is made by the states: a tone whose pitch says the object's size
    (big sounds low, small high; its waveform set by the shape: sine, square, sawtooth), a drum hit
    at every jump, and ticks in a rhythm that only the sound has. "sync": each state sounds while
    it is seen. "late": 2 tubelets later, so the sound of the clip's start is that of states before
    the clip. The states are a stationary process, so a late soundtrack is as likely a sound as a
    synced one and a picture is the same picture: only their timing tells the two apart.

    Sync is read by what tokens hold, not by where they are: how big the object looks in a tubelet
    and which pitch sounds then are both in the tokens' content (the big object fills several
    patches; the two pitches fall in one mel band, at different rows of its patches). In version 2
    the pitch said the height, a fact that lives in the position codes of a video row and a mel
    band, and no ViT learned it from the labels (docs/results.md)."""
    rng = np.random.default_rng(seed)
    sr = int(rng.choice([16000, 44100]))  # two source rates, so the ingest has to resample
    tau = TUBELET_FRAMES / fps
    lag = SYNCS[sync]
    # states -2 .. 5: 2 before the clip, its 4 tubelets, 2 after
    n_states = 6
    first = -lag                          # the first state the sound needs
    big = rng.random(n_states + 2) < 0.5                    # state s is index s + 2 (s = -2 .. 5)
    radius = np.where(big, RADII["big"], RADII["small"])
    lo, span = RADII["big"] + 2, width - 2 * RADII["big"] - 4   # the centre's height stays in [lo, lo + span]
    # heights: each state keeps the last one's, or (60%) jumps to a new one at least a fifth of the span
    # away. Every state, the first included, may have jumped into: a late clip's first hit (at the clip's
    # start) is then as likely as a synced one's, and the sound alone says nothing of sync.
    jumps = rng.random(n_states + 2) < 0.6
    start = rng.uniform(0, 1)                               # drawn before the jumps' sizes
    heights = (start + np.cumsum(np.where(jumps, rng.uniform(0.2, 0.8, n_states + 2), 0))) % 1.0
    # sideways per tubelet: >= half a patch
    step = DIRECTIONS[direction] * rng.uniform(0.15, 0.2) * width
    x0 = rng.uniform(0, width)            # uniform start: no cue in the first frame

    # Picture: sky, a ridge and ground, and a few posts on a world twice the screen's width (periodic),
    # which the camera pans across at a steady speed; the object in front.
    world = 2 * width
    yy, xx = np.mgrid[:width, :width] + 0.5
    horizon = rng.uniform(0.35, 0.6) * width
    sky_top, sky_low = rng.uniform(0.45, 0.8, 3), rng.uniform(0.55, 0.9, 3)
    ground_top, ground_low = rng.uniform(0.2, 0.5, 3), rng.uniform(0.05, 0.3, 3)
    # ridge: amplitude, harmonic, phase
    waves = [(rng.uniform(2, 6) / k, k, rng.uniform(0, 2 * np.pi)) for k in (1, 2, 3)]
    posts = [(rng.uniform(0, world), rng.uniform(3, 6), rng.uniform(10, 22),
              rng.uniform(0.05, 0.3, 3))
             for _ in range(rng.integers(2, 5))]   # (x, half-width, height above the ridge, colour)
    pan = rng.choice([-1, 1]) * rng.uniform(0.1, 0.2) * width / tau   # pixels per second
    cam0 = rng.uniform(0, world)
    n_frames = round(seconds * fps)
    # the world, drawn once: [width, world, 3], then each frame is a window on it, moved by the pan
    y, wx = np.mgrid[:width, :world] + 0.5
    ridge = horizon + sum(a * np.sin(2 * np.pi * k * wx / world + p) for a, k, p in waves)
    v = np.clip(y / ridge, 0, 1)[..., None]
    # sky, lighter towards the horizon
    scene = (1 - v) * sky_top + v * sky_low
    g = np.clip((y - ridge) / (width - ridge), 0, 1)[..., None]
    scene = np.where((y >= ridge)[..., None], (1 - g) * ground_top + g * ground_low, scene)
    for px, hw, ph, pc in posts:
        d = (wx - px + world / 2) % world - world / 2
        scene = np.where(((abs(d) <= hw) & (y >= ridge - ph) & (y < ridge + 3))[..., None], pc,
                         scene)
    left = cam0 + pan * np.arange(n_frames) / fps                       # [F] the window's left edge
    # [F, W] linear between two columns
    col = np.floor(left)[:, None] + np.arange(width)
    frac = (left - np.floor(left))[:, None, None, None]
    img = ((1 - frac) * scene[:, col.astype(int) % world].transpose(1, 0, 2, 3)
           + frac * scene[:, (col.astype(int) + 1) % world].transpose(1, 0, 2, 3))   # [F, H, W, 3]
    # each frame's state: its tubelet's, for the size and the height; the sideways steps are taken
    # MOVE_FRAME frames into each tubelet, so a tubelet's second frame is one step on
    f = np.arange(n_frames)
    state = np.clip((f - FIRST_FRAME) // TUBELET_FRAMES, -2, n_states - 1)                # [F]
    steps = (f - FIRST_FRAME - MOVE_FRAME) // TUBELET_FRAMES + 1                         # [F]
    cx = ((x0 + step * steps) % width)[:, None, None]                                     # [F, 1, 1]
    cy = (lo + heights[state + 2] * span)[:, None, None]
    r = radius[state + 2][:, None, None]
    y, x = yy[None, :, :1], xx[None, :1, :]                             # [1, H, 1], [1, 1, W]
    mask = np.zeros((n_frames, width, width), bool)
    for shift in (-width, 0, width):                                   # wrapping round the edges
        dx, dy = x - cx - shift, y - cy
        mask |= {"circle": dx ** 2 + dy ** 2 <= r ** 2,
                 "square": np.maximum(abs(dx), abs(dy)) <= 0.85 * r,
                 "triangle": (dy <= 0.8 * r) & (abs(dx) <= (dy + r) * 0.55)}[shape]
    frames = np.where(mask[..., None], COLOURS[colour], img)

    # Sound, in the clip's time u (u = 0 at the first frame of the clip)
    n = round((seconds + 0.1) * sr)
    u = np.arange(n) / sr - FIRST_FRAME / fps
    # the state sounding at u
    sounding = np.clip(np.floor(u / tau).astype(int) - lag, -2, n_states - 1)
    pitch = np.where(big[sounding + 2], PITCHES["big"], PITCHES["small"])
    phase = 2 * np.pi * np.cumsum(pitch) / sr
    wave = 0.15 * {"circle": np.sin(phase), "square": 0.6 * np.sign(np.sin(phase)),
                   "triangle": phase / np.pi % 2 - 1}[shape]               # ~equal loudness
    # a drum hit at every jump: 1.2-2.5 kHz noise, 60 ms, above the tone and below the ticks
    m = round(0.06 * sr)
    f_hz = np.fft.rfftfreq(m, 1 / sr)
    hit = np.fft.irfft(np.fft.rfft(rng.normal(0, 1, m)) * ((f_hz > 1200) & (f_hz < 2500)), m)
    hit *= 0.35 / hit.std() * np.minimum(np.arange(m) / (0.004 * sr), 1) * np.exp(-np.arange(m) / (0.02 * sr))
    for s in range(first, n_states):
        if jumps[s + 2]:
            i = int(np.searchsorted(u, (s + lag) * tau))   # when state s starts to sound
            wave[i:i + m] += hit[:max(0, min(m, n - i))]
    # Ticks: 30 ms bursts of noise in the 3-7.5 kHz band (the top three patch rows of the log-mel), at the
    # rhythm's tempo from a random phase. Fast ticks fill every patch of that band; slow ones leave most quiet.
    rate, m = RHYTHMS[rhythm], round(0.03 * sr)
    f_hz = np.fft.rfftfreq(m, 1 / sr)
    tick = np.fft.irfft(np.fft.rfft(rng.normal(0, 1, m)) * ((f_hz > 3000) & (f_hz < 7500)), m) * np.hanning(m)
    tick *= 0.12 / tick.std() * rng.uniform(0.7, 1.3)
    for i in (np.arange(rng.uniform(0, 1 / rate), seconds, 1 / rate) * sr).astype(int):
        wave[i:i + m] += tick[:len(wave) - i]
    wave += rng.normal(0, 0.01, len(wave))  # a noise bed, as any microphone has
    states = dict(heights=heights, jumps=jumps, big=big, step=step, x0=x0, pan=pan, lag=lag)
    return np.clip(frames, 0, 1), wave, sr, states


def synth_clip(path, colour, shape, rhythm, direction, sync, seed):
    """synth_world's clip as an mp4 (H.264 + AAC) at `path`."""
    frames, wave, sr, _ = synth_world(colour, shape, rhythm, direction, sync, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    # no half-written video under the real name
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        write_mp4(tmp, (frames * 255).round().astype(np.uint8), 30, wave, sr)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def make_synthetic(out="data/synthetic", workers=None, per_class=(10, 4)):
    """Generate the synthetic mp4s into <out>_videos/{train,val}/<class>/NNN.mp4 and ingest them
    like user videos. Only those files are written, and only such files left by a larger build are
    removed: anything else in the folder is the user's, and is left alone (and ingested, if it is a
    video in a class folder)."""
    t_begin, out = time.time(), Path(out)
    videos = out.parent / f"{out.name}_videos"
    classes = [f"{c}-{s}-{r}-{d}-{y}" for c in COLOURS for s in SHAPES for r in RHYTHMS for d in DIRECTIONS
               for y in SYNCS]
    jobs = [(videos / split / name / f"{j:03d}.mp4", *name.split("-"))
            for split, n in zip(SPLITS, per_class) for name in classes for j in range(n)]
    jobs = [job + (seed,) for seed, job in enumerate(jobs)]
    ours = {job[0] for job in jobs}
    for split in SPLITS:
        for name in classes:
            for old in (videos / split / name).glob("[0-9][0-9][0-9].mp4"):
                if old not in ours:
                    old.unlink()
    needed = 40_000 * len(jobs)   # about 20 kB a video, twice that to be safe
    check_space(videos / "x.mp4", needed)   # fail early if they cannot fit
    workers = workers or os.cpu_count()
    try:
        if workers > 1:
            with Pool(workers, init_worker) as pool:
                pool.starmap(synth_clip, jobs, chunksize=8)
        else:   # one worker: this process
            for job in jobs:
                synth_clip(*job)
    except Exception as e:   # a worker's OSError comes back here
        if disk_full(e):
            for split in SPLITS:   # a killed worker's temporaries
                remove_stale(str(videos / split / "*" / "*.mp4.tmp-*"))
            raise SystemExit(no_space(videos, needed, "the videos written so far are complete (no "
                                      "half-written one is left), and no dataset "
                                      "was written")) from None
        raise
    generated_s = time.time() - t_begin
    print(f"generated {len(jobs)} synthetic videos in {videos} in {generated_s:.1f} s")
    classes = sorted(classes)
    factors = {"colour": {"values": list(COLOURS), "modality": "video"},
               "shape": {"values": list(SHAPES), "modality": "both"},
               "rhythm": {"values": list(RHYTHMS), "modality": "audio"},
               "direction": {"values": list(DIRECTIONS), "modality": "video over time"},
               "sync": {"values": list(SYNCS), "modality": "video against audio"}}
    class_factors = [[factors[f]["values"].index(v) for f, v in zip(factors, name.split("-"))] for name in classes]
    return prepare(videos, out, **SYNTH, workers=workers, extra_meta={"factors": factors, "class_factors": class_factors, "synthetic_version": SYNTH_VERSION},
                   generated_s=generated_s)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description="Turn videos into avjepa memmaps. Without --videos: "
                                "build the synthetic set in data/synthetic (its clips "
                                "are always 8 frames, step 4, 64 px).")
    p.add_argument("--videos", metavar="PATH", help="a folder of videos (class subfolders = "
                   "labels, train/ and val/ = splits), a list of "
                   "'<path> <int label>' lines, a Kinetics CSV "
                   "or a VGGSound CSV")
    p.add_argument("--out", metavar="DIR", help="output folder (default: data/<name of --videos>)")
    # the clip flags default to None so that giving one for the built-in set can be refused, not ignored
    clip_flags = dict(frames=16, frame_step=4, size=224, clips_per_video=1)
    p.add_argument("--frames", type=COUNT, metavar="N", help="with --videos: frames per clip "
                                                             "(default 16)")
    p.add_argument("--frame-step", type=COUNT, metavar="N",
                   help="with --videos: frame i is the one shown at t0 + i * N / 30 s, whatever "
                        "the video's fps (default 4)")
    p.add_argument("--size", type=COUNT, metavar="N",
                   help="with --videos: frame side after short-side resize and centre crop "
                        "(default 224)")
    p.add_argument("--clips-per-video", type=COUNT, metavar="N",
                   help="with --videos: clips per video, spread evenly over it (default 1)")
    p.add_argument("--val-fraction", type=float, default=0.1, metavar="F",
                   help="share of the videos held out for val, when the source has no split of "
                        "its own")
    p.add_argument("--workers", type=COUNT, default=os.cpu_count(), metavar="N",
                   help="decoding processes")
    p.add_argument("--seed", type=NONNEG_INT, default=0, metavar="N", help="seed of the "
                                                                           "train/val split")
    args = p.parse_args()
    given = [f"--{k.replace('_', '-')}" for k in clip_flags if getattr(args, k) is not None]
    if args.videos is None and given:
        p.error(f"{', '.join(given)} applies to --videos only: the built-in synthetic set's clips "
                f"are always {SYNTH['frames']} frames, step {SYNTH['frame_step']}, {SYNTH['size']} "
                "px")
    for k, v in clip_flags.items():
        setattr(args, k, v if getattr(args, k) is None else getattr(args, k))
    # the model cuts clips into 2 x 16 x 16 tubelets
    for flag, unit in (("frames", TUBELET), ("size", PATCH)):
        if getattr(args, flag) % unit:
            p.error(f"argument --{flag}: must be a multiple of {unit} (tubelets are {TUBELET} "
                    f"frames x {PATCH} x {PATCH} pixels)")
    if not 0 <= args.val_fraction < 1:
        p.error(f"argument --val-fraction: {args.val_fraction} is out of range: it must be in [0, "
                "1)")
    try:
        if args.videos is None:
            make_synthetic(args.out or "data/synthetic", args.workers)
        else:
            src = Path(args.videos).expanduser()
            out = args.out or Path("data") / (src.resolve().stem if src.is_file() else src.resolve().name)
            prepare(src, out, args.frames, args.frame_step, args.size, args.clips_per_video,
                    args.val_fraction,
                    args.workers, args.seed)
    except KeyboardInterrupt:
        raise SystemExit("interrupted: no dataset was written, an existing one is left as it was")
