"""Range checks for the numeric fields of the frozen config dataclasses, with one wording for every error.

    >>> number("adam_beta1", 2.0, ge=0, lt=1)
    Traceback (most recent call last):
    ...
    ValueError: adam_beta1=2.0 must be a finite number in [0, 1)

NaN and infinities are never valid: a NaN fails every comparison, so a plain ``x <= 0`` check would let it
through to a NaN loss many steps later.
"""

from __future__ import annotations

import math
import numbers


def number(name: str, value, *, integer: bool = False, ge=None, gt=None, lt=None, le=None, none: bool = False):
    """`value` itself when it is a finite (integer) number within the bounds given; else ValueError."""
    if value is None and none:
        return value
    lo = f"[{ge}" if ge is not None else f"({gt}" if gt is not None else None
    hi = f"{lt})" if lt is not None else f"{le}]" if le is not None else None
    what = "an integer" if integer else "a finite number"
    if lo and hi:
        want = f"{what} in {lo}, {hi}"
    elif lo:
        want = f"{what} {'>=' if ge is not None else '>'} {ge if ge is not None else gt}"
    elif hi:
        want = f"{what} {'<' if lt is not None else '<='} {lt if lt is not None else le}"
    else:
        want = what
    if none:
        want += " or None"
    kind = numbers.Integral if integer else numbers.Real
    ok = isinstance(value, kind) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (ge is None or value >= ge) and (gt is None or value > gt)
    ok = ok and (lt is None or value < lt) and (le is None or value <= le)
    if not ok:
        raise ValueError(f"{name}={value!r} must be {want}")
    return value
