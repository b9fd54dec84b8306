"""`python -m hpcllm ...` runs the `hpcllm` command: the console script's entry point, same output and exit codes."""

import sys

from hpcllm.cli.main import main

if __name__ == "__main__":
    sys.exit(main())
