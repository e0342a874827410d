"""results.json -> results.md (tables) and results.png (engine and service throughput)."""

from __future__ import annotations

from pathlib import Path

ENGINE_NAMES = {
    "ort_fp32": "onnxruntime fp32",
    "ort_fp32_1call": "onnxruntime fp32, one call at a time on every thread",
    "ort_int8": "onnxruntime int8",
    "torch_eager": "PyTorch eager",
}


def engine_label(name: str, rows: dict) -> str:
    """ENGINE_NAMES, with the number of concurrent calls when the service runs several."""
    workers = max((row.get("workers", 1) for row in rows.values()), default=1)
    return ENGINE_NAMES[name] + (f" ({workers} calls at once, as served)" if workers > 1 else "")


def _f(x, digits: int = 1) -> str:
    return "-" if x is None else f"{x:,.{digits}f}"


def naive_label(row: dict) -> str:
    threads = row.get("torch_threads", "default")
    return "naive PyTorch" + ("" if threads == "default" else f", {threads} thread (control)")


def machine_line(r: dict) -> str:
    m, load = r["machine"], r.get("load", {})
    v = m["versions"]
    libs = ", ".join(
        f"{k} {v[k]}"
        for k in (
            "onnxruntime",
            "onnxruntime-gpu",
            "torch",
            "fastapi",
            "uvicorn",
            "uvloop",
            "httptools",
            "pillow",
            "numpy",
            "orjson",
        )
        if k in v
    )
    gpu = f"; GPU: {m['gpu']}" if m.get("gpu") else "; no GPU"
    return (
        f"{m['cpu_model']}, {m['logical_cpus']} logical CPUs "
        f"(AVX-512 VNNI: {'yes' if m['avx512_vnni'] else 'no'}), {m['memory_gb']} GB"
        f"{gpu}; provider {m['provider']}; Python {m['python']}; {libs}. "
        f"1-min load average during the run: mean {load.get('load1_mean', 0):.2f}, "
        f"min {load.get('load1_min', 0):.2f}, max {load.get('load1_max', 0):.2f}."
    )


def targets_table(r: dict) -> list[str]:
    lines = ["| target | measured | needed | result |", "|---|---|---|---|"]
    for t in r["targets"]:
        lines.append(
            f"| {t['name']} | {t['summary']} | >= {t['threshold']:g} | **{t['status']}** |"
        )
    return lines


def rounds_table(r: dict) -> list[str]:
    """Every target round: the load, the engine and each server at the target concurrency."""
    names = [
        ("engine_fp32_b1", "engine b1"),
        ("engine_fp32_b16", "engine b16"),
        ("on", "service"),
        ("on_1process", "service, 1 process"),
        ("off", "service, batching off"),
        ("naive", "naive"),
        ("naive_1thread", "naive, 1 thread"),
        ("engine_int8_b16", "engine int8 b16"),
        ("int8", "service int8"),
    ]
    lines = [
        "| model, images | round | load | " + " | ".join(n for _, n in names) + " |",
        "|---|---:|---:|" + "---:|" * len(names),
    ]
    for w, v in r.get("rounds", {}).items():
        label = r["models"][r["workloads"][w]["model"]]["label"]
        for i, row in enumerate(v["rounds"]):
            lines.append(
                f"| {label}, {w} | {i} | {row['load1']:.2f} | "
                + " | ".join(_f(row.get(k)) for k, _ in names)
                + " |"
            )
    return lines


def engine_table(r: dict) -> list[str]:
    engine = r.get("engine", {})
    if not engine:
        return []
    batches = sorted({int(b) for m in engine.values() for e in m.values() for b in e})
    lines = [
        "| model | engine | " + " | ".join(f"batch {b}" for b in batches) + " |",
        "|---|---|" + "---:|" * len(batches),
    ]
    for key, model in engine.items():
        for name, rows in model.items():
            cells = [_f(rows.get(str(b), {}).get("img_s")) for b in batches]
            lines.append(
                f"| {r['models'][key]['label']} | {engine_label(name, rows)} | "
                + " | ".join(cells)
                + " |"
            )
    return lines


def load_table(r: dict) -> list[str]:
    rows = r.get("service", []) + r.get("naive", [])
    if not rows:
        return []
    lines = [
        "| model, images | server | batching | c | img/s | p50 ms | p95 ms | p99 ms | "
        "mean batch | server cores busy | event-loop CPU us/request |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        lat = row.get("latency_ms", {})
        server = (
            ("simmim serve " + row["precision"]) if row["server"] == "service" else naive_label(row)
        )
        batch = row.get("batcher", {}).get("mean_batch")
        lines.append(
            f"| {r['models'][row['model']]['label']}, {row['workload']} | {server} | "
            f"{row['batching']} | {row['concurrency']} | {_f(row.get('img_s'))} | "
            f"{_f(lat.get('p50'))} | {_f(lat.get('p95'))} | {_f(lat.get('p99'))} | "
            f"{_f(batch)} | {_f(row.get('server_cores_busy'), 2)} | "
            f"{_f(row.get('loop_cpu_us_per_request'), 0)} |"
        )
    return lines


def breakdown_table(r: dict) -> list[str]:
    """Per workload: the service's own timings at c1 (batching on), then the in-process costs."""
    lines = [
        "| model, images | client latency | decode + preprocess | queue wait | inference "
        "| serialise | HTTP, parsing, loop (rest) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    stage_lines = [
        "| model, images | request bytes | parse JSON | base64 | decode | preprocess "
        "| inference b1 | serialise (base64) | serialise (numbers) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for w, info in r.get("workloads", {}).items():
        label = f"{r['models'][info['model']]['label']}, {w}"
        for c in (1, 16):
            row = next(
                (
                    x
                    for x in r.get("service", [])
                    if x["workload"] == w
                    and x["precision"] == "fp32"
                    and x["batching"] == "on"
                    and x["concurrency"] == c
                    and "server_ms" in x
                ),
                None,
            )
            if row:
                s, lat = row["server_ms"], row["latency_ms"]["mean"]
                known = sum(s.get(k, 0.0) for k in ("decode", "queue", "inference", "serialize"))
                lines.append(
                    f"| {label} (c{c}) | {_f(lat, 2)} | {_f(s.get('decode'), 2)} | "
                    f"{_f(s.get('queue'), 2)} | {_f(s.get('inference'), 2)} | "
                    f"{_f(s.get('serialize'), 2)} | {_f(lat - known, 2)} |"
                )
        st = r.get("breakdown", {}).get(w, {}).get("stages_ms")
        if st:
            stage_lines.append(
                f"| {label} | {_f(st['request_bytes_mean'], 0)} | {_f(st['parse_json_ms'], 3)} | "
                f"{_f(st['base64_ms'], 3)} | {_f(st['decode_ms'], 3)} | "
                f"{_f(st['preprocess_ms'], 3)} | {_f(st['inference_b1_ms'], 3)} | "
                f"{_f(st['serialize_ms'], 3)} | {_f(st.get('serialize_float_ms'), 3)} |"
            )
            if "originals" in st:
                o = st["originals"]
                stage_lines.append(
                    f"| {label}, files as found | {_f(o['image_bytes_mean'] * 4 / 3, 0)} | - | - "
                    f"| {_f(o['decode_ms'], 3)} | {_f(o['preprocess_ms'], 3)} | - | - | - |"
                )
    return (
        lines
        + [
            "",
            "In process, called from one thread (inference with the service's "
            "onnxruntime threads), milliseconds per image, through the service's own "
            "functions; the last row decodes the photographs as found (1-6k px) instead "
            "of re-encoded:",
            "",
        ]
        + stage_lines
    )


def markdown(r: dict) -> str:
    w = r.get("workloads", {})
    images = r.get("images", {})
    parts = [
        f"# Benchmarks{' (quick smoke run: numbers mean nothing)' if r['quick'] else ''}",
        "",
        f"`{r['command']}`, {r['started']}, {r['duration_s']:.0f} s.",
        "",
        "Machine: " + machine_line(r),
        "",
    ]
    for m in r.get("models", {}).values():
        parts.append(
            f"- {m['label']}: {m['arch']}, {m['parameters']:,} parameters, "
            f"{m['image_size']} px x {m['in_chans']} channels, embedding "
            f"{m['embedding_dim']} ({m['pooling']} pooling); {m['note']}; PyTorch: "
            f"{'the same weights' if m['checkpoint'] else 'random weights'}."
        )
    for key, info in w.items():
        parts.append(
            f"- Workload `{key}`: {r['models'][info['model']]['label']} with "
            f"{info['images']}, one image per request (POST /embed, JSON: the image in "
            'base64, `"encoding": "base64"` for the embedding, as simmim_client '
            "asks; the naive endpoint answers lists of numbers)."
        )
    if "photos" in images:
        parts.append(f"- Photographs: {images['photos']['source']}.")
    parts += ["", "## Targets", ""] + targets_table(r)
    parts += [
        "",
        f"Side by side (img/s; servers at concurrency "
        f"{next(iter(r.get('rounds', {}).values()), {}).get('concurrency', '-')}, "
        "one round after another; the targets are medians of per-round ratios):",
        "",
    ]
    parts += rounds_table(r)
    parts += ["", "## Engine (img/s at a fixed batch; onnxruntime as the service runs it)", ""]
    parts += engine_table(r)
    parts += [
        "",
        "## End to end on loopback (img/s and latency; load generator in its own process)",
        "",
    ] + load_table(r)
    parts += [
        "",
        "## Where the time goes in one request (ms, mean; the service's x-*-time-ms headers)",
        "",
    ] + breakdown_table(r)
    return "\n".join(parts) + "\n"


def write_markdown(r: dict, path: Path) -> None:
    path.write_text(markdown(r))


def write_plot(r: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    workloads = r.get("workloads", {})
    fig, axes = plt.subplots(2, len(workloads), figsize=(6 * len(workloads), 8), squeeze=False)
    for col, (w, info) in enumerate(workloads.items()):
        model = info["model"]
        label = r["models"][model]["label"]
        ax = axes[0][col]
        for name, rows in r.get("engine", {}).get(model, {}).items():
            batches = sorted(int(b) for b in rows)
            ax.plot(
                batches,
                [rows[str(b)]["img_s"] for b in batches],
                "o-",
                label=engine_label(name, rows),
            )
        ax.set(
            title=f"engine: {label}",
            xlabel="batch size",
            ylabel="img/s (log)",
            xscale="log",
            yscale="log",
        )
        ax.set_xticks([1, 8, 16, 32], ["1", "8", "16", "32"])
        ax.legend(fontsize=8)
        ax = axes[1][col]
        series = {}
        for row in r.get("service", []) + r.get("naive", []):
            if row["workload"] != w or "img_s" not in row:
                continue
            name = (
                f"service {row['precision']}, batching {row['batching']}"
                if row["server"] == "service"
                else naive_label(row)
            )
            series.setdefault(name, []).append((row["concurrency"], row["img_s"]))
        for name, points in series.items():
            points.sort()
            ax.plot(*zip(*points), "o-", label=name)
        refs = [x["engine_fp32_b16"] for x in r.get("rounds", {}).get(w, {}).get("rounds", [])]
        ref = sorted(refs)[len(refs) // 2] if refs else None
        if ref:
            ax.axhline(ref, color="gray", ls="--", label="engine fp32, batch 16 (median)")
        ax.set(
            title=f"end to end: {label}, {w}",
            xlabel="concurrent requests",
            ylabel="img/s",
            xscale="log",
        )
        ax.set_xticks([1, 4, 16, 64], ["1", "4", "16", "64"])
        ax.legend(fontsize=8)
    fig.suptitle(
        f"simmim-service benchmarks: {r['machine']['cpu_model']}, "
        f"{r['machine']['logical_cpus']} CPUs, load {r['load']['load1_mean']:.1f}"
        + (" (quick)" if r["quick"] else "")
    )
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
