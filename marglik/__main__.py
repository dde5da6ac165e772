"""``python -m marglik [hydra overrides...]``: same as the ``marglik`` console script."""

from .cli import main

if __name__ == "__main__":
    main()
