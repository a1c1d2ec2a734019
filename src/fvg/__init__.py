"""fvg: Factorized Video Generation. Plan the first frame, anchor it, then animate.

    from fvg import FactorizedPipeline
    pipe = FactorizedPipeline.from_preset("mini")
    out = pipe("a red circle moves right while a blue square moves up", seed=0)
    out.save("runs/example")

Names are imported lazily so that `import fvg` (and `fvg --help`) does not load torch.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "FactorizedPipeline": "fvg.pipeline",
    "FactorizedOutput": "fvg.pipeline",
    "AnchoredWanPipeline": "fvg.animate.wan",
    "Plan": "fvg.plan",
    "make_planner": "fvg.plan",
    "AnchorResult": "fvg.anchor",
    "DiffusersAnchorSource": "fvg.anchor",
    "FileAnchorSource": "fvg.anchor",
    "Preset": "fvg.presets",
    "PRESETS": "fvg.presets",
    "get_preset": "fvg.presets",
    "FvgError": "fvg.io",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'fvg' has no attribute '{name}'")
