"""``python -m fastif <command> ...`` (also ``torchrun -m fastif influence ...``): same as ``fastif``."""

from fastif.cli import main

if __name__ == "__main__":
    main()
