"""BrainMT models: ``build_model(cfg.model)`` returns a module mapping (B, T, C, D, H, W) to (B, 1)."""

from brainmt.models.brainmt import BrainMT, build_model, parameter_breakdown

__all__ = ["BrainMT", "build_model", "parameter_breakdown"]
