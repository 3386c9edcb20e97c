"""Benchmark: training data at the real set's scale, on real-size Kaggle-style phantom studies (run
on demand, not by pytest).

    .venv/bin/python tests/benchmarks/bench_train_scale.py [--studies 50 200] [--workers 1 2]
        [--device cpu|cuda] [--out DIR] [--seed 7] [--predict-repeats 3] [--predict-only]

Makes the largest N once (`lumbar-node phantom --style kaggle --matrix real`, kept in --out and
reused), and the smaller N as subsets of it (the same studies, symlinked). Per N: `lumbar-node
prepare` with each worker count (wall time, studies/s, peak RSS of the command and of all its
processes together), a second `prepare` (cache reuse), the cache's MB per study, and `lumbar-node
train --cache` for 2 localiser + 2 grader epochs (peak RSS; from its history, the second epochs'
training samples/s, the DataLoader workers' start, paid once per run, and the share of an epoch
spent waiting for data; validation seconds per study through the serving pipeline). Then a
real-size study's `predict` time with pydicom's own RLE decoder (LUMBAR_NODE_DECODER=pydicom) and
with the default one, and the projection for the 1,975 studies of the RSNA 2024 training set.
Every command runs as a subprocess, its memory polled from /proc every 50 ms. Prints a markdown
table.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

REAL_SET_STUDIES = 1975
EPOCHS = 2  # of each stage: the last one's rates are the steady state's
EXE = Path(sys.executable).with_name("lumbar-node")


@dataclass
class Measured:
    """A command's wall time and memory: its own peak RSS, and the peak of its process tree's sum."""

    seconds: float
    peak_mb: float
    tree_peak_mb: float
    stdout: str
    stderr: str


def _status_kb(pid: int, key: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def _tree(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for task in Path(f"/proc/{p}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
    return out


def measure(cmd: list[str], env: dict[str, str] | None = None) -> Measured:
    """Run a command, polling its memory; raises with its stderr when it fails."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **(env or {})})
    peak = tree = 0
    out_chunks: list[str] = []
    err_chunks: list[str] = []
    readers = [threading.Thread(target=lambda s=s, c=c: c.append(s.read()), daemon=True)
               for s, c in ((proc.stdout, out_chunks), (proc.stderr, err_chunks))]
    for r in readers:
        r.start()
    while proc.poll() is None:
        peak = max(peak, _status_kb(proc.pid, "VmHWM"))
        tree = max(tree, sum(_status_kb(p, "VmRSS") for p in _tree(proc.pid)))
        time.sleep(0.05)
    for r in readers:
        r.join()
    seconds = time.perf_counter() - t0
    stdout, stderr = "".join(out_chunks), "".join(err_chunks)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{stderr[-3000:]}")
    return Measured(seconds, peak / 1024, tree / 1024, stdout, stderr)


def make_data(out: Path, n_max: int, sizes: list[int], seed: int, workers: int) -> dict[int, Path]:
    """The largest N generated once (reused when present), smaller N as symlinked subsets."""
    full = out / f"real-{n_max}-seed{seed}"
    if not (full / "train.csv").is_file() or _rows(full / "train.csv") != n_max:
        shutil.rmtree(full, ignore_errors=True)
        print(f"generating {n_max} real-size Kaggle-style phantom studies in {full} ...", file=sys.stderr, flush=True)
        t = measure([str(EXE), "phantom", "--style", "kaggle", "--matrix", "real", "--studies", str(n_max),
                     "--seed", str(seed), "--out", str(full), "--workers", str(workers)])
        print(f"  {t.seconds:.0f} s ({t.seconds / n_max:.1f} s per study)", file=sys.stderr, flush=True)
    data = {n_max: full}
    for n in sizes:
        if n == n_max:
            continue
        sub = out / f"real-{n}-of-{n_max}-seed{seed}"
        shutil.rmtree(sub, ignore_errors=True)
        (sub / "train_images").mkdir(parents=True)
        with open(full / "train.csv", newline="") as f:
            ids = sorted(row["study_id"] for row in csv.DictReader(f))[:n]
        for name in ("train.csv", "train_label_coordinates.csv", "train_series_descriptions.csv"):
            with open(full / name, newline="") as f, open(sub / name, "w", newline="") as g:
                reader = csv.reader(f)
                writer = csv.writer(g)
                writer.writerow(next(reader))
                writer.writerows(r for r in reader if r[0] in set(ids))
        for sid in ids:
            (sub / "train_images" / sid).symlink_to(full / "train_images" / sid)
        data[n] = sub
    return data


def _rows(path: Path) -> int:
    with open(path, newline="") as f:
        return sum(1 for _ in csv.DictReader(f))


def bench_n(n: int, data: Path, out: Path, workers: list[int], device: str) -> dict:
    """Prepare with each worker count, prepare again, train 1 + 1 epochs."""
    row: dict = {"n": n, "prepare": {}}
    cache = out / f"cache-{n}"
    for w in workers:
        shutil.rmtree(cache, ignore_errors=True)
        m = measure([str(EXE), "prepare", "--data", str(data), "--out", str(cache), "--workers", str(w)])
        row["prepare"][w] = {"seconds": m.seconds, "studies_per_s": n / m.seconds, "peak_mb": m.peak_mb,
                             "tree_peak_mb": m.tree_peak_mb, "summary": m.stdout.strip()}
        print(f"N={n} prepare, {w} worker(s): {m.stdout.strip()}", file=sys.stderr, flush=True)
    again = measure([str(EXE), "prepare", "--data", str(data), "--out", str(cache), "--workers", str(max(workers))])
    row["reuse_seconds"] = again.seconds
    manifest = json.loads((cache / "manifest.json").read_text())
    ok = [s for s in manifest["studies"].values() if s["status"] == "ok"]
    row["ok"] = len(ok)
    row["cache_mb_per_study"] = sum(s["cache_bytes"] for s in ok) / 2**20 / max(len(ok), 1)
    row["source_mb_per_study"] = sum(s["source_bytes"] for s in ok) / 2**20 / max(len(ok), 1)
    run = out / f"run-{n}"
    shutil.rmtree(run, ignore_errors=True)
    m = measure([str(EXE), "train", "--cache", str(cache), "--out", str(run), "--localiser-epochs", str(EPOCHS),
                 "--grader-epochs", str(EPOCHS), "--patience", str(EPOCHS), "--workers", str(max(workers)),
                 "--device", device])
    history = json.loads((run / "history.json").read_text())
    loc = [h for h in history if h["stage"] == "localiser"][-1]
    grd = [h for h in history if h["stage"] == "grader"][-1]
    first = next(h for h in history if h["stage"] == "grader")
    row["train"] = {"seconds": m.seconds, "peak_mb": m.peak_mb, "tree_peak_mb": m.tree_peak_mb,
                    "grader_samples": grd["samples"], "grader_samples_per_s": _rate(grd),
                    "localiser_samples_per_s": _rate(loc), "loader_start_s": first["first_batch_seconds"],
                    "loader_wait_share": (grd["loader_wait_seconds"] - grd["first_batch_seconds"])
                    / max(grd["train_seconds"] - grd["first_batch_seconds"], 1e-9),
                    "validation_seconds": grd["validation_seconds"]}
    row["val_studies"] = _val_studies(run)
    print(f"N={n} train: {m.seconds:.0f} s, peak {m.peak_mb:.0f} MB", file=sys.stderr, flush=True)
    return row


def _rate(epoch: dict) -> float:
    """Training samples/s of an epoch, the wait for its first batch left out (in the first epoch: the
    workers' start, once per run)."""
    return epoch["samples"] / max(epoch["train_seconds"] - epoch["first_batch_seconds"], 1e-9)


def _val_studies(run: Path) -> int:
    import torch

    meta = torch.load(run / "model.pt", map_location="cpu", weights_only=False)["meta"]
    return int(meta["validation"]["studies"])


def bench_predict(data: Path, repeats: int) -> dict[str, dict[str, float]]:
    """`lumbar-node predict` of one real-size study (bundled model), old decoder and new: medians."""
    study = sorted((data / "train_images").iterdir())[0]
    out = {}
    for name, env in (("pydicom RLE decoder", {"LUMBAR_NODE_DECODER": "pydicom"}), ("default decoder", {})):
        walls, grading = [], []
        for _ in range(repeats):
            m = measure([str(EXE), "predict", str(study), "--json"], env)
            walls.append(m.seconds)
            grading.append(sum(json.loads(m.stdout)[0]["seconds"].values()))
        out[name] = {"wall": statistics.median(walls), "analyze": statistics.median(grading)}
    return out


def report(rows: list[dict], predict: dict, workers: list[int], device: str, gen_note: str) -> str:
    w_best = max(workers)
    lines = [f"machine: {platform.node()}, {os.cpu_count()} CPUs, device {device}; {gen_note}", "",
             "| N | " + " | ".join(f"prepare {w}w s (studies/s)" for w in workers)
             + " | prepare peak RSS MB (cmd / all procs) | 2nd prepare s | cache MB/study | train peak RSS MB "
               "(cmd / all procs) | grader samples/s | localiser samples/s | loader start s | loader wait share | "
               "validation s/study |",
             "|---|" + "---|" * len(workers) + "---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        p = r["prepare"]
        t = r["train"]
        lines.append(
            f"| {r['n']} | " + " | ".join(f"{p[w]['seconds']:.1f} ({p[w]['studies_per_s']:.2f})" for w in workers)
            + f" | {p[w_best]['peak_mb']:.0f} / {p[w_best]['tree_peak_mb']:.0f} | {r['reuse_seconds']:.1f}"
            f" | {r['cache_mb_per_study']:.2f} | {t['peak_mb']:.0f} / {t['tree_peak_mb']:.0f}"
            f" | {t['grader_samples_per_s']:.0f} | {t['localiser_samples_per_s']:.1f} | {t['loader_start_s']:.1f}"
            f" | {t['loader_wait_share']:.0%} | {t['validation_seconds'] / max(r['val_studies'], 1):.2f} |")
    lines += ["", "| predict, one real-size study | wall s (median) | analyze_study s (median) |", "|---|---|---|"]
    lines += [f"| {k} | {v['wall']:.2f} | {v['analyze']:.2f} |" for k, v in predict.items()]
    big = rows[-1]
    rate = big["prepare"][w_best]["studies_per_s"]
    per_study_windows = big["train"]["grader_samples"] / max(big["ok"] - big["val_studies"], 1)
    n_train, n_val = round(REAL_SET_STUDIES * 0.8), round(REAL_SET_STUDIES * 0.2)
    grader_epoch = n_train * per_study_windows / big["train"]["grader_samples_per_s"]
    val_epoch = n_val * big["train"]["validation_seconds"] / max(big["val_studies"], 1)
    lines += ["", f"Projection for {REAL_SET_STUDIES} studies (from N={big['n']}, {w_best} workers, {device}):",
              f"- prepare: {REAL_SET_STUDIES / rate / 3600:.2f} h ({rate:.2f} studies/s); cache "
              f"{REAL_SET_STUDIES * big['cache_mb_per_study'] / 1024:.1f} GB "
              f"({big['cache_mb_per_study']:.2f} MB per study; sources {big['source_mb_per_study']:.1f} MB per study "
              "here)",
              f"- a grader epoch: {grader_epoch / 60:.1f} min ({n_train} training studies x {per_study_windows:.1f} "
              f"windows at {big['train']['grader_samples_per_s']:.0f} samples/s); validation through the pipeline: "
              f"{val_epoch / 60:.1f} min per epoch ({n_val} studies)",
              f"- peak RSS: prepare {big['prepare'][w_best]['peak_mb']:.0f} MB, train {big['train']['peak_mb']:.0f} MB "
              f"at N={big['n']} (flat in N: compare the rows)"]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--studies", type=int, nargs="+", default=[50, 200])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--out", type=Path, default=Path("data/bench-train-scale"))
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--predict-repeats", type=int, default=3)
    parser.add_argument("--predict-only", action="store_true", help="only the predict timing (data made or reused)")
    args = parser.parse_args()
    sizes = sorted(set(args.studies))
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    data = make_data(args.out.resolve(), sizes[-1], sizes, args.seed, max(args.workers))
    gen_note = f"data: {sizes[-1]} real-size Kaggle-style phantom studies, seed {args.seed}"
    if args.predict_only:
        for name, t in bench_predict(data[sizes[-1]], args.predict_repeats).items():
            print(f"predict, one real-size study, {name}: wall {t['wall']:.2f} s, analyze_study {t['analyze']:.2f} s")
        return
    rows = [bench_n(n, data[n], args.out.resolve(), args.workers, args.device) for n in sizes]
    predict = bench_predict(data[sizes[-1]], args.predict_repeats)
    table = report(rows, predict, args.workers, args.device, gen_note)
    print(table)
    (args.out / "bench_train_scale.json").write_text(json.dumps({"rows": rows, "predict": predict}, indent=1,
                                                                default=str))
    print(f"\n(benchmark took {(time.perf_counter() - t0) / 60:.1f} min)", file=sys.stderr)


if __name__ == "__main__":
    main()
