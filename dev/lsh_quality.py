"""
LSH-MoE quality experiment on the CPU (issue: does compressing the all-to-all hurt quality?).

Trains the same small MoE (d4, E=8 experts, top-2, 4 simulated source ranks, dropless routing) on
Tiny Shakespeare with the same seed, data order and steps, once uncompressed and once per LSH
setting: several compression rates with residual compensation, and one rate without it. Writes
per-step CSV, a PNG (val loss vs step; final val loss vs bytes sent per step) and prints the
summary table (markdown) that README.md quotes. A longer look at three of the runs:
    /usr/bin/python3 dev/lsh_quality.py --steps 300 --val-every 50 --out dev/lsh_quality_300 --runs uncompressed,lsh_L3_dp1,lsh_L3_dp1_nocomp

Run from the repository root after `make train_gpt2_moe_cpu` (about 15 minutes on 2 cores):
    /usr/bin/python3 dev/lsh_quality.py                 # writes dev/lsh_quality/{runs.csv,summary.csv,lsh_quality.png}
    /usr/bin/python3 dev/lsh_quality.py --steps 20      # a quick look
    /usr/bin/python3 dev/lsh_quality.py --reuse         # keeps the runs already done, runs the rest

Bytes: with 4 simulated ranks, source v owns experts {2v, 2v+1}; a group (expert e, source v)
crosses the wire unless v owns e. Each of the four all-to-alls of an MoE layer (dispatch, combine
and their backwards) carries the same rows, C fp32 values each (C * 2 in bf16 on a GPU): the
trainer logs MB per all-to-all summed over layers, we report 4 x that per step.
"""
import argparse, csv, os, re, subprocess, sys, time

# name, LSH flags. With dp = 1 a hash is one sign bit, so L functions give 2^L buckets per group;
# (L, d') were picked from 20-step calibration runs (groups of ~32 rows here) to land near 10%,
# 15%, 20% and 30%; the table reports the rate measured over the whole run, which falls as
# training makes the tokens more alike
RUNS = [
    ("uncompressed", []),
    ("lsh_L2_dp1", ["-J", "2", "-P", "1"]),
    ("lsh_L1_dp3", ["-J", "1", "-P", "3"]),
    ("lsh_L3_dp1", ["-J", "3", "-P", "1"]),
    ("lsh_L4_dp1", ["-J", "4", "-P", "1"]),
    ("lsh_L5_dp1", ["-J", "5", "-P", "1"]),
    ("lsh_L2_dp1_nocomp", ["-J", "2", "-P", "1", "-C", "0"]),
    ("lsh_L3_dp1_nocomp", ["-J", "3", "-P", "1", "-C", "0"]),
]

def parse_log(path):
    """main.log -> {step: dict} with train (trl, ce, lsh_rate, wire_mb, ...) and val (tel)."""
    rows = {}
    for line in open(path):
        fields = line.split()
        step = int(fields[0].split(":")[1])
        row = rows.setdefault(step, {})
        for f in fields[1:]:
            k, v = f.split(":", 1)
            if "," not in v:
                row[k] = float(v)
    return rows

def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--val-every", type=int, default=10)
    ap.add_argument("--out", default="dev/lsh_quality")
    ap.add_argument("--bin", default="./train_gpt2_moe_cpu")
    ap.add_argument("--reuse", action="store_true", help="keep runs whose log already reaches the last step")
    ap.add_argument("--runs", default="", help="comma-separated subset of the run names (default: all)")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    common = ["-e", "d4", "-E", "8", "-K", "2", "-V", "4", "-F", "0", "-b", "8", "-t", "64",
              "-x", str(args.steps), "-v", str(args.val_every), "-m", "8", "-s", "0", "-l", "1e-3", "-u", "5",
              "-q", "0.1", "-S", "1337"]
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", str(os.cpu_count())))
    logs = {}
    runs = [r for r in RUNS if not args.runs or r[0] in args.runs.split(",")]
    for name, flags in runs:
        outdir = os.path.join(args.out, name)
        log = os.path.join(outdir, "main.log")
        done = os.path.exists(log) and f"s:{args.steps} tel:" in open(log).read()
        if not (args.reuse and done):
            t0 = time.time()
            cmd = [args.bin] + common + flags + ["-o", outdir]
            res = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            if res.returncode != 0:
                sys.exit(f"{name} failed:\n{res.stdout[-2000:]}")
            print(f"{name}: {time.time() - t0:.0f} s  ({' '.join(flags) or 'no LSH'})", flush=True)
        logs[name] = parse_log(os.path.join(outdir, "main.log"))

    # per-step CSV
    with open(os.path.join(args.out, "runs.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["run", "step", "train_ce", "val_loss", "lsh_rate", "lsh_rel_error", "wire_mb_per_a2a", "wire_mb_uncompressed"])
        for name, rows in logs.items():
            for s in sorted(rows):
                r = rows[s]
                w.writerow([name, s, r.get("ce", ""), r.get("tel", ""), r.get("lsh_rate", ""), r.get("lsh_err", ""),
                            r.get("wire_mb", ""), r.get("wire_mb_uncompressed", "")])

    # summary: mean rate and bytes over the training steps, final val loss
    base = None
    summary = []
    for name, rows in logs.items():
        train = [rows[s] for s in sorted(rows) if "trl" in rows[s]]
        val = [(s, rows[s]["tel"]) for s in sorted(rows) if "tel" in rows[s]]
        sent = sum(r.get("wire_mb", 0.0) for r in train) / len(train)
        full = sum(r.get("wire_mb_uncompressed", 0.0) for r in train) / len(train)
        rate = sum(r.get("lsh_rate", 1.0) for r in train) / len(train)
        err = sum(r.get("lsh_err", 0.0) for r in train) / len(train)
        lsh_ms = sum(r.get("lsh_ms", 0.0) for r in train) / len(train)
        step_ms = sum(r["ms"] for r in train[1:]) / max(1, len(train) - 1)
        final = val[-1][1]
        if base is None:
            base = final
        summary.append(dict(run=name, rate=rate, rel_error=err, mb_per_step=4 * sent, mb_uncompressed=4 * full,
                            final_val=final, delta=final - base, lsh_ms=lsh_ms, step_ms=step_ms))
    with open(os.path.join(args.out, "summary.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(summary[0].keys()))
        w.writeheader()
        w.writerows(summary)
    print(f"\n{args.steps} steps of 512 tokens, d4 E=8 top-2, 4 simulated ranks, dropless; val loss over 8 batches")
    print("| run | compression rate (centroids/rows) | rel. error ||x-c||/||x|| | MB crossing ranks per step (4 all-to-alls, fp32) | final val loss | delta vs uncompressed | LSH ms/step | step ms |")
    print("|---|---|---|---|---|---|---|---|")
    for r in summary:
        rate = "1 (no LSH)" if r["run"] == "uncompressed" else f"{r['rate']:.3f}"
        print(f"| {r['run']} | {rate} | {r['rel_error']:.3f} | {r['mb_per_step']:.2f} of {r['mb_uncompressed']:.2f} | "
              f"{r['final_val']:.4f} | {r['delta']:+.4f} | {r['lsh_ms']:.1f} | {r['step_ms']:.0f} |")

    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot (Debian: python3-matplotlib)")
        return
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, rows in logs.items():
        val = [(s, rows[s]["tel"]) for s in sorted(rows) if "tel" in rows[s]]
        ax1.plot([s for s, _ in val], [v for _, v in val], marker="o", ms=3, label=name)
    ax1.set_xlabel("step")
    ax1.set_ylabel("val loss")
    ax1.set_title("validation loss")
    ax1.legend(fontsize=8)
    for r in summary:
        ax2.scatter(r["mb_per_step"], r["final_val"], marker="x" if "nocomp" in r["run"] else "o")
        ax2.annotate(r["run"], (r["mb_per_step"], r["final_val"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax2.set_xlabel("MB crossing ranks per step (4 all-to-alls)")
    ax2.set_ylabel(f"val loss at step {args.steps}")
    ax2.set_title("quality vs bytes sent")
    fig.tight_layout()
    png = os.path.join(args.out, "lsh_quality.png")
    fig.savefig(png, dpi=110)
    print(f"wrote {png}")

if __name__ == "__main__":
    main()
