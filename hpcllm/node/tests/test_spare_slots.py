"""Spare workers and the node's slots: a spare waits only where an instance could still start (a free CPU slot of
controller.cpu_slots_per_node, or a free GPU), and a slot that frees gets its spare back for the next start. Real
spares and `hpcllm worker` processes serving the tiny converted test model, without a model process (model_process =
false): these tests count the agent's spares and slots, not the worker's engine, and a model process imports torch
again (that path through the agent: test_agent.py::test_a_spare_worker_takes_the_next_instance_and_is_replaced)."""

from __future__ import annotations

from pathlib import Path

from hpcllm.node.agent import NodeAgent
from hpcllm.node.protocol import StartInstance
from hpcllm.node.tests.test_agent import converted, make_agent, wait_for  # noqa: F401 (converted: a fixture)


def one_slot_agent(tmp_path: Path, spare_workers: int = 1) -> NodeAgent:
    """An agent of one CPU slot (as the dev cluster's allocations: cpu_slots_per_node = 1) keeping spare_workers
    spares."""
    agent = make_agent(tmp_path, model_process=False, spare_workers=spare_workers)
    agent.workers.config.controller.cpu_slots_per_node = 1
    return agent


def test_no_spare_waits_while_the_only_slot_is_taken_and_a_freed_slot_gets_it_back(tmp_path, converted):
    """A spare imports torch twice (itself, its model process where workers use one) and reserves its host pool: on a
    node whose every slot is taken no instance can start, so a spare there only holds memory and CPU beside the
    running streams. The
    spare the start took is not replaced while the instance runs; the instance's stop brings one back, and the next
    start takes it (the fast path the spare is for). node.spare_workers = 2, above the node's one slot: only as many
    spares as free slots wait, at the start and when the slot is free again."""
    agent = one_slot_agent(tmp_path, spare_workers=2)
    workers = agent.workers
    try:
        workers.ensure_spares()
        [spare] = workers._spares  # capped by the one free slot
        first = workers.start(StartInstance(model="tiny-llama", source=str(converted)))
        assert first.process.pid == spare.process.pid  # the spare became the instance's worker
        wait_for(lambda: first.state == "ready", what="the first instance to serve")
        agent.beat()  # a heartbeat turn with no load running: where a spare that died is replaced
        assert workers._spares == []  # the node's one slot is taken: nothing could use a spare
        assert list(workers.run_dir.glob("spare-*.log")) == []

        workers.stop(first.instance_id)
        assert workers._spares == []  # not on the stop request's path: the heartbeat the stop wakes starts it
        agent.beat()
        [back] = workers._spares  # the slot is free again: one spare (the cap) for the next start
        assert back.process.poll() is None
        second = workers.start(StartInstance(model="tiny-llama", source=str(converted)))
        assert second.process.pid == back.process.pid
        wait_for(lambda: second.state == "ready", what="the second instance to serve")
        assert workers._spares == []
    finally:
        agent.drain()
        workers.close()


def test_a_start_that_takes_no_spare_and_fills_the_slots_ends_the_waiting_spare(tmp_path, converted, monkeypatch):
    """A start that is not given the spare (a vLLM instance, tensor-parallel ranks under mpirun) can take the node's
    last slot too: the spare that waited beside it is ended, not left holding its memory for the instance's life."""
    agent = one_slot_agent(tmp_path)
    workers = agent.workers
    try:
        workers.ensure_spares()
        [spare] = workers._spares
        monkeypatch.setattr(workers, "_assign_spare", lambda *args, **kwargs: None)  # as for vLLM or mpirun ranks
        spare_at_ready = []  # whether the spare still ran when the heartbeat saying "ready" was woken
        wake = workers.on_change

        def on_change():
            if not spare_at_ready and any(i.state == "ready" for i in workers.instances()):
                spare_at_ready.append(spare.process.poll() is None)
            wake()

        workers.on_change = on_change
        inst = workers.start(StartInstance(model="tiny-llama", source=str(converted)))
        assert inst.process.pid != spare.process.pid
        wait_for(lambda: spare_at_ready, what="the heartbeat saying the instance is ready to be woken")
        assert spare_at_ready == [True], "the ready heartbeat (a cold start's request waits on it) waited for the spare"
        agent.beat()
        assert workers._spares == []
        # Ended by the thread that saw the slots fill (the instance's watcher, at ready), outside the lock.
        wait_for(lambda: spare.process.poll() is not None and not spare.log_path.exists(), what="the spare to end")
    finally:
        agent.drain()
        workers.close()


def test_a_model_pool_agent_keeps_no_spare_beside_its_pinned_instance(tmp_path, converted):
    """`hpcllm node --model`: the controller places nothing on a pool's node, so once its pinned instance runs no
    start could take a spare, though the node has slots left (cpu_slots_per_node = 2, the default). When the
    instance stops, a spare waits again for its restart."""
    base = make_agent(tmp_path, model_process=False, spare_workers=1)
    agent = NodeAgent(base.config, pinned_model="tiny-llama", cache=base.cache, gpus=base.gpus,
                      measurements=base.measurements)
    workers = agent.workers
    try:
        assert workers.config.controller.cpu_slots_per_node > 1
        workers.ensure_spares()
        [spare] = workers._spares  # for the pinned start
        inst = workers.start(StartInstance(model="tiny-llama", source=str(converted)))
        assert inst.process.pid == spare.process.pid
        wait_for(lambda: inst.state == "ready", what="the pinned instance to serve")
        agent.beat()
        assert workers._spares == []

        workers.stop(inst.instance_id)
        agent.beat()
        [back] = workers._spares
        assert back.process.poll() is None
        # Killed here, not retired by the drain: a spare reads its stdin's end only once its imports are done, and
        # the drain would wait for them (a drain retiring a spare: test_agent.py's
        # test_a_spare_that_dies_while_idle_or_after_a_long_load_is_replaced_at_the_next_heartbeat).
        back.process.kill()
    finally:
        agent.drain()
        workers.close()
        base.workers.close()
