"""Thin Typer front-ends, one module per subcommand. Heavy imports live inside commands."""
