"""The mission report: OUT/mission.json, OUT/mission.png and the summary on stdout."""

from __future__ import annotations

import json
import os
import textwrap
from pathlib import Path

import numpy as np

from host.formats.qdet import read_detections


def _json_default(value):
    if isinstance(value, np.integer | np.floating):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value)}")


def distil_figures(report: dict | None, outcome: dict, out: Path) -> dict:
    """The distillation's figures the mission reports (report.json has them all)."""
    report = report or {}
    keys = sorted(p.name for p in out.glob("*.key"))
    sync = report.get("sync") or {}
    # report.json gives sifted_bits and qber only after error correction; the sifting
    # counts (n detections, m errors per basis and intensity) exist whenever sifting ran
    counts = report.get("counts") or {}
    sifted = {b: sum(c["n"] for c in per.values()) for b, per in counts.items()}
    errors = {b: sum(c["m"] for c in per.values()) for b, per in counts.items()}
    return {
        "aborted": outcome["aborted"],
        "abort_reason": outcome["abort_reason"],
        "sifted_bits": report.get("sifted_bits") or (sum(sifted.values()) if counts else None),
        "sifted_by_basis": sifted or None,
        "qber_sifted": {b: round(errors[b] / n, 5) if n else None for b, n in sifted.items()}
        or None,
        "counts": counts or None,
        "intensities": (report.get("profile") or {}).get("intensities"),
        "qber": report.get("qber"),
        "key_bits": report.get("key_bits", 0),
        "key_files": keys,
        "sync_assigned_fraction": sync.get("assigned_fraction"),
        "sync_residual_rms_ps": sync.get("residual_rms_ps"),
        "report": "report.json" if (out / "report.json").exists() else None,
    }


def write_json(out: Path, summary: dict) -> None:
    path = out / "mission.json"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(summary, indent=1, default=_json_default) + "\n")
    os.replace(tmp, path)


def _detection_rate(out: Path, scenario, bins: int = 50):
    """Ground detections per second over the segment, on the ground clock's true time."""
    times_ps, _channels, _header = read_detections(out / "ground" / "detections.qdet")
    if times_ps.size == 0:
        return np.zeros(0), np.zeros(0)
    true_s = scenario.ground_clock.true_time_s(times_ps)
    edges = np.linspace(true_s.min(), true_s.max(), bins + 1)
    counts, _ = np.histogram(true_s, edges)
    width = edges[1] - edges[0] if edges[1] > edges[0] else 1.0
    return (edges[:-1] + edges[1:]) / 2, counts / width


def write(out: Path, summary: dict, curve: dict, scenario) -> None:
    """mission.json and mission.png (Agg backend: no display needed)."""
    write_json(out, summary)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = summary.get("timeline")
    if rows:
        fig = plt.figure(figsize=(13, 10.4))
        grid = fig.add_gridspec(3, 3, height_ratios=[1, 0.95, 0.5])
        draw_timeline(fig.add_subplot(grid[1, :]), summary)
        text_row = 2
    else:
        fig = plt.figure(figsize=(13, 6.8))
        grid = fig.add_gridspec(2, 3, height_ratios=[1, 0.42])
        text_row = 1
    axes = [fig.add_subplot(grid[0, i]) for i in range(3)]
    stages = summary["stages"]
    ax = axes[0]
    ax.plot(curve["t_s"], curve["loss_db"], color="tab:blue")
    ground = stages.get("ground")
    if ground:
        begin = ground["segment_start_s"]
        ax.axvspan(begin, begin + ground["segment_seconds"], color="tab:orange", alpha=0.3)
        ax.axvline(begin, color="tab:orange", lw=2, alpha=0.7)
        ax.annotate(
            f"emulated\n{ground['segment_seconds']:.3g} s",
            (begin, float(np.mean(curve["loss_db"]))),
            textcoords="offset points",
            xytext=(6, 0),
            color="tab:orange",
        )
    ax.set_xlabel("time in pass (s)")
    ax.set_ylabel("channel loss (dB, mean pointing, no detectors)")
    ax.set_title("link loss over the pass")
    ax.invert_yaxis()
    ax.grid(alpha=0.3)

    ax = axes[1]
    if scenario is not None and ground:
        centres, rate = _detection_rate(out, scenario)
        ax.plot((centres - centres.min()) if centres.size else centres, rate / 1e3)
        ax.set_xlabel("time in segment (s, ground receive)")
        ax.set_ylabel("detections (k/s)")
        ax.set_title(f"ground detections: {ground['detections']:,}")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    else:
        ax.set_axis_off()

    ax = axes[2]
    distil = stages.get("distil") or {}
    if distil.get("counts"):
        verdict = (
            f"key {distil['key_bits']:,} bits" if not distil["aborted"] else "no key (aborted)"
        )
        draw_qber_panel(ax, distil["counts"], distil.get("intensities"), verdict)
    else:
        ax.set_axis_off()

    text = fig.add_subplot(grid[text_row, :])
    text.set_axis_off()
    wrapped = []
    for line in _summary_lines(summary):
        wrapped.extend(textwrap.wrap(line, 150, subsequent_indent=" " * 10) or [""])
    text.text(0, 1, "\n".join(wrapped), va="top", family="monospace", fontsize=8.5)
    fig.tight_layout()
    fig.savefig(out / "mission.png", dpi=100)
    plt.close(fig)


def draw_timeline(ax, summary: dict) -> None:
    """Running totals of detections, sifted and reconciled bits over pass time, the backlog
    (detections not yet worked off), the optical link's down times shaded, loss of signal
    and the moment both keys existed marked. A post-pass pipeline says so in the title:
    its bits appear only after the pass."""
    from host.mission.timeline import link_intervals

    rows = summary["timeline"]
    t = np.array([r["t_s"] for r in rows])
    for name, colour in (
        ("detections", "tab:blue"),
        ("sifted_bits", "tab:orange"),
        ("reconciled_bits", "tab:green"),
        ("backlog_bits", "tab:red"),
    ):
        values = np.array([r[name] for r in rows], dtype=float)
        style = "--" if name == "backlog_bits" else "-"
        ax.step(t, values, where="post", color=colour, ls=style, label=name.replace("_", " "))
    for start, end, up in link_intervals(rows):
        if not up:
            ax.axvspan(start, end, color="grey", alpha=0.25, lw=0)
    ax.axvspan(0, 0, color="grey", alpha=0.25, label="optical link down")
    los = summary.get("loss_of_signal_s")
    if los is not None:
        ax.axvline(los, color="black", lw=1)
        ax.annotate("loss of signal", (los, 0), textcoords="offset points", xytext=(3, 3),
                    fontsize=8)  # fmt: skip
    latency = summary.get("key_latency_s")
    if latency is not None:
        ax.axvline(t[-1], color="tab:purple", lw=1.5, label=f"both keys: {latency:+.1f} s")
    cut = summary.get("stream_cut")
    if cut:
        discarded = f"{cut['detections_discarded']:,} discarded"
        ax.axvline(cut["cut_s"], color="tab:brown", lw=1, ls="--", label=f"cut ({discarded})")
    pipeline = summary.get("pipeline", "post-pass")
    lag = summary.get("lag_s_max")
    ax.set_title(
        f"pipeline over the pass ({pipeline}: "
        + (
            "distilled after loss of signal, bits appear only then"
            if pipeline == "post-pass"
            else "streamed during the pass"
        )
        + (f"; lag max {lag:.0f} s, median {summary.get('lag_s_median', 0):.0f} s)" if lag
           is not None else ")")
    )  # fmt: skip
    ax.set_xlabel("pass time (s, optical link clock)")
    ax.set_ylabel("bits (running total)")
    ax.set_yscale("symlog", linthresh=10)
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    lag_axis = ax.twinx()
    lag_axis.plot(t, [r["lag_s"] for r in rows], color="tab:purple", ls=":", label="lag (s)")
    lag_axis.set_ylabel("lag behind the newest detection (s)", color="tab:purple")
    lag_axis.set_ylim(bottom=0)
    handles, labels = ax.get_legend_handles_labels()
    more, more_labels = lag_axis.get_legend_handles_labels()
    ax.legend(handles + more, labels + more_labels, loc="upper left", fontsize=8, ncol=4)


def draw_qber_panel(ax, counts: dict, intensities: dict | None, verdict: str) -> None:
    """Sifted error rate per basis and signal/decoy intensity, on a scale that shows the
    ~1 % that matter. Vacuum classes (mean photon number 0: errors are dark counts, ~50 %
    on a handful of events) are written as text, not drawn: one 2-event bar at 100 %
    would set the scale and flatten every other bar."""
    intensities = intensities or {}
    labels, rates_pct, errors_pct, ns, vacuum = [], [], [], [], []
    for basis, per in counts.items():
        for name, c in per.items():
            n, m = c["n"], c["m"]
            if intensities.get(name, 1.0) == 0:
                rate = f"{100 * m / n:.0f} %" if n else "-"
                vacuum.append(f"{basis} {name}: {m}/{n} ({rate})")
                continue
            p = m / n if n else 0.0
            labels.append(f"{basis} {name}")
            rates_pct.append(100.0 * p)
            errors_pct.append(100.0 * (p * (1 - p) / n) ** 0.5 if n else 0.0)
            ns.append(n)
    bars = ax.bar(labels, rates_pct, yerr=errors_pct, color="tab:green", capsize=3)
    for bar, n in zip(bars, ns, strict=True):
        ax.annotate(f"n={n:,}", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                    ha="center", va="bottom", fontsize=8)  # fmt: skip
    top = max([r + e for r, e in zip(rates_pct, errors_pct, strict=True)] + [1.0])
    ax.set_ylim(0, 1.3 * top)
    ax.set_ylabel("sifted error rate (%)")
    ax.set_title(f"QBER by basis and intensity; {verdict}")
    ax.grid(alpha=0.3, axis="y")
    if vacuum:
        ax.text(
            0.02, 0.97, "vacuum (dark counts): " + "; ".join(vacuum), transform=ax.transAxes,
            va="top", fontsize=7,
        )  # fmt: skip


def _summary_lines(summary: dict) -> list[str]:
    s = summary["stages"]
    lines = [f"qkdsat mission  target={summary['target']}  profile={summary['profile']}"]
    if "orbit" in s:
        o = s["orbit"]
        lines.append(
            f"orbit     pass {o['pass_seconds']} s, culmination {o['culmination_range_km']} km"
            f" / {o['culmination_elevation_deg']} deg, loss {o['link_loss_db_min']}-"
            f"{o['link_loss_db_max']} dB"
        )
    if "firmware" in s:
        f = s["firmware"]
        if f.get("generator"):
            lines.append(
                f"firmware  head QRNG -> pattern memory: {f['generator']['frames']:,}"
                f" frames, {f['slots_emitted']:,} slots (read on board:"
                f" {f.get('pattern_memory_reads', 0)} slot-list reads); TDC lost {f['tdc_lost']}"
            )
        else:
            lines.append(
                f"firmware  {f['frames_emitted']} frames, {f['slots_emitted']:,} slots in"
                f" {f['run_seconds']} s ({f['slots_per_s_wall']:,} slots/s), missed"
                f" {f['frames_missed']}, TDC lost {f['tdc_lost']}"
            )
        lines.append(f"          pattern log equals emitted: {f['pattern_log']['equals_emitted']}")
    if "download" in s:
        d = s["download"]
        lines.append(
            f"download  {len(d['products'])} products, {d['bytes']:,} bytes in {d['seconds']} s"
            f" ({d['goodput_bytes_per_s']:,} B/s), CRC-verified"
        )
        if d.get("pattern_product_security"):
            lines.append(
                "          pattern product sealed with AES-256-GCM (product key): the key of"
                " this pass is computationally secure only"
            )
    if "ground" in s:
        g = s["ground"]
        lines.append(
            f"ground    {g['segment_seconds']:.4g} s of pass around culmination,"
            f" {g['detections']:,} detections"
        )
    if "distil" in s:
        d = s["distil"]
        qber = d["qber"] if d["qber"] is not None else d["qber_sifted"]
        if isinstance(qber, dict):
            qber_text = ", ".join(f"{b} {100 * q:.2f} %" for b, q in qber.items() if q is not None)
        else:
            qber_text = "-" if qber is None else f"{100 * qber:.2f} %"
        assigned = d["sync_assigned_fraction"]
        lines.append(
            f"distil    sifted {d['sifted_bits']} ({d['sifted_by_basis']}), QBER {qber_text},"
            f" time sync assigned {'-' if assigned is None else f'{100 * assigned:.1f} %'}"
        )
        if d["aborted"]:
            lines.append(f"          no key: {d['abort_reason']}")
        else:
            lines.append(f"          key {d['key_bits']:,} bits ({', '.join(d['key_files'])})")
    if "link" in s:
        k = s["link"]
        cpu = (k.get("processor") or {}).get("cpu_s")
        mem = (k.get("processor") or {}).get("peak_rss_mb")
        lines.append(
            f"link      optical link to {k['station']}: {k['classical_bytes']['down']:,} bytes"
            f" down, {k['classical_bytes']['up']:,} up; outages {len(k['outages'])}; too slow"
            f" {len(k['too_slow'])}; payload processor CPU {cpu} s, peak {mem} MB"
        )
        if k.get("lost_for_good"):
            lines.append(f"          {k['lost_reason']}")
    if summary.get("timeline"):
        latency = summary.get("key_latency_s")
        lines.append(
            f"timeline  {summary.get('pipeline')}: key latency after loss of signal "
            f"{'-' if latency is None else f'{latency} s'}, lag behind detections max "
            f"{summary['lag_s_max']} s, median {summary['lag_s_median']} s"
        )
        cut = summary.get("stream_cut")
        if cut:
            lines.append(
                f"          pass closed at {cut['cut_s']} s for the optical link's end at "
                f"{cut['link_end_s']:.1f} s (loss of signal {cut['loss_of_signal_s']:.1f} s): "
                f"{cut['detections_discarded']:,} detections discarded, never sifted (the "
                f"pipeline {cut.get('behind_s', '-')} s behind the detections then)"
            )
            if cut.get("rest_wall_s") is not None:
                lines.append(
                    f"          the rest after the cut took {cut['rest_wall_s']} s of the "
                    f"{cut['reserve_wall_s']} s reserved (docs/streaming.md, 'The link's end')"
                )
    if "timetransfer" in s:
        tt = s["timetransfer"]
        if tt["aborted"]:
            lines.append(f"time      no time transfer: {tt['abort_reason']}")
        else:
            tdev = ", ".join(f"{k} s {v:.2f} ps" for k, v in tt["tdev_ps"].items())
            lines.append(
                f"time      {tt['time_data_rate_hz']:.0f} Hz of time data, TDEV {tdev};"
                f" key {tt['key_bits_used']['pad']} pad + {tt['key_bits_used']['auth']} tag bits"
            )
    if "timetransfer_during_pass" in s:
        tt = s["timetransfer_during_pass"]
        if tt["aborted"]:
            lines.append(f"time      during the pass: stopped: {tt['abort_reason']}")
        else:
            latency = tt["streaming"]["offset_latency_s"]
            feed = tt.get("uplink_feed") or {}
            on_link = (s.get("link", {}).get("stream_bytes") or {}).get("time_transfer") or {}
            lines.append(
                f"time      during the pass: {tt['bins']} bins, {tt['time_data_rate_hz']:.0f}"
                f" Hz, offsets known {latency['median']:.1f} s (median) after their bin;"
                f" uplink read from the controller's TDC log as written:"
                f" {feed.get('blocks_taken_before_the_log_ended', '-')} blocks before its end;"
                f" {on_link.get('satellite_to_ground', 0):,} bytes down,"
                f" {on_link.get('ground_to_satellite', 0):,} up on the link"
            )
    if "failed" in summary:
        lines.append(f"FAILED    {summary['failed']}")
    secs = summary.get("stage_seconds", {})
    if secs:
        lines.append("seconds   " + ", ".join(f"{k} {v}" for k, v in secs.items()))
    return lines


def print_summary(summary: dict) -> None:
    for line in _summary_lines(summary):
        print(line)
