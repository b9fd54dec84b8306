"""The base of request bodies that services take from one another (one config, used by every service's wire types),
and the one bound on the Unix times they carry."""

from __future__ import annotations

import time
from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

# How far ahead of this host's clock a time another host sends may be: nodes' clocks drift (no NTP, a VM resumed);
# beyond a day it is no clock but a wrong unit (milliseconds) or a made-up value, which stored would be obeyed
# (a cache copy "used" in 2500 is never the least recently used).
MAX_CLOCK_SKEW_SECONDS = 86_400.0


class WireModel(BaseModel):
    # Strict: true is not token 1, "2" not max_tokens 2 (every caller builds these with real types); no inf/nan.
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


def not_in_future(value: float) -> float:
    """A Unix time another host sent: refused (ValueError, a 400 naming the field) beyond MAX_CLOCK_SKEW_SECONDS."""
    ahead = value - time.time()
    if ahead > MAX_CLOCK_SKEW_SECONDS:
        raise ValueError(f"{value} is {ahead:.0f} s ahead of this host's clock: a Unix time in seconds is expected, "
                         f"and the clocks may differ by at most {MAX_CLOCK_SKEW_SECONDS:.0f} s")
    return value


# A Unix time in seconds from another host: not negative, not past MAX_CLOCK_SKEW_SECONDS ahead (not inf or nan).
UnixTime = Annotated[float, Field(ge=0, allow_inf_nan=False), AfterValidator(not_in_future)]
