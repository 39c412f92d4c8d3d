"""`python -m memsvc.cli ...` runs the `memsvc` command line."""
from memsvc.cli import main

main()
