"""Errors named after the problem. The CLI turns them into one line and an exit code."""


class KdtoolError(Exception):
    """Base class: a failure kdtool can explain in one line."""

    exit_code = 1


class BadInput(KdtoolError):
    """An input file, option or value is unusable (missing, malformed, out of range)."""

    exit_code = 2


class UnknownFormat(BadInput):
    """A file is not in any format kdtool recognises."""


class MissingColumns(BadInput):
    """A table lacks columns a command needs."""


class RuntimeFailure(KdtoolError):
    """A job failed while running (diverged, ran out of data, a model refused to load)."""

    exit_code = 1


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM arrived (kdtool/cli/signals.py): the command stops where --resume can continue."""

    def __init__(self, signum: int):
        super().__init__(f"signal {signum}")
        self.signum = signum
