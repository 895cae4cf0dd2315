"""assets/steps.png: what a run's checkpoints read as training goes on. For each checkpoint (one folder
each, as a run keeps them with --save-every and a copy per save), first run
    python probe.py --task classify --ckpt DIR/ckpt.pt --probe-seeds 0
    python probe.py --task retrieve --ckpt DIR/ckpt.pt
then: python assets/plot_steps.py RANDOM_DIR DIR1 DIR2 ..., where RANDOM_DIR holds a classify result read
with the random baseline (probe_classify_both_separate_random.json: any run of the same config)."""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import pyplot, save_figure  # noqa: E402

runs = [(json.loads((Path(d) / "probe_classify_both_separate_pretrained.json").read_text()),
         json.loads((Path(d) / "probe_retrieve_pretrained.json").read_text())) for d in sys.argv[2:]]
runs.sort(key=lambda r: r[0]["step"])
steps = [c["step"] for c, _ in runs]
random = json.loads((Path(sys.argv[1]) / "probe_classify_both_separate_random.json").read_text())["linear"]
plt = pyplot()
fig, (acc, rank) = plt.subplots(1, 2, figsize=(11, 3.6))
for key, colour in (("top1", "C0"), ("direction", "C1"), ("sync", "C2")):
    pick = (lambda r: r["top1"]) if key == "top1" else (lambda r: r["factors"][key])
    acc.plot(steps, [100 * pick(c["linear"]) for c, _ in runs], "o-", color=colour, label=f"{key}")
    acc.axhline(100 * pick(random), color=colour, ls="--", lw=1, label=f"{key}, random encoder")
acc.set(title="linear readout of the frozen encoder", xlabel="step", ylabel="val accuracy (%)", ylim=(0, 100))
acc.legend(fontsize=8, ncol=2)
rank.plot(steps, [r["v2a"]["median_rank"] for _, r in runs], "o-", color="C3", label="pretrained")
rank.axhline(runs[0][1]["chance_median_rank"], color="0.5", ls="--", label="chance")
rank.set(title="retrieval video -> audio through the predictor", xlabel="step", ylabel="median rank (of 384)",
         ylim=(0, 200))
rank.legend(fontsize=8)
for ax in (acc, rank):
    ax.grid(alpha=0.3)
save_figure(fig, Path(__file__).with_name("steps.png"))
print(f"steps.png: {len(steps)} checkpoints, steps {steps[0]}-{steps[-1]}")
