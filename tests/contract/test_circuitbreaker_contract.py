"""What resilgate.breaker relies on in the ``circuitbreaker`` package (2.1.3).

The breaker drives the package's state machine instead of re-implementing it: it opens through
the name-mangled failure path with a threshold of 1, lets the ``state`` property derive
half-open from an overridden ``open_remaining``, and closes with ``reset()``. An upgrade that
changes any of this fails here first.
"""

from __future__ import annotations

import inspect

import circuitbreaker
from circuitbreaker import CircuitBreaker, CircuitBreakerMonitor

from resilgate.breaker import EndpointBreaker, _Circuit
from resilgate.config import Breaker


class Remaining(CircuitBreaker):
    """The package breaker with ``open_remaining`` set by the test."""

    remaining = 10.0

    @property
    def open_remaining(self) -> float:
        return self.remaining


def opened(breaker: Remaining) -> Remaining:
    breaker._CircuitBreaker__call_failed()
    return breaker


def test_state_names() -> None:
    assert circuitbreaker.STATE_CLOSED == "closed"
    assert circuitbreaker.STATE_OPEN == "open"
    assert circuitbreaker.STATE_HALF_OPEN == "half_open"


def test_constructor_keeps_threshold_timeout_and_name_in_these_attributes() -> None:
    breaker = CircuitBreaker(failure_threshold=1, recovery_timeout=7.5, name="his/primary")
    assert breaker._failure_threshold == 1
    assert breaker._recovery_timeout == 7.5
    assert breaker._failure_count == 0
    assert breaker._state == "closed"
    assert breaker.state == "closed"
    assert breaker.name == "his/primary"
    assert isinstance(breaker._opened, float)


def test_the_failure_path_is_name_mangled_and_takes_no_arguments() -> None:
    method = CircuitBreaker._CircuitBreaker__call_failed
    assert list(inspect.signature(method).parameters) == ["self"]
    assert not hasattr(CircuitBreaker, "__call_failed")


def test_one_failure_opens_at_threshold_one_and_keeps_the_recovery_timeout() -> None:
    breaker = opened(Remaining(failure_threshold=1, recovery_timeout=7.5))
    assert breaker._state == "open"
    assert breaker.state == "open"
    assert breaker._recovery_timeout == 7.5
    assert breaker._failure_count == 1


def test_a_failure_while_open_or_half_open_opens_again() -> None:
    breaker = opened(Remaining(failure_threshold=1))
    breaker.remaining = 0.0
    assert breaker.state == "half_open"
    breaker._opened = -1.0
    opened(breaker)
    assert breaker._state == "open"
    assert breaker._opened != -1.0  # stamped again (resilgate then stamps its own clock)


def test_half_open_is_derived_from_open_remaining_not_stored() -> None:
    breaker = opened(Remaining(failure_threshold=1))
    for remaining, state in [(0.5, "open"), (1e-9, "open"), (0.0, "half_open"), (-3, "half_open")]:
        breaker.remaining = remaining
        assert breaker.state == state
        assert breaker._state == "open"


def test_closed_ignores_open_remaining() -> None:
    breaker = Remaining(failure_threshold=1)
    breaker.remaining = -1.0
    assert breaker.state == "closed"


def test_reset_closes_and_clears_the_count() -> None:
    breaker = opened(Remaining(failure_threshold=1))
    breaker.reset()
    assert breaker._state == "closed"
    assert breaker.state == "closed"
    assert breaker._failure_count == 0


def test_only_decorating_registers_in_the_global_monitor() -> None:
    before = dict(CircuitBreakerMonitor.circuit_breakers)
    CircuitBreaker(name="contract/plain")
    EndpointBreaker("contract/endpoint", Breaker())
    assert CircuitBreakerMonitor.circuit_breakers == before


def test_our_subclass_runs_the_package_state_machine_on_the_injected_clock() -> None:
    now = [1e9]  # far from time.monotonic(), which the package would use
    circuit = _Circuit("his/primary", 5.0, lambda: now[0])
    assert isinstance(circuit, CircuitBreaker)
    assert circuit.state == "closed"
    circuit.open_for(3.0)
    assert (circuit.phase, circuit.open_remaining, circuit.opened_until) == ("open", 3.0, 1e9 + 3)
    now[0] += 3
    assert circuit.phase == "half_open"
    circuit.open_for(6.0)
    assert (circuit.phase, circuit.open_remaining) == ("open", 6.0)
    circuit.reset()
    assert circuit.state == "closed"
