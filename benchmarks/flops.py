"""FLOPs of a compiled program, with while-loop bodies counted once per iteration.

XLA's `cost_analysis()` (HloCostAnalysis) counts a while loop's body once whatever its trip count, so for
the scanned decoder it reports about one layer's work: 3.18 GFLOP for a 2-layer and for a 4-layer model
of the same width (hidden 256, batch 4 x seq 128). This reads the compiled HLO text instead and counts
every ``dot`` (2 x output elements x contracted size, the matmul convention) in every computation it
runs, multiplying a while body by the trip count XLA itself proved (``known_trip_count``). Elementwise
ops are not counted: they are a few percent of a transformer step and not what a peak FLOP/s measures.
"""

from __future__ import annotations

import math
import re

_HEADER = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) \((.*)\) -> .* \{$")
_PARAM = re.compile(r"([\w.\-]+): \w+\[([\d,]*)\]")
_INSTR = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = (.+?) ([a-z][\w\-]*)\((.*)$")  # name, type, op, rest
_ARRAY = re.compile(r"^\w+\[([\d,]*)\]")
_CALLEE = re.compile(r"(?:calls|body|to_apply)=%?([\w.\-]+)")
_CALLEES = re.compile(r"(?:branch_computations|called_computations)=\{([^}]*)\}")
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"')


def _dims(text: str) -> tuple[int, ...]:
    return tuple(int(d) for d in text.split(",") if d)


def _dot_flops(out: tuple[int, ...], rest: str, shapes: dict) -> int:
    lhs = re.match(r"%?([\w.\-]+)", rest).group(1)
    contracting = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", rest).group(1)
    k = math.prod(shapes[lhs][int(d)] for d in contracting.split(",") if d)
    return 2 * math.prod(out) * k


def hlo_dot_flops(hlo_text: str) -> int:
    """Dot FLOPs of one run of the ENTRY computation of `hlo_text` (``compiled.as_text()``)."""
    own, calls, entry = {}, {}, None
    name = shapes = None
    for line in hlo_text.splitlines():
        head = _HEADER.match(line)
        if head:
            name, shapes = head.group(1), {p: _dims(d) for p, d in _PARAM.findall(head.group(2))}
            own[name], calls[name] = 0, []
            entry = name if line.startswith("ENTRY") else entry
            continue
        ins = _INSTR.match(line) if name else None
        if not ins:
            continue
        array = _ARRAY.match(ins.group(2))  # None for a tuple
        var, out, op, rest = ins.group(1), _dims(array.group(1)) if array else (), ins.group(3), ins.group(4)
        shapes[var] = out
        if op == "dot":
            own[name] += _dot_flops(out, rest, shapes)
        times = 1
        if op == "while":
            trip = _TRIP.search(rest)
            if trip is None:
                raise ValueError(f"while loop {var} has no known trip count: its FLOPs cannot be counted")
            times = int(trip.group(1))
        callees = _CALLEE.findall(rest) + [c.strip().lstrip("%") for g in _CALLEES.findall(rest) for c in g.split(",")]
        calls[name] += [(c, times) for c in callees if op != "while" or c in re.findall(r"body=%?([\w.\-]+)", rest)]
    if entry is None:
        raise ValueError("no ENTRY computation in the HLO text")

    memo: dict[str, int] = {}

    def total(comp: str) -> int:
        if comp not in memo:
            memo[comp] = own.get(comp, 0) + sum(n * total(c) for c, n in calls.get(comp, ()))
        return memo[comp]

    return total(entry)


def step_flops(compiled) -> dict:
    """``{"flops": dot FLOPs of one call, trip counts applied; "cost_analysis_flops": XLA's own figure}``."""
    ca = compiled.cost_analysis()
    ca = ca[0] if isinstance(ca, list) else ca
    return {"flops": hlo_dot_flops(compiled.as_text()), "cost_analysis_flops": (ca or {}).get("flops")}
