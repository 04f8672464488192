"""
Issue 14's results: reads the runs of scripts/run_gutenberg.sh (one folder per run, each with a
main.log) and writes, into the output folder (default dev/gutenberg):

  curves.csv          run, step, tokens, val_loss: every validation point
  results.csv         one row per run: the table below, unrounded
  val_loss.png        val loss against tokens seen, every run (and its difference from moe_e8k1)
  val_vs_bytes.png    val loss at the last common step against all-to-all MB per step
  step_time.png       the bandwidth model's step time against link speed (see below)

and prints the table as markdown (for README.md). Usage:

    /usr/bin/python3 dev/plot_gutenberg.py [runs_dir (log_gutenberg)] [-o dev/gutenberg] [--tokens 4096]
                                           [--earlier dev/gutenberg]

--earlier DIR takes the runs that have no main.log in runs_dir from the results.csv and curves.csv
an earlier call wrote to DIR (a run whose folder was lost with its machine keeps its results; the
table says which runs come from there). A timing.txt in runs_dir/<run>/ still applies to them.

Columns: val loss at the last step every run has reached (equal tokens: every run sees the same
batches), its difference from the uncompressed MoE run (moe_e8k1), the LSH compression rate
(centroids / rows, mean over steps), all-to-all MB per step (rows that cross ranks, the four
all-to-alls of every MoE layer, summed over the simulated ranks, mean over steps), the time in
lshmoe.h's calls per step and the step time (medians: a step paused from outside does not skew them).
Where a run folder has a timing.txt (TIME=1 bash scripts/run_gutenberg.sh: the finished runs timed
again in turn on a quiet machine), its least disturbed round gives those two timings instead.

Bandwidth model (DESIGN.md, "Where it pays"): t(bw) = t_step + bytes_per_step / bw, with t_step the
measured step time on this machine (it includes the LSH work and the experts' smaller inputs, and
the all-to-all as a local copy) and bw the link speed per rank. A compressed run beats the
uncompressed one below bw* = (bytes_uncompressed - bytes_compressed) / (t_compressed - t_uncompressed)
(and at every speed when it is not slower to compute). At equal quality instead of equal steps:
the uncompressed run reached the compressed run's final loss at step s_eq (interpolated between
val points), so the compressed run pays while common (t_c + B_c/bw) < s_eq (t_u + B_u/bw); and,
for any machine, where the all-to-all takes more than (common k - s_eq) / (common (k - rho)) of
the uncompressed step, with k and rho the measured ratios of compute time and bytes per step.
"""
import argparse
import csv
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from plot_log import read_log  # noqa: E402

BASELINE = "moe_e8k1"
DESCRIPTION = {  # what each run of scripts/run_gutenberg.sh is
    "dense": "dense d4",
    "moe_e8k1": "MoE E=8 K=1",
    "moe_e16k2": "MoE E=16 K=2 H=2C",
    "moe_e8k1_bf16": "MoE E=8 K=1, bf16 wire",
    "lsh10": "LSH ~10%",
    "lsh20": "LSH ~20%",
    "lsh30": "LSH ~30%",
    "lsh10_nocomp": "LSH ~10%, no compensation",
    "lsh20_nocomp": "LSH ~20%, no compensation",
    "lsh30_nocomp": "LSH ~30%, no compensation",
    "lsh10_half": "LSH ~10%, residual x 0.5 (ours)",
    "lsh20_bf16": "LSH ~20%, bf16 wire (ours)",
}


def steps_to_reach(run, loss):
    """the (linearly interpolated) step at which run's val curve first gets down to loss; None if never"""
    points = sorted(run["val"].items())
    if points and points[0][1] <= loss:
        return points[0][0]
    for (s0, v0), (s1, v1) in zip(points, points[1:]):
        if v1 <= loss:  # v0 > loss >= v1
            return s0 + (v0 - loss) / (v0 - v1) * (s1 - s0)
    return None


def mean(xs):
    return sum(xs) / len(xs) if xs else float("nan")


def median(xs):
    xs = sorted(xs)
    return xs[len(xs) // 2] if xs else float("nan")


def read_timing(path):
    """timing.txt's rounds ("round R ms M lsh_ms X", then "from RUN" when timed from another run's
    checkpoint): the least disturbed one's (ms, lsh_ms), or None"""
    if not os.path.isfile(path):
        return None
    rounds = []
    with open(path) as f:
        for i, line in enumerate(f, 1):
            w = line.split()
            try:
                if len(w) not in (6, 8) or w[0] != "round" or w[2] != "ms" or w[4] != "lsh_ms" or w[6:7] not in ([], ["from"]):
                    raise ValueError
                rounds.append((float(w[3]), 0.0 if w[5] == "-" else float(w[5])))
            except ValueError:
                sys.exit(f"error: {path}:{i}: expected 'round R ms M lsh_ms X [from RUN]', got {line.strip()!r}")
    return min(rounds) if rounds else None


def summarise(name, train, val, tokens_per_step, timing=None):
    vals = [v for _, v in train.get("wire_mb", [])]
    return {
        "run": name,
        "what": DESCRIPTION.get(name, name),
        "steps": max((s for s, _ in train.get("ce", [])), default=-1) + 1,
        "val": dict(val),
        "rate": mean([v for _, v in train.get("lsh_rate", [])]) if "lsh_rate" in train else float("nan"),
        "lsh_err": mean([v for _, v in train.get("lsh_err", [])]) if "lsh_err" in train else float("nan"),
        "mb_per_step": 4 * mean(vals) if vals else 0.0,  # four all-to-alls of the same size
        # timings: medians, robust to a step paused from outside
        "lsh_ms": median([v for _, v in train.get("lsh_ms", [])]) if "lsh_ms" in train else 0.0,
        "ms": median([v for s, v in train.get("ms", []) if s > 0]),  # step 0 pays the allocations
        "tokens_per_step": tokens_per_step,
        "timed": timing is not None,
    } | ({"ms": timing[0], "lsh_ms": timing[1]} if timing else {})


def read_earlier(folder, tokens_per_step):
    """the runs of an earlier call's results.csv and curves.csv in folder, as summarise() gives them"""
    runs, path = {}, os.path.join(folder, "results.csv")
    try:
        with open(path, newline="") as f:
            for i, row in enumerate(csv.DictReader(f), 2):
                path = f"{os.path.join(folder, 'results.csv')}:{i}"
                runs[row["run"]] = {
                    "run": row["run"], "what": row["what"], "steps": int(row["steps"]), "val": {},
                    "tokens_per_step": tokens_per_step, "timed": row["timed"] == "1", "earlier": True,
                } | {c: float(row[c]) for c in ("rate", "lsh_err", "mb_per_step", "lsh_ms", "ms")}
        path = os.path.join(folder, "curves.csv")
        with open(path, newline="") as f:
            for i, row in enumerate(csv.DictReader(f), 2):
                path = f"{os.path.join(folder, 'curves.csv')}:{i}"
                if row["run"] not in runs:
                    raise ValueError(f"run {row['run']!r} is not in results.csv")
                runs[row["run"]]["val"][int(row["step"])] = float(row["val_loss"])
    except (OSError, KeyError, TypeError, ValueError) as e:  # a missing column reads as KeyError or None
        sys.exit(f"error: {path}: not a results.csv / curves.csv of plot_gutenberg.py ({type(e).__name__}: {e})")
    return [r for r in runs.values() if r["val"]]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="?", default="log_gutenberg", help="folder of run folders (default log_gutenberg)")
    ap.add_argument("-o", "--out", default="dev/gutenberg", help="output folder (default dev/gutenberg)")
    ap.add_argument("--tokens", type=int, default=4096, help="tokens per step (default 4096, the script's 32 x 128)")
    ap.add_argument("--earlier", metavar="DIR", help="take runs without a main.log from DIR's results.csv and curves.csv")
    args = ap.parse_args()
    if not os.path.isdir(args.runs):
        sys.exit(f"error: {args.runs} is not a folder of runs (run scripts/run_gutenberg.sh first)")
    earlier = read_earlier(args.earlier, args.tokens) if args.earlier else []
    names = sorted(d for d in os.listdir(args.runs) if os.path.isfile(os.path.join(args.runs, d, "main.log")))
    order = list(DESCRIPTION)

    def rank(n):
        return (order.index(n) if n in order else len(order), n)

    names.sort(key=rank)
    runs = []
    for n in names:
        try:
            train, val = read_log(os.path.join(args.runs, n))
        except ValueError as e:
            sys.exit(f"error: {e}")
        if val:
            runs.append(summarise(n, train, val, args.tokens, read_timing(os.path.join(args.runs, n, "timing.txt"))))
    for r in earlier:
        if r["run"] not in names:
            timing = read_timing(os.path.join(args.runs, r["run"], "timing.txt"))
            runs.append(r | ({"ms": timing[0], "lsh_ms": timing[1], "timed": True} if timing else {}))
    runs.sort(key=lambda r: rank(r["run"]))
    if not runs:
        sys.exit(f"error: no run in {args.runs} has a validation loss yet")
    common = min(max(r["val"]) for r in runs)  # the last val step every run has reached
    base = next((r for r in runs if r["run"] == BASELINE), None)
    for r in runs:
        r["val_common"] = r["val"].get(common, float("nan"))
    for r in runs:
        r["delta"] = r["val_common"] - base["val_common"] if base else float("nan")
    os.makedirs(args.out, exist_ok=True)

    with open(os.path.join(args.out, "curves.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["run", "step", "tokens", "val_loss"])
        for r in runs:
            for s in sorted(r["val"]):
                w.writerow([r["run"], s, s * r["tokens_per_step"], f"{r['val'][s]:.6f}"])
    cols = ["run", "what", "steps", "val_common", "delta", "rate", "lsh_err", "mb_per_step", "lsh_ms", "ms", "timed"]
    with open(os.path.join(args.out, "results.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(cols[:3] + [f"val_loss_at_step_{common}"] + cols[4:])
        for r in runs:
            w.writerow([int(r[c]) if isinstance(r[c], bool) else r[c] if isinstance(r[c], (str, int)) else f"{r[c]:.6g}"
                        for c in cols])

    def fmt(x, spec):
        return "-" if x != x else format(x, spec)  # NaN: not applicable

    print(f"val loss at step {common} ({common * args.tokens:,} tokens); delta against {BASELINE}\n")
    print("| run | what | val loss | delta | rate | rel. error | MB/step | LSH ms/step | ms/step |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in runs:
        print(f"| {r['run']} | {r['what']} | {fmt(r['val_common'], '.4f')} | {fmt(r['delta'], '+.4f')} | "
              f"{fmt(r['rate'], '.3f')} | {fmt(r['lsh_err'], '.3f')} | {fmt(r['mb_per_step'], '.1f')} | "
              f"{fmt(r['lsh_ms'], '.0f') if r['lsh_ms'] else '-'} | {fmt(r['ms'], '.0f')} |")
    steps = sorted({s for r in runs for s in r["val"]})
    print("\nval loss at each validation step (bold: the step above)\n")
    print("| run | " + " | ".join(str(s) for s in steps) + " |")
    print("|---|" + "---|" * len(steps))
    for r in runs:
        cells = [fmt(r["val"].get(s, float("nan")), ".3f") for s in steps]
        cells = [f"**{c}**" if s == common else c for s, c in zip(steps, cells)]
        print(f"| {r['run']} | " + " | ".join(cells) + " |")
    timed = [r["run"] for r in runs if r["timed"]]
    if len(timed) == len(runs):
        note = "timing.txt (timed again on a quiet machine) for every run"
    elif timed:
        note = f"timing.txt (timed again on a quiet machine) for {', '.join(timed)}; the training's medians for the others"
    else:
        note = "the training's medians (none timed again: TIME=1 bash scripts/run_gutenberg.sh)"
    print(f"\nstep times: {note}")
    old = [r["run"] for r in runs if r.get("earlier")]
    if old:
        print(f"from {args.earlier}/results.csv and curves.csv (no main.log in {args.runs}): {', '.join(old)}")

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def style(name):
        return "--" if "nocomp" in name else ":" if name.startswith("dense") else "-"

    fig, axes = plt.subplots(1, 3, figsize=(17, 4.2))
    for r in runs:
        steps = sorted(r["val"])
        for ax in axes[:2]:
            ax.plot([s * r["tokens_per_step"] / 1e6 for s in steps], [r["val"][s] for s in steps], style(r["run"]),
                    marker="o", ms=2.5, lw=1, label=r["run"])
        if base:  # the gap to the uncompressed MoE run at each validation step both reached
            steps = [s for s in steps if s > 0 and s in base["val"]]
            axes[2].plot([s * r["tokens_per_step"] / 1e6 for s in steps], [r["val"][s] - base["val"][s] for s in steps],
                         style(r["run"]), marker="o", ms=2.5, lw=1, label=r["run"])
    axes[2].axhline(0.0, color="k", lw=0.5)
    axes[2].set_title(f"val loss minus {BASELINE}'s")
    axes[0].set_title("val loss (Gutenberg, d4)")
    half = [v for r in runs for s, v in r["val"].items() if s >= common / 2]
    if half:
        axes[1].set_ylim(min(half) - 0.02, max(half) + 0.02)
        axes[1].set_xlim(common / 2 * args.tokens / 1e6, None)
    axes[1].set_title("second half, zoomed")
    for ax in axes:
        ax.set_xlabel("tokens (M)"); ax.set_ylabel("val loss" if ax is not axes[2] else "difference")
    axes[1].legend(fontsize=7, ncol=2)
    fig.tight_layout(); fig.savefig(os.path.join(args.out, "val_loss.png"), dpi=110); plt.close(fig)

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for r in runs:
        if r["run"] == "dense":
            ax.axhline(r["val_common"], color="k", lw=0.7, ls=":", label="dense (no all-to-all)")
            continue
        ax.plot(r["mb_per_step"], r["val_common"], "o")
        ax.annotate(r["run"], (r["mb_per_step"], r["val_common"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("all-to-all MB per step (crossing rows, 4 all-to-alls)"); ax.set_ylabel(f"val loss at step {common}")
    ax.set_title("quality against bytes"); ax.legend(fontsize=7)
    fig.tight_layout(); fig.savefig(os.path.join(args.out, "val_vs_bytes.png"), dpi=110); plt.close(fig)

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    bws = [10 ** (e / 20) for e in range(-60, 41)]  # 1 MB/s .. 100 GB/s, in MB/s
    for r in runs:
        if r["run"] == "dense" or r["ms"] != r["ms"]:
            continue
        ax.plot([b / 1e3 for b in bws], [r["ms"] + 1e3 * r["mb_per_step"] / b for b in bws], style(r["run"]), lw=1, label=r["run"])
    ax.set_xscale("log"); ax.set_yscale("log")
    ax.set_xlabel("link speed per rank (GB/s)"); ax.set_ylabel("projected ms per step")
    ax.set_title("t = t_step (measured here) + bytes / link speed"); ax.legend(fontsize=7, ncol=2)
    fig.tight_layout(); fig.savefig(os.path.join(args.out, "step_time.png"), dpi=110); plt.close(fig)
    if base and common > 0:  # at step 0 no run has trained yet: nothing to compare
        print()
        for r in runs:
            if r["run"] not in ("dense", BASELINE) and r["mb_per_step"] < base["mb_per_step"]:
                saved, dt = base["mb_per_step"] - r["mb_per_step"], r["ms"] - base["ms"]
                where = "at every link speed (not slower to compute)" if dt <= 0 else f"below {saved / dt:.3g} GB/s"
                print(f"{r['run']}: saves {saved:.1f} MB per step; faster than {BASELINE} {where}")
                # at equal quality: the baseline needs only s_eq steps to reach this run's loss, so
                # the compressed run pays while common (t + B/bw) < s_eq (t_b + B_b/bw)
                s_eq = steps_to_reach(base, r["val_common"])
                if s_eq is None:
                    print(f"  at equal quality: it reaches a loss {BASELINE} did not reach by step {max(base['val'])}")
                    continue
                more_bytes = s_eq * base["mb_per_step"] - common * r["mb_per_step"]  # MB the baseline sends beyond it
                more_ms = common * r["ms"] - s_eq * base["ms"]  # ms of compute it spends beyond the baseline
                if more_bytes <= 0:
                    where = "at no link speed (it sends more bytes in all)"
                elif more_ms <= 0:
                    where = "at every link speed"
                else:
                    where = f"below {more_bytes / more_ms * 1e3:.3g} MB/s"
                print(f"  at equal quality: {BASELINE} reached its loss at step {s_eq:.0f} of {common}; "
                      f"it pays {where}")
                # the same without this machine's compute speed: with the baseline's step c + m (m its
                # all-to-all), this run's k c + rho m (k, rho: measured ratios of compute and bytes),
                # it pays where m / (c + m) > (common k - s_eq) / (common (k - rho))
                k, rho = r["ms"] / base["ms"], r["mb_per_step"] / base["mb_per_step"]
                if more_bytes > 0:  # else it never pays (above)
                    share = max(0.0, (common * k - s_eq) / (common * (k - rho)))
                    print(f"  (compute {k:.2f}x, bytes {rho:.3f}x {BASELINE}'s per step: at equal quality it pays where "
                          f"the all-to-all takes over {100 * share:.0f}% of {BASELINE}'s step)")
    print(f"\nwrote curves.csv, results.csv, val_loss.png, val_vs_bytes.png, step_time.png to {args.out}")


if __name__ == "__main__":
    main()
