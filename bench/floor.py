#!/usr/bin/env python3
"""The least time any sync tool could take for two of the bench's figures on this host.

Usage (from the repository root; the dataset comes from ../shared/bench/compare.sh):
    python3 bench/floor.py [--reps N] [--work DIR] [--dataset DIR] [--threads 1,4,16]

A receiver that keeps DESIGN.md's rule for applying a file (temp file, fsync, rename:
the issue names it) has to write every byte of the result to the disk and wait for the
disk to say it is there before the new name appears. This script does only that, with
no hashing, network, scanning or store, to show what the disk alone costs here:

- insert: the harness's own front insert (`bench_pair.edit_insert_head`: a new 256 MiB
  file with 10 bytes in front, renamed over the old one), then the receiver's least
  work: the new content copied (from the page cache) to a temp file, fdatasync, rename
  over the previous copy. The harness times its edit and the receiver together
  (README of ../shared/bench, c.), so the sum is the floor of "insert 10 B at start".
- initial: the dataset copied from a fresh `cp -a` of it (in the page cache, as after the
  harness's copy and `sync`) into an empty folder, each file through a temp file,
  fdatasync and rename, on 1, 4 and 16 threads. The floor of "initial sync".

Every repetition starts after `sync` and a 2 s pause, like the harness's. Python 3
stdlib only, plus the harness's bench_pair.py for the edit.
"""
import argparse
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HARNESS = os.path.join(REPO, "..", "shared", "bench")
BIG = os.path.join("large", "big0.bin")


def durable_copy(src, dst):
    """src -> dst the way a careful receiver applies a file: temp, fdatasync, rename."""
    tmp = os.path.join(os.path.dirname(dst), ".floor-tmp." + os.path.basename(dst))
    with open(src, "rb") as s, open(tmp, "wb") as d:
        shutil.copyfileobj(s, d, 16 << 20)
        d.flush()
        os.fdatasync(d.fileno())
    os.replace(tmp, dst)


def quiet():
    os.sync()
    time.sleep(2)


def insert_floor(work, dataset, reps):
    sys.path.insert(0, HARNESS)
    import bench_pair  # noqa: E402 (the harness's own edit)

    a, b = os.path.join(work, "a"), os.path.join(work, "b")
    for side in (a, b):
        os.makedirs(side, exist_ok=True)
        shutil.copyfile(os.path.join(dataset, BIG), os.path.join(side, "big0.bin"))
    rows = []
    for rep in range(reps):
        quiet()
        t0 = time.monotonic()
        bench_pair.edit_insert_head(os.path.join(a, "big0.bin"), f"floor{rep}", work)
        t1 = time.monotonic()
        durable_copy(os.path.join(a, "big0.bin"), os.path.join(b, "big0.bin"))
        t2 = time.monotonic()
        rows.append((t1 - t0, t2 - t1, t2 - t0))
        print(f"insert rep {rep}: harness edit {t1 - t0:.3f} s, receiver {t2 - t1:.3f} s, "
              f"total {t2 - t0:.3f} s", flush=True)
    return rows


def initial_floor(work, dataset, reps, threads):
    fa, fb = os.path.join(work, "fa"), os.path.join(work, "fb")
    results = {}
    for n in threads:
        times = []
        for rep in range(reps):
            shutil.rmtree(fa, ignore_errors=True)
            shutil.rmtree(fb, ignore_errors=True)
            subprocess.run(["cp", "-a", "--", dataset, fa], check=True)
            files = []
            for root, _, names in os.walk(fa):
                for name in names:
                    path = os.path.join(root, name)
                    files.append((os.path.getsize(path), os.path.relpath(path, fa)))
            for d in {os.path.dirname(rel) for _, rel in files}:
                os.makedirs(os.path.join(fb, d), exist_ok=True)
            files.sort()
            quiet()
            lock = threading.Lock()

            def worker(largest_first):
                while True:
                    with lock:
                        if not files:
                            return
                        _, rel = files.pop() if largest_first else files.pop(0)
                    durable_copy(os.path.join(fa, rel), os.path.join(fb, rel))

            t0 = time.monotonic()
            pool = [threading.Thread(target=worker, args=(i == 0,)) for i in range(n)]
            for t in pool:
                t.start()
            for t in pool:
                t.join()
            times.append(time.monotonic() - t0)
            print(f"initial, {n} threads, rep {rep}: {times[-1]:.3f} s", flush=True)
        results[n] = times
    shutil.rmtree(fa, ignore_errors=True)
    shutil.rmtree(fb, ignore_errors=True)
    return results


def summary(values):
    return f"{statistics.median(values):.2f} [{min(values):.2f}-{max(values):.2f}]"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--work", default=os.path.join(os.environ.get("TMPDIR", "/tmp"), "weft-floor"))
    ap.add_argument("--dataset", default=os.path.join(
        os.environ.get("TMPDIR", "/tmp"), "weft-bench", "dataset_seed42"))
    ap.add_argument("--threads", default="1,4,16")
    ap.add_argument("--only", choices=["insert", "initial"])
    args = ap.parse_args()
    if not os.path.isdir(args.dataset):
        sys.exit(f"no dataset at {args.dataset}: run ../shared/bench/compare.sh once, "
                 "or pass --dataset")
    shutil.rmtree(args.work, ignore_errors=True)
    os.makedirs(args.work)
    try:
        lines = ["| floor | median [min-max] (s) |", "|---|---|"]
        if args.only in (None, "insert"):
            rows = insert_floor(args.work, args.dataset, args.reps)
            lines.append(f"| insert: the harness's edit | {summary([r[0] for r in rows])} |")
            lines.append(f"| insert: the receiver's durable copy | {summary([r[1] for r in rows])} |")
            lines.append(f"| **insert: both (the harness's timed window)** | {summary([r[2] for r in rows])} |")
        if args.only in (None, "initial"):
            threads = [int(t) for t in args.threads.split(",")]
            for n, times in initial_floor(args.work, args.dataset, args.reps, threads).items():
                lines.append(f"| initial sync: durable copy of the dataset, {n} threads | {summary(times)} |")
        print("\n" + "\n".join(lines))
    finally:
        shutil.rmtree(args.work, ignore_errors=True)


if __name__ == "__main__":
    main()
