"""
Plots any run's main.log (CPU or GPU trainer): train and val loss, learning rate, gradient norm,
and for MoE runs each expert's load (its share of the routed slots over a uniform split) and the
dropped-slot count; with LSH, the compression rate and the relative error.

    /usr/bin/python3 dev/plot_log.py log_dir [more_log_dirs_or_main.logs ...] [-o plot.png]

Several logs are overlaid (named by their folders); the expert-load panel shows the first MoE
log. main.log's lines are "s:<step> key:value ..." (train steps, written by log_step in train.h)
and "s:<step> tel:<val loss>" (validation); every key is read, unknown ones are ignored.
"""
import argparse
import os
import sys


def read_log(path):
    """main.log -> (train, val): train maps each key to a list of (step, value) (load: a list of
    floats per step), val is a list of (step, val loss). Raises ValueError naming the file and line
    on a malformed line."""
    if os.path.isdir(path):
        path = os.path.join(path, "main.log")
    train, val = {}, []
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            fields = line.split()
            if not fields:
                continue
            try:
                kv = dict(field.split(":", 1) for field in fields)
                step = int(kv.pop("s"))
                if "tel" in kv:
                    val.append((step, float(kv["tel"])))
                    continue
                for key, value in kv.items():
                    parsed = [float(v) for v in value.split(",")] if "," in value or key == "load" else float(value)
                    train.setdefault(key, []).append((step, parsed))
            except (ValueError, KeyError) as e:
                raise ValueError(f"{path}:{lineno}: not a main.log line ({e}): {line.strip()[:80]}")
    return train, val


def label_of(path):
    path = os.path.normpath(path)
    return os.path.basename(os.path.dirname(path)) if path.endswith("main.log") else os.path.basename(path)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("logs", nargs="+", help="run folders (with main.log) or main.log files")
    ap.add_argument("-o", "--out", default="main_log.png", help="the PNG to write (default main_log.png)")
    args = ap.parse_args()
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = []
    for p in args.logs:
        try:
            runs.append((label_of(p), *read_log(p)))
        except (OSError, ValueError) as e:
            sys.exit(f"error: {e}")
    moe = next((r for r in runs if "load" in r[1]), None)
    lsh = next((r for r in runs if "lsh_rate" in r[1]), None)
    panels = 3 + (moe is not None) + (lsh is not None)
    rows = 1 if panels <= 3 else 2
    fig, axes = plt.subplots(rows, 3, figsize=(13.5, 3.6 * rows), squeeze=False)
    axes = axes.ravel()
    for extra in axes[panels:]:
        extra.axis("off")
    ax = axes[0]
    for name, train, val in runs:
        if "ce" in train:
            s, v = zip(*train["ce"])
            line, = ax.plot(s, v, lw=0.8, alpha=0.6, label=f"{name} train ce")
            if val:
                vs, vv = zip(*val)
                ax.plot(vs, vv, "o-", ms=3, color=line.get_color(), label=f"{name} val")
    ax.set_xlabel("step"); ax.set_ylabel("loss"); ax.set_title("loss"); ax.legend(fontsize=7)
    for ax, key, title in ((axes[1], "lr", "learning rate"), (axes[2], "norm", "gradient norm")):
        for name, train, _ in runs:
            if key in train:
                s, v = zip(*train[key])
                ax.plot(s, v, lw=0.8, label=name)
        ax.set_xlabel("step"); ax.set_title(title)
        if key == "norm":
            ax.set_yscale("log")
    k = 3
    if moe is not None:
        ax = axes[k]; k += 1
        steps = [s for s, _ in moe[1]["load"]]
        loads = [l for _, l in moe[1]["load"]]
        for e in range(len(loads[0])):
            ax.plot(steps, [l[e] for l in loads], lw=0.7, label=f"expert {e}")
        ax.axhline(1.0, color="k", lw=0.5)
        ax.set_xlabel("step"); ax.set_title(f"{moe[0]}: expert load / uniform")
        if len(loads[0]) <= 16:
            ax.legend(fontsize=6, ncol=2)
    if lsh is not None:
        ax = axes[k]
        for name, train, _ in runs:
            if "lsh_rate" in train:
                s, v = zip(*train["lsh_rate"])
                ax.plot(s, v, lw=0.8, label=f"{name} rate")
                s, v = zip(*train["lsh_err"])
                ax.plot(s, v, lw=0.8, ls="--", label=f"{name} rel. error")
        ax.set_xlabel("step"); ax.set_title("LSH: centroids/rows, ||x-c||/||x||"); ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out} ({len(runs)} logs)")


if __name__ == "__main__":
    main()
