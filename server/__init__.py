"""The ServerApp, the ``medfed`` command, engines and the run directory."""
