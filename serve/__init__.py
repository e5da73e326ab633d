"""The Ray Serve app (`serve/app.py`, config in `serve/config.yaml`): a thin adapter over `app.serving`."""
