"""TRIM settings by name, as the evaluation and the server take them: "model" (the model's own), "full"
(the model's with every patch kept: the no-TRIM baseline) or a preset ("default", "paper", "official",
"ratio:<float>") with the model's text settings; and the short name of a config."""

from __future__ import annotations

import dataclasses

from trim.config import TrimConfig

_PRESET_FIELDS = ("similarity", "keep", "threshold", "iqr_scope", "iqr_multiplier", "aggregate")


def setting_name(cfg: TrimConfig) -> str:
    """A short name of a TRIM config: its preset ("default", "paper", "official", "ratio:0.05") or
    "custom", with "/<selection>" when the selection is a baseline ("default/all": no reduction)."""
    def same(preset: TrimConfig) -> bool:
        fields = _PRESET_FIELDS + (("ratio",) if preset.threshold == "ratio" else ())
        return all(getattr(cfg, f) == getattr(preset, f) for f in fields)

    name = "custom"
    if cfg.threshold == "ratio" and same(TrimConfig.fixed_ratio(cfg.ratio)):
        name = f"ratio:{cfg.ratio:g}"
    else:
        for preset in ("default", "paper", "official"):
            if same(TrimConfig.preset(preset)):
                name = preset
                break
    return name if cfg.selection == "trim" else f"{name}/{cfg.selection}"


def named_setting(name: str, model_cfg: TrimConfig) -> TrimConfig:
    """The TrimConfig `name` stands for beside a model trained with `model_cfg` (module docstring)."""
    if name == "model":
        return model_cfg
    if name == "full":
        return dataclasses.replace(model_cfg, selection="all")
    return TrimConfig.preset(name, text=model_cfg.text, text_at_inference=model_cfg.text_at_inference)
