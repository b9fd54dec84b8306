"""The worker's watch on its node agent's stdin pipe (hpcllm.worker.cli.stop_when_the_agent_is_gone), in a real
process: what it leaves running when the agent's pipe ends, and what it does when stdin is no pipe at all."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

from hpcllm.node.workers import processes, running
from hpcllm.worker.tests.conftest import wait_until

# A worker whose stop hangs (its stop signal ignored) with a child that ignores SIGTERM, as a hung engine core.
HUNG_WORKER = textwrap.dedent("""
    import signal, subprocess, sys, threading
    from hpcllm.worker.cli import stop_when_the_agent_is_gone
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    child = subprocess.Popen([sys.executable, "-c", "import signal, threading; "
                              "signal.signal(signal.SIGTERM, signal.SIG_IGN); print('ready', flush=True); "
                              "threading.Event().wait()"], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE)
    child.stdout.readline()
    stop_when_the_agent_is_gone(signal.SIGTERM, 1)
    print(child.pid, flush=True)
    threading.Event().wait()
""")


def test_a_hung_worker_whose_agent_is_gone_takes_its_child_processes_with_it():
    worker = subprocess.Popen([sys.executable, "-c", HUNG_WORKER], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    child = processes([int(worker.stdout.readline())])
    try:
        assert running(child), "the worker's child did not start"
        worker.stdin.close()  # the agent's end of the pipe, as when the agent is killed with -9
        assert worker.wait(timeout=60) == -signal.SIGKILL
        # before: the worker SIGKILLed itself alone, its child (a model process, vLLM's engine core) ran on
        assert wait_until(lambda: not running(child), timeout=60), f"the worker's child {child} outlived it"
    finally:
        for proc in running(child):  # a failed run: what the test started goes
            os.kill(proc.pid, signal.SIGKILL)
        if worker.poll() is None:
            worker.kill()
            worker.wait()



def test_a_worker_whose_stdin_is_no_pipe_serves_on_with_a_warning():
    # A launcher that does not forward stdin (an MPI launcher, a job script) leaves /dev/null: its immediate end
    # is no news of the agent. The watch would stop the worker at once; the script's end shows it serves on.
    script = textwrap.dedent("""
        import logging, signal, threading
        from hpcllm.worker.cli import stop_when_the_agent_is_gone
        logging.basicConfig()
        stop_when_the_agent_is_gone(signal.SIGTERM, 60)
        for thread in threading.enumerate():
            if thread is not threading.main_thread():
                thread.join()
        print("still serving", flush=True)
    """)
    done = subprocess.run([sys.executable, "-c", script], stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=120)
    # before: killed by its own SIGTERM (returncode -15), stderr "stdin closed: the node agent ... is gone; stopping"
    assert (done.returncode, done.stdout) == (0, "still serving\n"), done.stderr
    assert "stdin is not the node agent's pipe: this worker will not stop when its agent is gone" in done.stderr
