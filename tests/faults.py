"""Faults a test injects into a tensor-parallel worker process (importable there: spawned workers
get the parent's sys.path, which holds tests/)."""

import signal


def run_worker_that_loops_on_sigusr1(*args) -> None:
    """Chapter 7's run_worker, but SIGUSR1 sends the worker's main thread into an endless loop:
    alive, running, and never again at a collective."""

    def loop_forever(signum, frame):
        while True:
            pass

    signal.signal(signal.SIGUSR1, loop_forever)
    from cleanvllm.model_runner import run_worker

    run_worker(*args)
