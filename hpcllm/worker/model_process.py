"""The model process before it has a model (`[worker] model_process`, runner_process.py has the rest).

This module imports neither torch nor transformers, so a worker spawns the child first thing, before its own heavy
imports: the two processes import torch and transformers side by side (on two cores, no longer than one), and the
child waits for its model while the worker loads the weights. A spare worker starts it while it waits for an
assignment (hpcllm.worker.spare).
"""

from __future__ import annotations

import multiprocessing
import threading

STOP_SECONDS = 10.0


class ModelProcess:
    """A spawned child that imports torch, transformers and the model runner at once, then waits on a pipe for the
    model (runner_process.ProcessRunner sends it and drives the steps)."""

    def __init__(self) -> None:
        context = multiprocessing.get_context("spawn")  # never fork a process with OpenMP/CUDA threads
        self.conn, child_end = context.Pipe()
        self.process = context.Process(target=_child_main, args=(child_end,), name="hpcllm-model", daemon=True)
        self.process.start()
        child_end.close()
        self._imported = False
        self._import_lock = threading.Lock()
        self._close_lock = threading.Lock()
        self._closed = False

    def wait_imported(self) -> bool:
        """Block until the child has imported what it runs (its first message); False if it died first."""
        with self._import_lock:
            if not self._imported:
                try:
                    self._imported = self.conn.recv() == ("imported", None)
                except (EOFError, OSError):
                    return False
            return self._imported

    def close(self) -> None:
        """Stop the child and close its pipe, once: the engine thread and the step watchdog (a hung step) may both
        end the engine at the same moment, and a pipe closed from two threads fails one with EBADF."""
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
            if self.process.is_alive() and self._say_stop():
                self.process.join(STOP_SECONDS)
            if self.process.is_alive():  # it ignores SIGTERM (the worker's to act on), or its pipe is broken
                self.process.kill()
                self.process.join(STOP_SECONDS)
            self.conn.close()


    def _say_stop(self) -> bool:
        """Ask the child to stop; False when its pipe is already broken (then only a kill ends it)."""
        try:
            self.conn.send(("stop", None))
        except (BrokenPipeError, OSError):
            return False
        return True


def _child_main(conn) -> None:
    from hpcllm.procs import freeze_startup_heap
    from hpcllm.worker.runner_process import serve_steps  # torch, transformers, the runner: the child's imports

    # The imports' heap leaves the collector's walks now, while the child waits: the freeze before its first step
    # then walks only the model's objects instead of ~385k (0.1-0.2 s that was a spare's start time).
    freeze_startup_heap()
    conn.send(("imported", None))
    serve_steps(conn)
