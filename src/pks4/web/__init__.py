"""``pks4 serve``: a small web page over a :class:`pks4.VideoClassifier` (the optional extra ``pks4[web]``).

FastAPI serves one plain HTML/JS page and two JSON endpoints (upload a video, or pick one of the example
videos); the page shows the top-k and, for a video at least two windows long, the timeline plot. FastAPI,
uvicorn and python-multipart are imported only here, so the rest of pks4 never needs them.

Why not Gradio, the usual home of shared demos: it runs on FastAPI itself and adds some thirty packages (pandas,
pillow, pydub, huggingface-hub, ...) and a 31 MB wheel for one page, and the page it generates changes its
markup between releases, which a browser test would have to chase. A page of plain HTML with stable element ids
is a few dozen lines and is tested as a user sees it.
"""
from __future__ import annotations

WEB_MODULES = ("fastapi", "uvicorn", "multipart")


def missing_web_modules() -> list[str]:
    """The modules of the ``web`` extra that cannot be imported (empty when ``pks4 serve`` can run)."""
    import importlib.util

    return [name for name in WEB_MODULES if importlib.util.find_spec(name) is None]


def __getattr__(name: str):
    if name in ("create_app", "serve", "find_examples"):
        from pks4.web import app

        return getattr(app, name)
    raise AttributeError(f"module 'pks4.web' has no attribute {name!r}")
