"""Ctrl-C and SIGTERM as exceptions, held back inside hand-overs to threads."""
from __future__ import annotations

import os
import signal

import pytest

from cbir import interrupts


@pytest.mark.parametrize("number,exception", [(signal.SIGTERM, interrupts.Terminated),
                                              (signal.SIGINT, KeyboardInterrupt)])
def test_a_signal_is_raised_at_once_outside_held_and_at_the_next_check_inside(number, exception):
    with interrupts.as_exceptions():
        with pytest.raises(exception):
            os.kill(os.getpid(), number)
        with pytest.raises(exception):
            with interrupts.held():
                os.kill(os.getpid(), number)
                noted = True  # the handler has run by now, and raised nothing
                interrupts.check()
        assert noted


def test_a_signal_noted_inside_held_is_raised_on_leaving_and_only_once():
    with interrupts.as_exceptions():
        with pytest.raises(interrupts.Terminated):
            with interrupts.held():
                with interrupts.held():
                    os.kill(os.getpid(), signal.SIGTERM)
                reached = True  # the inner block's end is not the outer one's
        assert reached
        interrupts.check()  # nothing left over


def test_the_previous_handlers_come_back():
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    with interrupts.as_exceptions():
        assert signal.getsignal(signal.SIGTERM) is not before[1]
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before


def test_a_signal_whose_exception_was_swallowed_is_raised_again_at_the_next_check():
    """Raised at once, the exception can land in code that swallows it (numpy's lazy import did)."""
    with interrupts.as_exceptions():
        with pytest.raises(interrupts.Terminated):
            try:
                os.kill(os.getpid(), signal.SIGTERM)
            except Exception:  # a library's broad except
                pass
            interrupts.check()
        interrupts.check()  # raised once: nothing left over


def test_leaving_normally_after_a_swallowed_signal_raises_it_and_leaving_by_it_clears_it():
    with pytest.raises(KeyboardInterrupt):
        with interrupts.as_exceptions():
            try:
                os.kill(os.getpid(), signal.SIGINT)
            except BaseException:
                pass
    with pytest.raises(interrupts.Terminated):
        with interrupts.as_exceptions():
            os.kill(os.getpid(), signal.SIGTERM)
    with interrupts.as_exceptions():
        interrupts.check()  # the signal that stopped the last block is not raised again
