"""The experiments shipped with vqadapt, as package data (an installed wheel has them too).

- ``defaults.yaml``: the settings every ablation cell starts from;
- ``presets/NAME.yaml``: studies, each a small file of overrides (``vqadapt ablate --preset``);
- ``hypotheses.yaml``: the expected ranges and claims the study report checks.

``$VQADAPT_EXPERIMENTS`` names another folder of the same layout instead.
"""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path

from vqadapt.errors import VQAConfigError


def experiments_dir() -> Path:
    """``$VQADAPT_EXPERIMENTS``, or this package's folder."""
    override = os.environ.get("VQADAPT_EXPERIMENTS")
    if override:
        return Path(override)
    shipped = resources.files(__name__)
    if not isinstance(shipped, Path):  # pip installs packages as folders; a zip import is not one
        raise VQAConfigError(
            f"vqadapt's experiments are not a folder ({shipped}): set $VQADAPT_EXPERIMENTS"
        )
    return shipped


def preset_names() -> list[str]:
    """The presets available (``presets/*.yaml``), sorted."""
    return sorted(path.stem for path in (experiments_dir() / "presets").glob("*.yaml"))


def preset_file(name: str) -> Path:
    """``presets/NAME.yaml``; a clear error naming the known presets when there is none."""
    path = experiments_dir() / "presets" / f"{name}.yaml"
    if not path.is_file():
        known = ", ".join(preset_names()) or f"none in {experiments_dir() / 'presets'}"
        raise VQAConfigError(f"unknown preset {name!r}; known: {known}")
    return path


def defaults_file() -> Path:
    return experiments_dir() / "defaults.yaml"


def hypotheses_file() -> Path:
    return experiments_dir() / "hypotheses.yaml"
