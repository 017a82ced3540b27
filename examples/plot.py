#!/usr/bin/env python3
"""Draws train_mlp's curves: for each setting (learning rate, initial weights' scale), the
training loss and the held-out accuracy per epoch, with and without batch norm.

    python3 examples/plot.py train_mlp.csv docs/train_mlp.png
"""
import csv
import sys
from collections import defaultdict

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main():
    if len(sys.argv) != 3:
        sys.exit("usage: plot.py CSV PNG")
    runs = defaultdict(lambda: ([], [], []))  # (bn, lr, init) -> epochs, losses, accuracies
    with open(sys.argv[1], newline="") as f:
        for row in csv.DictReader(f):
            key = (row["batch_norm"] == "1", float(row["lr"]), float(row["init"]))
            epochs, losses, accuracies = runs[key]
            epochs.append(int(row["epoch"]))
            losses.append(float(row["loss"]))
            accuracies.append(100 * float(row["test_accuracy"]))
    settings = []
    for _, lr, init in runs:
        if (lr, init) not in settings:
            settings.append((lr, init))
    fig, axes = plt.subplots(2, len(settings), figsize=(3.2 * len(settings), 5.5),
                             sharex=True, sharey="row", squeeze=False)
    styles = {True: ("tab:blue", "-", "with batch norm"), False: ("tab:red", "--", "without")}
    for col, (lr, init) in enumerate(settings):
        axes[0][col].set_title(f"lr {lr:g}, init {init:g}x He")
        for bn in (True, False):
            color, line, label = styles[bn]
            epochs, losses, accuracies = runs.get((bn, lr, init), ([], [], []))
            if not epochs:  # diverged in its first epoch: no curve to draw
                axes[0][col].text(0.5, 0.5 if bn else 0.85, f"{label}: diverged",
                                  color=color, ha="center", transform=axes[0][col].transAxes)
                continue
            axes[0][col].plot(epochs, losses, color=color, linestyle=line, label=label)
            axes[1][col].plot(epochs, accuracies, color=color, linestyle=line, label=label)
        axes[1][col].set_xlabel("epoch")
    axes[0][0].set_ylabel("training loss")
    axes[0][0].set_yscale("log")
    axes[1][0].set_ylabel("held-out accuracy (%)")
    axes[1][0].set_ylim(40, 100)
    handles = [plt.Line2D([], [], color=c, linestyle=s, label=l) for c, s, l in styles.values()]
    fig.legend(handles=handles, loc="upper center", ncol=2, frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 0.94))
    fig.savefig(sys.argv[2], dpi=90)


if __name__ == "__main__":
    main()
