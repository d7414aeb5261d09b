"""The room state machine: allowed transitions, final states, per-state timeouts (fake clock)."""

from __future__ import annotations

import pytest

from pd.transfer.state import InvalidTransition, RoomStateMachine, TransferState, TransferTimeouts

S = TransferState


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def machine(clock: FakeClock | None = None) -> RoomStateMachine:
    timeouts = TransferTimeouts(bootstrapping_s=1, waiting_for_input_s=2, transferring_s=3, abort_grace_s=1)
    return RoomStateMachine(7, "test", timeouts, clock or FakeClock())


def test_happy_path():
    m = machine()
    assert m.state is S.BOOTSTRAPPING
    for state in (S.WAITING_FOR_INPUT, S.TRANSFERRING, S.DONE):
        m.to(state)
        assert m.state is state
    assert m.is_final


@pytest.mark.parametrize("final", [S.DONE, S.FAILED, S.ABORTED])
def test_no_transition_out_of_a_final_state(final):
    m = machine()
    m.to(S.WAITING_FOR_INPUT)
    m.to(S.TRANSFERRING)
    m.to(final, "why")
    for state in S:
        with pytest.raises(InvalidTransition, match="no transition"):
            m.to(state)
    assert m.state is final and m.reason == "why"


@pytest.mark.parametrize(
    ("path", "bad"),
    [
        ((), S.TRANSFERRING),  # skipping WAITING_FOR_INPUT
        ((), S.DONE),
        ((S.WAITING_FOR_INPUT,), S.DONE),
        ((S.WAITING_FOR_INPUT,), S.BOOTSTRAPPING),  # backwards
        ((S.WAITING_FOR_INPUT, S.TRANSFERRING), S.WAITING_FOR_INPUT),
    ],
)
def test_transitions_not_in_the_table_raise(path, bad):
    m = machine()
    for state in path:
        m.to(state)
    with pytest.raises(InvalidTransition):
        m.to(bad)


@pytest.mark.parametrize("state", [S.BOOTSTRAPPING, S.WAITING_FOR_INPUT, S.TRANSFERRING])
def test_failed_and_aborted_reachable_from_every_non_final_state(state):
    for end in (S.FAILED, S.ABORTED):
        m = machine()
        for step in (S.WAITING_FOR_INPUT, S.TRANSFERRING)[: list(S).index(state)]:
            m.to(step)
        m.to(end)
        assert m.state is end


def test_each_state_has_its_own_timeout():
    clock = FakeClock()
    m = machine(clock)
    clock.now += 0.9
    assert not m.fail_if_expired()
    m.to(S.WAITING_FOR_INPUT)  # the new state's timeout (2 s) starts now
    clock.now += 1.9
    assert not m.fail_if_expired()
    clock.now += 0.2
    assert m.fail_if_expired()
    assert m.state is S.FAILED and m.reason == "timed out in waiting_for_input after 2s"
    assert not m.fail_if_expired()  # final: never expires again


def test_touch_restarts_the_timeout():
    clock = FakeClock()
    m = machine(clock)
    m.to(S.WAITING_FOR_INPUT)
    m.to(S.TRANSFERRING)
    for _ in range(5):
        clock.now += 2.5
        m.touch()
        assert not m.expired()
    clock.now += 3.1
    assert m.fail_if_expired() and m.state is S.FAILED


def test_timeouts_must_be_positive():
    with pytest.raises(ValueError, match="bootstrapping_s"):
        TransferTimeouts(bootstrapping_s=0)
    with pytest.raises(ValueError, match="final state"):
        TransferTimeouts().for_state(S.DONE)
