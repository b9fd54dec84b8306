"""The controller's persistent state (SQLite): see store.py."""

from hpcllm.controller.registry.store import (
    AllocationIntent,
    AllocationRecord,
    CacheRecord,
    ColdStartRecord,
    CredentialRecord,
    DemandRecord,
    HeartbeatOutcome,
    InstanceRecord,
    MigrationRecord,
    NodeRecord,
    Registry,
    check_agent_process,
)

__all__ = ["AllocationIntent", "AllocationRecord", "CacheRecord", "ColdStartRecord", "CredentialRecord",
           "DemandRecord", "HeartbeatOutcome", "InstanceRecord", "MigrationRecord", "NodeRecord", "Registry", "check_agent_process"]
