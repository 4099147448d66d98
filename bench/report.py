#!/usr/bin/env python3
"""The report of bench/run.sh: a Markdown table and a gnuplot chart.

Usage: report.py META.tsv RAW.tsv OUT.md OUT.png

RAW.tsv has one line per figure: run, column, metric, value, daemon CPU seconds,
work (GiB for streaming, operations for fio; empty otherwise). Metrics starting
with "cold:" are the cached fraction of the backing files after a cold remount;
"#:na" and "#:fail" lines carry a reason in the last field. META.tsv is key, value.
Running it again on a kept latest.tsv (and a meta file) redraws the report.
"""

import os
import shutil
import statistics
import subprocess
import sys
import tempfile

PEERS = ["gocryptfs", "securefs", "cryfs"]


def load(meta_path, raw_path):
    meta = {}
    with open(meta_path, encoding="utf-8") as f:
        for line in f:
            k, _, v = line.rstrip("\n").partition("\t")
            meta[k] = v
    rows = []
    with open(raw_path, encoding="utf-8") as f:
        for line in f:
            p = line.rstrip("\n").split("\t")
            if len(p) < 6:
                p += [""] * (6 - len(p))
            rows.append(p)
    return meta, rows


def metrics(meta):
    """(key, label, unit, better, cpu kind, digits); cpu kind: gib, op, s or None."""
    size = int(meta.get("size_mb", "1024"))
    sz = "1 GiB" if size == 1024 else f"{size} MiB"
    snap_gb = meta.get("snap_gb", "0")
    m = [
        ("write", f"{sz} write + fsync", "MB/s", "higher", "gib", 0),
        ("read", f"{sz} read (cold)", "MB/s", "higher", "gib", 0),
        ("read2diff", f"2 readers, 2 files of {sz} (cold), total", "MB/s", "higher", "gib", 0),
        ("read2same", f"2 readers, same file (cold), total", "MB/s", "higher", "gib", 0),
        ("r2diff", "2 readers / 1 reader, 2 files", "x", "higher", None, 2),
        ("r2same", "2 readers / 1 reader, same file", "x", "higher", None, 2),
        ("untar_real", f"untar real tree ({meta.get('real_files')} files, {meta.get('real_mb')} MiB) + flush",
         "s", "lower", "s", 2),
        ("untar_synth", f"untar synthetic tree ({meta.get('synth_files')} files, {meta.get('synth_mb')} MiB) + flush",
         "s", "lower", "s", 2),
        ("ls", "ls -lR of both trees (cold)", "s", "lower", "s", 2),
        ("catall", "find both trees -type f \\| xargs cat (cold)", "s", "lower", "s", 2),
        ("rm", "rm -rf of both trees", "s", "lower", "s", 2),
        ("create", f"create {meta.get('meta_files')} empty files", "s", "lower", "s", 2),
        ("stat", f"stat {meta.get('meta_files')} files (cold)", "s", "lower", "s", 2),
        ("unlink", f"unlink {meta.get('meta_files')} files", "s", "lower", "s", 2),
        ("randwrite", "fio 4K random write", "IOPS", "higher", "op", 0),
        ("randread", "fio 4K random read (cold)", "IOPS", "higher", "op", 0),
        ("randrw_read", "fio 4K randrw, 2 jobs (cold): reads", "IOPS", "higher", "op", 0),
        ("randrw_write", "fio 4K randrw, 2 jobs (cold): writes", "IOPS", "higher", None, 0),
        ("snap_small", "kmsfs snapshot create, 10 MiB volume", "s", "lower", "s", 3),
    ]
    if snap_gb not in ("", "0"):
        m.append(("snap_big", f"kmsfs snapshot create, {snap_gb} GiB volume", "s", "lower", "s", 3))
    return m


CPU_UNIT = {"gib": "CPU-s/GiB", "op": "CPU-µs/op", "s": "CPU-s"}


def collect(rows):
    """values[(col, metric)] = [(run, value)], cpu[(col, metric)] = [(run, normalized cpu)]."""
    values, cpu, notes, cold, busy = {}, {}, [], {}, {}
    cpu_kind = {}
    for run, col, metric, value, cpus, work in rows:
        if metric.startswith("#:"):
            notes.append((run, col, metric[2:], work))
            continue
        try:
            v = float(value)
        except ValueError:
            continue
        if metric.startswith("busy:"):
            busy.setdefault((col, metric[5:]), []).append((run, v))
            continue
        if metric.startswith("cold:"):
            try:
                kib = float(work) if work else 0.0
            except ValueError:
                kib = 0.0
            cold.setdefault(col, []).append((run, metric[5:], v, kib))
            continue
        values.setdefault((col, metric), []).append((run, v))
        if cpus:
            try:
                c = float(cpus)
                w = float(work) if work else None
            except ValueError:
                continue
            cpu_kind[(col, metric)] = (c, w)
            cpu.setdefault((col, metric), []).append((run, c, w))
    # Derived: 2 readers / 1 reader, per run.
    for col in {c for c, _ in values}:
        one = dict(values.get((col, "read"), []))
        for src, dst in (("read2diff", "r2diff"), ("read2same", "r2same")):
            for run, v in values.get((col, src), []):
                if one.get(run):
                    values.setdefault((col, dst), []).append((run, v / one[run]))
    return values, cpu, notes, cold, busy


def norm_cpu(kind, c, w):
    if kind == "gib":
        return c / w if w else None
    if kind == "op":
        return c / w * 1e6 if w else None
    return c


def fmt(v, digits):
    if v is None:
        return "n/a"
    if digits == 0 and abs(v) >= 1:
        return f"{v:.0f}"
    if digits == 0:
        return f"{v:.2f}"
    return f"{v:.{digits}f}"


def summary(vals, digits):
    if not vals:
        return "n/a"
    med = statistics.median(vals)
    if len(vals) == 1:
        return fmt(med, digits)
    return f"{fmt(med, digits)} [{fmt(min(vals), digits)}-{fmt(max(vals), digits)}]"


def ratio(a, b):
    if a is None or b is None or b == 0:
        return "n/a"
    return f"{a / b:.2f}"


def best(better, cands):
    """(name, value) of the best of cands [(name, value)] (value not None)."""
    c = [(n, v) for n, v in cands if v is not None]
    if not c:
        return None, None
    return (max if better == "higher" else min)(c, key=lambda x: x[1])


def main():
    meta_path, raw_path, out_md, out_png = sys.argv[1:5]
    meta, rows = load(meta_path, raw_path)
    cols = meta.get("columns", "").split()
    base = {c: meta.get(f"base:{c}", c) for c in cols}
    mains = [c for c in cols if not meta.get(f"levers:{c}")]
    variants = [c for c in cols if meta.get(f"levers:{c}")]
    values, cpu, notes, cold, busy = collect(rows)
    mets = metrics(meta)
    na = {}
    for run, col, kind, why in notes:
        kind = {"na": "n/a", "fail": "failed", "warn": "warning"}.get(kind, kind)
        na.setdefault(col, []).append(f"{kind} (run {run}): {why}" if run != "0" else f"{kind}: {why}")

    def med(col, metric):
        v = [x for _, x in values.get((col, metric), [])]
        return statistics.median(v) if v else None

    def cpu_vals(col, metric, kind):
        out = []
        for _, c, w in cpu.get((col, metric), []):
            n = norm_cpu(kind, c, w)
            if n is not None:
                out.append(n)
        return out

    def cpu_med(col, metric, kind):
        v = cpu_vals(col, metric, kind)
        return statistics.median(v) if v else None

    L = []
    L.append("# kmsfs side-by-side benchmark")
    L.append("")
    L.append(f"{meta.get('date')}, commit {meta.get('commit')}, kernel {meta.get('kernel')}, "
             f"{meta.get('cpu')}, {meta.get('ram')} RAM.")
    L.append(f"All file systems on the same disk: {meta.get('disk')}.")
    L.append(f"Median of {meta.get('runs')} run(s) [min-max when more than one]; every run measures each "
             f"column in turn on a fresh volume, starting with the next column each run; "
             f"total time {meta.get('total_s')} s." + (" BENCH_QUICK: small sizes." if meta.get("quick") else ""))
    L.append(f"Streaming: {meta.get('size_mb')} MiB files of random bytes. Real tree: {meta.get('real_desc')}, "
             f"{meta.get('real_files')} files, {meta.get('real_mb')} MiB, tar sha256 {meta.get('real_sha')}…. "
             f"Synthetic tree: {meta.get('synth_files')} files in {meta.get('synth_dirs')} dirs, "
             f"{meta.get('synth_mb')} MiB.")
    L.append(f"fio ({meta.get('fio')}): 4 KiB blocks, psync, buffered, {meta.get('fio_mb')} MiB file, "
             f"{meta.get('fio_secs')} s per phase.")
    if meta.get("can_drop") != "1":
        L.append("**WARNING: the page cache could not be dropped; 'cold' figures are warm.**")
    L.append("")
    L.append("Columns:")
    for c in cols:
        lv = meta.get(f"levers:{c}")
        L.append(f"- {c}: {meta.get(f'version:{c}', '')}" + (f"; levers `{lv}`" if lv else ""))
    L.append("")
    L.append("![chart](latest.png)")
    L.append("")

    # ---- figures
    L.append("## Figures")
    L.append("")
    L.append("Ratios divide kmsfs's median by the best peer's (gocryptfs, securefs, CryFS: the best "
             "for that row, named) and by bindfs's; the `better` column says whether a higher or a "
             "lower figure (and so ratio) is better.")
    L.append("")
    hdr = "| workload | unit | better | " + " | ".join(mains) + " | kmsfs / best peer | kmsfs / bindfs |"
    L.append(hdr)
    L.append("|---|---|---|" + "---:|" * len(mains) + "---:|---:|")
    for key, label, unit, better, _, digits in mets:
        if not any((c, key) in values for c in cols):
            continue
        cells = [summary([x for _, x in values.get((c, key), [])], digits) for c in mains]
        bn, bv = best(better, [(p, med(p, key)) for p in PEERS if p in cols])
        k = med("kmsfs", key)
        rb = f"{ratio(k, bv)} ({bn})" if bn else "n/a"
        L.append(f"| {label} | {unit} | {better} | " + " | ".join(cells) + f" | {rb} | {ratio(k, med('bindfs', key))} |")
    L.append("")

    # ---- CPU
    L.append("## Daemon CPU")
    L.append("")
    L.append("User + system CPU seconds of the FUSE daemon process (all its threads) during the "
             "workload, from /proc/PID/stat before and after (from the exited daemon's rusage when "
             "the workload ends with the unmount): per GiB moved for streaming, in microseconds per "
             "4 KiB operation for fio (the randrw row counts reads and writes), in seconds otherwise. "
             "Lower is better. The plain directory has no daemon (its work is in the kernel, not "
             "counted).")
    L.append("")
    cmains = [c for c in mains if base.get(c) != "plain"]
    L.append("| workload | unit | " + " | ".join(cmains) + " | kmsfs / best peer | kmsfs / bindfs |")
    L.append("|---|---|" + "---:|" * len(cmains) + "---:|---:|")
    for key, label, unit, better, kind, digits in mets:
        if kind is None or not any((c, key) in cpu for c in cols):
            continue
        d = 2 if kind != "op" else 1
        cells = [summary(cpu_vals(c, key, kind), d) for c in cmains]
        bn, bv = best("lower", [(p, cpu_med(p, key, kind)) for p in PEERS if p in cols])
        k = cpu_med("kmsfs", key, kind)
        rb = f"{ratio(k, bv)} ({bn})" if bn else "n/a"
        lab = label.replace(": reads", ": reads + writes")
        L.append(f"| {lab} | {CPU_UNIT[kind]} | " + " | ".join(cells) + f" | {rb} | {ratio(k, cpu_med('bindfs', key, kind))} |")
    L.append("")

    # ---- room on the machine
    if busy:
        L.append("## Room on the machine")
        L.append("")
        L.append("The share of the whole machine's CPU time (all CPUs, every process and the kernel; "
                 "from /proc/stat, idle and iowait counted as free, steal as busy) that was busy "
                 "during the workload. A second reader can add at most what one reader left free: "
                 "the ceiling row is 1 / (busy share of one reader), at most 2.")
        L.append("")
        L.append("| workload | unit | " + " | ".join(mains) + " |")
        L.append("|---|---|" + "---:|" * len(mains))
        bmets = [("write", "machine busy during the write"), ("read", "machine busy during 1 cold reader"),
                 ("read2diff", "machine busy during 2 readers, 2 files")]
        for key, label in bmets:
            if not any((c, key) in busy for c in mains):
                continue
            cells = [summary([x * 100 for _, x in busy.get((c, key), [])], 0) for c in mains]
            L.append(f"| {label} | % | " + " | ".join(cells) + " |")
        cells = []
        for c in mains:
            ceil = [min(2.0, 1 / x) for _, x in busy.get((c, "read"), []) if x > 0]
            cells.append(summary(ceil, 2))
        L.append("| ceiling of 2 readers / 1 reader, 2 files | x | " + " | ".join(cells) + " |")
        L.append("")

    # ---- variants
    if variants:
        L.append("## Variants")
        L.append("")
        L.append("kmsfs (or another base) with levers: mount options, environment, kernel settings set "
                 "before the column and restored after it. Each figure is followed by its ratio to "
                 "the base column's median (`better` as above; for CPU lower is better).")
        L.append("")
        for c in variants:
            L.append(f"- {c} (base {base.get(c)}): `{meta.get(f'levers:{c}')}`")
        L.append("")
        L.append("| workload | unit | better | " + " | ".join(f"{c} | / {base.get(c)}" for c in variants) + " |")
        L.append("|---|---|---|" + "---:|---:|" * len(variants))
        for key, label, unit, better, kind, digits in mets:
            if not any((c, key) in values for c in variants):
                continue
            cells = []
            for c in variants:
                cells.append(summary([x for _, x in values.get((c, key), [])], digits))
                cells.append(ratio(med(c, key), med(base.get(c), key)))
            L.append(f"| {label} | {unit} | {better} | " + " | ".join(cells) + " |")
            if kind is not None and any((c, key) in cpu for c in variants):
                cells = []
                for c in variants:
                    cells.append(summary(cpu_vals(c, key, kind), 2 if kind != "op" else 1))
                    cells.append(ratio(cpu_med(c, key, kind), cpu_med(base.get(c), key, kind)))
                L.append(f"| (daemon CPU) | {CPU_UNIT[kind]} | lower | " + " | ".join(cells) + " |")
        L.append("")

    # ---- cold check, n/a
    L.append("## Cold check")
    L.append("")
    L.append("After every unmount + drop_caches + remount, `fincore` counts the page-cache-resident "
             "pages of the column's backing files (the directory itself for plain) against all their "
             "pages. Largest resident amount per column, its fraction, and the step it came before "
             "(a remount reads a few metadata pages back: that is expected). Flagged when more than "
             "1% and more than 1 MiB are resident.")
    L.append("")
    for c in cols:
        if c not in cold:
            continue
        run, step, f, kib = max(cold[c], key=lambda x: (x[3], x[2]))
        flag = "" if f <= 0.01 or kib <= 1024 else "  **(not cold)**"
        L.append(f"- {c}: {kib:.0f} KiB, {f * 100:.2f}% (run {run}, before {step}){flag}")
    L.append("")
    if na:
        L.append("## n/a, failures and warnings")
        L.append("")
        for c, whys in na.items():
            for w in whys:
                L.append(f"- {c}: {w}")
        L.append("")

    # ---- raw
    L.append("<details><summary>Every run's raw figures (value, daemon CPU-s, work)</summary>")
    L.append("")
    L.append("| run | column | metric | value | CPU-s | work |")
    L.append("|---|---|---|---:|---:|---:|")
    for run, col, metric, value, cpus, work in rows:
        if metric.startswith("#:"):
            continue
        L.append(f"| {run} | {col} | {metric} | {value} | {cpus} | {work} |")
    L.append("")
    L.append("</details>")
    L.append("")
    with open(out_md, "w", encoding="utf-8") as f:
        f.write("\n".join(L))

    chart(meta, mets, cols, values, cpu, med, cpu_med, out_png)


def chart(meta, mets, cols, values, cpu, med, cpu_med, out_png):
    """Two panels: figures and daemon CPU, each column normalized to the best peer
    (above 1 = better than the best peer), log scale."""
    # A chart of an older run must not sit beside this report.
    if os.path.exists(out_png):
        os.remove(out_png)
    if not shutil.which("gnuplot"):
        print("gnuplot is missing: no chart", file=sys.stderr)
        return
    rows_f, rows_c = [], []
    short = {
        "write": "write", "read": "read", "read2diff": "2 rd/2 files", "read2same": "2 rd/1 file",
        "untar_real": "untar real", "untar_synth": "untar synth", "ls": "ls -lR", "catall": "cat all",
        "rm": "rm -rf", "create": "create", "stat": "stat", "unlink": "unlink",
        "randwrite": "4K randwrite", "randread": "4K randread", "randrw_read": "randrw rd",
        "randrw_write": "randrw wr",
    }
    for key, _, _, better, kind, _ in mets:
        if key not in short:
            continue
        _, bv = best(better, [(p, med(p, key)) for p in PEERS if p in cols])
        if bv:
            r = []
            for c in cols:
                v = med(c, key)
                r.append("?" if not v else f"{(v / bv if better == 'higher' else bv / v):.4f}")
            rows_f.append((short[key], r))
        if kind:
            _, bc = best("lower", [(p, cpu_med(p, key, kind)) for p in PEERS if p in cols])
            if bc:
                r = []
                for c in cols:
                    v = cpu_med(c, key, kind)
                    r.append("?" if not v else f"{bc / v:.4f}")
                rows_c.append((short[key], r))
    if not rows_f:
        print("no peer figures: no chart", file=sys.stderr)
        return
    def yrange(data):
        v = [float(x) for _, r in data for x in r if x != "?" and float(x) > 0]
        if not v:
            return "set yrange [*:*]"
        return f"set yrange [{min(min(v), 1) / 1.5}:{max(max(v), 1) * 1.5}]"

    tmp = tempfile.mkdtemp(prefix="kmsfs-chart.")
    try:
        def write(name, data):
            """The data file of one panel, without the columns it has no figure for;
            returns (path, the columns kept)."""
            keep = [i for i in range(len(cols)) if any(r[i] != "?" for _, r in data)]
            p = os.path.join(tmp, name)
            with open(p, "w", encoding="utf-8") as f:
                f.write("label " + " ".join(cols[i] for i in keep) + "\n")
                for lab, r in data:
                    f.write('"' + lab + '" ' + " ".join(r[i] for i in keep) + "\n")
            return p, keep
        pf = write("fig.dat", rows_f)
        pc = write("cpu.dat", rows_c) if rows_c else None
        palette = {"plain": "#999999", "bindfs": "#4daf4a", "kmsfs": "#e41a1c", "gocryptfs": "#ff7f00",
                   "securefs": "#377eb8", "cryfs": "#984ea3"}
        extra = ["#a50f15", "#fb6a4a", "#67000d", "#fcbba1", "#7f2704", "#fdae6b"]
        colors, k = [], 0
        for c in cols:
            if c in palette:
                colors.append(palette[c])
            else:
                colors.append(extra[k % len(extra)])
                k += 1
        def plots(panel):
            path, keep = panel
            return ", ".join(
                f"'{path}' using {j + 2}:xtic(1) title columnheader({j + 2}) lc rgb '{colors[i]}'"
                for j, i in enumerate(keep))
        title = (f"kmsfs vs peers, normalized to the best peer (gocryptfs/securefs/CryFS) per workload; "
                 f"above 1 = better; {meta.get('date')}, commit {meta.get('commit')}"
                 + (" (BENCH_QUICK)" if meta.get("quick") else ""))
        g = [
            "set terminal pngcairo size 1600,1100 font 'sans,10' noenhanced",
            f"set output '{out_png}'",
            "set datafile missing '?'",
            "set style data histograms",
            "set style histogram clustered gap 1",
            "set style fill solid 0.9 border -1",
            "set logscale y 2",
            "set grid ytics",
            "set xtics rotate by -30",
            "set key outside right top",
            "set arrow from graph 0, first 1 to graph 1, first 1 nohead lw 2 lc rgb 'black' front",
            f"set multiplot layout {2 if pc else 1},1 title \"{title}\"",
            "set title 'Figures: speed relative to the best peer (throughput ratio, or inverse time ratio)'",
            "set ylabel 'x best peer'",
            yrange(rows_f),
            "plot " + plots(pf),
        ]
        if pc:
            g += [
                "set title 'Daemon CPU: best peer CPU / column CPU (above 1 = less CPU than the best peer)'",
                "set ylabel 'x best peer'",
                yrange(rows_c),
                "plot " + plots(pc),
            ]
        g.append("unset multiplot")
        gp = os.path.join(tmp, "chart.gp")
        with open(gp, "w", encoding="utf-8") as f:
            f.write("\n".join(g) + "\n")
        subprocess.run(["gnuplot", gp], check=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
