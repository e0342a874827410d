"""results.json of benchmarks.retrieval -> results.md (and the README's figures, same words)."""

from __future__ import annotations

from pathlib import Path

from .report import _f, machine_line


def headline(r: dict) -> str:
    """One paragraph of the figures (README and results.md)."""
    e, g, i, q = r["embed"], r["engine"], r["index"], r["queries"]
    return (
        f"`simmim embed` wrote {e['images']:,} vectors at {e['img_s']:,.0f} img/s against "
        f"{g['img_s']:,.0f} img/s for the engine alone ({e['img_s'] / g['img_s']:.2f}x; by CPU "
        f"time per image {r['cpu_ratio']:.2f}x); "
        f"`simmim index` loaded them into Milvus Lite in {i['seconds']:.0f} s; "
        f"{q['queries']:,} queries through `simmim serve` and Milvus ran at {q['qps']:,.0f} "
        f"queries/s with recall@10 {q['recall_at_10']:.3f} against exact search and class "
        f"precision@10 {q['precision_at_10']:.3f} (exact search: "
        f"{q['exact_precision_at_10']:.3f})."
    )


def markdown(r: dict) -> str:
    e, g, i, q, m = r["embed"], r["engine"], r["index"], r["queries"], r["model"]
    lines = [
        "# Retrieval benchmark: Fashion-MNIST end to end",
        "",
        f"`{r['command']}`, {r['started']}, {r['seconds']:.0f} s.",
        "",
        f"Machine: {machine_line(r)}",
        "",
        f"- Model: {m['model']} ({m['dim']}-d, {m['encoder_file']} sha256 "
        f"{m['encoder_sha256'][:12]}), {m['path']}.",
        f"- Data: the Debian Fashion-MNIST idx files, written as {r['data']['train_images']:,} "
        f"training and {r['data']['test_images']:,} test PNG files (28x28 gray, "
        f"{r['data']['png_bytes_mean']:.0f} bytes on average; not timed).",
        "",
        headline(r),
        "",
        "## Targets",
        "",
        "| target | measured | needed | result |",
        "|---|---:|---:|---|",
    ]
    for t in r["targets"]:
        status = "pass" if t["passed"] else "MISS"
        lines.append(f"| {t['name']} | {t['measured']:.3f} | >= {t['needed']:g} | **{status}** |")
    lines += [
        "",
        "## Bulk embedding (`simmim embed`, Ray Data on this machine)",
        "",
        "| | img/s | seconds |",
        "|---|---:|---:|",
        f"| engine alone before the job ({g['calls_at_once']} calls at once, "
        f"{g['threads_per_call']} thread each, batch {g['batch_size']}, images preprocessed in "
        f"memory) | {_f(g['img_s_before'])} | |",
        f"| `simmim embed` ({e['actors']} actors, batch {e['batch_size']}: read, decode, "
        f"preprocess, embed, write Parquet) | {_f(e['img_s'])} | {_f(e['seconds'])} |",
        f"| engine alone after the job | {_f(g['img_s_after'])} | |",
        "",
        f"CPU time per image, steadier than wall-clock rates on a shared machine: engine alone "
        f"{g['cpu_ms_per_image']:.2f} ms (before {g['cpu_ms_per_image_before']:.2f}, after "
        f"{g['cpu_ms_per_image_after']:.2f}), `simmim embed` {e['cpu_ms_per_image']:.2f} ms "
        f"(the driver {e['cpu_ms_per_image_driver']:.2f} ms of it, the Ray processes the rest): "
        f"ratio {r['cpu_ratio']:.2f}, the img/s ratio to expect where both keep every core busy.",
        "",
        f"Ray start-up (before the job, not counted): {e['ray_init_s']:.1f} s. Parquet file: "
        f"{e['parquet_mb']:,.0f} MB, {e['failed']} failed rows. Largest difference between a "
        f"stored vector and the engine's for the same image (1,000 sampled): "
        f"{e['max_abs_diff_vs_engine']:.1e}.",
        "",
        "## Index (`simmim index`, Milvus Lite)",
        "",
        f"{i['vectors']:,} vectors, {i['index']}: {i['seconds']:.1f} s "
        f"({_f(i['vectors_s'], 0)} vectors/s; insert, flush, index build and load).",
        "",
        "## Queries (the test images through `simmim serve`, then Milvus)",
        "",
        "| | seconds | queries/s |",
        "|---|---:|---:|",
        f"| embedding, simmim_client against `simmim serve` (defaults) | {_f(q['embed_s'])} | "
        f"{_f(q['embed_qps'])} |",
        f"| Milvus search, k={q['k']}, ef={q['ef']} | {_f(q['search_s'])} | "
        f"{_f(q['search_qps'])} |",
        f"| both | {_f(q['embed_s'] + q['search_s'])} | {_f(q['qps'])} |",
        "",
        f"recall@{q['k']} of the HNSW index against exact search over the same vectors: "
        f"{q['recall_at_10']:.4f}. Class precision@{q['k']} (neighbours of the query's class): "
        f"{q['precision_at_10']:.4f} (exact search: {q['exact_precision_at_10']:.4f}).",
        "",
    ]
    return "\n".join(lines)


def write_markdown(r: dict, path: Path) -> None:
    path.write_text(markdown(r))
