"""The phase board (pipeline/phases.py) on a real Ray cluster: reports made in Ray workers reach
the driver in the order each actor made them, counted per phase across actors, and the board
leaves nothing in Ray's key-value store when closed."""

from __future__ import annotations

import time

from pipeline.phases import NAMESPACE, PhaseBoard, PhaseReporter


def test_reports_from_workers_arrive_in_order_and_are_counted(ray_cluster):
    import ray
    from ray.experimental import internal_kv

    def report_in_a_worker(name: str, phases: list[str]) -> int:  # pickled by value
        import os

        from pipeline.phases import PhaseReporter

        rep = PhaseReporter(name)
        for p in phases:
            rep(p)
        return os.getpid()

    seen: list[str] = []
    board = PhaseBoard(seen.append)
    try:
        task = ray.remote(num_cpus=0)(report_in_a_worker)
        pid = ray.get(task.remote(board.name, ["loading the model", "compiling about 3 programs"]))
        board.flush()
        assert seen == ["loading the model", "compiling about 3 programs"]
        assert pid != __import__("os").getpid()  # made in a worker process

        # A second actor reaching the same phase: shown with the count of actors in it.
        time.sleep(0.01)
        PhaseReporter(board.name)("compiling about 3 programs")
        board.flush()
        assert seen[2:] == ["compiling about 3 programs (2 actors)"]
        board.flush()  # nothing new: nothing shown twice
        assert len(seen) == 3
        assert internal_kv._internal_kv_list(board.name + "/", namespace=NAMESPACE)
    finally:
        board.close()
    assert internal_kv._internal_kv_list(board.name + "/", namespace=NAMESPACE) == []


def test_a_reporter_without_a_board_reports_nothing(ray_cluster):
    PhaseReporter(None)("loading the model")  # no board named: a no-op, never an error
    seen: list[str] = []
    board = PhaseBoard(seen.append)
    board.close()
    PhaseReporter(board.name)("late")  # after close: stored, but no driver shows it
    assert seen == []
