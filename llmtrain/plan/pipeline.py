"""Pipeline bubble: the idle share of a pipeline step, per schedule (textbook formulas).

With p stages (ranks), m micro-batches and v model chunks per rank, and equal forward / backward
times per chunk:
- gpipe, 1f1b: (p - 1) / (m + p - 1): the warm-up and cool-down of p - 1 micro-batch slots;
- interleaved_1f1b: (p - 1) / (v m + p - 1): each slot is 1/v as long (Narayanan et al., 2021);
- interleaved_zb (ZB-H1 ordering with looped chunks): the weight-gradient passes fill two thirds of
  the 1F1B warm-up and cool-down when forward, input-gradient and weight-gradient passes take the same
  time, (p - 1) / (3 v m + p - 1) (Qi et al., 2024, section 3);
- zbv, dualpipev: 0 once m >= 2 p (the V fills its warm-up with the other chunk's work and the
  weight-gradient passes; Qi et al., section 6; DeepSeek-V3's DualPipe); with fewer (ZBV accepts
  2 p - 1) the interleaved-zero-bubble value for v = 2 stands in.
Real schedules are worse when the three passes differ in time (the output layer on the last stage,
recomputation); the planner uses these as the ideal stretch 1 / (1 - bubble) of the compute time.
"""


def bubble_fraction(schedule: str, pp: int, microbatches: int, virtual: int = 1) -> float:
    """Idle share of a pipeline step under `schedule` (parallel.pp_schedule) on `pp` ranks."""
    p, m = pp, microbatches
    if p <= 1:
        return 0.0
    if m < 1:
        raise ValueError(f"parallel.pp_microbatches={m} must be >= 1")
    if schedule in ("gpipe", "1f1b"):
        return (p - 1) / (m + p - 1)
    if schedule == "interleaved_1f1b":
        return (p - 1) / (max(virtual, 1) * m + p - 1)
    if schedule in ("zbv", "dualpipev") and m >= 2 * p:
        return 0.0
    if schedule in ("interleaved_zb", "zbv", "dualpipev"):
        v = 2 if schedule != "interleaved_zb" else max(virtual, 1)
        return (p - 1) / (3 * v * m + p - 1)
    raise ValueError(f"parallel.pp_schedule={schedule!r} has no bubble model")
