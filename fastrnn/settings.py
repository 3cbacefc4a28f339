"""The settings in force on this thread: which backend runs the layers and
which launch strategy the Triton engine uses.

One small module that the backend resolution (``fastrnn.backends``) and the
Triton engine both import, so neither imports the other for them.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator


class _Settings(threading.local):
    """The backend and the Triton strategy, per thread.

    A thread-local object rather than a ContextVar: torch.compile guards on
    the attributes it reads, so a compiled function runs (recompiled if need
    be) under the settings in force when it is called. Autograd's device
    threads see the defaults: what forward decided is kept for backward.
    """

    def __init__(self) -> None:
        self.backend = "auto"
        self.triton_strategy = "auto"


settings = _Settings()


@contextlib.contextmanager
def setting(name: str, value: str) -> Iterator[None]:
    """Sets ``settings.<name>`` to ``value`` on this thread inside the ``with`` block."""
    previous = getattr(settings, name)
    setattr(settings, name, value)
    try:
        yield
    finally:
        setattr(settings, name, previous)
