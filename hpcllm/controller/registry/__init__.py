"""The controller's persistent state (SQLite): see store.py."""

from hpcllm.controller.registry.store import (
    AllocationRecord,
    CacheRecord,
    ColdStartRecord,
    HeartbeatOutcome,
    InstanceRecord,
    NodeRecord,
    Registry,
)

__all__ = ["AllocationRecord", "CacheRecord", "ColdStartRecord", "HeartbeatOutcome", "InstanceRecord", "NodeRecord",
           "Registry"]
