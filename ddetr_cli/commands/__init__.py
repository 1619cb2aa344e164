"""One module per `ddetr` command. Each holds a plain Python function that does the work (the
Python API; `ddetr demo` calls them) and a thin Typer `command` that parses options and calls it."""
