"""
The specification of avjepa, as tests. Tiny shapes, CPU, fast.  Run: python -m pytest -q test_avjepa.py

On a machine without a GPU the Triton kernels run under Triton's interpreter (TRITON_INTERPRET=1, set
below before triton is imported). On a GPU, `TRITON_INTERPRET=0 python -m pytest test_avjepa.py` runs
them compiled, with bf16 and longer clips added.
"""
import os
os.environ.setdefault("TRITON_INTERPRET", "1")  # before kernels (and so triton) is imported

import json
import math
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn

import avjepa
import bench
import kernels

# A micro encoder for tests of mechanics (the real sizes are tested where they matter).
avjepa.MODELS.setdefault("vit_micro", (32, 2, 2))


def write_fake_dataset(root, n_train=16, n_val=8, frames=4, size=32, audio_frames=32, seed=0):
    """Random arrays in prepare.py's layout: enough to drive training without decoding any video."""
    os.makedirs(root, exist_ok=True)
    rng = np.random.default_rng(seed)
    meta = dict(version=1, frames=frames, size=size, frame_step=4, fps=30, frame_seconds=4 / 30,
                clip_seconds=frames * 4 / 30, sample_rate=16000, mel_bins=128, audio_frames=audio_frames,
                audio_hop_seconds=0.01, audio_mean=-5.0, audio_std=4.0, classes=["a", "b"],
                splits=dict(train=n_train, val=n_val), video_shape=[frames, size, size, 3], audio_shape=[128, audio_frames])
    for split, n in meta["splits"].items():
        rng.integers(0, 256, (n, frames, size, size, 3), dtype=np.uint8).tofile(f"{root}/{split}_video.bin")
        (rng.standard_normal((n, 128, audio_frames)) * 4 - 5).astype(np.float16).tofile(f"{root}/{split}_audio.bin")
        (np.arange(n) % 2).astype(np.int64).tofile(f"{root}/{split}_label.bin")
        (np.arange(n) % 4 != 3).astype(np.uint8).tofile(f"{root}/{split}_has_audio.bin")   # every 4th clip is silent
    with open(f"{root}/meta.json", "w") as f:
        json.dump(meta, f)
    return str(root)


@pytest.fixture(scope="module")
def fake_data(tmp_path_factory):
    return write_fake_dataset(tmp_path_factory.mktemp("data"))


def micro_args(data, out, *extra):
    return ["--data", data, "--out", str(out), "--model", "vit_micro", "--batch-size", "4", "--log-every", "1", *extra]

# -----------------------------------------------------------------------------
# Masks and packing

VIDEO_GRID, AUDIO_GRID = (8, 14, 14), (8, 13)   # 16 x 224^2 frames, 2.08 s of log-mel
N = math.prod(VIDEO_GRID) + math.prod(AUDIO_GRID)   # 1568 + 104 tokens per clip


def masks_for(config, batch=24, seed=0, has_audio=None, truncate=False):
    has_audio = np.ones(batch, bool) if has_audio is None else has_audio
    return avjepa.sample_masks(np.random.default_rng(seed), [config], batch, VIDEO_GRID, AUDIO_GRID, has_audio, truncate)


def segments(packed):
    index, cu, _ = packed
    return [index[cu[i]:cu[i + 1]].numpy() for i in range(len(cu) - 1)]


@pytest.mark.parametrize("config", ["short", "long", "v2a", "a2v"])
def test_context_and_targets_are_disjoint_and_cover_every_token(config):
    m = masks_for(config)
    for c, t in zip(segments(m["ctx"]), segments(m["tgt"])):
        assert not set(c) & set(t)
        assert sorted(set(c) | set(t)) == list(range(c.min() // N * N, (c.min() // N + 1) * N))


@pytest.mark.parametrize("config, low, high", [("short", 0.5, 0.85), ("long", 0.7, 0.97)])
def test_multiblock_target_coverage_is_in_vjepa_range(config, low, high):
    # V-JEPA's short-range config hides about 63% of the clip, the long-range about 82%
    m = masks_for(config, batch=64)
    nv = math.prod(VIDEO_GRID)
    frac_video = np.mean([np.mean(t % N < nv) * len(t) / nv for t in segments(m["tgt"])])
    assert low < frac_video < high


def test_video_target_blocks_span_all_time():
    nv = math.prod(VIDEO_GRID)
    for t in segments(masks_for("short")["tgt"]):
        v = np.zeros(nv, bool)
        v[t[t % N < nv] % N] = True
        v = v.reshape(VIDEO_GRID)
        assert (v == v[:1]).all()


def test_context_is_never_empty_even_on_a_tiny_grid():
    for config in ["short", "long", "v2a", "a2v"]:
        m = avjepa.sample_masks(np.random.default_rng(1), [config], 200, (1, 2, 2), (2, 2), np.arange(200) % 2 == 0)
        index, cu, _ = m["ctx"]
        assert (cu[1:] - cu[:-1]).min() >= 1


def test_silent_clips_keep_no_audio_tokens():
    has_audio = np.array([True, False] * 4)
    m = masks_for("short", batch=8, has_audio=has_audio)
    nv = math.prod(VIDEO_GRID)
    for b, (c, t) in enumerate(zip(segments(m["ctx"]), segments(m["tgt"]))):
        audio_tokens = np.sum(np.concatenate([c, t]) % N >= nv)
        assert (audio_tokens > 0) == has_audio[b]


def test_each_clip_gets_its_own_masks():
    tgt = [tuple(t % N) for t in segments(masks_for("short", batch=16)["tgt"])]
    assert len(set(tgt)) == 16


def test_packed_offsets_are_consistent():
    m = avjepa.sample_masks(np.random.default_rng(0), ["short", "long"], 6, VIDEO_GRID, AUDIO_GRID, np.ones(6, bool))
    for index, cu, max_len in m.values():
        lengths = (cu[1:] - cu[:-1]).numpy()
        assert cu[0] == 0 and cu[-1] == len(index) and len(cu) == 13 and max_len == lengths.max()
        for s, seg in enumerate(segments((index, cu, max_len))):
            clip = s % 6
            assert (seg // N == clip).all() and (np.diff(seg) > 0).all()


def test_varlen_keeps_every_token_but_truncate_cuts_to_the_batch_minimum():
    full, cut = masks_for("long"), masks_for("long", truncate=True)
    full_len = (full["ctx"][1][1:] - full["ctx"][1][:-1]).numpy()
    cut_len = (cut["ctx"][1][1:] - cut["ctx"][1][:-1]).numpy()
    assert (cut_len == full_len.min()).all() and full_len.sum() > cut_len.sum()

# -----------------------------------------------------------------------------
# The model

def test_packed_encoder_equals_each_clip_encoded_alone():
    torch.manual_seed(0)
    enc = avjepa.Encoder(32, 2, 2, frames=4, size=32, audio_frames=32).eval()
    video, audio = torch.randn(3, 3, 4, 32, 32), torch.randn(3, 1, 128, 32)
    n = enc.nv + 16
    keep = [np.sort(np.random.default_rng(b).choice(n, size, replace=False)) for b, size in enumerate([1, 7, 24])]
    packed = avjepa.pack(keep, n, 3)
    out = enc(video, audio, keep=packed)
    for b in range(3):
        alone = enc(video[b:b + 1], audio[b:b + 1], keep=avjepa.pack([keep[b]], n, 1))
        torch.testing.assert_close(out[packed[1][b]:packed[1][b + 1]], alone, atol=1e-5, rtol=1e-5)


class RefViT(nn.Module):
    """V-JEPA's VisionTransformer (video, no masks), written plainly with its module names."""
    def __init__(self, dim, depth, heads, frames, size):
        super().__init__()
        self.heads = heads
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv3d(3, dim, (2, 16, 16), (2, 16, 16))
        self.pos_embed = nn.Parameter(torch.zeros(1, frames // 2 * (size // 16) ** 2, dim), requires_grad=False)
        self.blocks = nn.ModuleList()
        for _ in range(depth):
            b = nn.Module()
            b.norm1, b.norm2 = nn.LayerNorm(dim, eps=1e-6), nn.LayerNorm(dim, eps=1e-6)
            b.attn, b.mlp = nn.Module(), nn.Module()
            b.attn.qkv, b.attn.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
            b.mlp.fc1, b.mlp.fc2 = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)
            self.blocks.append(b)
        self.norm = nn.LayerNorm(dim, eps=1e-6)

    def forward(self, x):
        x = self.patch_embed.proj(x).flatten(2).transpose(1, 2) + self.pos_embed
        B, N, C = x.shape
        for b in self.blocks:
            qkv = b.attn.qkv(b.norm1(x)).reshape(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
            q, k, v = qkv[0], qkv[1], qkv[2]
            attn = ((q @ k.transpose(-2, -1)) * (C // self.heads) ** -0.5).softmax(-1)
            x = x + b.attn.proj((attn @ v).transpose(1, 2).reshape(B, N, C))
            x = x + b.mlp.fc2(nn.functional.gelu(b.mlp.fc1(b.norm2(x))))
        return self.norm(x)


def vjepa_sincos_3d(dim, grid_size, grid_depth):
    """V-JEPA's get_3d_sincos_pos_embed(uniform_power=True), in numpy as it is there."""
    def one_axis(d, pos):
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)
    gh, gd, gw = np.meshgrid(np.arange(grid_size, dtype=float), np.arange(grid_depth, dtype=float),
                             np.arange(grid_size, dtype=float))
    d = int(np.ceil(dim / 6) * 2)
    return np.concatenate([one_axis(d, gd), one_axis(d, gh), one_axis(d, gw)], axis=1)[:, :dim]


@pytest.mark.parametrize("dim", [192, 200])
def test_video_positions_equal_vjepa_sincos_table(dim):
    enc = avjepa.Encoder(dim, 1, 2, frames=4, size=48)
    np.testing.assert_allclose(enc.pos_embed[0].numpy(), vjepa_sincos_3d(dim, 3, 2), atol=1e-6)


def test_encoder_output_equals_vjepa_vision_transformer_on_same_weights():
    torch.manual_seed(0)
    enc = avjepa.Encoder(192, 3, 3, frames=4, size=64).eval()
    ref = RefViT(192, 3, 3, frames=4, size=64)
    ref.load_state_dict(enc.state_dict(), strict=True)   # same names and shapes, pos_embed included
    video = torch.randn(2, 3, 4, 64, 64)
    torch.testing.assert_close(enc(video), ref(video), atol=1e-4, rtol=0)


def test_vit_tiny_has_vjepa_key_layout_and_size():
    enc = avjepa.Encoder(*avjepa.MODELS["vit_tiny"], frames=16, size=224)
    sd = enc.state_dict()
    assert sd["pos_embed"].shape == (1, 1568, 192) and sd["patch_embed.proj.weight"].shape == (192, 3, 2, 16, 16)
    assert {k.split(".", 2)[2] for k in sd if k.startswith("blocks.0.")} == {
        f"{m}.{p}" for m in ["norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2"] for p in ["weight", "bias"]}
    trained = sum(p.numel() for p in enc.parameters() if p.requires_grad)
    assert abs(trained / 1e6 - 5.63) < 0.01


def test_load_encoder_reads_a_vjepa_checkpoint_with_prefixes(tmp_path):
    torch.manual_seed(0)
    enc = avjepa.Encoder(192, 2, 3, frames=16, size=32)
    sd = {f"module.backbone.{k}": v for k, v in enc.state_dict().items()}
    torch.save({"encoder": sd, "target_encoder": sd, "epoch": 3}, tmp_path / "vitt.pth.tar")
    loaded = avjepa.load_encoder(tmp_path / "vitt.pth.tar")
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    assert loaded.video_grid == (8, 2, 2)
    video = torch.randn(1, 3, 16, 32, 32)
    torch.testing.assert_close(loaded(video), enc.eval()(video))

# -----------------------------------------------------------------------------
# Training

def test_loss_decreases_on_a_tiny_batch(fake_data, tmp_path):
    avjepa.train(micro_args(fake_data, tmp_path, "--audio", "--steps", "40", "--lr", "2e-3", "--start-lr", "2e-3"))
    log = [json.loads(line) for line in open(tmp_path / "vit_micro-av" / "log.jsonl")]
    first, last = np.mean([r["loss"] for r in log[:5]]), np.mean([r["loss"] for r in log[-5:]])
    assert last < 0.8 * first
    assert all(r["loss_audio"] is not None and r["loss_video"] > 0 for r in log)


@pytest.mark.parametrize("flags", [[], ["--audio"], ["--audio", "--masks", "short,long,v2a,a2v"], ["--audio", "--truncate"]])
def test_training_runs_and_writes_a_checkpoint(fake_data, tmp_path, flags):
    avjepa.train(micro_args(fake_data, tmp_path, "--steps", "2", "--run", "r", *flags))
    ck = torch.load(tmp_path / "r" / "ckpt.pt", weights_only=True)
    assert {"encoder", "predictor", "target_encoder", "opt", "step", "config", "rng"} <= set(ck) and ck["step"] == 2


def test_resume_after_interruption_gives_the_same_weights(fake_data, tmp_path, monkeypatch):
    flags = ["--audio", "--steps", "8", "--save-every", "4"]
    avjepa.train(micro_args(fake_data, tmp_path / "a", *flags))
    schedules = avjepa.schedules
    def interrupt_at_6(step, args):
        if step == 6:
            raise KeyboardInterrupt
        return schedules(step, args)
    monkeypatch.setattr(avjepa, "schedules", interrupt_at_6)
    with pytest.raises(KeyboardInterrupt):
        avjepa.train(micro_args(fake_data, tmp_path / "b", *flags))
    assert torch.load(tmp_path / "b" / "vit_micro-av" / "ckpt.pt", weights_only=True)["step"] == 4
    monkeypatch.setattr(avjepa, "schedules", schedules)
    avjepa.train(micro_args(fake_data, tmp_path / "b", *flags, "--resume"))
    a = torch.load(tmp_path / "a" / "vit_micro-av" / "ckpt.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / "vit_micro-av" / "ckpt.pt", weights_only=True)
    for part in ["encoder", "predictor", "target_encoder"]:
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), (part, k)


def test_load_encoder_round_trips_our_checkpoint(fake_data, tmp_path):
    _, _, target = avjepa.train(micro_args(fake_data, tmp_path, "--audio", "--steps", "2"))
    enc = avjepa.load_encoder(tmp_path / "vit_micro-av" / "ckpt.pt")
    video, audio = torch.randn(2, 3, 4, 32, 32), torch.randn(2, 1, 128, 32)
    torch.testing.assert_close(enc(video, audio), target.eval()(video, audio))
    assert enc(video, audio).shape == (2, 8 + 16, 32) and enc(video).shape == (2, 8, 32)


DDP_CHILD = """
import os, sys, torch
sys.path.insert(0, {repo!r})
import avjepa
avjepa.MODELS["vit_micro"] = (32, 2, 2)
enc, pred, _ = avjepa.train({args!r})
torch.save(enc.state_dict(), os.path.join({out!r}, f"rank{{os.environ['RANK']}}.pt"))
"""


def test_ddp_two_gloo_processes_keep_identical_weights(fake_data, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = tmp_path / "child.py"
    script.write_text(DDP_CHILD.format(repo=os.path.dirname(os.path.abspath(__file__)), out=str(tmp_path),
                                       args=micro_args(fake_data, tmp_path, "--audio", "--steps", "3", "--device", "cpu")))
    procs = [subprocess.Popen([sys.executable, str(script)], env={**os.environ, "RANK": str(r), "LOCAL_RANK": str(r),
             "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}) for r in range(2)]
    assert [p.wait(timeout=300) for p in procs] == [0, 0]
    w0, w1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    assert all(torch.equal(w0[k], w1[k]) for k in w0)

# -----------------------------------------------------------------------------
# Clear messages for bad input

def test_missing_dataset_says_to_run_prepare(tmp_path):
    with pytest.raises(SystemExit, match="run `python prepare.py`"):
        avjepa.train(["--data", str(tmp_path / "nowhere")])


def test_a_damaged_dataset_says_to_rerun_prepare(tmp_path):
    root = write_fake_dataset(tmp_path / "d")
    os.truncate(os.path.join(root, "train_video.bin"), 100)
    with pytest.raises(SystemExit, match="rerun `python prepare.py`"):
        avjepa.load_split(root, "train")


def test_unknown_model_is_named(capsys):
    with pytest.raises(SystemExit):
        avjepa.get_args(["--model", "vit_gigantic"])
    assert "unknown model 'vit_gigantic'" in capsys.readouterr().err


def test_a_checkpoint_that_does_not_fit_is_explained(fake_data, tmp_path):
    other = avjepa.Encoder(64, 2, 2, frames=4, size=32)
    torch.save({"target_encoder": other.state_dict()}, tmp_path / "other.pt")
    with pytest.raises(SystemExit, match="does not fit this model"):
        avjepa.train(micro_args(fake_data, tmp_path, "--steps", "1", "--init", str(tmp_path / "other.pt")))


def test_an_existing_run_is_not_overwritten_without_resume(fake_data, tmp_path):
    avjepa.train(micro_args(fake_data, tmp_path, "--steps", "1"))
    with pytest.raises(SystemExit, match="add --resume"):
        avjepa.train(micro_args(fake_data, tmp_path, "--steps", "1"))


def test_a_nan_loss_stops_with_a_message(fake_data, tmp_path, monkeypatch):
    loss = avjepa.jepa_loss
    monkeypatch.setattr(avjepa, "jepa_loss", lambda *a: tuple(x * float("nan") for x in loss(*a)))
    with pytest.raises(SystemExit, match="loss became nan at step 0"):
        avjepa.train(micro_args(fake_data, tmp_path, "--steps", "3"))


# -----------------------------------------------------------------------------
# kernels.py: each Triton kernel equals its PyTorch reference, forward and backward.
# Tolerance: max |kernel - reference| <= tol * max(1, max |reference|), reference in fp32 from the
# same (rounded) inputs. tol: fp32 1e-4 interpreted (exact), 1e-2 compiled (tl.dot uses TF32);
# fp16 1e-2; bf16 4e-2.

INTERPRET = os.environ["TRITON_INTERPRET"] == "1"
DEVICE = "cpu" if INTERPRET else "cuda"
needs_runner = pytest.mark.skipif(not (INTERPRET or torch.cuda.is_available()),
                                  reason="compiled Triton needs a GPU; set TRITON_INTERPRET=1")
DTYPES = [torch.float32, torch.float16] + ([] if INTERPRET else [torch.bfloat16])
TOL = {torch.float32: 1e-4 if INTERPRET else 1e-2, torch.float16: 1e-2, torch.bfloat16: 4e-2}
RAGGED = [1, 17, 5, 33] if INTERPRET else [1, 300, 129, 64, 257]  # 1, and not multiples of the tile
HEAD_DIMS = [16, 24, 32, 64] if INTERPRET else [16, 24, 32, 64, 128]  # 24: padded to 32, masked
# the interpreter's range() over a tensor bound trips a numpy deprecation warning, harmlessly
pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")


@pytest.fixture
def triton_path(monkeypatch):
    """Force the Triton kernels, with outputs allocated as NaN so an unwritten element fails."""
    monkeypatch.setattr(kernels, "BACKEND", "triton")
    monkeypatch.setattr(kernels, "POISON", True)


def assert_close(out, ref, dtype):
    ref = ref.float()
    err = (out.float() - ref).abs().max().item()  # NaN anywhere makes this NaN, and fails
    assert err <= TOL[dtype] * max(1.0, ref.abs().max().item()), f"max error {err}"


def cu_seqlens(lengths):
    return torch.tensor([0] + lengths, device=DEVICE).cumsum(0).to(torch.int32)


def packed_qkv(lengths, H, hd, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(sum(lengths), H, hd, generator=g).to(DEVICE, dtype).requires_grad_() for _ in range(3)]


def _grads(fn, leaves, do_dtype=None):
    """fn() and its gradients wrt leaves for a fixed random upstream gradient, rounded to
    do_dtype first so a fp32 reference sees the same upstream values as a fp16 kernel."""
    out = fn()
    do = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    do = do.to(DEVICE, do_dtype or out.dtype).to(out.dtype)
    return out, torch.autograd.grad(out, leaves, do)


def attention_and_grads(q, k, v, cu, max_seqlen):
    return _grads(lambda: kernels.attention(q, k, v, cu, max_seqlen), [q, k, v])


def reference_and_grads(q, k, v, cu, max_seqlen):
    """The reference in fp32 on the same (rounded) inputs."""
    leaves = [x.detach().float().requires_grad_() for x in (q, k, v)]
    return _grads(lambda: kernels.attention_torch(*leaves, cu, max_seqlen), leaves, do_dtype=q.dtype)

# -----------------------------------------------------------------------------
# attention


def test_attention_reference_equals_per_clip_dense_softmax():
    lengths, H, hd = [1, 17, 5, 33], 2, 16
    q, k, v = (x.detach().cpu() for x in packed_qkv(lengths, H, hd, torch.float32))
    cu = torch.tensor([0] + lengths).cumsum(0).to(torch.int32)
    out = kernels.attention_torch(q, k, v, cu, max(lengths))
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
        qs, ks, vs = (x[a:b].transpose(0, 1) for x in (q, k, v))          # [H, L, hd]
        dense = torch.softmax(qs @ ks.transpose(1, 2) / hd ** 0.5, dim=-1) @ vs
        torch.testing.assert_close(out[a:b], dense.transpose(0, 1), atol=1e-5, rtol=1e-5)


@needs_runner
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("hd", HEAD_DIMS)
def test_attention_forward_matches_reference(triton_path, hd, dtype):
    q, k, v = packed_qkv(RAGGED, 2, hd, dtype)
    cu = cu_seqlens(RAGGED)
    with torch.no_grad():
        out = kernels.attention(q, k, v, cu, max(RAGGED))
        ref = kernels.attention_torch(q.float(), k.float(), v.float(), cu, max(RAGGED))
    assert out.dtype == dtype and out.shape == q.shape
    assert_close(out, ref, dtype)


@needs_runner
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("hd", HEAD_DIMS)
def test_attention_grads_match_reference(triton_path, hd, dtype):
    q, k, v = packed_qkv(RAGGED, 2, hd, dtype)
    cu = cu_seqlens(RAGGED)
    _, grads = attention_and_grads(q, k, v, cu, max(RAGGED))
    _, ref_grads = reference_and_grads(q, k, v, cu, max(RAGGED))
    for name, g, r in zip("qkv", grads, ref_grads):
        assert g.dtype == dtype, name
        assert_close(g, r, dtype)


@needs_runner
def test_attention_writes_every_output_element(triton_path):
    q, k, v = packed_qkv(RAGGED, 3, 32, torch.float32)
    o, grads = attention_and_grads(q, k, v, cu_seqlens(RAGGED), max(RAGGED))
    for t in (o, *grads):  # allocated as NaN by the poison flag
        assert torch.isfinite(t).all()


@needs_runner
def test_attention_poison_catches_a_skipped_tile(triton_path):
    # a max_seqlen too small launches one tile per clip: the rows beyond it must stay NaN,
    # which is what makes the test above able to fail
    block_m = kernels._attn_config(32, "fwd", 4)[0]                   # fp32, hd 32
    lengths = [block_m + 3]
    q, k, v = packed_qkv(lengths, 1, 32, torch.float32)
    with torch.no_grad():
        o = kernels.attention(q, k, v, cu_seqlens(lengths), 1)
    assert torch.isfinite(o[:block_m]).all() and torch.isnan(o[block_m:]).all()


@needs_runner
def test_attention_dense_equal_lengths_matches_sdpa(triton_path):
    B, L, H, hd = 3, 40 if INTERPRET else 200, 2, 32
    x = [torch.randn(B, H, L, hd, device=DEVICE, requires_grad=True) for _ in range(3)]
    packed = [t.transpose(1, 2).reshape(B * L, H, hd) for t in x]          # [B*L, H, hd], strided
    out, grads = attention_and_grads(*packed, cu_seqlens([L] * B), L)
    ref, ref_grads = _grads(lambda: torch.nn.functional.scaled_dot_product_attention(*x)
                            .transpose(1, 2).reshape(B * L, H, hd), x)          # same upstream grad
    assert_close(out, ref, torch.float32)
    for g, r in zip(grads, ref_grads):
        assert_close(g, r.transpose(1, 2).reshape(B * L, H, hd), torch.float32)


@needs_runner
def test_attention_accepts_strided_views_of_one_qkv_tensor(triton_path):
    H, hd = 2, 16
    g = torch.Generator().manual_seed(0)
    qkv = torch.randn(sum(RAGGED), 3, H, hd, generator=g).to(DEVICE).requires_grad_()
    cu = cu_seqlens(RAGGED)
    out, (dqkv,) = _grads(lambda: kernels.attention(*qkv.unbind(1), cu, max(RAGGED)), [qkv])
    ref, (ref_dqkv,) = _grads(lambda: kernels.attention_torch(*qkv.unbind(1), cu, max(RAGGED)), [qkv])
    assert_close(out, ref, torch.float32)
    assert_close(dqkv, ref_dqkv, torch.float32)


# -----------------------------------------------------------------------------
# gather / scatter: D = 37 is not a power of two and spans two 32-wide column tiles under the
# interpreter; K = 11 is not a multiple of the 4-row tile


@needs_runner
@pytest.mark.parametrize("pos_mode", ["none", "pos", "pos_with_grad"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gather_matches_reference_forward_and_backward(triton_path, dtype, pos_mode):
    M, K, D, P = 20, 11, 37, 5
    g = torch.Generator().manual_seed(0)
    x = torch.randn(M, D, generator=g).to(DEVICE, dtype).requires_grad_()
    index = torch.randint(0, M, (K,), generator=g).to(DEVICE)             # repeats allowed
    index[:2] = index[2]                                                   # and certainly present
    pos = None if pos_mode == "none" else torch.randn(P, D, generator=g).to(DEVICE, dtype)
    if pos_mode == "pos_with_grad":
        pos.requires_grad_()
    leaves = [t for t in (x, pos) if t is not None and t.requires_grad]
    out, grads = _grads(lambda: kernels.gather(x, index, pos), leaves)
    ref, ref_grads = _grads(lambda: kernels.gather_torch(x, index, pos), leaves)
    assert out.dtype == ref.dtype
    torch.testing.assert_close(out, ref, atol=0, rtol=0)                    # a copy (and one add)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b)


@needs_runner
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_scatter_matches_reference_forward_and_backward(triton_path, dtype):
    n, K, D = 20, 11, 37
    g = torch.Generator().manual_seed(0)
    x = torch.randn(K, D, generator=g).to(DEVICE, dtype).requires_grad_()
    index = torch.randperm(n, generator=g)[:K].to(DEVICE)                 # distinct rows
    out, (dx,) = _grads(lambda: kernels.scatter(x, index, n), [x])
    ref, (ref_dx,) = _grads(lambda: kernels.scatter_torch(x, index, n), [x])
    torch.testing.assert_close(out, ref, atol=0, rtol=0)
    torch.testing.assert_close(dx, ref_dx, atol=0, rtol=0)


# -----------------------------------------------------------------------------
# import and dispatch


@needs_runner
def test_torch_compile_runs_around_the_kernels(triton_path):
    # avjepa --compile: dynamo must leave the Triton paths to run eagerly, and gradients still flow
    cu, index = cu_seqlens(RAGGED), torch.tensor([5, 1, 7, 40], device=DEVICE)
    qkv = torch.randn(sum(RAGGED), 3 * 2 * 16, device=DEVICE, requires_grad=True)
    pos = torch.randn(4, 32, device=DEVICE)
    def block(qkv):
        q, k, v = qkv.unflatten(-1, (3, 2, -1)).unbind(1)
        x = kernels.attention(q, k, v, cu, max(RAGGED)).flatten(1)
        return kernels.scatter(kernels.gather(x, index, pos), index, len(x))
    out, (g,) = _grads(lambda: torch.compile(block, backend="eager", dynamic=True)(qkv), [qkv])
    ref, (ref_g,) = _grads(lambda: block(qkv), [qkv])
    assert_close(out, ref, torch.float32)
    assert_close(g, ref_g, torch.float32)


def test_import_without_interpreter_or_gpu_falls_back_to_reference():
    code = """
import torch, kernels
assert kernels.BACKEND == "auto" and not kernels.INTERPRET
q, k, v = (torch.randn(7, 2, 16) for _ in range(3))
cu = torch.tensor([0, 3, 7], dtype=torch.int32)
assert torch.equal(kernels.attention(q, k, v, cu, 4), kernels.attention_torch(q, k, v, cu, 4))
x, index = torch.randn(7, 5), torch.tensor([4, 0, 2])
assert torch.equal(kernels.gather(x, index, x[:3]), kernels.gather_torch(x, index, x[:3]))
assert torch.equal(kernels.scatter(x[:3], index, 6), kernels.scatter_torch(x[:3], index, 6))
"""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["CUDA_VISIBLE_DEVICES"] = ""
    here = os.path.dirname(os.path.abspath(__file__))
    subprocess.run([sys.executable, "-c", code], check=True, cwd=here, env=env, timeout=120)


@needs_runner
def test_jepa_loss_and_gradients_on_the_triton_path_equal_the_torch_path(monkeypatch):
    torch.manual_seed(0)
    cfg = dict(model="vit_micro", audio=True, masks=["short", "long"], frames=4, crop=32, audio_frames=32,
               tubelet_seconds=0.27, audio_patch_seconds=0.16, pred_width=0, pred_depth=0)
    encoder, predictor, target = avjepa.build(cfg)
    model = avjepa.JEPA(encoder, predictor).to(DEVICE)
    video, audio = torch.randn(2, 3, 4, 32, 32, device=DEVICE), torch.randn(2, 1, 128, 32, device=DEVICE)
    masks = avjepa.sample_masks(np.random.default_rng(0), cfg["masks"], 2, encoder.video_grid, encoder.audio_grid, [1, 0])
    masks = {k: (i.to(DEVICE), cu.to(DEVICE), m) for k, (i, cu, m) in masks.items()}
    target_tokens = torch.randn(len(masks["tgt"][0]), 32, device=DEVICE)
    def loss_and_grads(backend):
        monkeypatch.setattr(kernels, "BACKEND", backend)
        model.zero_grad()
        loss = avjepa.jepa_loss(model(video, audio, masks), target_tokens, masks, 2, 2, encoder.nv, 24, 1.0)[0]
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]
    (loss_t, grads_t), (loss_r, grads_r) = loss_and_grads("triton"), loss_and_grads("torch")
    torch.testing.assert_close(loss_t, loss_r, atol=1e-5, rtol=1e-4)
    for gt, gr in zip(grads_t, grads_r, strict=True):
        torch.testing.assert_close(gt, gr, atol=1e-5, rtol=1e-3)

# -----------------------------------------------------------------------------
# bench.py runs end to end at --quick sizes on the CPU: every reference row has a number, the Triton
# rows say they were skipped (they need CUDA), and --json writes what was printed.

def test_step_quick(tmp_path, monkeypatch):
    monkeypatch.setitem(avjepa.MODELS, "vit_micro", (64, 2, 2))   # vit_tiny's init alone takes seconds on a CPU
    out = tmp_path / "bench.json"
    res = bench.main(["--quick", "--only", "step", "--models", "vit_micro", "--device", "cpu", "--batch-size", "1",
                      "--steps", "1", "--json", str(out)])
    rows = res["step"]
    assert len(rows) == 8 and {r["model"] for r in rows} == {"vit_micro"}   # AV/V x varlen/truncate x triton/torch
    for r in rows:
        if r["path"] == "torch":
            assert r["note"] == "" and r["clips_s"] > 0 and r["gflop"] > 0, r
        else:
            assert r["note"] == bench.SKIP and "clips_s" not in r
    assert json.loads(out.read_text())["step"] == rows


def test_kernels_quick():
    res = bench.main(["--quick", "--only", "attention", "--device", "cpu", "--batch-size", "1", "--repeats", "1"])
    rows = res["attention"]
    ref = [r for r in rows if r["kind"] == "ref"]
    assert len(ref) == 6 and all(r["fwd_ms"] > 0 and r["fb_ms"] > 0 and r["err"] < 1e-4 for r in ref)
    assert all(r["note"] == bench.SKIP for r in rows if r["kind"] == "ours")
    res = bench.main(["--quick", "--only", "gather", "--device", "cpu", "--batch-size", "1", "--repeats", "1"])
    rows = res["gather"]
    assert all(r["err"] == 0 and r["gbs"] > 0 for r in rows if "[triton]" not in r["row"])
