"""Same as ``deepcontrol-prepare``: build the training cache, e.g. ``data=cityscapes``."""

from deepcontrol.data.prepare import main

if __name__ == "__main__":
    main()
