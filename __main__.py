"""``python -m mixstack``: the same command as ``mixstack``."""

from mixstack.cli.main import main

if __name__ == "__main__":
    main()
