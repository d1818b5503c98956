"""Serving: the native TGI-compatible server (``python -m serving.server``) and the TGI
launch/prompt script templates (``serving.templates``). Stands alone: no import of remote/."""
