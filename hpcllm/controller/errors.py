"""Errors of the controller. Each maps to one HTTP status and a stable `code` (hpcllm.httpkit.errors renders them),
and the CLI prints its message."""

from __future__ import annotations

from hpcllm.errors import ConfigError, HpcllmError
from hpcllm.httpkit.errors import ServiceError


class ControllerError(ServiceError):
    http_status = 500
    code = "internal_error"
    error_type = "server_error"


class InvalidRequest(ControllerError):
    http_status = 400
    code = "invalid_request"
    error_type = "invalid_request_error"


class InvalidModelConfig(InvalidRequest, ConfigError):
    """A model config (TOML or admin request body) is invalid: the message names the field."""

    code = "invalid_model_config"
    exit_code = 2


class UnknownModel(ControllerError):
    http_status = 404
    code = "model_not_found"
    error_type = "invalid_request_error"


class JobNotLocated(ControllerError):
    """Slurm cannot say (yet) where an allocation token's job runs: the agent retries its registration."""

    http_status = 503
    code = "job_not_located"
    error_type = "server_error"


class UnknownCredential(ControllerError):
    http_status = 404
    code = "credential_not_found"
    error_type = "invalid_request_error"


class UnknownNode(ControllerError):
    """A heartbeat from a node the controller does not know (or declared lost): the agent must register again."""

    http_status = 404
    code = "unknown_node"
    error_type = "invalid_request_error"


class AgentReplaced(ControllerError):
    """A heartbeat from an agent process other than the one that registered the node last (a late one of the process
    before a restart): its instances are that process's, not the node's now. It changes nothing."""

    http_status = 409
    code = "agent_replaced"
    error_type = "invalid_request_error"


class NodeTaken(ControllerError):
    """A second node agent (another Slurm job on the same node) wants to register while the first one lives: one
    agent per node, since the controller knows an agent by its node's name. The agent retries until that one goes."""

    http_status = 409
    code = "node_taken"
    error_type = "invalid_request_error"


class InstanceTaken(ControllerError):
    """A heartbeat reports an instance id the registry holds for another node: instance ids are the cluster's, one
    node's each. The heartbeat is refused whole (nothing of it recorded); the message names both nodes."""

    http_status = 409
    code = "instance_taken"
    error_type = "invalid_request_error"


class TooManyTickets(ControllerError):
    """A node token asked for more live migration tickets for one instance than it may hold at once."""

    http_status = 429
    code = "too_many_migration_tickets"
    error_type = "rate_limit_error"


class NoCapacity(ControllerError):
    """No node can host the model now and no allocation may be submitted now (max_allocations in use, nodes full).
    Capacity can free up (a queued allocation's agent registers, an idle instance or allocation is released), so a
    route call with `wait` keeps trying until its wait is over."""

    http_status = 503
    code = "no_capacity"
    error_type = "server_error"

    def __init__(self, message: str, retry_after: float | None = None):
        super().__init__(message, retry_after=retry_after)


class NoCapacityPossible(NoCapacity):
    """No capacity can ever come for the model as deployed and configured (Controller.why_never_capacity: e.g. it
    needs more GPUs or CPU slots on one node than any node offers and no allocation can be submitted). Answered at
    once, never waited on, without Retry-After: asking again cannot help; the message says what to change."""

    code = "no_capacity_possible"


class AllocationRefused(NoCapacity):
    """The allocation the model needs was refused by Slurm or got no answer: answered at once, never waited on
    (each try would sbatch again)."""

    code = "allocation_failed"


class AllocationFailed(ControllerError):
    """Slurm could not be asked (controller down, command missing) or refused the allocation (sbatch rejected it)."""

    http_status = 503
    code = "allocation_failed"
    error_type = "server_error"


class AgentError(ControllerError):
    """A node agent did not answer or refused a request."""

    http_status = 502
    code = "node_agent_error"
    error_type = "server_error"


class ControllerUnreachable(HpcllmError):
    """The CLI could not reach the controller."""

    exit_code = 3


class DatabaseError(ConfigError):
    """The database URL is unsupported or the file cannot be opened / was written by a newer hpcllm."""
