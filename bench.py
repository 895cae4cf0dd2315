"""
Benchmarks of avjepa's hot paths, each next to the baselines it has to beat, in one run:

  attention  kernels.attention (packed varlen, Triton) vs torch's own varlen_attn (FlashAttention-2),
             FlexAttention with a document mask, and every SDPA backend, on dense ViT batches and on
             the ragged batches the JEPA masks make (padded to the longest for SDPA)
  gather     kernels.gather / kernels.scatter (Triton) vs torch.gather, index_select and indexing
  step       avjepa.train_step, exactly what training runs: clips/s, MFU and peak memory
  profile    (--profile) where the step's time goes: top kernels, and the share of each kind of work

Each section prints its napkin-math floor first (the time at the GPU's bf16 peak, or at the measured
copy bandwidth), then what every row achieves against it. A row that fails or is unsupported says
so instead of showing a number. On CUDA, the rows that have targets say met or missed.

    python bench.py                                # everything (on an H100 or H200)
    python bench.py --only step --models vit_base  # one section
    python bench.py --quick                        # tiny shapes; on a CPU, the reference paths only
    python bench.py --tune                         # sweep the kernels' tiles; prints kernels._attn_config's table
"""
import argparse
import contextlib
import datetime
import json
import math
import platform
import statistics
import time
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import avjepa
import common
import kernels

# prepare.py's defaults: every 4th frame at 30 fps, 10 ms mel hop
FRAME_SECONDS, HOP_SECONDS = 4 / 30, 0.01
CONFIGS = ("short", "long")                 # V-JEPA's two mask configs, as training uses them
# vit_small's and vit_base's; head dim 64 in every V-JEPA size
HEAD_COUNTS = (6, 12)
# what the kernels must reach, as speedups over the fastest correct row of a kind (fwd+bwd), or of copy
TARGETS = dict(dense=0.9, ragged=1.5, varlen=1.0, gather=0.8, mfu=0.4)
SKIP = "skipped: Triton rows need CUDA"
SKIP_CUDA = "skipped: needs CUDA"


def get_args(argv=None):
    p = argparse.ArgumentParser(description="Time avjepa's attention, gather/scatter and "
                                            "training step against baselines.")
    p.add_argument("--only", choices=["attention", "gather", "step"],
                   help="run this section only (default: all three)")
    p.add_argument("--quick", action="store_true",
                   help="tiny shapes (4 frames, 64 px, 112 audio frames, batch 2, vit_tiny): "
                   "proves the script runs, on a CPU too; the numbers mean nothing")
    p.add_argument("--batch-size", type=common.NONNEG_INT, default=0,
                   help="clips per batch in every section (0: 32, or 2 with --quick)")
    p.add_argument("--steps", type=common.NONNEG_INT, default=0,
                   help="timed training steps per step row, after warmup (0: 10, or 2 with "
                        "--quick)")
    p.add_argument("--models", default="",
                   help="comma list of encoders for the step section (default: "
                   "vit_tiny,vit_small,vit_base; vit_tiny with --quick)")
    p.add_argument("--repeats", type=common.NONNEG_INT, default=0,
                   help="timed calls per kernel row; the median is reported (0: 20, or 3 with "
                        "--quick)")
    p.add_argument("--compile", action="store_true",
                   help="step section: also time the AV rows with varlen masks under "
                   "torch.compile, as avjepa.py --compile runs them (each compiles anew: "
                   "'warmup s' says how long)")
    p.add_argument("--profile", action="store_true",
                   help="also profile the last --models' AV step (auto path; compiled with "
                   "--compile): the top kernels by time, and the shares of attention, "
                   "matmul, norm and elementwise, gather/scatter, optimizer, idle")
    p.add_argument("--device", default="", help="cpu or cuda (default: cuda when available)")
    p.add_argument("--json", default="", help="also write the header and every row to this JSON "
                                              "file")
    p.add_argument("--tune", action="store_true", help="instead of the sections: sweep BLOCK_M, "
                   "BLOCK_N, warps and stages of each "
                   "attention kernel and the tiles of "
                   "gather/scatter, check each config against "
                   "the reference, time it, and print the "
                   "winners as kernels._attn_config's table")
    args = p.parse_args(argv)
    common.check_device(p, args.device)
    q = args.quick
    args.batch_size = args.batch_size or (2 if q else 32)
    args.steps = args.steps or (2 if q else 10)
    args.repeats = args.repeats or (3 if q else 20)
    args.warmup, args.warmup_steps = (1, 1) if q else (5, 3)
    args.models = (args.models or ("vit_tiny" if q else "vit_tiny,vit_small,vit_base")).split(",")
    for m in args.models:
        if m not in avjepa.MODELS:
            p.error(f"unknown model {m!r}: choose from {', '.join(avjepa.MODELS)}")
    args.frames, args.crop, args.audio_frames = (4, 64, 112) if q else (16, 224, 208)
    args.dev = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    args.cuda = args.dev.type == "cuda"
    args.triton = args.cuda and kernels.HAS_TRITON
    # what training computes in (autocast on CUDA only)
    args.dtype = torch.bfloat16 if args.cuda else torch.float32
    name = f"cpu ({platform.machine()}, {torch.get_num_threads()} threads)"
    if args.cuda:
        name = torch.cuda.get_device_name(args.dev)
    args.device_name = name
    args.peak = next((v for k, v in common.GPU_PEAK_FLOPS.items() if args.cuda and k in name), None)
    args.video_grid = (args.frames // common.TUBELET, args.crop // common.PATCH,
                       args.crop // common.PATCH)
    args.audio_grid = (128 // common.PATCH, args.audio_frames // common.PATCH)
    # video and audio tokens per clip
    args.nv, args.na = math.prod(args.video_grid), math.prod(args.audio_grid)
    return args

# -----------------------------------------------------------------------------
# Timing and printing

def median_time(fn, args):
    """Median seconds of one fn() call. Warm up first (Triton compiles on its first call), then time
    each call alone: on CUDA between events, after flushing L2 so no call reads what the last one
    left."""
    for _ in range(args.warmup):
        fn()
    if not args.cuda:
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return statistics.median(times)
    # more than any L2 (H100: 50 MB)
    flush = torch.empty(256 * 2**20, dtype=torch.int8, device=args.dev)
    events = [[torch.cuda.Event(enable_timing=True) for _ in range(2)] for _ in range(args.repeats)]
    torch.cuda.synchronize()
    for start, end in events:
        flush.zero_()
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in events) / 1e3


def attempt(fn, args):
    """(fn(), None), or (None, why) when it raises: an unsupported backend, out of memory, a kernel
    bug. SDPA explains a refusal in a warning and raises 'No available kernel', so the warning is
    the reason."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            return fn(), None
        except Exception as e:
            if args.cuda:
                torch.cuda.empty_cache()
            reasons = [str(w.message).split(" (Triggered")[0] for w in caught if "not used because" not in str(w.message)]
            why = " ".join(("; ".join(reasons) or str(e).split(". ")[0]).split())
            return None, f"failed: {type(e).__name__}: {why[:100]}"


@contextlib.contextmanager
def backend(name):
    """kernels.BACKEND = name inside the block: "triton" forces the kernels, "torch" the
    references."""
    old, kernels.BACKEND = kernels.BACKEND, name
    try:
        yield
    finally:
        kernels.BACKEND = old


def table(cols, rows):
    """cols: (key, header, format or None for text). A missing value prints 'n/a'."""
    cells = [[h for _, h, _ in cols]] + [["n/a" if r.get(k) is None else f.format(r[k]) if f else str(r[k])
                                          for k, _, f in cols] for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(cols))]
    for c in cells:
        print("  " + "  ".join(s.rjust(w) if f else s.ljust(w) for s, w, (_, _, f) in zip(c, widths, cols)).rstrip())


def verdict(value, need, fmt):
    """'1.12x (need 1.00x): met', with fmt the way both numbers print."""
    return f"{fmt.format(value)} (need {fmt.format(need)}): {'met' if value >= need else 'MISSED'}"


def moved_rows(args, batch):
    """The rows gather and scatter move in a real step: the encoder gathers the packed context (its
    rows repeat across mask configs), the predictor scatters onto its slots (distinct). Both on the
    device."""
    masks = sample_masks(args, batch)
    slots = torch.cat(avjepa.predictor_slots(masks.context, masks.targets))
    return masks.context.index.to(args.dev), slots.to(args.dev)


def sample_masks(args, batch, audio=True, truncate=False, seed=0):
    """The real mask generator's output for a batch of clips with sound (or video only), the context
    encoded one modality at a time as training does by default."""
    rng = np.random.default_rng(seed)
    cfg = avjepa.Config(masks=CONFIGS, truncate=truncate)
    return avjepa.sample_masks(rng, cfg, batch, args.video_grid, args.audio_grid if audio else None,
                               np.full(batch, audio))

# -----------------------------------------------------------------------------
# 1. Attention. FLOPs count useful work only: 4 * sum(L_i^2) * H * hd forward (QK^T and PV, non-causal),
# and FlashAttention's convention for the backward, 2.5x the forward (it recomputes QK^T), so fwd+bwd
# is 3.5x. Padded baselines get the same count: the work they waste on padding earns nothing.

def attention_cases(args):
    """(name, heads, head dim, sequence lengths): dense clips, and the context segments the real
    mask generator makes (short and long configs, clips with and without sound), for vit_small's and
    vit_base's head counts at head dim 64. Last, vit_base's predictor (384 wide, so head dim 32)
    over context + targets: a clip with sound has all its tokens there, so it is only ragged where
    clips are silent."""
    B, nv, na = args.batch_size, args.nv, args.na
    cases = []
    for heads in HEAD_COUNTS:
        cases += [(f"dense AV, {heads} heads", heads, 64, [nv + na] * B),
                  (f"dense V, {heads} heads", heads, 64, [nv] * B)]
        for audio in (True, False):
            for config in CONFIGS:
                masks = avjepa.sample_masks(np.random.default_rng(0),
                                            avjepa.Config(masks=(config,)), B,
                                            args.video_grid, args.audio_grid if audio else None,
                                            np.full(B, audio))
                # the segments the encoder attends within
                lengths = np.diff(masks.context_passes.cu.numpy()).tolist()
                cases.append((f"JEPA {config} context, "
                              f"{'AV' if audio else 'V'}, {heads} heads", heads, 64, lengths))
    masks = sample_masks(args, B)
    ctx, tgt = (np.diff(p.cu.numpy()).tolist() for p in (masks.context, masks.targets))
    cases.append(("JEPA predictor (vit_base), AV", 12, 32, [c + t for c, t in zip(ctx, tgt)]))
    return cases


def varlen_and_flex(cu, segment, L, total):
    """torch's own packed attention, the baselines a user would pick instead of ours: varlen_attn
    (FlashAttention-2 on [total, H, hd]) and FlexAttention with a document mask, its BlockMask built
    once per batch as every layer would reuse it, compiled."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    from torch.nn.attention.varlen import varlen_attn
    def varlen(q, k, v):
        return varlen_attn(q, k, v, cu, cu, L, L)
    # compiled: built eagerly, the mask is first materialized dense, [total, total], which outgrows the GPU
    block_mask = torch.compile(create_block_mask)(lambda b, h, qi, ki: segment[qi] == segment[ki], None, None,
                                                  total, total, device=segment.device)
    # one compile per case; past the limit flex runs eager, unfused
    torch._dynamo.config.recompile_limit = 64
    flex_compiled = torch.compile(flex_attention, dynamic=False)
    # [total, H, hd] -> one sequence [1, H, total, hd] that the mask cuts into clips
    def flex(q, k, v):
        o = flex_compiled(*(t.transpose(0, 1)[None] for t in (q, k, v)), block_mask=block_mask)
        return o[0].transpose(0, 1)
    return varlen, flex


def bench_attention(args):
    print("\n== attention: TFLOP/s of useful work (fwd+bwd = 3.5x fwd), forward timed with "
          "autograd on, as in training")
    print("   max err: largest |row - kernels.attention_torch in fp32| on the real tokens; "
          "padded rows pay no pad/unpad")
    if not args.triton:
        print(f"   ({SKIP})")
    results = []
    for case, heads, hd, lengths in attention_cases(args):
        dev, L, total = args.dev, max(lengths), sum(lengths)
        lens = torch.tensor(lengths, device=dev)
        cu = F.pad(lens.cumsum(0), (1, 0)).to(torch.int32)
        flops = 4 * sum(n * n for n in lengths) * heads * hd
        torch.manual_seed(0)
        q, k, v = packed = [torch.randn(total, heads, hd, device=dev, dtype=args.dtype,
                                        requires_grad=True) for _ in range(3)]
        # packed row -> (clip, offset)
        clip = kernels.segment_ids(cu, total)
        offset = torch.arange(total, device=dev) - cu[:-1].long()[clip]
        # [total, H, hd] -> [B, H, L, hd], zeros after each clip's end: what a padded batch holds
        def pad(x):
            out = x.new_zeros(len(lengths), L, heads, hd)
            out[clip, offset] = x
            return out.transpose(1, 2).contiguous().requires_grad_()
        padded = [pad(t.detach()) for t in packed]
        unpad = lambda o: o.transpose(1, 2)[clip, offset]
        # [B, 1, 1, L]
        key_mask = (torch.arange(L, device=dev)[None] < lens[:, None])[:, None, None, :]
        with torch.no_grad():
            ref = kernels.attention_torch(q.float(), k.float(), v.float(), cu, L)
        spans = list(zip(cu[:-1].tolist(), cu[1:].tolist()))
        ragged = len(set(lengths)) > 1

        def ours(q, k, v):
            with backend("triton"):
                return kernels.attention(q, k, v, cu, L)
        def sdpa(kind, mask):
            def f(q, k, v):
                with sdpa_kernel(kind):
                    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
            return f
        def loop(q, k, v):   # one SDPA call per clip: exact, no padding, but a launch per clip
            return torch.cat([F.scaled_dot_product_attention(*(t[a:b].transpose(0, 1)[None] for t in (q, k, v)))[0].transpose(0, 1)
                              for a, b in spans])
        same = lambda o: o
        rows = [("kernels.attention [triton]", "ours", packed, ours, same),
                ("kernels.attention_torch (reference)", "ref", packed, lambda q, k, v: kernels.attention_torch(q, k, v, cu, L), same),
                # what a user gets: equal lengths go to SDPA (cuDNN first), ragged ones to Triton on CUDA
                ("kernels.attention [auto]", "auto", packed, lambda q, k, v: kernels.attention(q, k, v, cu, L), same)]
        if args.cuda:
            varlen, flex = varlen_and_flex(cu, clip, L, total)
            rows += [("torch varlen_attn (FlashAttention-2)", "varlen", packed, varlen, same),
                     ("flex_attention, document mask, compiled", "flex", packed, flex, same)]
        else:
            rows += [("torch varlen_attn (FlashAttention-2)", "varlen", packed, None, same),
                     ("flex_attention, document mask, compiled", "flex", packed, None, same)]
        for b in (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                  SDPBackend.CUDNN_ATTENTION, SDPBackend.MATH):
            name = f"sdpa {b.name.lower()}"
            if not ragged:
                rows.append((name, "sdpa", padded, sdpa(b, None), unpad))
            # takes no mask: it attends to the padding, a wrong result
            elif b == SDPBackend.FLASH_ATTENTION:
                rows.append((name + ", padded, NO mask", "wrong", padded, sdpa(b, None), unpad))
            else:
                rows.append((name + ", padded + key "
                                    "mask", "padded", padded, sdpa(b, key_mask), unpad))
        if ragged:
            rows.append(("sdpa per-clip loop (auto backend)", "loop", packed, loop, same))

        at_peak = f"{flops / args.peak * 1e3:.3f} ms fwd, {3.5 * flops / args.peak * 1e3:.3f} ms fwd+bwd" if args.peak else "n/a"
        print(f"\n{case}: {len(lengths)} sequences of {min(lengths)}-{L} tokens (mean "
              f"{total / len(lengths):.0f}), {heads} heads x {hd}, {str(args.dtype)[6:]}; "
              f"{flops / 1e9:.1f} GFLOP fwd; at peak: {at_peak}")
        out_rows = []
        for name, kind, inputs, fn, unpack in rows:
            row = dict(case=case, row=name, kind=kind)
            out_rows.append(row)
            if kind == "ours" and not args.triton:
                row["note"] = SKIP
                continue
            if fn is None:
                row["note"] = SKIP_CUDA
                continue
            out, why = attempt(lambda: fn(*inputs), args)
            if why:
                row["note"] = why
                continue
            row["err"] = (unpack(out.detach()).float() - ref).abs().max().item()
            tol = 5e-2 if args.dtype == torch.bfloat16 else 1e-3
            row["note"] = "WRONG: attends to the padding (speed only)" if kind == "wrong" else "" if row["err"] <= tol else "MISMATCH"
            grad = torch.randn_like(out)
            def backward():
                return torch.autograd.grad(fn(*inputs), inputs, grad)
            for mode, mult, call in (("fwd", 1.0, lambda: fn(*inputs)), ("fb", 3.5, backward)):
                t, why = attempt(lambda: median_time(call, args), args)
                if why:
                    row["note"] = why
                    break
                row[f"{mode}_ms"], row[f"{mode}_tflops"] = t * 1e3, mult * flops / t / 1e12
                row[f"{mode}_pct"] = 100 * mult * flops / t / args.peak if args.peak else None
            del out, grad
        # targets: ours vs the fastest correct row of each kind that has one (ragged: varlen_attn and padded
        # SDPA; dense: SDPA's best backend); every speedup over each baseline is kept for the JSON
        mine = out_rows[0]
        checks = [("varlen", TARGETS["varlen"]), ("padded", TARGETS["ragged"])] if ragged else [("sdpa", TARGETS["dense"])]
        verdicts = []
        for base_kind, need in checks:
            base = [r for r in out_rows if r["kind"] == base_kind and r.get("fb_ms") and r["note"] == ""]
            if args.cuda and mine.get("fb_ms") and base:
                best = min(base, key=lambda r: r["fb_ms"])
                verdicts.append(f"{verdict(best['fb_ms'] / mine['fb_ms'], need, '{:.2f}x')} vs "
                                f"{best['row'].split(',')[0]}")
        for r in out_rows[1:]:
            if mine.get("fb_ms") and r.get("fb_ms"):
                r["ours_speedup"] = r["fb_ms"] / mine["fb_ms"]
        mine["target"] = "; ".join(verdicts) or None
        table([("row", "row", None), ("fwd_ms", "fwd ms", "{:.3f}"),
               ("fwd_tflops", "TFLOP/s", "{:.1f}"), ("fwd_pct", "% peak", "{:.1f}"),
               ("fb_ms", "fwd+bwd ms", "{:.3f}"), ("fb_tflops", "TFLOP/s", "{:.1f}"),
               ("fb_pct", "% peak", "{:.1f}"),
               ("err", "max err", "{:.1e}"), ("ours_speedup", "ours vs row", "{:.2f}x"),
               ("target", "target (fwd+bwd speedup)", None), ("note", "note", None)], out_rows)
        results += out_rows
        del q, k, v, packed, padded, ref
    return results

# -----------------------------------------------------------------------------
# 2. Gather / scatter: pure memory traffic. Bytes = rows read + rows written + the int64 index, plus
# the position table once when fused (it is small and stays in L2); the bound is a device copy.

def bench_gather(args):
    print("\n== gather / scatter: GB/s of bytes read + written, against a device copy")
    dev, B = args.dev, args.batch_size
    n_copy = 2**28 if args.cuda else 2**22   # 512 MiB in bf16 on a GPU: far past L2
    src = torch.empty(n_copy, dtype=args.dtype, device=dev)
    dst = torch.empty_like(src)
    t = median_time(lambda: dst.copy_(src), args)
    copy_bw = 2 * src.nbytes / t
    print(f"copy bandwidth: {copy_bw / 1e9:.0f} GB/s (copy_ of {src.nbytes / 2**20:.0f} MiB, read "
          "+ write)")
    del src, dst
    if not args.triton:
        print(f"   ({SKIP})")
    N = args.nv + args.na
    index, slot = moved_rows(args, B)
    K, n, e = len(index), len(slot), torch.finfo(args.dtype).bits // 8
    print(f"context of {B} clips x {N} tokens x {len(CONFIGS)} mask configs: {K} rows gathered "
          f"({K / (len(CONFIGS) * B * N):.0%} kept); predictor scatter: {n} rows")
    results = []
    for D in (384, 768):
        x, pos, rows = (torch.randn(m, D, device=dev, dtype=args.dtype) for m in (B * N, N, n))
        g_ref, gp_ref = x[index], x[index] + pos[index % N]
        s_ref = kernels.scatter_torch(rows, slot, n)
        g_bytes, s_bytes = 2 * K * D * e + 8 * K, (K + n) * D * e + 8 * n
        def triton(fn):
            def f():
                with backend("triton"):
                    return fn()
            return f
        def indexed_scatter():
            out = rows.new_zeros(n, D)
            out[slot] = rows
            return out
        ops = [("kernels.gather [triton]", "ours", triton(lambda: kernels.gather(x, index)), g_ref,
                g_bytes),
               ("kernels.gather [triton] + pos", "ours",
                triton(lambda: kernels.gather(x, index, pos)), gp_ref, g_bytes + N * D * e),
               ("torch.gather (expanded index)", "", lambda: torch.gather(x, 0, index[:, None].expand(-1, D)), g_ref, g_bytes),
               ("index_select", "", lambda: x.index_select(0, index), g_ref, g_bytes),
               ("x[index]", "", lambda: x[index], g_ref, g_bytes),
               ("kernels.gather_torch + pos (reference)", "", lambda: kernels.gather_torch(x, index, pos), gp_ref, g_bytes + N * D * e),
               ("kernels.scatter [triton]", "ours-scatter",
                triton(lambda: kernels.scatter(rows, slot, n)), s_ref, s_bytes),
               ("kernels.scatter_torch (index_copy)", "", lambda: kernels.scatter_torch(rows, slot, n), s_ref, s_bytes),
               ("zeros, then out[index] = x", "", indexed_scatter, s_ref, s_bytes),
               ("zeros, then scatter_", "", lambda: rows.new_zeros(n, D).scatter_(0, slot[:, None].expand(-1, D), rows), s_ref, s_bytes)]
        print(f"\nD = {D}: gather moves {g_bytes / 1e6:.1f} MB -> {g_bytes / copy_bw * 1e6:.1f} us "
              f"at copy bandwidth; scatter {s_bytes / 1e6:.1f} MB -> {s_bytes / copy_bw * 1e6:.1f} "
              "us")
        out_rows = []
        for name, kind, fn, ref, nbytes in ops:
            row = dict(D=D, row=name, mb=nbytes / 1e6, note="")
            out_rows.append(row)
            if kind.startswith("ours") and not args.triton:
                row["note"] = SKIP
                continue
            out, why = attempt(fn, args)
            t, why = (None, why) if why else attempt(lambda: median_time(fn, args), args)
            if why:
                row["note"] = why
                continue
            row["err"] = (out.float() - ref.float()).abs().max().item()
            row.update(us=t * 1e6, gbs=nbytes / t / 1e9, pct=100 * nbytes / t / copy_bw)
            # copies are exact; an add may
            if row["err"] > (2**-7 * ref.abs().max().item() if "pos" in name else 0):
                # round one bf16 ulp apart
                row["note"] = "MISMATCH"
            if args.cuda and kind == "ours":
                row["target"] = verdict(row["pct"], 100 * TARGETS["gather"], "{:.0f}%")
        table([("row", "row", None), ("mb", "MB", "{:.1f}"), ("us", "us", "{:.1f}"),
               ("gbs", "GB/s", "{:.0f}"),
               ("pct", "% copy", "{:.0f}"), ("err", "max err", "{:.1e}"),
               ("target", "target (of copy)", None),
               ("note", "note", None)], out_rows)
        results += out_rows
    return results

# -----------------------------------------------------------------------------
# 3. The training step: avjepa.train_step on random inputs already on the device, fresh masks every
# step as in training. MFU counts common.step_flops (attention's backward at 2x, no recompute).

def step_setup(args, model_name, audio, truncate, compiled):
    """A model as avjepa.train builds it, random inputs already on the device, and fresh masks for
    every warmup and timed step. Returns (run(masks) -> loss, host masks, device masks, training
    args, encoder, predictor)."""
    B, dev = args.batch_size, args.dev
    # a dataset of this shape
    meta = dict(frames=args.frames, size=args.crop, audio_shape=[128, args.audio_frames],
                frame_seconds=FRAME_SECONDS, audio_hop_seconds=HOP_SECONDS)
    targs = avjepa.Config(model=model_name, masks=CONFIGS, audio=audio, truncate=truncate).with_data(meta)
    torch.manual_seed(0)
    encoder, predictor, target_encoder = avjepa.build(targs)
    model = avjepa.JEPA(encoder, predictor).to(dev)
    target_encoder.to(dev)
    # as avjepa.train
    loss_fn = torch.compile(avjepa.step_loss, dynamic=True) if compiled else avjepa.step_loss
    opt = avjepa.make_optimizer(model, targs.lr)
    # stands for augment_video's output
    video = torch.randn(B, 3, args.frames, args.crop, args.crop, device=dev)
    sound = torch.randn(B, 1, 128, args.audio_frames, device=dev) if audio else None
    host = [sample_masks(args, B, audio, truncate, seed=s) for s in range(args.warmup_steps + args.steps)]
    def run(m):
        return avjepa.train_step(model, target_encoder, opt, video, sound, m, 0.998, targs,
                                 loss_fn)[0]
    # training prefetches the masks
    return run, host, [m.to(dev) for m in host], targs, encoder, predictor


def time_steps(args, model_name, audio, truncate, path, compiled):
    B = args.batch_size
    setup = step_setup(args, model_name, audio, truncate, compiled)
    run, host, masks, targs, encoder, predictor = setup
    timed = host[args.warmup_steps:]
    flops = sum(common.step_flops(encoder, predictor, m, B, targs.target_pass) for m in timed)
    with backend(path):
        t_compile = time.perf_counter()
        for m in masks[:args.warmup_steps]:
            run(m)
        if args.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        warmup_s = time.perf_counter() - t_compile
        # train_step never waits for the device: the synchronize below does
        t0 = time.perf_counter()
        losses = [run(m) for m in masks[args.warmup_steps:]]
        if args.cuda:
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
    if not all(torch.isfinite(l) for l in losses):
        raise RuntimeError("non-finite loss: the timed steps did not train as a real run would")
    ctx_tokens = np.mean([np.diff(m.context.cu.numpy()).mean() for m in timed])
    return dict(clips_s=B * args.steps / dt, step_ms=dt / args.steps * 1e3, ctx_tokens=ctx_tokens,
                warmup_s=warmup_s,
                gflop=flops / args.steps / 1e9,
                peak_ms=flops / args.steps / args.peak * 1e3 if args.peak else None,
                mfu=100 * flops / dt / args.peak if args.peak else None,
                mem_gib=torch.cuda.max_memory_allocated(args.dev) / 2**30 if args.cuda else None)


def bench_step(args):
    print(f"\n== training step: avjepa.train_step, batch {args.batch_size}, {args.warmup_steps} "
          f"warmup + {args.steps} timed steps; 'auto' is the path training takes; 'ms at peak' is "
          "the step's FLOPs at the bf16 peak; 'warmup s' includes compiling")
    results = []
    for model_name in args.models:
        for audio in (True, False):
            for truncate in (False, True):
                for path in ("auto", "triton", "torch"):
                    for compiled in (False, True) if args.compile and audio and not truncate else (False,):
                        row = dict(model=model_name, input="AV" if audio else "V",
                                   masks="truncate" if truncate else "varlen",
                                   path=path, compiled="compiled" if compiled else "eager", note="")
                        results.append(row)
                        if path == "triton" and not args.triton:
                            row["note"] = SKIP
                            continue
                        res, why = attempt(lambda: time_steps(args, model_name, audio, truncate,
                                                              path, compiled), args)
                        row.update(res or dict(note=why))
                        if args.cuda:
                            torch.cuda.empty_cache()
                        if args.cuda and res and (model_name, audio, truncate, path) == ("vit_base", True, False, "auto"):
                            row["target"] = verdict(res["mfu"], 100 * TARGETS["mfu"], "{:.1f}%") if res["mfu"] else None
    table([("model", "model", None), ("input", "input", None), ("masks", "masks", None),
           ("path", "kernels", None),
           ("compiled", "", None), ("ctx_tokens", "ctx tok/seg", "{:.0f}"),
           ("gflop", "GFLOP/step", "{:.1f}"),
           ("step_ms", "ms/step", "{:.1f}"), ("peak_ms", "ms at peak", "{:.1f}"),
           ("clips_s", "clips/s", "{:.1f}"),
           ("mfu", "MFU %", "{:.1f}"), ("mem_gib", "peak GiB", "{:.1f}"),
           ("warmup_s", "warmup s", "{:.1f}"),
           ("target", "target (MFU)", None), ("note", "note", None)], results)
    return results

# -----------------------------------------------------------------------------
# 4. Where the step's time goes: torch.profiler over the timed steps of one AV varlen step row (auto path)

# (category, substrings of kernel or op names), first match wins; the rest is "other"
CATEGORIES = [
    ("attention", ("attn", "attention", "flash", "fmha", "cudnn")),
    ("gather/scatter", ("_rows_kernel", "index", "gather", "scatter")),
    ("optimizer", ("adam", "foreach", "multi_tensor")),
    ("matmul", ("gemm", "mm", "matmul", "linear", "xmma", "nvjet", "cutlass", "conv")),
    ("norm and elementwise",
     ("norm", "elementwise", "vectorized", "reduce", "add", "mul", "sub", "div", "gelu",
                              "softmax", "exp", "copy", "fill", "where", "triton_")),
]


def category(name):
    low = name.lower()
    return next((c for c, keys in CATEGORIES if any(k in low for k in keys)), "other")


def profile_step(args):
    """The top kernels (CUDA) or ops (CPU) by self time, and each category's share of the step's
    wall time; idle is the wall time no kernel ran in (on a CPU: no op's own code ran in, e.g. the
    Python between)."""
    from torch.profiler import ProfilerActivity, profile
    model_name, compiled = args.models[-1], args.compile
    run, _, masks, *_ = step_setup(args, model_name, True, False, compiled)
    for m in masks[:args.warmup_steps]:
        run(m)
    if args.cuda:
        torch.cuda.synchronize()
    activities = [ProfilerActivity.CPU] + [ProfilerActivity.CUDA] * args.cuda
    with profile(activities=activities) as prof:
        t0 = time.perf_counter()
        for m in masks[args.warmup_steps:]:
            run(m)
        if args.cuda:
            torch.cuda.synchronize()
        wall_us = (time.perf_counter() - t0) * 1e6
    events = prof.key_averages()
    key = "self_device_time_total" if args.cuda else "self_cpu_time_total"
    # on CUDA only the kernels (device-side events) count, so CPU-side ops are not counted twice
    leaves = [e for e in events if getattr(e, key) > 0 and (not args.cuda or e.device_type.name == "CUDA")]
    print(f"\n== profile: {model_name} AV varlen, auto path, "
          f"{'compiled' if compiled else 'eager'}, {args.steps} steps of batch {args.batch_size}, "
          f"{wall_us / args.steps / 1e3:.1f} ms/step")
    print(events.table(sort_by=key, row_limit=15))
    shares = {c: 0.0 for c, _ in CATEGORIES}
    shares["other"] = 0.0
    for e in leaves:
        shares[category(e.key)] += getattr(e, key)
    shares["idle"] = max(wall_us - sum(shares.values()), 0.0)
    rows = [dict(category=c, ms=us / args.steps / 1e3, pct=100 * us / wall_us) for c, us in shares.items()]
    table([("category", "category", None), ("ms", "ms/step", "{:.2f}"),
           ("pct", "% of step", "{:.0f}")], rows)
    return rows


# -----------------------------------------------------------------------------
# 4. --tune: every kernel's tiles swept at the bench's shapes. A config must first compute what the
# reference computes (one that compiles but is wrong, or does not fit in shared memory, is dropped).

def tune_attention(args):
    elem = torch.finfo(args.dtype).bits // 8
    row = max(64, 64 * elem // 2)   # kernels._attn_config's key for head dim 64
    tiles = (16, 32) if args.quick else (32, 64, 128)
    launch = [(1, 1)] if kernels.INTERPRET else [(w, st) for w in (4, 8) for st in (2, 3, 4)]
    # dense, short, long
    cases = [c for c in attention_cases(args) if c[1] == 12 and c[2] == 64 and "AV" in c[0]][:3]
    inputs = []
    for case, heads, hd, lengths in cases:
        heads = 2 if args.quick else heads    # the interpreter runs one program at a time
        cu = F.pad(torch.tensor(lengths, device=args.dev).cumsum(0), (1, 0)).to(torch.int32)
        torch.manual_seed(0)
        qkv = [torch.randn(sum(lengths), heads, hd, device=args.dev, dtype=args.dtype,
                           requires_grad=True) for _ in range(3)]
        grad = torch.randn_like(qkv[0])
        # the fp32 reference, once per case
        leaves = [t.detach().float().requires_grad_() for t in qkv]
        ref = kernels.attention_torch(*leaves, cu, max(lengths))
        refs = dict(fwd=[ref.detach()], bwd=list(torch.autograd.grad(ref, leaves, grad.float())))
        inputs.append((case, qkv, cu, max(lengths), grad, refs))
    print(f"\n== tune attention: head dim 64, {str(args.dtype)[6:]} (table row {row}); cases: "
          f"{', '.join(c[0] for c in cases)}")
    results = []
    for kernel in ("fwd", "dkdv", "dq"):
        rows = []
        for bm, bn, warps, stages in [(m, n, w, st) for m in tiles for n in tiles for w, st in launch]:
            kernels.TILE_OVERRIDE[kernel, row] = (bm, bn, warps, stages)
            r = dict(kernel=kernel, row=row, config=(bm, bn, warps, stages), ms=0.0, best="",
                     note="")
            for case, qkv, cu, L, grad, refs in inputs:
                def call():
                    with backend("triton"):
                        out = kernels.attention(*qkv, cu, L)
                        return [out] if kernel == "fwd" else torch.autograd.grad(out, qkv, grad)
                out, why = attempt(call, args)
                if why is None:
                    pairs = list(zip(out, refs["fwd" if kernel == "fwd" else "bwd"]))
                    tol = 5e-2 if args.dtype == torch.bfloat16 else 1e-3
                    if any((o.float() - f).abs().max().item() > tol * max(1.0, f.abs().max().item()) for o, f in pairs):
                        why = "MISMATCH"
                if why is None:
                    t, why = attempt(lambda: median_time(call, args), args)
                if why:
                    r.update(ms=None, note=why)
                    break
                r["ms"] += t * 1e3
            rows.append(r)
        good = [r for r in rows if r["ms"] is not None]
        if not good:
            raise SystemExit(f"--tune: no config of the {kernel} kernel works; see the notes: "
                             f"{rows[0]['note']}")
        best = min(good, key=lambda r: r["ms"])
        # the next kernel is tuned with this one in place
        kernels.TILE_OVERRIDE[kernel, row] = best["config"]
        best["best"] = "<-"
        print(f"\n{kernel} kernel")
        table([("config", "BLOCK_M, BLOCK_N, "
                          "warps, stages", None), ("ms", "ms (sum over cases)", "{:.3f}"),
               ("best", "best", None), ("note", "note", None)], rows)
        results += rows
    print("\nkernels._attn_config, measured winners (paste into its table):")
    for kernel in ("fwd", "dkdv", "dq"):
        print(f'    "{kernel}": {{{row}: {kernels.TILE_OVERRIDE[kernel, row]}}},')
    return results


def tune_rows(args):
    """gather (with positions) and scatter at the context sizes of the bench, per row width D."""
    B = args.batch_size
    N = args.nv + args.na
    index, slot = moved_rows(args, B)
    n = len(slot)
    results = []
    print("\n== tune gather/scatter: (BLOCK_R, BLOCK_D) per row width, time of gather + pos and "
          "scatter")
    for D in (384, 768):
        dt = args.dtype
        x, pos, rows_in = (torch.randn(m, D, device=args.dev, dtype=dt) for m in (B * N, N, n))
        g_ref, s_ref = kernels.gather_torch(x, index, pos), kernels.scatter_torch(rows_in, slot, n)
        blocks_d = [d for d in (32, 64, 128, 256, 512, 1024) if d < 2 * D][-3 if args.quick else -4:]
        rows = []
        for br in ((1, 4) if args.quick else (1, 2, 4, 8, 16)):
            for bd in blocks_d:
                kernels.TILE_OVERRIDE["rows", D] = (br, bd)
                r = dict(D=D, config=(br, bd), best="", note="")
                def call():
                    with backend("triton"):
                        return kernels.gather(x, index, pos), kernels.scatter(rows_in, slot, n)
                out, why = attempt(call, args)
                if why is None and not (torch.equal(out[0], g_ref) and torch.equal(out[1], s_ref)):
                    why = "MISMATCH"
                t, why = (None, why) if why else attempt(lambda: median_time(call, args), args)
                r.update(us=None if t is None else t * 1e6, note=why or "")
                rows.append(r)
        good = [r for r in rows if r["us"] is not None]
        if good:
            min(good, key=lambda r: r["us"])["best"] = "<-"
        kernels.TILE_OVERRIDE.pop(("rows", D))
        print(f"\nD = {D}")
        table([("config", "BLOCK_R, BLOCK_D", None), ("us", "us (gather + scatter)", "{:.1f}"),
               ("best", "best", None),
               ("note", "note", None)], rows)
        if not good:
            raise SystemExit(f"no gather/scatter tile ran correctly at D = {D}: see the notes "
                             "above")
        results += rows
    return results


def tune(args):
    if not (args.triton or kernels.INTERPRET):
        raise SystemExit("--tune needs CUDA, or TRITON_INTERPRET=1 with --quick to rehearse it "
                         "on a CPU")
    try:
        return dict(attention=tune_attention(args), rows=tune_rows(args))
    finally:
        kernels.TILE_OVERRIDE.clear()

# -----------------------------------------------------------------------------

def main(argv=None):
    args = get_args(argv)
    header = dict(date=datetime.datetime.now().isoformat(timespec="seconds"),
                  device=args.device_name,
                  torch=torch.__version__, cuda=torch.version.cuda,
                  triton=kernels.triton.__version__ if kernels.HAS_TRITON else None,
                  peak_tflops=args.peak / 1e12 if args.peak else None, batch_size=args.batch_size,
                  dtype=str(args.dtype),
                  frames=args.frames, crop=args.crop, audio_frames=args.audio_frames,
                  quick=args.quick, compile=args.compile)
    print(f"avjepa bench  {header['date']}  {header['device']}")
    print(f"torch {header['torch']} (CUDA {header['cuda']}), triton {header['triton']}, {header['dtype']}; "
          f"bf16 peak {'%.0f TFLOP/s' % header['peak_tflops'] if args.peak else 'n/a (not in common.GPU_PEAK_FLOPS)'}")
    print(f"clips: {args.frames} frames x {args.crop}^2 px -> {args.nv} video tokens, "
          f"{args.audio_frames} audio frames -> {args.na} audio tokens; batch {args.batch_size}")
    if not args.cuda and not args.quick:
        print("warning: full-size shapes on a CPU take a very long time; --quick is the CPU run")
    results = dict(header=header)
    if args.tune:
        results["tune"] = tune(args)
    for section, fn in (("attention", bench_attention), ("gather", bench_gather),
                        ("step", bench_step)):
        if args.only in (None, section) and not args.tune:
            results[section] = fn(args)
    if args.profile:
        results["profile"] = profile_step(args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
        print(f"\nwrote {args.json}")
    return results


if __name__ == "__main__":
    main()
