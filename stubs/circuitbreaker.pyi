# Minimal stub of circuitbreaker 2.1.3: only what resilgate.breaker and its contract test use.
from collections.abc import Callable
from types import TracebackType

STATE_CLOSED: str
STATE_OPEN: str
STATE_HALF_OPEN: str

class CircuitBreaker:
    _failure_count: int
    _failure_threshold: int
    _recovery_timeout: float
    _state: str
    _opened: float
    def __init__(
        self,
        failure_threshold: int | None = None,
        recovery_timeout: float | None = None,
        expected_exception: object = None,
        name: str | None = None,
        fallback_function: Callable[..., object] | None = None,
    ) -> None: ...
    def __enter__(self) -> None: ...
    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc_value: BaseException | None,
        traceback: TracebackType | None,
    ) -> bool: ...
    def reset(self) -> None: ...
    # ``__call_failed`` in the source; spelled as Python mangles it for subclasses.
    def _CircuitBreaker__call_failed(self) -> None: ...
    @property
    def state(self) -> str: ...
    @property
    def open_remaining(self) -> float: ...
    @property
    def failure_count(self) -> int: ...
    @property
    def name(self) -> str | None: ...

class CircuitBreakerMonitor:
    circuit_breakers: dict[str | None, CircuitBreaker]
