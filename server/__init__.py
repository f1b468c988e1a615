"""The round loop and its plug-ins, the ``medfed`` command, engines, deployment and the run directory."""
