"""Serving: FastAPI + ONNX Runtime over a bundle, with no torch import.

``create_app(settings)`` builds the app (``app.py``); ``serve(settings)`` runs it under
uvicorn (``server.py``); ``ServeSettings`` reads every knob from ``PIXELMILL_*`` variables.
"""
