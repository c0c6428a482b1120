"""Correct, then fine-tune: a few corrected images and a few minutes, against training from scratch.

For each task it picks k training images as a user would, trains two models on them with the same
code, images and time limit (``--minutes``) — one fine-tuned from a model file (``--from-model``,
the trainer's fine-tune defaults), one from scratch (the trainer's scratch learning rate; the same
checkpoint rule, ``--select-on auto``) — and scores both on the task's whole val split with
segthenseg-eval's per-image metrics (StS and baseline DSC at original resolution):

* ``ct``: the CT stand-in (SegTHOR aorta), slices spread evenly through the aorta of 1 (k = 1), 3
  (k = 3) or 3 (k = 10: 4 + 3 + 3) train patients; scored on all 389 slices of the 4 val patients.
* ``polyp``: Kvasir-SEG, k train images evenly spaced in the sorted train split; scored on val.
* ``colour``: dsb2018's colour (brightfield/H&E) train images, k of them evenly spaced; scored on
  the colour and on the fluorescence (gray) val images separately, since a user's other images must
  not get worse.

Every run's model, log and metrics stay in ``--out``; the JSON gets one entry per run as it
finishes (with the CPU load average before and after, the epochs each stage reached and the wall
time), so a long benchmark can be read while it runs and continued with ``--skip-done``.

    nice -n 10 .venv/bin/python benchmarks/bench_finetune.py --task ct --k 1 3 10 --minutes 5 \\
        --data ../shared/data --out runs/bench_finetune --json runs/bench_finetune/ct.json
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

from napari_segthenseg.cli.evaluate import evaluate_samples
from napari_segthenseg.engine import Engine, load_model
from trainer.config import TrainConfig
from trainer.data import load_splits, load_stems
from trainer.finetune import fine_tune_values
from trainer.loop import train

FOLDERS = {"ct": "ct_segthor_aorta", "polyp": "kvasir_seg", "colour": "dsb2018"}
# The time limit, not the epochs, ends every run of this benchmark; the epochs only split the time
# between the stages, 2:1 for both kinds of run (the fine net converges in about half; the paper).
EPOCHS, FINE_EPOCHS = 200_000, 100_000


def evenly(items: list, k: int) -> list:
    """``k`` of ``items`` at the middles of k equal parts (a user scrolling through and picking)."""
    return [items[int((j + 0.5) * len(items) / k)] for j in range(k)]


def read_manifest(root: Path) -> list[dict[str, str]]:
    with open(root / "manifest.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def ct_picks(root: Path, k: int) -> list[str]:
    """k train slices over 1-3 train patients (the first ones by name), evenly through each one's
    aorta slices."""
    train = set(load_splits(root)["train"])
    by_patient: dict[str, list[tuple[int, str]]] = {}
    for row in read_manifest(root):
        if row["id"] in train:
            by_patient.setdefault(row["patient_id"], []).append((int(row["slice_index"]), row["id"]))
    patients = sorted(by_patient)[: min(k, 3)]
    counts = [k // len(patients) + (1 if i < k % len(patients) else 0) for i in range(len(patients))]
    picks = []
    for patient, n in zip(patients, counts, strict=True):
        picks += [stem for _, stem in evenly(sorted(by_patient[patient]), n)]
    return picks


def polyp_picks(root: Path, k: int) -> list[str]:
    return evenly(sorted(load_splits(root)["train"]), k)


def colour_picks(root: Path, k: int) -> list[str]:
    train = set(load_splits(root)["train"])
    colour = sorted(r["id"] for r in read_manifest(root) if r["id"] in train and r["grayscale"] == "0")
    return evenly(colour, k)


PICKS = {"ct": ct_picks, "polyp": polyp_picks, "colour": colour_picks}


def val_sets(task: str, root: Path) -> dict[str, list[str]]:
    """The images each run is scored on: the val split (colour: its colour and gray images apart)."""
    val = load_splits(root)["val"]
    if task != "colour":
        return {"val": val}
    gray = {r["id"]: r["grayscale"] == "1" for r in read_manifest(root)}
    return {"val_colour": [s for s in val if not gray[s]], "val_fluorescence": [s for s in val if gray[s]]}


def make_folder(root: Path, stems: list[str], dest: Path) -> Path:
    """A data folder holding only ``stems`` (links to the files), all in the train split."""
    if dest.exists():
        shutil.rmtree(dest)
    for sub in ("images", "masks"):
        (dest / sub).mkdir(parents=True)
        for stem in stems:
            src = next((root / sub).glob(f"{stem}.*"))
            (dest / sub / src.name).symlink_to(src.resolve())
    (dest / "splits.json").write_text(json.dumps({"train": stems}))
    return dest


def score(model_file: Path, root: Path, sets: dict[str, list[str]], cache: dict) -> dict[str, dict]:
    engine = Engine(load_model(model_file), device="cpu")
    out = {}
    for name, stems in sets.items():
        if name not in cache:
            cache[name] = load_stems(root, stems)
        _, summary = evaluate_samples(engine, cache[name], progress=False)
        out[name] = {m: {"dsc": summary[m]["dsc"], "dsc_std": summary[m]["dsc_std"],
                         "empty_pred": summary[m]["empty_pred"]} for m in ("baseline", "sts")}
        out[name]["n_images"] = summary["n_images"]
    return out


def progress_of(run: Path, batch: int) -> tuple[dict[str, int], dict[str, int]]:
    """Epochs and optimizer steps each stage reached (from the run's metrics.csv)."""
    with open(run / "metrics.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    stages = ("rough", "fine")
    epochs = {s: max((int(r["epoch"]) for r in rows if r["stage"] == s), default=0) for s in stages}
    per_epoch = [(r["stage"], int(r["train_items"])) for r in rows]  # a batch holds at most the items
    steps = {s: sum(-(-n // min(batch, n)) for st, n in per_epoch if st == s) for s in stages}
    return epochs, steps


def run_one(args: argparse.Namespace, task: str, k: int, start: str, minutes: float, data: Path,
            root: Path, sets: dict, cache: dict) -> dict:
    kind = "scratch" if start == "scratch" else "finetune" + (f"_lr{args.lr:g}" if args.lr else "")
    kind += "".join(f"_{k}{v}" for k, v in args.set.items())
    name = f"{task}_k{k}_{kind}_{minutes:g}min"
    out = args.out / name
    if out.exists():
        shutil.rmtree(out)
    values: dict[str, object] = {"data": data, "out": out, "threads": args.threads, "minutes": minutes,
                                 "select_on": "auto", "command": f"bench_finetune {name}"}
    given = {"data", "out", "threads", "minutes", "select_on"}
    values.update(epochs=EPOCHS, fine_epochs=FINE_EPOCHS, **args.set)
    given |= {"epochs", "fine_epochs", *args.set}
    if start == "scratch":
        values["size"] = args.size
        given.add("size")
    else:
        values["from_model"] = start
        given.add("from_model")
        if args.lr is not None:
            values["lr"] = args.lr
            given.add("lr")
    cfg = TrainConfig(**fine_tune_values(values, given))
    load = os.getloadavg()
    t0 = time.perf_counter()
    train(cfg)
    wall = time.perf_counter() - t0
    load_after = os.getloadavg()
    t1 = time.perf_counter()
    scores_ = score(out / "model.pt", root, sets, cache)
    notes = load_model(out / "model.pt").settings.notes
    epochs, steps = progress_of(out, cfg.batch_size)
    entry = {"task": task, "k": k, "start": start, "minutes": minutes, "run": str(out),
             "train_wall_s": round(wall, 1), "eval_s": round(time.perf_counter() - t1, 1),
             "load_before": [round(v, 2) for v in load], "load_after": [round(v, 2) for v in load_after],
             "epochs": epochs, "steps": steps, "select_on": notes["select_on"], "lr": cfg.lr,
             "batch_size": cfg.batch_size, "settings": args.set, "scores": scores_}
    sts = "; ".join(f"{n} StS {100 * v['sts']['dsc']:.1f} (baseline {100 * v['baseline']['dsc']:.1f})"
                    for n, v in scores_.items())
    print(f"{name}: {sts}; trained {wall:.0f} s, epochs {entry['epochs']}, load {load[0]:.1f}", flush=True)
    return entry


def report(result: dict) -> str:
    """Markdown tables of a results JSON: StS (baseline) DSC % per task, k, minutes and start."""
    lines = []
    for task in dict.fromkeys(r["task"] for r in result["runs"]):
        runs = [r for r in result["runs"] if r["task"] == task]
        sets = list(runs[0]["scores"])
        lines += [f"**{task}**", "", "| k | minutes | start | lr, settings | steps (rough, fine) | load | "
                  + " | ".join(f"{n}: StS (baseline) DSC %" for n in sets) + " |",
                  "|---" * (6 + len(sets)) + "|"]

        def cells(scores: dict, sets: list = sets) -> str:
            return " | ".join(f"{100 * scores[n]['sts']['dsc']:.1f} "
                              f"({100 * scores[n]['baseline']['dsc']:.1f})" for n in sets)

        for parent in (e for e in result["parents"] if e["task"] == task):
            lines.append(f"| 0 | 0 | {parent['start']} as it is | | | | {cells(parent['scores'])} |")
        for r in sorted(runs, key=lambda r: (r["k"], r["minutes"], r["start"] == "scratch")):
            start = "scratch" if r["start"] == "scratch" else f"fine-tune {r['start']}"
            steps = r.get("steps", r["epochs"])
            extra = "".join(f", {k} {v}" for k, v in r.get("settings", {}).items())
            lines.append(f"| {r['k']} | {r['minutes']:g} | {start} | {r['lr']:g}{extra} | {steps['rough']}, "
                         f"{steps['fine']} | {r['load_before'][0]:.1f} | {cells(r['scores'])} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--report", type=Path, metavar="JSON", help="print the tables of a results JSON and stop")
    p.add_argument("--task", nargs="+", choices=sorted(FOLDERS))
    p.add_argument("--k", type=int, nargs="+", default=[1, 3, 10], help="corrected images per run")
    p.add_argument("--minutes", type=float, nargs="+", default=[5.0], help="time limit(s) of each run")
    p.add_argument("--start", nargs="+", default=["default", "scratch"],
                   help="'scratch' and/or model files to fine-tune ('default': the bundled model)")
    p.add_argument("--data", type=Path, default=Path("../shared/data"), help="folder holding the data sets")
    p.add_argument("--out", type=Path, default=Path("runs/bench_finetune"), help="runs and data subsets")
    p.add_argument("--json", type=Path, help="results, one entry per run (appended)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (training and scoring)")
    p.add_argument("--size", type=int, default=64, help="S of the runs from scratch")
    p.add_argument("--lr", type=float, help="learning rate of the fine-tunes (default: the trainer's "
                   "fine-tune default)")
    p.add_argument("--set", nargs="*", default=[], metavar="NAME=VALUE",
                   help="more segthenseg-train settings for both kinds of run, e.g. colour_jitter=0.5")
    p.add_argument("--skip-done", action="store_true", help="skip runs the JSON already holds")
    p.add_argument("--no-baseline", action="store_true", help="do not score the start models themselves")
    args = p.parse_args(argv)
    if args.report is not None:
        print(report(json.loads(args.report.read_text())))
        return 0
    if not args.task or args.json is None:
        p.error("--task and --json are needed (or --report JSON)")
    args.set = {k: json.loads(v) for k, v in (item.split("=", 1) for item in args.set)}
    torch.set_num_threads(args.threads)
    result = json.loads(args.json.read_text()) if args.json.is_file() else {"runs": [], "parents": []}
    result.update({"command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]) if argv is None else argv,
                   "host": platform.node(), "cpus": os.cpu_count(), "torch": torch.__version__})
    done = {(r["task"], r["k"], r["start"], r["minutes"], r["lr"]) for r in result["runs"]}
    args.out.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1) + "\n")

    for task in args.task:
        root = args.data / FOLDERS[task]
        sets, cache = val_sets(task, root), {}
        if not args.no_baseline:
            for start in (s for s in args.start if s != "scratch"):
                parents = {(e["task"], e["start"]) for e in result["parents"]}
                if args.skip_done and (task, start) in parents:
                    continue
                scores_ = score(start, root, sets, cache)
                result["parents"].append({"task": task, "start": start, "scores": scores_})
                print(f"{task} {start} as it is: " + "; ".join(
                    f"{n} StS {100 * v['sts']['dsc']:.1f}" for n, v in scores_.items()), flush=True)
                save()
        for k in args.k:
            stems = PICKS[task](root, k)
            data = make_folder(root, stems, args.out / "data" / f"{task}_k{k}")
            for minutes in args.minutes:
                for start in args.start:
                    lr = None if start == "scratch" else args.lr
                    if args.skip_done and any(d[:4] == (task, k, start, minutes) and lr in (None, d[4])
                                              for d in done):
                        continue
                    entry = run_one(args, task, k, start, minutes, data, root, sets, cache)
                    entry.update({"images": stems, "date": dt.datetime.now(dt.timezone.utc).isoformat()})
                    result["runs"].append(entry)
                    save()
    return 0


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    sys.exit(main())
