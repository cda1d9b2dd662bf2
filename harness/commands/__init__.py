"""One module per CLI subcommand. Each defines HELP, add_arguments(parser) and run(args) -> int.

The module name is the subcommand name with '_' for '-'. Modules must stay cheap to import:
heavy imports (mlx, pandas, fastapi) go inside run().
"""
