"""deepcontrol's Hydra plugins: the panel sweeper and the GPU-pool launcher.

Hydra finds plugins only under the ``hydra_plugins`` namespace package, hence this folder.
"""
