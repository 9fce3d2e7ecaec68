"""Serving a model with TRIM: an OpenAI-compatible Ray Serve application (app.py), its request
checks (api.py), image fetching and decoding with limits (images.py), the CPU preparation
(prepare.py) and the model replica's batched core (engine.py)."""
