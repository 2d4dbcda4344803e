"""The number formatter of the topic pages' sections: n/a for a missing value, 'not reached' for infinity."""

from __future__ import annotations

import math


def fmt(x, digits=3):
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    if isinstance(x, float) and math.isinf(x):
        return "not reached"
    return f"{x:.{digits}f}"
