"""The task state table (no server needed)."""
import pytest

from server.states import ALLOWED_SOURCES, FINAL, IllegalTransition, TaskState, check_transition


def test_final_states_have_no_way_out():
    for dst, sources in ALLOWED_SOURCES.items():
        assert not (sources & FINAL), f"{dst} can be entered from a final state"


@pytest.mark.parametrize("src,dst", [("queued", "assigned"), ("assigned", "preparing"), ("preparing", "running"),
                                     ("running", "uploading"), ("uploading", "finished"), ("assigned", "running"),
                                     ("queued", "stopped"), ("running", "lost"), ("preparing", "failed")])
def test_allowed_edges(src, dst):
    check_transition(TaskState(src), TaskState(dst))


@pytest.mark.parametrize("src,dst", [("finished", "running"), ("running", "preparing"), ("queued", "running"),
                                     ("lost", "running"), ("queued", "lost"), ("stopped", "queued")])
def test_refused_edges(src, dst):
    with pytest.raises(IllegalTransition):
        check_transition(TaskState(src), TaskState(dst))
