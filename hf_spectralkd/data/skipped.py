"""When undecodable images are too many: the test behind ``--max_skipped_fraction``."""

from __future__ import annotations

import math


def share_above(count: int, total: int, limit: float, whole_split: bool, z: float = 3.09) -> bool:
    """Whether more than ``limit`` of a split's images fail, given ``count`` failures among ``total`` read.

    On a whole split (an evaluation) the observed share is the answer. On part of one (training
    so far) it is only an estimate, and a few early failures in a small sample would otherwise stop
    a sound run: the answer is then yes only when the lower end of the Wilson interval, at 99.9 %
    one-sided confidence (``z`` = 3.09), is above ``limit``.
    """
    if total <= 0 or count <= 0:
        return False
    share = count / total
    if whole_split:
        return share > limit
    z2 = z * z
    center = share + z2 / (2 * total)
    spread = z * math.sqrt(share * (1 - share) / total + z2 / (4 * total * total))
    return (center - spread) / (1 + z2 / total) > limit
