"""``isc serve``: a registered descriptor model over HTTP -- MLflow's own scoring app (``/invocations``,
``/ping``), whose error answers carry no traceback and no server path.

    isc serve                                           # models:/isc-descriptor@champion on 127.0.0.1:5001
    isc serve --model models:/isc-descriptor/3 --port 8080

Use it instead of ``mlflow models serve``, which answers every request it cannot parse with the full
Python traceback of the server (``stack_trace``); see registry/serving.py. The model is a pyfunc, and
loading a pyfunc runs the Python code it was saved with: only this project's descriptor models are
loaded unless ``--trust-model-code true`` (as for ``isc search``). Requests: ``dataframe_split`` with an
``image`` column of base64 image bytes, as in README "Serving"; paths of files on the server (a ``path``
column) are refused: a network client must not make the server open its files.
"""

from __future__ import annotations

import socket

from isc.cliutil import Parser, str2bool
from isc.contract import CHAMPION, DEFAULT_MODEL_NAME, model_uri
from isc.errors import ConfigError
from registry.serving import build_app


def build_parser() -> Parser:
    p = Parser(prog="isc serve", description="\n\n".join(__doc__.split("\n\n")[:2]))
    p.add_argument("--model", default=model_uri(DEFAULT_MODEL_NAME, CHAMPION),
                   help="model URI: models:/name@alias, models:/name/version, runs:/..., a local pyfunc folder")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default loopback only; put a TLS proxy in front to serve others)")
    p.add_argument("--port", type=int, default=5001, help="TCP port (default 5001; 5000 is the tracking server's)")
    p.add_argument("--trust-model-code", type=str2bool, nargs="?", const=True, default=False,
                   help="load a pyfunc that is not one of this project's descriptor models (it runs the code it "
                        "was saved with: only for a model you trust)")
    return p


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    if not 0 < args.port < 65536:
        raise ConfigError("port", f"must be 1-65535, got {args.port}")

    import uvicorn

    from registry.image_search import load_descriptor_model

    try:  # a port in use is one line naming it, before the model is loaded (uvicorn: its own log line, exit 3)
        with socket.create_server((args.host, args.port)):
            pass
    except OSError as exc:
        raise ConfigError("port", f"cannot listen on {args.host}:{args.port} ({exc.strerror or exc})") from None
    model, ident = load_descriptor_model(args.model, args.trust_model_code)
    server = uvicorn.Server(uvicorn.Config(build_app(model), host=args.host, port=args.port, log_level="warning",
                                           access_log=False))
    print(f"serving {ident['resolved_uri']} on http://{args.host}:{args.port} (POST /invocations, GET /ping)",
          flush=True)
    try:
        server.run()  # SIGTERM / Ctrl-C: uvicorn finishes the open requests, then raises the signal again
    except KeyboardInterrupt:
        pass
    print("isc serve: stopped", flush=True)  # a stop is the normal end of a server: exit 0
    return 0


if __name__ == "__main__":
    from entrypoints._run import cli

    cli("entrypoints.serve")
