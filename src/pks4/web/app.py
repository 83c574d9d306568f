"""The FastAPI application of ``pks4 serve``: ``/`` (the page), ``/api/info``, ``/api/predict``, ``/api/example``.

Every answer comes from the :class:`pks4.VideoClassifier` given to :func:`create_app` (the inference path of
``pks4 predict``). Inference runs one request at a time under a lock: the model is shared, and on a CPU two
requests at once would only split the same cores. Uploads go to a temporary file (the decoder reads files),
which is deleted when the request ends.
"""
from __future__ import annotations

import base64
import os
import tempfile
import threading
from importlib import resources
from pathlib import Path
from typing import Any

from fastapi import FastAPI, File, Form, UploadFile
from fastapi.responses import HTMLResponse, JSONResponse

from pks4.api import VideoClassifier
from pks4.data.video import DataError, probe_video
from pks4.engine.timeline import parse_span

__all__ = ["create_app", "find_examples", "serve"]

_CHUNK = 1 << 20


def find_examples(folder: str | os.PathLike | None, limit: int = 200) -> dict[str, Path]:
    """Videos under ``folder`` (recursively, sorted) by their path relative to it; at most ``limit``."""
    from pks4.data.datasets import VIDEO_SUFFIXES
    from pks4.errors import UserError

    if folder is None:
        return {}
    root = Path(folder)
    if not root.is_dir():
        raise UserError(f"--examples {root}: not a folder")
    found = sorted(p for p in root.rglob("*") if p.suffix.lower() in VIDEO_SUFFIXES and p.is_file())
    return {str(p.relative_to(root)): p for p in found[:limit]}


class _Analyst:
    """One video -> the page's answer: top-k, and for a long video the timeline with its plot."""

    def __init__(self, clf: VideoClassifier, window: str, stride: str) -> None:
        self.clf, self.window, self.stride = clf, parse_span(window, "--window"), parse_span(stride, "--stride")
        self.lock = threading.Lock()

    def __call__(self, path: Path, name: str) -> dict[str, Any]:
        info = probe_video(path)
        long = info.num_frames >= 2 * self.window.frames(info.fps, "--window")
        with self.lock:
            pred = self.clf(path)
            timeline = self.clf.timeline(path, self.window, self.stride) if long else None
        answer = {"name": name, "label": pred["label"], "score": pred["score"], "topk": pred["topk"],
                  "frames": info.num_frames, "seconds": round(info.duration, 3), "timeline": None}
        if timeline is not None:
            with tempfile.TemporaryDirectory() as tmp:
                png = timeline.plot(Path(tmp) / "timeline.png")
                plot = "data:image/png;base64," + base64.b64encode(png.read_bytes()).decode()
            answer["timeline"] = {**timeline.to_dict(self.clf.topk), "plot": plot}
            answer["timeline"]["path"] = name
        return answer


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def create_app(clf: VideoClassifier, *, examples: dict[str, Path] | None = None, window: str = "2s",
               stride: str = "1s", max_upload_mb: float = 200) -> FastAPI:
    """The application: ``clf`` answers, ``examples`` (name -> file) can be picked on the page, videos at
    least two ``window`` long also get a timeline (``stride`` apart), uploads above ``max_upload_mb`` are refused."""
    examples = dict(examples or {})
    analyse = _Analyst(clf, window, stride)
    page = resources.files("pks4.web").joinpath("static/index.html").read_text()
    app = FastAPI(title="pks4", docs_url=None, redoc_url=None)

    @app.get("/", response_class=HTMLResponse)
    def index() -> str:
        return page

    @app.get("/api/info")
    def info() -> dict[str, Any]:
        model = clf.model
        return {"model": getattr(model, "model_name", type(model).__name__), "classes": clf.classes,
                "views": str(clf.views), "examples": list(examples), "window": str(analyse.window),
                "stride": str(analyse.stride)}

    @app.post("/api/predict")
    def predict(file: UploadFile = File(...)) -> Any:
        name = Path(file.filename or "upload").name
        with tempfile.TemporaryDirectory(prefix="pks4-upload-") as tmp:
            target = Path(tmp) / f"video{Path(name).suffix.lower()}"
            if not _save_upload(file, target, max_upload_mb):
                return _error(413, f"{name}: larger than {max_upload_mb:g} MB")
            try:
                return analyse(target, name)
            except (DataError, ValueError) as exc:
                return _error(400, str(exc).replace(str(target), name))

    @app.post("/api/example")
    def example(name: str = Form(...)) -> Any:
        if name not in examples:
            return _error(404, f"{name}: not one of the example videos")
        try:
            return analyse(examples[name], name)
        except (DataError, ValueError) as exc:
            return _error(400, str(exc))

    return app


def _save_upload(file: UploadFile, target: Path, max_mb: float) -> bool:
    """Copy the upload to ``target`` in chunks; False (and nothing kept) once it passes ``max_mb``."""
    written = 0
    with open(target, "wb") as out:
        while chunk := file.file.read(_CHUNK):
            written += len(chunk)
            if written > max_mb * 1e6:
                return False
            out.write(chunk)
    return True


def serve(source: str | os.PathLike, *, host: str = "127.0.0.1", port: int = 8000, examples: str | None = None,
          window: str = "2s", stride: str = "1s", device: str = "auto", amp: str = "auto") -> int:
    """Load ``source`` (run dir, checkpoint or Hub folder) and serve the page until interrupted."""
    import uvicorn

    parse_span(window, "--window"), parse_span(stride, "--stride")  # before loading the model
    found = find_examples(examples)
    clf = VideoClassifier.from_pretrained(source, device=device, dtype=amp)
    app = create_app(clf, examples=found, window=window, stride=stride)
    print(f"pks4 serve: {getattr(clf.model, 'model_name', '')} with {len(clf.classes)} classes, "
          f"{len(found)} example videos, on http://{host}:{port}/ (Ctrl-C stops)", flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning")
    return 0

