"""Charts of a bench/compare-torchserve.sh run: throughput and p99 latency against concurrency
for each case, start-up time, and memory, tchserve beside TorchServe.

Usage: python bench/compare_charts.py RESULTS.jsonl OUT_DIR
Writes OUT_DIR/compare-throughput.png, compare-p99.png and compare-startup-memory.png, and
prints the results as Markdown tables.
"""

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

SERVERS = ["torchserve", "tchserve"]
COLORS = {"torchserve": "#ee6a24", "tchserve": "#2b6cb0"}
CASES = [
    ("mlp_b1", "MLP, batch size 1"),
    ("mlp_b8", "MLP, batch size 8"),
    ("image_b1", "ResNet-18 JPEG, batch size 1"),
    ("image_b8", "ResNet-18 JPEG, batch size 8"),
]


def main(results: Path, out: Path) -> None:
    rows = [json.loads(line) for line in results.read_text().splitlines() if line.strip()]
    header, rows = rows[0], rows[1:]
    load = [r for r in rows if r.get("bench") == "load"]
    subtitle = f"{header['machine']}; {header['seconds_per_run']} s per run; {header['date']}"

    for metric, label, name in [("rps", "requests/s", "throughput"), ("p99_ms", "p99 latency (ms)", "p99")]:
        fig, axes = plt.subplots(1, len(CASES), figsize=(4 * len(CASES), 3.6))
        for ax, (case, title) in zip(axes, CASES):
            for server in SERVERS:
                pts = sorted((r["concurrency"], r[metric]) for r in load if r["case"] == case and r["server"] == server)
                if pts:
                    xs, ys = zip(*pts)
                    ax.plot(xs, ys, marker="o", label=server, color=COLORS[server])
            ax.set_title(title, fontsize=10)
            ax.set_xlabel("concurrency")
            ax.set_xscale("log", base=2)
            # The MLP's two servers are an order of magnitude apart; the images' are not.
            if case.startswith("mlp"):
                ax.set_yscale("log")
            else:
                ax.set_ylim(bottom=0)
            ax.grid(True, which="both", alpha=0.3)
        axes[0].set_ylabel(label)
        axes[0].legend()
        fig.suptitle(f"{label}: tchserve and TorchServe 0.12.0\n{subtitle}", fontsize=10)
        fig.tight_layout()
        fig.savefig(out / f"compare-{name}.png", dpi=110)
        plt.close(fig)

    startup = {r["server"]: r for r in rows if r.get("bench") == "startup"}
    after = {r["server"]: r for r in rows if r.get("bench") == "memory_after_load"}
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(8, 3.4))
    present = [s for s in SERVERS if s in startup]
    a1.bar(present, [startup[s]["seconds_until_both_answer"] for s in present], color=[COLORS[s] for s in present])
    a1.set_title("start until MLP and ResNet-18 answer (s)", fontsize=10)
    width = 0.38
    xs = range(len(present))
    colors = [COLORS[s] for s in present]
    a2.bar([x - width / 2 for x in xs], [startup[s]["pss_mb"] for s in present], width, label="after start-up", color=colors, alpha=0.45)
    a2.bar([x + width / 2 for x in xs], [after[s]["pss_mb"] if s in after else 0 for s in present], width, label="after the load", color=colors)
    a2.set_xticks(list(xs), present)
    a2.set_title("memory, server and its processes (PSS, MB)", fontsize=10)
    a2.legend(fontsize=8)
    fig.suptitle(subtitle, fontsize=9)
    fig.tight_layout()
    fig.savefig(out / "compare-startup-memory.png", dpi=110)
    plt.close(fig)

    print("| case | concurrency | TorchServe req/s | tchserve req/s | ratio | TorchServe p99 ms | tchserve p99 ms | TorchServe req per CPU-s | tchserve req per CPU-s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for case, title in CASES:
        for c in sorted({r["concurrency"] for r in load if r["case"] == case}):
            by = {r["server"]: r for r in load if r["case"] == case and r["concurrency"] == c}
            ts, tch = by.get("torchserve"), by.get("tchserve")
            if not ts or not tch:
                continue
            ratio = tch["rps"] / ts["rps"] if ts["rps"] else float("inf")
            print(
                f"| {title} | {c} | {ts['rps']:,.0f} | {tch['rps']:,.0f} | {ratio:.1f}x | {ts['p99_ms']:.1f} | "
                f"{tch['p99_ms']:.1f} | {ts['requests_per_cpu_second']:,.0f} | {tch['requests_per_cpu_second']:,.0f} |"
            )
    print()
    print("| server | start until both answer | memory after start-up | memory after the load |")
    print("|---|---|---|---|")
    for s in present:
        print(f"| {s} | {startup[s]['seconds_until_both_answer']:.2f} s | {startup[s]['pss_mb']} MB | {after.get(s, {}).get('pss_mb', '-')} MB |")


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
