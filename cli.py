"""What every command-line script of the project shares: an argument parser whose errors are one
line and exit status 2, the one-line report of an expected error, and the stop signals of a long run.

Expected errors (a bad flag, a missing file, an unknown name) are printed as one line; unexpected ones
keep their traceback, so a bug is never hidden behind a tidy message.
"""

import argparse
import signal
import sys


def first_line(err: BaseException | str, limit: int | None = None) -> str:
    """The first line of an error's message (its type's name when the message is empty), cut to
    `limit` characters: enough to say what went wrong without echoing a file's content."""
    text = err if isinstance(err, str) else str(err)
    lines = text.strip().splitlines()
    line = lines[0] if lines else type(err).__name__
    return line if limit is None else line[:limit]


def usage_error(err: BaseException | str, status: int = 2) -> int:
    """Print an expected error as `error: ...` on stderr and return the exit status (2: bad input;
    1: a run that cannot go on)."""
    print(f"error: {first_line(err)}", file=sys.stderr)
    return status


class ArgumentParser(argparse.ArgumentParser):
    """argparse with a one-line error and exit status 2 instead of the usage block (sub-commands
    too: add_subparsers passes the class on)."""

    def error(self, message):
        print(f"error: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(2)

    def add_subparsers(self, **kw):
        kw.setdefault("parser_class", ArgumentParser)
        return super().add_subparsers(**kw)


class StopSignals:
    """SIGTERM (preemption: the cloud's grace period) and SIGINT (Ctrl-C) ask a long run to stop:
    `received` is set and the run decides (with every rank) when to save and exit. A second Ctrl-C
    interrupts at once. A second SIGTERM is the same request (SLURM and systemd signal every process
    and torchrun passes on its own, so a rank gets two); the scheduler's SIGKILL ends a run that
    outstays its grace period."""

    def __init__(self):
        self.received: int | None = None

    def install(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.received = signum
        if signum == signal.SIGINT:
            signal.signal(signum, signal.default_int_handler)
