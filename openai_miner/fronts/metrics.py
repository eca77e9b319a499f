"""The operator's front (``--metrics.port``): ``/metrics`` for Prometheus and ``/health``.

It answers no validator, so it is never the advertised front (:attr:`Front.advertisable`), and
it listens on 127.0.0.1 unless told otherwise: the counts say how a miner does, which is for its
operator (or a Prometheus next to it), not for the network. ``/metrics`` is prometheus_client's
own exposition (``generate_latest``) of the core's :class:`~openai_miner.metrics.Metrics`; ``/health`` is 200 with the
answers so far while a request would be answered, 503 while not (the local model still loading).
"""

import argparse

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from openai_miner.config import at_least
from openai_miner.fronts import base


def add_args(parser: argparse._ActionsContainer) -> None:
    parser.add_argument(
        "--metrics.port", type=at_least(1), default=None,
        help="Serve Prometheus metrics (/metrics) and /health on this port, for the operator (off when unset).",
    )
    parser.add_argument(
        "--metrics.host", type=str, default="127.0.0.1",
        help="Address the metrics front listens on (0.0.0.0 exposes the counts to anyone who can reach it).",
    )


class Front(base.AppFront):
    """``/metrics`` and ``/health`` on the miner's core; never published on chain."""

    name = "metrics"
    label = "metrics front"
    advertisable = False
    add_args = staticmethod(add_args)

    async def health(self, request: Request) -> Response:
        ready = self.miner.can_answer()
        body = {"status": "ok" if ready else "loading", "answers": self.core.stats.as_json()}
        return JSONResponse(body, status_code=200 if ready else 503)

    async def metrics(self, request: Request) -> Response:
        return Response(generate_latest(self.core.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    def app(self) -> Starlette:
        return Starlette(
            routes=[Route("/metrics", self.metrics, methods=["GET"]), Route("/health", self.health, methods=["GET"])]
        )
