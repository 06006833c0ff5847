"""kdtool cache-acts: placeholder until its issue lands."""

from kdtool.errors import RuntimeFailure


def main() -> None:
    """Not implemented yet."""
    raise RuntimeFailure("not implemented yet")
