"""
Tests of probe.py: a micro model on random arrays, CPU.  Run: python -m pytest -q test_probe_part.py
"""
import json
import math
import os
import wave

import numpy as np
import pytest
import torch

import avjepa
import probe
from test_avjepa import micro_args, write_fake_dataset


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A 2-step micro AV checkpoint on a fake dataset whose two classes carry one factor each."""
    root = tmp_path_factory.mktemp("probe")
    data = write_fake_dataset(root / "data")
    meta = json.loads((root / "data" / "meta.json").read_text())
    meta.update(factors={"side": {"values": ["a", "b"], "modality": "video"}}, class_factors=[[0], [1]])
    (root / "data" / "meta.json").write_text(json.dumps(meta))
    avjepa.train(micro_args(data, root / "out", "--audio", "--steps", "2"))
    return dict(root=root, data=data, runs=str(root / "out"), ckpt=root / "out" / "vit_micro-av" / "ckpt.pt")


@pytest.fixture(scope="module")
def reconstructed(run):
    return probe.main(["--task", "reconstruct", "--runs", run["runs"], "--examples", "2", "--batch-size", "8"])

# -----------------------------------------------------------------------------
# End to end

@pytest.mark.parametrize("modalities, init", [("both", "pretrained"), ("video", "random")])
def test_classify_runs_end_to_end_and_writes_its_result(run, modalities, init):
    res = probe.main(["--task", "classify", "--runs", run["runs"], "--epochs", "2",
                      "--modalities", modalities, "--init", init])
    saved = json.loads((run["ckpt"].parent / f"probe_classify_{modalities}_{init}.json").read_text())
    assert saved["top1"] == res["top1"] and 0 <= res["top1"] <= 1 and res["val_clips"] == 8
    assert set(res["factors"]) == {"side"} and "top5" not in res   # 2 classes: no top-5
    assert (run["ckpt"].parent / f"probe_features_{modalities}_{init}.pt").exists()


def test_classify_reuses_cached_features(run, capsys):
    argv = ["--task", "classify", "--runs", run["runs"], "--epochs", "1", "--modalities", "audio"]
    first = probe.main(argv)
    assert "features from" not in capsys.readouterr().out
    second = probe.main(argv)
    assert "features from" in capsys.readouterr().out and second["top1"] == first["top1"]


def test_silent_clips_have_no_audio_tokens_for_the_probe(run):
    encoder = probe.frozen_models(avjepa.read_checkpoint(run["ckpt"]), "pretrained", 0)[2]
    data = avjepa.load_split(run["data"], "val")
    feats = probe.extract(encoder, data, np.arange(8), "both", torch.device("cpu"), 8, "test")
    silent = ~torch.from_numpy(np.array(data["has_audio"])).bool()
    assert silent.any() and not feats["valid"][silent, encoder.nv:].any() and feats["valid"][~silent].all()


def test_reconstruct_runs_end_to_end_and_writes_metrics_with_baselines(run, reconstructed):
    saved = json.loads((run["ckpt"].parent / "probe_reconstruct_short_pretrained.json").read_text())
    for k in ("psnr", "psnr_mean_fill", "l1", "l1_mean_fill", "snr", "snr_mean_fill"):
        assert math.isfinite(saved[k]) and saved[k] == reconstructed[k]


def test_written_png_mp4_and_wav_decode_with_the_expected_sizes(run, reconstructed):
    import av
    from PIL import Image
    out = run["ckpt"].parent / "reconstruct"
    k = math.ceil(128 / 32)                                       # 32 px frames are drawn 4x
    img = Image.open(out / "short_pretrained_0.png")
    assert img.size == (110 + max(4 * (32 * k + 4), 3 * (2 * 32 + 4)), 3 * (32 * k + 4) + 256 + 20 + 4)
    with av.open(str(out / "short_pretrained_0.mp4")) as c:
        assert c.streams.audio and c.streams.audio[0].sample_rate == 16000
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
        assert len(frames) == 4 and frames[0].shape == ((32 * k), (2 * 32 + 4) * k, 3)
    with av.open(str(out / "short_pretrained_0.mp4")) as c:
        assert sum(f.samples for f in c.decode(audio=0)) > 0.2 * 16000
    for name in ("short_pretrained_0.wav", "short_pretrained_0_original.wav"):
        with wave.open(str(out / name)) as w:
            assert w.getframerate() == 16000 and w.getnchannels() == 1 and w.getnframes() > 0.2 * 16000
    assert not [p for p in os.listdir(out) if ".tmp-" in p]       # every file was renamed into place

# -----------------------------------------------------------------------------
# Patches and metrics

def test_patchify_round_trips_and_rows_are_the_encoders_tokens():
    torch.manual_seed(0)
    enc = avjepa.Encoder(32, 1, 2, frames=4, size=32, audio_frames=48)
    video, audio = torch.randn(2, 3, 4, 32, 32), torch.randn(2, 1, 128, 48)
    pv, pa = probe.patchify_video(video), probe.patchify_audio(audio)
    assert torch.equal(probe.unpatchify_video(pv, 3, 4, 32, 32), video)
    assert torch.equal(probe.unpatchify_audio(pa, 128, 48), audio)
    # a patch embedding is a linear map of its patch: same rows, same order as the encoder's tokens
    for p, embed in ((pv, enc.patch_embed), (pa, enc.audio_patch_embed)):
        w = embed.proj.weight
        w = w.permute(0, 2, 3, 4, 1) if w.dim() == 5 else w.permute(0, 2, 3, 1)   # (dt, dy, dx, c) order
        tokens = embed(video if w.dim() == 5 else audio)
        torch.testing.assert_close(p @ w.reshape(len(w), -1).T + embed.proj.bias, tokens, atol=1e-4, rtol=1e-4)


def test_masked_metrics_count_only_hidden_patches():
    target = torch.tensor([[[0.0, 1.0], [0.5, 0.5], [1.0, 1.0]]])
    pred = torch.tensor([[[0.5, 1.0], [9.0, 9.0], [1.0, 0.0]]])   # patch 1 is visible: its error must not count
    mask = torch.tensor([[True, False, True]])
    # hidden squared errors: (0.25 + 0) / 2 and (0 + 1) / 2 -> mse 0.3125
    assert probe.masked_psnr(pred, target, mask).item() == pytest.approx(10 * math.log10(1 / 0.3125))
    assert probe.masked_l1(pred, target, mask).item() == pytest.approx((0.25 + 0.5) / 2)
    # hidden signal power (0.5 + 1) / 2 over error power 0.3125
    assert probe.masked_snr(pred, target, mask).item() == pytest.approx(10 * math.log10(0.75 / 0.3125))
    assert torch.isnan(probe.masked_psnr(pred, target, torch.zeros(1, 3, dtype=torch.bool))).all()


def test_mean_fill_uses_the_visible_patches_of_the_same_clip():
    patches = torch.tensor([[[1.0, 3.0], [5.0, 5.0], [3.0, 1.0]], [[7.0, 7.0], [0.0, 0.0], [1.0, 1.0]]])
    mask = torch.tensor([[False, True, False], [True, True, False]])
    filled = probe.mean_fill(patches, mask)
    assert filled[0, 1].tolist() == [2.0, 2.0] and filled[1, 0].tolist() == [1.0, 1.0] == filled[1, 1].tolist()
    assert torch.equal(filled[~mask], patches[~mask])


def test_griffin_lim_resynthesis_keeps_the_pitch_of_a_tone():
    import torchaudio.compliance.kaldi as kaldi
    sr, f0 = 16000, 1000.0
    w = 0.3 * torch.sin(2 * math.pi * f0 * torch.arange(sr) / sr)[None]
    mel = kaldi.fbank(w, htk_compat=True, sample_frequency=sr, use_energy=False, window_type="hanning",
                      num_mel_bins=128, dither=0.0, frame_shift=10).T
    meta = dict(audio_mean=-5.0, audio_std=4.0)
    out = probe.mel_to_wave((mel - meta["audio_mean"]) / (2 * meta["audio_std"]), meta)
    spectrum = np.abs(np.fft.rfft(out.numpy()))
    assert abs(np.argmax(spectrum) * sr / len(out) - f0) < 40

# -----------------------------------------------------------------------------
# Defaults and errors

def test_default_checkpoint_is_the_most_recent_run(run, tmp_path, capsys):
    for i, name in enumerate(["b-old", "a-new"]):   # the newer one sorts first by name: mtime must decide
        (tmp_path / name).mkdir()
        (tmp_path / name / "ckpt.pt").write_bytes(run["ckpt"].read_bytes())
        os.utime(tmp_path / name / "ckpt.pt", (1e9 + i, 1e9 + i))
    assert probe.newest_checkpoint(tmp_path) == tmp_path / "a-new" / "ckpt.pt"
    res = probe.main(["--task", "classify", "--runs", str(tmp_path), "--epochs", "1", "--no-cache"])
    assert res["run"] == "a-new" and f"probing {tmp_path / 'a-new' / 'ckpt.pt'}" in capsys.readouterr().out


def test_missing_checkpoint_says_to_train_first(tmp_path):
    with pytest.raises(SystemExit, match="train first with `python avjepa.py"):
        probe.main(["--task", "reconstruct", "--runs", str(tmp_path)])


def test_wrong_checkpoint_files_are_explained(tmp_path):
    (tmp_path / "junk.pt").write_text("not a checkpoint")
    with pytest.raises(SystemExit, match="not a readable checkpoint"):
        probe.main(["--task", "classify", "--ckpt", str(tmp_path / "junk.pt")])
    torch.save({"model": {}}, tmp_path / "other.pt")
    with pytest.raises(SystemExit, match="not an avjepa checkpoint"):
        probe.main(["--task", "classify", "--ckpt", str(tmp_path / "other.pt")])


def test_missing_dataset_is_explained(run, tmp_path):
    with pytest.raises(SystemExit, match="no dataset at"):
        probe.main(["--task", "classify", "--ckpt", str(run["ckpt"]), "--data", str(tmp_path / "nowhere")])


def test_unlabelled_dataset_cannot_be_classified(run, tmp_path):
    data = write_fake_dataset(tmp_path / "unlabelled")
    for split in ("train", "val"):
        np.full(json.loads((tmp_path / "unlabelled" / "meta.json").read_text())["splits"][split], -1,
                np.int64).tofile(tmp_path / "unlabelled" / f"{split}_label.bin")
    with pytest.raises(SystemExit, match="no labelled clips"):
        probe.main(["--task", "classify", "--ckpt", str(run["ckpt"]), "--data", data])
