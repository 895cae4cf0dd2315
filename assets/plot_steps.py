"""assets/steps.png: what a run's checkpoints read as training goes on, between the floor and the
ceiling. Train with --keep-every N (each kept checkpoint in its own folder, out/<run>/steps/<step>/),
then for each of those folders DIR run
    python probe.py --task classify --read joint --probe-seeds 0 --no-labels --ckpt DIR/ckpt.pt
    python probe.py --task retrieve --ckpt DIR/ckpt.pt
and, on the run's last checkpoint (out/<run>, read with the random baseline as probe.py reads by
default), the README's probes. Then: python assets/plot_steps.py LABELS_JSON DIR1 DIR2 ... out/<run>,
where LABELS_JSON is the labels' ceiling that probe.py cached in the dataset folder (labels_*.json,
with its linear readout)."""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import pyplot, save_figure  # noqa: E402


def result(folder, task, init="pretrained"):   # the one result of `task` in a checkpoint's folder
    found = sorted(Path(folder).glob(f"probe_{task}_*{init}.json"))
    if not found:
        raise SystemExit(f"{folder} has no probe_{task}_*{init}.json: run probe.py --task {task} on it first")
    return json.loads(found[0].read_text())


runs = sorted(((result(d, "classify"), result(d, "retrieve")) for d in sys.argv[2:]), key=lambda r: r[0]["step"])
steps = [c["step"] for c, _ in runs]
ceiling = json.loads(Path(sys.argv[1]).read_text())["linear"]
last = sys.argv[-1]   # the floor: the random networks read beside the last checkpoint
floor, floor_rank = result(last, "classify", "random")["linear"], result(last, "retrieve", "random")["v2a"]
plt = pyplot()
fig, (acc, rank) = plt.subplots(1, 2, figsize=(11, 3.8))
for key, colour in (("top1", "C0"), ("direction", "C1"), ("sync", "C2")):
    pick = (lambda r: r["top1"]) if key == "top1" else (lambda r: r["factors"][key])
    acc.plot(steps, [100 * pick(c["linear"]) for c, _ in runs], "o-", color=colour, label=key)
    acc.axhline(100 * pick(floor), color=colour, ls="--", lw=1)
    acc.axhline(100 * pick(ceiling), color=colour, ls=":", lw=1.5)
acc.plot([], [], "k--", lw=1, label="floor: random encoder")
acc.plot([], [], "k:", lw=1.5, label="ceiling: labels")
acc.set(title="linear readout of the frozen encoder", xlabel="step", ylabel="val accuracy (%)", ylim=(0, 103))
acc.legend(fontsize=8, ncol=2, loc="lower right")
rank.plot(steps, [r["v2a"]["median_rank"] for _, r in runs], "o-", color="C3", label="pretrained")
rank.axhline(floor_rank["median_rank"], color="C3", ls="--", lw=1, label="floor: random")
rank.axhline(runs[0][1]["chance_median_rank"], color="0.5", ls=":", label="chance")
rank.set(title="retrieval video -> audio through the predictor", xlabel="step",
         ylabel=f"median rank (of {runs[0][1]['val_clips']})", ylim=(0, runs[0][1]["val_clips"] * 0.6))
rank.legend(fontsize=8)
for ax in (acc, rank):
    ax.grid(alpha=0.3)
save_figure(fig, Path(__file__).with_name("steps.png"))
print(f"steps.png: {len(steps)} checkpoints, steps {steps[0]}-{steps[-1]}")
