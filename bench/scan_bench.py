#!/usr/bin/env python3
"""Scan benchmark: Weft's cold scan and warm rescan beside b3sum over the same files.

Usage (from the repository root):
    python3 bench/scan_bench.py [--work DIR] [--skip-1g] [--skip-100k]

Builds `weft` in release mode, generates (once, cached in WORK) the ~0.8 GiB
dataset of ../shared/bench/gen_dataset.py and a tree of 100,000 small files, then
for each tree:
  - b3sum over every file (one process, `xargs -0 b3sum`), page cache warm and cold;
  - a weft node (watcher off) adding the folder: the first full scan ("cold": empty
    index), then `weft scan` with nothing changed ("warm"), page cache warm and cold.
Reported: wall seconds (the node's own "scan finished millis" log line), CPU
seconds of the node process, and its peak RSS (VmHWM). Cold page cache means
`echo 3 > /proc/sys/vm/drop_caches` first (needs root; skipped otherwise).
Python 3 stdlib only; installs b3sum with apt-get if it is missing.
"""
import argparse
import json
import os
import random
import re
import shutil
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WEFT = os.path.join(REPO, "target", "release", "weft")
GEN = os.path.join(REPO, "..", "shared", "bench", "gen_dataset.py")
API_KEY = "scan-bench-api-key-0123456789"


def drop_caches():
    try:
        subprocess.run(["sync"], check=True)
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def ensure_b3sum():
    if shutil.which("b3sum"):
        return
    subprocess.run(["apt-get", "install", "-y", "b3sum"], stdout=subprocess.DEVNULL)
    if not shutil.which("b3sum"):
        subprocess.run(["apt-get", "update"], stdout=subprocess.DEVNULL)
        subprocess.run(["apt-get", "install", "-y", "b3sum"], check=True, stdout=subprocess.DEVNULL)


def gen_small_tree(path, count=100_000):
    if os.path.exists(os.path.join(path, ".done")):
        return
    shutil.rmtree(path, ignore_errors=True)
    rng = random.Random(7)
    for index in range(count):
        directory = os.path.join(path, f"d{index // 1000:03d}", f"e{(index // 100) % 10}")
        os.makedirs(directory, exist_ok=True)
        size = rng.randint(100, 4096)
        with open(os.path.join(directory, f"f{index}.txt"), "wb") as f:
            f.write(rng.randbytes(size))
    open(os.path.join(path, ".done"), "w").close()


def b3sum(tree, cold):
    if cold and not drop_caches():
        return None
    if not cold:
        # Warm the page cache with one unmeasured pass.
        subprocess.run(f"find {tree} -type f -print0 | xargs -0 cat > /dev/null", shell=True, check=True)
    start = time.monotonic()
    result = subprocess.run(
        f"find {tree} -type f ! -name .done -print0 | xargs -0 /usr/bin/time -f '%U %S %M' b3sum > /dev/null",
        shell=True, capture_output=True, text=True, check=True)
    wall = time.monotonic() - start
    # xargs may split into several b3sum runs; add their CPU, take the max RSS.
    cpu, rss = 0.0, 0
    for line in result.stderr.strip().splitlines():
        parts = line.split()
        if len(parts) == 3:
            cpu += float(parts[0]) + float(parts[1])
            rss = max(rss, int(parts[2]))
    return {"wall_s": wall, "cpu_s": cpu, "rss_mib": rss / 1024}


def proc_cpu(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


def proc_rss_mib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return 0.0


def weft(home, *args):
    return subprocess.run([WEFT, "--home", home, *args], capture_output=True, text=True, check=True).stdout


def scan_millis(log_path, count):
    """The millis of the first `count` 'scan finished' log lines (waits for them)."""
    deadline = time.monotonic() + 1800
    while time.monotonic() < deadline:
        with open(log_path) as f:
            found = re.findall(r"scan finished.*?millis=(\d+)", re.sub(r"\x1b\[[0-9;]*m", "", f.read()))
        if len(found) >= count:
            return [int(m) / 1000 for m in found[:count]]
        time.sleep(0.05)
    raise RuntimeError("scan did not finish")


def weft_scan(tree, work, label, cold):
    home = os.path.join(work, f"home-{label}")
    shutil.rmtree(home, ignore_errors=True)
    os.makedirs(home)
    with open(os.path.join(home, "config.toml"), "w") as f:
        f.write(f'api_key = "{API_KEY}"\nwatch = false\nfull_rescan_interval_s = 86400\n')
    log_path = os.path.join(home, "node.log")
    log = open(log_path, "w")
    node = subprocess.Popen([WEFT, "--home", home, "run", "--no-default-folder"],
                            stdout=log, stderr=log, stdin=subprocess.DEVNULL)
    try:
        for _ in range(200):
            if os.path.exists(os.path.join(home, "api.json")):
                break
            time.sleep(0.05)
        if cold and not drop_caches():
            return None
        cpu0 = proc_cpu(node.pid)
        weft(home, "folder", "add", tree, "--id", "bench")
        cold_s = scan_millis(log_path, 1)[0]
        cpu_cold = proc_cpu(node.pid) - cpu0
        rss_cold = proc_rss_mib(node.pid)
        status = json.loads(weft(home, "status", "--json"))["folders"][0]
        cpu1 = proc_cpu(node.pid)
        weft(home, "scan", "bench", "--json")
        warm_s = scan_millis(log_path, 2)[1]
        cpu_warm = proc_cpu(node.pid) - cpu1
        return {
            "files": status["files"], "bytes": status["bytes"],
            "cold_wall_s": cold_s, "cold_cpu_s": cpu_cold,
            "warm_wall_s": warm_s, "warm_cpu_s": cpu_warm,
            "rss_mib": max(rss_cold, proc_rss_mib(node.pid)),
        }
    finally:
        node.terminate()
        node.wait(timeout=60)
        log.close()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--work", default=os.path.join(os.environ.get("TMPDIR", "/tmp"), "weft-scan-bench"))
    parser.add_argument("--skip-1g", action="store_true")
    parser.add_argument("--skip-100k", action="store_true")
    args = parser.parse_args()
    os.makedirs(args.work, exist_ok=True)
    subprocess.run(["cargo", "build", "--release", "-p", "weft-node"], cwd=REPO, check=True)
    ensure_b3sum()
    trees = []
    if not args.skip_1g:
        dataset = os.path.join(args.work, "dataset")
        if not os.path.exists(os.path.join(dataset, "large", "big1.bin")):
            subprocess.run([sys.executable, GEN, "1", dataset], check=True, stdout=subprocess.DEVNULL)
        trees.append(("dataset-0.8GiB", dataset))
    if not args.skip_100k:
        small = os.path.join(args.work, "small100k")
        gen_small_tree(small)
        trees.append(("small-100k", small))
    for label, tree in trees:
        for cold in (False, True):
            cache = "cold cache" if cold else "warm cache"
            ref = b3sum(tree, cold)
            if ref is None:
                print(f"{label} ({cache}): skipped, cannot drop the page cache (not root)")
                continue
            w = weft_scan(tree, args.work, label, cold)
            print(f"{label} ({cache}): files {w['files']}, bytes {w['bytes']}")
            print(f"  b3sum           wall {ref['wall_s']:.2f} s  cpu {ref['cpu_s']:.2f} s  rss {ref['rss_mib']:.0f} MiB")
            print(f"  weft cold scan  wall {w['cold_wall_s']:.2f} s  cpu {w['cold_cpu_s']:.2f} s  "
                  f"(speed {ref['wall_s'] / w['cold_wall_s'] * 100:.0f}% of b3sum)")
            print(f"  weft warm scan  wall {w['warm_wall_s']:.3f} s  cpu {w['warm_cpu_s']:.2f} s")
            print(f"  weft peak RSS   {w['rss_mib']:.0f} MiB")
            sys.stdout.flush()


if __name__ == "__main__":
    main()
