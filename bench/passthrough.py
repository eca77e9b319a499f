"""The HTTP front's reference: a thin Starlette pass-through of the same upstream, nothing else.

``POST /v1/chat/completions`` forwards the body to the upstream with one shared httpx client and
streams the upstream's SSE bytes back as they come: no signature check, no access policy, no
re-batching, no deadline. Whatever the miner's HTTP front costs beyond this is its own.
"""

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.routing import Route


def app(upstream: str) -> Starlette:
    client = httpx.AsyncClient(base_url=upstream, timeout=None, limits=httpx.Limits(max_connections=None))

    async def chat(request: Request) -> StreamingResponse:
        upstream_request = client.build_request("POST", "chat/completions", content=await request.body(),
                                                headers={"Content-Type": "application/json"})
        response = await client.send(upstream_request, stream=True)

        async def relay():
            try:
                async for part in response.aiter_raw():
                    yield part
            finally:
                await response.aclose()

        return StreamingResponse(relay(), media_type="text/event-stream")

    return Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"])])
