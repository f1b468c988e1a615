"""Test-wide environment: no telemetry, no update checks, a job-local Flower home, headless plots."""

from __future__ import annotations

import os
import tempfile

import pytest

pytest.register_assert_rewrite("tests.helpers")  # its shared checks report values like test asserts do

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
os.environ.setdefault("FLWR_HOME", tempfile.mkdtemp(prefix="medfed-flwr-home-"))
os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
os.environ.setdefault("MPLBACKEND", "Agg")
