"""`python -m polysense ...` is the `polysense` command (torchrun starts training processes this way)."""

import sys

from polysense.cli.main import main

if __name__ == "__main__":
    sys.exit(main())
