"""An avemo-train run interrupted mid-way, as Ctrl-C or a killed job would leave it."""
import contextlib

from train import loop


@contextlib.contextmanager
def training_interrupted_at(epoch: int):
    """Within the block, training raises KeyboardInterrupt as its epoch ``epoch`` (0-based) begins."""
    real = loop._reseed

    def crash(seed, e, rank):
        if e == epoch:
            raise KeyboardInterrupt
        real(seed, e, rank)

    loop._reseed = crash
    try:
        yield
    finally:
        loop._reseed = real
