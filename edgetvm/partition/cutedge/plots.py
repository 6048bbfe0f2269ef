"""The trade-off plots: energy and latency against V (CutEdge), energy against latency (every method)."""

from __future__ import annotations

from pathlib import Path


def write(out: Path, rows: list[dict]) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for mode in sorted({r["mode"] for r in rows}):
        ce = sorted([r for r in rows if r["mode"] == mode and r["policy"].startswith("cutedge")],
                    key=lambda r: float(r["policy"].split("=")[1]))
        if ce:
            fig, ax1 = plt.subplots(figsize=(6, 4))
            vs = [float(r["policy"].split("=")[1]) for r in ce]
            ax1.plot(vs, [r["energy_per_frame_mj"] for r in ce], "o-", color="tab:green", label="energy")
            ax1.set_xscale("log")
            ax1.set_xlabel("V")
            ax1.set_ylabel("device energy per frame (mJ)", color="tab:green")
            ax2 = ax1.twinx()
            ax2.plot(vs, [r["latency_mean_ms"] for r in ce], "s--", color="tab:blue", label="mean latency")
            ax2.plot(vs, [r["latency_p95_ms"] for r in ce], "^:", color="tab:blue", label="p95 latency")
            ax2.set_ylabel("latency (ms)", color="tab:blue")
            ax2.legend(loc="upper center", fontsize=8)
            ax1.set_title(f"CutEdge: energy and latency against V ({mode})")
            fig.tight_layout()
            p = out / f"energy_latency_vs_V_{mode}.png"
            fig.savefig(p, dpi=110)
            plt.close(fig)
            written.append(p)
        fig, ax = plt.subplots(figsize=(6, 4))
        if ce:
            ax.plot([r["latency_mean_ms"] for r in ce], [r["energy_per_frame_mj"] for r in ce], "o-",
                    color="tab:green", label="CutEdge (V sweep)")
        for r in rows:
            if r["mode"] == mode and not r["policy"].startswith("cutedge"):
                ax.plot(r["latency_mean_ms"], r["energy_per_frame_mj"], "x", markersize=9, label=r["policy"])
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("mean latency (ms)")
        ax.set_ylabel("device energy per frame (mJ)")
        ax.set_title(f"energy against latency ({mode})")
        ax.legend(fontsize=8)
        fig.tight_layout()
        p = out / f"energy_vs_latency_{mode}.png"
        fig.savefig(p, dpi=110)
        plt.close(fig)
        written.append(p)
    return written
