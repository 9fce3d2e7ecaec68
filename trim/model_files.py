"""The files that mark a saved TRIM-LLaVA model folder, named apart from `trim.model` so that a job's
driver can look for a model without importing torch and transformers."""

PROJECTOR_FILE = "mm_projector.bin"
"""The projector's weights (LLaVA's name for them)."""
SETTINGS_FILE = "trim_llava.json"
"""The model's settings (TRIM, encoder, geometry), written after the weights."""
