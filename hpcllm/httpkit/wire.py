"""The base of request bodies that services take from one another (one config, used by every service's wire types)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class WireModel(BaseModel):
    # Strict: true is not token 1, "2" not max_tokens 2 (every caller builds these with real types); no inf/nan.
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)
