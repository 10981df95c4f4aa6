"""``isc serve``: MLflow's own scoring app for a registered descriptor model, with error answers that carry
no server internals.

Why not ``mlflow models serve``: MLflow 3.17's scoring server puts a ``stack_trace`` field -- the full
Python traceback, with the server's file paths -- into every error it builds from a failed parse
(``not json``, a body that is JSON but no pandas frame, a wrong shape), and has no switch to turn that
off (``_handle_serving_error(include_traceback=True)`` and ``MlflowException(stack_trace=...)`` are
hard-wired in ``mlflow/pyfunc/scoring_server/__init__.py``). The app here is the very same
``scoring_server.init(model)`` -- same routes (``/invocations``, ``/ping``, ``/health``, ``/version``),
same request formats and answers -- wrapped in :class:`NoServerInternals`, which rewrites every answer
with status >= 400: the ``stack_trace`` field (and any other ``*trace*`` field) is dropped, a traceback
in a text body is cut off, and absolute paths in the message are masked. Successful answers pass
through untouched.
"""

from __future__ import annotations

import json
import re
from typing import Any

PATH_MASK = "<path>"
MAX_MESSAGE = 4000
# an absolute path of two or more parts (/srv/x/model, /usr/lib/python3.11/site-packages/mlflow/...)
_ABS_PATH = re.compile(r"(?<![\w:/.])/(?:[\w.+@~-]+/)+[\w.+@~-]*")


def clean_message(text: str) -> str:
    """An error message without a traceback (cut at ``Traceback``) or absolute paths, at most
    :data:`MAX_MESSAGE` characters (MLflow echoes the whole request body into some messages)."""
    text = text.split("Traceback (most recent call last)")[0].rstrip()
    text = _ABS_PATH.sub(PATH_MASK, text)
    return text if len(text) <= MAX_MESSAGE else text[:MAX_MESSAGE] + " ... (cut)"


def clean_error_body(body: bytes, content_type: str) -> bytes:
    """The body of an error answer without server internals (see the module doc)."""
    text = body.decode("utf-8", "replace")
    if "json" in content_type:
        try:
            doc: Any = json.loads(text)
        except ValueError:
            doc = None
        if isinstance(doc, dict):
            out = {k: (clean_message(v) if isinstance(v, str) else v) for k, v in doc.items()
                   if "trace" not in k.lower()}
            return json.dumps(out).encode()
    return clean_message(text).encode()


class NoServerInternals:
    """ASGI middleware: every answer with status >= 400 goes through :func:`clean_error_body`."""

    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        held: dict[str, Any] = {}
        chunks: list[bytes] = []

        async def filtered(message: dict) -> None:
            if message["type"] == "http.response.start" and message["status"] >= 400:
                held["start"] = message  # sent with the rewritten body, whose length differs
                return
            if message["type"] == "http.response.body" and "start" in held:
                chunks.append(message.get("body", b""))
                if message.get("more_body"):
                    return
                start = held.pop("start")
                headers = [(k, v) for k, v in start.get("headers", []) if k.lower() != b"content-length"]
                ctype = next((v.decode("latin-1") for k, v in headers if k.lower() == b"content-type"), "")
                body = clean_error_body(b"".join(chunks), ctype)
                await send({**start, "headers": [*headers, (b"content-length", str(len(body)).encode())]})
                await send({"type": "http.response.body", "body": body})
                return
            await send(message)

        await self.app(scope, receive, filtered)


class BytesOnly:
    """The served model, taking images as bytes only: a request naming files on the server (a ``path``
    column, a list of paths) is refused.

    Why: the descriptor pyfunc also describes image *files* (``path``), which is right in a notebook and
    wrong for a network client: it makes the server open any file it can read -- answering whether a path
    exists, and the descriptors of private images on the server's disk. Everything else (``metadata``,
    ...) is the model's own."""

    def __init__(self, model: Any):
        self._model = model

    def __getattr__(self, name: str) -> Any:
        return getattr(self._model, name)

    def predict(self, data: Any, params: dict[str, Any] | None = None) -> Any:
        import numpy as np
        import pandas as pd
        from mlflow.exceptions import MlflowException

        names_files = ((isinstance(data, pd.DataFrame) and "path" in data.columns) or isinstance(data, pd.Series)
                       or (isinstance(data, list | tuple) and any(isinstance(v, str) for v in data))
                       or (isinstance(data, np.ndarray) and data.dtype.kind in "USO"))
        if names_files:
            raise MlflowException.invalid_parameter_value(
                "isc serve takes images as bytes only: send each image's base64 in an 'image' column "
                "(dataframe_split), not paths on the server")
        return self._model.predict(data, params=params)


def build_app(model: Any) -> Any:
    """MLflow's scoring app for a loaded pyfunc (bytes only: :class:`BytesOnly`), wrapped in
    :class:`NoServerInternals`."""
    from mlflow.pyfunc import scoring_server

    return NoServerInternals(scoring_server.init(BytesOnly(model)))
