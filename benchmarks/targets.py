"""The issue's targets, as ratios of figures measured side by side in the same run.

Each comes from the target rounds (run.py, Bench.rounds): every round measures the engine and
then each server at concurrency 16, back to back; a target is the median over the rounds of
that round's ratio, so that a change in the machine's load (a shared machine) moves both sides
of a ratio alike. In a --quick run every target is "n/a": its numbers mean nothing.
"""

from __future__ import annotations

import statistics


def _target(
    name: str, values: list[float], threshold: float, quick: bool, summary: str, **details
) -> dict:
    measured = statistics.median(values) if values else None
    if measured is None:
        status = "n/a"
    elif quick:
        status = "n/a"
        summary += " (quick run: not a measurement)"
    else:
        status = "pass" if measured >= threshold else "miss"
    rounds = ", ".join(f"{v:.2f}" for v in values)
    return {
        "name": name,
        "measured": measured,
        "threshold": threshold,
        "status": status,
        "summary": f"{summary}; median of rounds [{rounds}]" if len(values) > 1 else summary,
        "rounds": values,
        **details,
    }


def _per_round(rows: list[dict], fn) -> list[float]:
    out = []
    for row in rows:
        try:
            value = fn(row)
        except (KeyError, TypeError, ZeroDivisionError):
            continue
        if value is not None:
            out.append(value)
    return out


def _med(values: list[float]) -> float:
    return statistics.median(values) if values else 0.0


def compute_targets(r: dict) -> list[dict]:
    quick = r.get("quick", False)
    workloads, models = r.get("workloads", {}), r.get("models", {})
    label = lambda w: models.get(workloads.get(w, {}).get("model"), {}).get("label", w)  # noqa
    rounds = {w: v["rounds"] for w, v in r.get("rounds", {}).items()}
    c = next(iter(r.get("rounds", {}).values()), {}).get("concurrency", 16)
    out = []

    # 1, 2: service at c16 against the engine at batch 16
    for w, threshold, what in (("photo", 0.90, "photographs"), ("small", 0.60, "small images")):
        rows = rounds.get(w, [])
        values = _per_round(rows, lambda x: x["on"] / x["engine_fp32_b16"])
        on = _med(_per_round(rows, lambda x: x["on"]))
        eng = _med(_per_round(rows, lambda x: x["engine_fp32_b16"]))
        best = _per_round(rows, lambda x: x["on"] / max(x["engine_fp32_b16"], x["engine_fp32_b1"]))
        summary = (
            f"service {on:.1f} img/s at c{c} / engine {eng:.1f} img/s at batch 16 = "
            f"{_med(values):.2f} (against the engine's faster of batch 1 and 16 in each "
            f"round: {_med(best):.2f})"
        )
        details = {"service_img_s": on, "engine_b16_img_s": eng, "against_best_batch": best}
        if w == "small" and on and eng:
            overhead = _med(_per_round(rows, lambda x: 1e6 / x["on"] - 1e6 / x["engine_fp32_b16"]))
            engine_cpu = _med(
                _per_round(rows, lambda x: x["engine_fp32_b16_cpu_ms_per_image"] * 1e3)
            )
            server_cpu = _med(
                _per_round(rows, lambda x: x["on_load"]["server_cpu_ms_per_request"] * 1e3)
            )
            loop_cpu = _med(_per_round(rows, lambda x: x["on_load"]["loop_cpu_us_per_request"]))
            client_cpu = _med(
                _per_round(
                    rows,
                    lambda x: x["on_load"]["client_cpu_s"] / x["on_load"]["requests_sent"] * 1e6,
                )
            )
            details.update(
                overhead_us_per_image=overhead,
                engine_cpu_us_per_image=engine_cpu,
                server_cpu_us_per_request=server_cpu,
                loop_cpu_us_per_request=loop_cpu,
                load_generator_cpu_us_per_request=client_cpu,
            )
            summary += (
                f"; overhead {overhead:.0f} us per image (server CPU {server_cpu:.0f} us "
                f"per request against the engine's {engine_cpu:.0f} us per image; "
                f"its event loop alone {loop_cpu:.0f} us; the load generator, on the "
                f"same cores, {client_cpu:.0f} us)"
            )
        out.append(
            _target(
                f"{label(w)}, {what}: service c{c} / engine b16",
                values,
                threshold,
                quick,
                summary,
                **details,
            )
        )

    # 3: batching on vs off keeps the engine's batch-16 / batch-1 gain
    for w in ("small", "photo"):
        rows = rounds.get(w, [])
        values = _per_round(
            rows, lambda x: (x["on"] / x["off"]) / (x["engine_fp32_b16"] / x["engine_fp32_b1"])
        )
        service_gain = _med(_per_round(rows, lambda x: x["on"] / x["off"]))
        engine_gain = _med(_per_round(rows, lambda x: x["engine_fp32_b16"] / x["engine_fp32_b1"]))
        out.append(
            _target(
                f"{label(w)}: batching on/off gain kept, service c{c} vs engine b16/b1",
                values,
                0.90,
                quick,
                f"service on/off {service_gain:.2f}x, engine b16/b1 {engine_gain:.2f}x: kept "
                f"{_med(values):.2f}",
                service_gain=service_gain,
                engine_gain=engine_gain,
            )
        )

    # 4: service vs the naive PyTorch endpoint, fp32 and int8, against the faster of its two
    # PyTorch thread settings in the same round (the default, and the one-thread control)
    rows = rounds.get("photo", [])
    naive = lambda x: max(x.get("naive") or 0, x.get("naive_1thread") or 0)  # noqa: E731
    for key, precision, threshold in (("on", "fp32", 1.2), ("int8", "int8", 2.0)):
        values = _per_round(rows, lambda x, key=key: x[key] / naive(x))
        s, n = _med(_per_round(rows, lambda x, key=key: x[key])), _med(_per_round(rows, naive))
        out.append(
            _target(
                f"{label('photo')}: service {precision} / naive PyTorch endpoint at c{c}",
                values,
                threshold,
                quick,
                f"{s:.1f} / {n:.1f} img/s = {_med(values):.2f}x",
                service_img_s=s,
                naive_img_s=n,
            )
        )

    # 5: int8 vs fp32 in the engine (rounds: batch 16 side by side; part 1: every batch)
    model = workloads.get("photo", {}).get("model")
    engine = r.get("engine", {}).get(model, {})
    fp32, int8 = engine.get("ort_fp32", {}), engine.get("ort_int8", {})
    by_batch = {b: int8[b]["img_s"] / fp32[b]["img_s"] for b in fp32 if b in int8}
    values = _per_round(rows, lambda x: x["engine_int8_b16"] / x["engine_fp32_b16"])
    accuracy = models.get(model, {}).get("int8_cosine_to_fp32")
    summary = f"int8/fp32 at batch 16 {_med(values):.2f}x"
    if by_batch:
        summary += (
            " (engine table: " + ", ".join(f"b{b} {v:.2f}x" for b, v in by_batch.items()) + ")"
        )
    if accuracy:
        summary += f"; cosine to fp32 min {accuracy['cosine_to_fp32_min']:.4f}"
    out.append(
        _target(
            f"{label('photo')}: engine int8 / fp32 at batch 16",
            values,
            1.7,
            quick,
            summary,
            by_batch=by_batch,
            accuracy=accuracy,
        )
    )
    return out
