"""The issue's targets, as ratios of figures measured in the same run.

Engine figures for the service ratios are the reference measurements taken beside the service
runs (same minutes, server idle), so that a change in the machine's load between parts moves
both sides of a ratio alike. In a --quick run every target is "n/a": its numbers mean nothing.
"""
from __future__ import annotations

C = 16                           # the concurrency the targets name


def _find(rows: list[dict], **match) -> dict | None:
    for row in rows:
        if all(row.get(k) == v for k, v in match.items()):
            return row
    return None


def _img_s(rows: list[dict], **match) -> float | None:
    row = _find(rows, **match)
    return row.get("img_s") if row else None


def _target(name: str, measured: float | None, threshold: float, quick: bool, summary: str,
            **details) -> dict:
    if measured is None:
        status = "n/a"
    elif quick:
        status = "n/a"
        summary += " (quick run: not a measurement)"
    else:
        status = "pass" if measured >= threshold else "miss"
    return {"name": name, "measured": measured, "threshold": threshold, "status": status,
            "summary": summary, **details}


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


def compute_targets(r: dict) -> list[dict]:
    quick = r.get("quick", False)
    svc, naive, ref = r.get("service", []), r.get("naive", []), r.get("reference", {})
    concurrencies = sorted({row["concurrency"] for row in svc + naive})
    c = C if C in concurrencies or not concurrencies else max(concurrencies)
    workloads = r.get("workloads", {})
    models = r.get("models", {})
    label = lambda w: models.get(workloads.get(w, {}).get("model"), {}).get("label", w)  # noqa
    ref_of = lambda w, p: ref.get(f"{workloads.get(w, {}).get('model')}/{p}", {})       # noqa
    out = []

    # 1, 2: service at c16 against the engine at batch 16
    for w, threshold, what in (("photo", 0.90, "photographs"), ("small", 0.60, "small images")):
        s = _img_s(svc, workload=w, precision="fp32", batching="on", concurrency=c)
        e = ref_of(w, "fp32").get("16")
        ratio = _ratio(s, e)
        details = {"service_img_s": s, "engine_b16_img_s": e}
        summary = (f"service {s or 0:.1f} img/s at c{c} / engine {e or 0:.1f} img/s at batch 16 "
                   f"= {ratio or 0:.2f} (>= {threshold:.2f})")
        if w == "small" and s and e:
            details["overhead_us_per_image"] = 1e6 / s - 1e6 / e
            summary += f"; overhead {details['overhead_us_per_image']:.0f} us per image"
            row = _find(svc, workload=w, precision="fp32", batching="on", concurrency=c)
            engine_cpu = ref_of(w, "fp32").get("cpu_ms_per_image", {}).get("16")
            if row and engine_cpu:
                # CPU per request beyond the engine's own: the event loop (main thread) and
                # the rest (decode and serialise threads, smaller batches' extra model cost)
                extra = row["server_cpu_ms_per_request"] * 1e3 - min(engine_cpu) * 1e3
                loop = row["loop_cpu_us_per_request"]
                details.update(overhead_cpu_us_per_request=extra, loop_cpu_us_per_request=loop,
                               engine_cpu_us_per_image=min(engine_cpu) * 1e3)
                summary += (f" (CPU beyond the engine's {min(engine_cpu) * 1e3:.0f} us/image: "
                            f"{extra:.0f} us/request, of which the event loop {loop:.0f})")
        out.append(_target(f"{label(w)}, {what}: service c{c} / engine b16", ratio, threshold,
                           quick, summary, **details))

    # 3: batching on vs off keeps the engine's batch-16 / batch-1 gain
    for w in ("small", "photo"):
        on = _img_s(svc, workload=w, precision="fp32", batching="on", concurrency=c)
        off = _img_s(svc, workload=w, precision="fp32", batching="off", concurrency=c)
        e = ref_of(w, "fp32")
        service_gain, engine_gain = _ratio(on, off), _ratio(e.get("16"), e.get("1"))
        kept = _ratio(service_gain, engine_gain)
        out.append(_target(
            f"{label(w)}: batching on/off gain kept, service c{c} vs engine b16/b1", kept, 0.90,
            quick, f"service on/off {service_gain or 0:.2f}x, engine b16/b1 "
                   f"{engine_gain or 0:.2f}x: kept {kept or 0:.2f} (>= 0.90)",
            service_gain=service_gain, engine_gain=engine_gain))

    # 4: service vs the naive PyTorch endpoint, fp32 and int8; against the faster of its
    # PyTorch thread settings (the default, and the one-thread control)
    n = max((row.get("img_s", 0) for row in naive
             if row["workload"] == "photo" and row["concurrency"] == c), default=None)
    for precision, threshold in (("fp32", 1.2), ("int8", 2.0)):
        s = _img_s(svc, workload="photo", precision=precision, batching="on", concurrency=c)
        ratio = _ratio(s, n)
        out.append(_target(
            f"{label('photo')}: service {precision} / naive PyTorch endpoint at c{c}", ratio,
            threshold, quick, f"{s or 0:.1f} / {n or 0:.1f} img/s = {ratio or 0:.2f}x "
                              f"(>= {threshold:g}x)", service_img_s=s, naive_img_s=n))

    # 5: int8 vs fp32 in the engine
    model = workloads.get("photo", {}).get("model")
    engine = r.get("engine", {}).get(model, {})
    fp32, int8 = engine.get("ort_fp32", {}), engine.get("ort_int8", {})
    by_batch = {b: _ratio(int8[b]["img_s"], fp32[b]["img_s"]) for b in fp32 if b in int8}
    accuracy = models.get(model, {}).get("int8_cosine_to_fp32")
    ratio = by_batch.get("16")
    cos = f", cosine to fp32 min {accuracy['cosine_to_fp32_min']:.4f}" if accuracy else ""
    out.append(_target(
        f"{label('photo')}: engine int8 / fp32 at batch 16", ratio, 1.7, quick,
        "int8/fp32 " + ", ".join(f"b{b} {v:.2f}x" for b, v in by_batch.items()) + cos
        + " (>= 1.7x)", by_batch=by_batch, accuracy=accuracy))
    return out
