"""Source side of token-based live migration, in rounds (ServerlessLLM §5; docs/migration.md).

A running request moves from this worker (source S) to a destination worker D while S keeps decoding:

1. Round 1: D gets the prompt and the output so far (`prepare`) and prefills them into a HELD request.
2. Round k: D gets the tokens S produced while D was prefilling (`extend`, wait until prefilled). Each round's
   delta is what S decodes during the previous round's prefill, so rounds shrink quickly: a long prompt becomes a
   delta of a few tokens.
3. Hand-over, once a delta is at most `handover_tokens` long, or stopped shrinking (from round 3 on: a round
   has a fixed cost - an HTTP call and a forward step - so the delta levels off at a few tokens on a slow
   destination, and more rounds would only delay the hand-over), or at round `max_rounds`, or once half of what
   was left of `timeout_seconds` when the move began has passed (a node drain has a deadline: better a larger last
   delta than no hand-over):
   PAUSE the request here
   (atomically read its final token list), extend D with the last delta and wait until it is prefilled, then end
   the source stream with `finish_reason: "migrated"` and `migrated_to` (D's URL, request id, from_index). The
   reader of that stream (the gateway) attaches to D from that index; D samples the next token from its cache.

Only the hand-over pauses the client's stream, and it costs a prefill of a couple of tokens plus two HTTP round
trips, instead of a prefill of the whole context (stop-and-resume). Sampling is seeded per (seed, output index),
so D draws exactly the tokens S would have drawn.

Any failure before the stream's final line leaves the request running here (un-paused if the hand-over had begun)
and drops the held request on D (best effort; otherwise it expires after hold_seconds).

`timeout_seconds` is a deadline, for one move and for a drain's all (migrate_all): every call to D is bounded by
what is left of it, and a drop after it by a third of drain_answer_margin(timeout_seconds), so the answer comes in
time for the node agent, which stops the worker once it has it: a hand-over still running then would be cut short.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor

from hpcllm.config import InternalHttpConfig
from hpcllm.credentials import issue_ticket
from hpcllm.worker.client import WorkerClient, WorkerError
from hpcllm.worker.engine import Engine, EngineError
from hpcllm.worker.protocol import (
    MigrateAllResult,
    MigratedTo,
    MigrateRequest,
    MigrationFailure,
    MigrationResult,
    PrepareMigration,
    drain_answer_margin,
)

log = logging.getLogger(__name__)

# Concurrent migrations of one drain (each mostly waits on the destination's prefill).
MAX_PARALLEL_MIGRATIONS = 16


def drop_timeout(timeout_seconds: float) -> float:
    """How long past its deadline a failed move may take to drop its hold on the destination (best effort: a hold
    expires anyway): the moves of a drain cut at its deadline drop theirs in parallel, well within the answer
    margin the node agent waits past the deadline it ordered."""
    return drain_answer_margin(timeout_seconds) / 3


class DestinationFailed(EngineError):
    """The destination refused or could not be reached; the request keeps running on this worker."""

    http_status = 502
    error_type = "migration_error"
    code = "destination_failed"


class MigrationTimedOut(EngineError):
    """The migration's deadline (timeout_seconds) passed before the request moved; it keeps running here."""

    http_status = 504
    error_type = "migration_error"
    code = "migration_timed_out"


def migrate_request(engine: Engine, request_id: str, body: MigrateRequest,
                    http: InternalHttpConfig | None = None, deadline: float | None = None) -> MigrationResult:
    """Move one running request to body.destination_url in rounds, by `deadline` (time.monotonic(): a drain's;
    default: body.timeout_seconds from now); raises EngineError if it stays here. The caller checked body.ticket (the
    server: hpcllm.credentials.check_ticket); the destination gets its grant, never our key, and so does the
    reader of the moved stream (MigratedTo.grant)."""
    started = time.monotonic()
    # Said to whoever reads the failure (an admin, in the node agent's log): which deadline, not a field's name.
    whose = ("the drain's deadline ({:g} s: node.migrate_timeout_seconds less the answer margin)" if deadline
             else "the migration's deadline ({:g} s)").format(body.timeout_seconds)
    deadline = started + body.timeout_seconds if deadline is None else deadline

    def timed_out() -> MigrationTimedOut:
        return MigrationTimedOut(f"request {request_id!r} did not move before {whose}; it goes on here")

    def time_left() -> float:
        left = deadline - time.monotonic()
        if left <= 0:
            raise timed_out()
        return left

    time_left()  # a drain's request whose turn came too late is not begun
    template = engine.begin_migration(request_id)  # 404 unknown, 409 finished / already migrating
    grant = body.ticket.grant if body.ticket else None
    destination = WorkerClient(body.destination_url, "", read_timeout=body.timeout_seconds, http=http, grant=grant)
    held_on_destination = False
    try:
        known = list(template.resume_token_ids)  # output tokens the destination has
        tokens_per_round: list[int] = []
        handover_started: float | None = None
        last_round_seconds = 0.0
        while handover_started is None:
            round_number = len(tokens_per_round) + 1
            round_started = time.monotonic()
            output = engine.migration_output(request_id)
            delta = len(output) - len(known)
            small = round_number > 1 and delta <= body.handover_tokens
            stalled = round_number > 2 and delta >= tokens_per_round[-1]
            late = round_number > 1 and time.monotonic() - started >= (deadline - started) / 2
            if round_number >= body.max_rounds or small or stalled or late:
                # A hand-over whose extend would not make it by the deadline only stalls the client's stream.
                if time_left() < last_round_seconds:
                    raise timed_out()
                handover_started = time.monotonic()
                output = engine.pause(request_id)
            if round_number == 1:
                held_on_destination = True  # even a prepare that times out may have created it
                prepared = destination.prepare_migration(
                    PrepareMigration(
                        request_id=request_id,
                        generate=template.model_copy(update={"resume_token_ids": output}),
                        hold_seconds=body.hold_seconds,
                    ),
                    timeout=time_left(),
                )
                tokens_per_round.append(prepared.cached_tokens)
            else:
                delta = output[len(known):]
                destination.extend_migration(request_id, delta, wait=True, timeout=time_left())
                tokens_per_round.append(len(delta))
            known = output
            last_round_seconds = time.monotonic() - round_started
        engine.finish_migrated(
            request_id, MigratedTo(worker_url=body.destination_url, request_id=request_id, from_index=len(known),
                                   grant=grant)
        )
    except BaseException as exc:
        engine.abandon_migration(request_id)
        if held_on_destination:
            _drop_held(destination, request_id, deadline, drop_timeout(body.timeout_seconds))
        destination.close()
        if isinstance(exc, WorkerError):
            raise DestinationFailed(f"destination {body.destination_url} failed: {exc}") from exc
        raise
    destination.close()
    finished = time.monotonic()
    result = MigrationResult(
        request_id=request_id,
        destination_url=body.destination_url,
        destination_request_id=request_id,
        rounds=len(tokens_per_round),
        tokens_per_round=tokens_per_round,
        handover_seconds=finished - handover_started,
        total_seconds=finished - started,
        output_tokens_at_handover=len(known),
    )
    log.info("migrated request %s to %s: %d rounds %s, hand-over %.3fs, total %.3fs", request_id,
             body.destination_url, result.rounds, tokens_per_round, result.handover_seconds, result.total_seconds)
    return result


def ticketed_request(destination_url: str, *, model: str, key: str, destination_key: str | None = None,
                     **fields) -> MigrateRequest:
    """A migration order with a ticket made by whoever holds the workers' keys (benches and tests: one key for
    every worker); in a cluster the controller issues the tickets."""
    ticket = issue_ticket(model=model, source_instance="", source_key=key, destination_url=destination_url,
                          destination_instance="", destination_key=destination_key or key)
    return MigrateRequest(destination_url=destination_url, ticket=ticket, **fields)


def _drop_held(destination: WorkerClient, request_id: str, deadline: float, past_deadline: float) -> None:
    """Drop a failed move's hold, by its deadline or a little past it: a busy destination's step may take more than a
    second, and a hold not dropped keeps its KV cache and slot there for hold_seconds."""
    try:
        destination.drop_migration(request_id, timeout=max(deadline - time.monotonic(), 0) + past_deadline)
    except WorkerError as exc:  # unreachable, refused or not held: a held request expires after hold_seconds
        log.info("could not drop held request %s on %s: %s", request_id, destination.base_url, exc)


def migrate_all(engine: Engine, body: MigrateRequest, http: InternalHttpConfig | None = None) -> MigrateAllResult:
    """Move every running and waiting request (node drain), concurrently, all by body.timeout_seconds from now: a
    request still queued for its turn then stays here (failed). A request that finishes meanwhile (on its own, or
    cancelled: its client left) needs no migration and is in neither list; one this worker ended (its engine failed,
    or it stops) is failed: the gateway resumes it from its tokens."""
    deadline = time.monotonic() + body.timeout_seconds
    request_ids = engine.migratable_request_ids()
    if not request_ids:
        return MigrateAllResult(migrated=[], failed=[])
    migrated: list[MigrationResult] = []
    failed: list[MigrationFailure] = []
    with ThreadPoolExecutor(max_workers=min(len(request_ids), MAX_PARALLEL_MIGRATIONS),
                            thread_name_prefix="hpcllm-migrate") as pool:
        futures = {rid: pool.submit(migrate_request, engine, rid, body, http, deadline) for rid in request_ids}
        for request_id, future in futures.items():
            try:
                migrated.append(future.result())
            except Exception as exc:
                if not _ended_here(engine, request_id):
                    failed.append(MigrationFailure(request_id=request_id, error=str(exc)))
    return MigrateAllResult(migrated=migrated, failed=failed)


def _ended_here(engine: Engine, request_id: str) -> bool:
    """The request ended for good while it was moving (it finished, or its client left: cancelled), whatever the
    move ran into: not a failed move, which resumes from its tokens (EngineBase.ended)."""
    try:
        return engine.ended(request_id)
    except EngineError:  # no longer known here: nothing says how it ended
        return False
