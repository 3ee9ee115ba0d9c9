"""How a MoE layer is named in plans, score files and MTP policies: its plan key, the layer
number after its stack's prefix from the architecture table ("3", "mtp.0", "talker.12",
"vision.4"). The one spelling of it: plan files, score files and `mtp_policy` all check keys here.
"""

from __future__ import annotations

import re

PLAN_KEY_PATTERN = r"(?:[A-Za-z_][A-Za-z0-9_]*\.)*[0-9]+"
PLAN_KEY = re.compile(PLAN_KEY_PATTERN)
PLAN_KEY_RULE = "is not a plan key (like '3' or 'mtp.0')"


def is_plan_key(text: object) -> bool:
    """Whether `text` is spelled as a plan key.

    Example:
        >>> is_plan_key("mtp.0"), is_plan_key("model.layers.x")
        (True, False)
    """
    return isinstance(text, str) and PLAN_KEY.fullmatch(text) is not None
