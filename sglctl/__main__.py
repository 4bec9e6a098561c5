"""``python -m sglctl`` is the same as the ``sglctl`` console script."""

from sglctl.cli import main

if __name__ == "__main__":
    main()
