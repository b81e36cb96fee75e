"""Files ``ferrotune package`` copies into a packaged model folder (``score.py``, the Azure ML
scoring script). Not imported at run time; read with ``importlib.resources``."""
