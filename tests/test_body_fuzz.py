"""Any JSON at any field of either front's body: a 200 or a 4xx with a reason, never a 5xx, and
the miner still answers a good request after it.

Python's JSON gives what a hand-written case forgets: ints of any size (``float()`` of one past
1e308 overflowed into a 500), ``NaN`` and ``Infinity``, lone surrogates (``"\\ud800"``), nesting
deeper than the interpreter's stack. The HTTP front's app is driven in-process; the axon's body
goes through bittensor's middleware, so a real miner gets it, signed by a real dendrite.
"""

import copy
import json
import uuid
from typing import Any

import aiohttp
import bittensor as bt
import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from openai_miner.fronts.auth import epistula_headers
from openai_miner.protocol import StreamPromptingSynapse
from openai_miner.testing.fake_source import FakeSource
from openai_miner.testing.validator import ask
from tests.helpers import Http

TOKENS = ["fine", " thanks"]
ANSWER = "".join(TOKENS)
UNLIMITED = ("--blacklist.max_requests_per_minute", "0", "--blacklist.max_refusals_per_second", "0")

NUMBERS = st.one_of(
    st.integers(),
    st.floats(),  # NaN and infinities included: json.dumps writes them, json.loads reads them
    st.sampled_from([0, -1, 2**31, 2**63, -(2**63) - 1, 2**64, 10**400, -(10**400), 1e308, 5.5]),
)
TEXT = st.text(st.characters(exclude_categories=()), max_size=12)  # surrogates included
JSON = st.recursive(
    st.one_of(st.none(), st.booleans(), NUMBERS, TEXT),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(TEXT, inner, max_size=3),
    max_leaves=6,
)
EDGES = st.sampled_from(
    [10**400, -(10**400), 2**64, float("inf"), float("-inf"), float("nan"), 1e308, -0.0, 0.5, "\ud800", "", [], {}, [[[]]]]
).map(copy.deepcopy)  # a fresh [] or {} each time: a body built around one must not change the next (or itself)
VALUE = st.one_of(EDGES, NUMBERS, JSON)  # what a field gets: an edge a third of the time
FUZZ = settings(
    max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
)


def fresh() -> str:
    """A conversation never asked before (a repeat could be refused as one)."""
    return f"hello {uuid.uuid4().hex}"


# -- the HTTP front -------------------------------------------------------------------------------

SAMPLING = [
    "temperature", "top_p", "top_k", "max_tokens", "max_completion_tokens", "max_new_tokens", "seed", "stop",
    "logprobs", "top_logprobs",
]
# Where a value can go: a body field, the message's, or one of sampling_parameters
PLACES = [
    "model", "messages", "stream", "task", "timeout", "sampling_parameters", *SAMPLING,
    "message.role", "message.content", *(f"sampling_parameters.{name}" for name in SAMPLING),
]


@st.composite
def chat_bodies(draw: st.DrawFn) -> Any:
    """A good chat body with one or two of its :data:`PLACES` given any value (more would mostly
    stop at the first bad one and never reach the rest); or any JSON at all."""
    if draw(st.integers(0, 9)) == 0:
        return draw(JSON)
    message: dict[str, Any] = {"role": "user", "content": "hello"}
    body: dict[str, Any] = {"model": "any", "messages": [message]}
    for place, value in draw(st.dictionaries(st.sampled_from(PLACES), VALUE, min_size=1, max_size=2)).items():
        if place.startswith("message."):
            message[place.removeprefix("message.")] = value
        elif place.startswith("sampling_parameters."):
            if not isinstance(body.get("sampling_parameters"), dict):
                body["sampling_parameters"] = {}
            body["sampling_parameters"][place.removeprefix("sampling_parameters.")] = value
        else:
            body[place] = value
    return body


CLIENT_TIMEOUTS = st.one_of(st.none(), st.sampled_from(["inf", "nan", "1e999", "-1", "0", "soon", "5"]), st.floats().map(repr))


@pytest.fixture
def http_front(serve_http, validator) -> Http:
    """The HTTP front of a miner that serves nothing on a port, driven in-process."""
    return serve_http(*UNLIMITED, source=FakeSource(TOKENS))


async def post_chat(http_front: Http, validator, body: bytes, **headers: str) -> httpx.Response:
    signed = epistula_headers(validator.hotkey, body, http_front.miner.wallet.hotkey.ss58_address)
    async with http_front.raw() as http:
        return await http.post("/v1/chat/completions", content=body, headers={**signed, **headers})


async def answers_a_good_request(http_front, validator) -> bool:
    body = json.dumps({"model": "any", "messages": [{"role": "user", "content": fresh()}]}).encode()
    response = await post_chat(http_front, validator, body)
    return response.status_code == 200 and response.json()["choices"][0]["message"]["content"] == ANSWER


@FUZZ
@given(body=chat_bodies(), client_timeout=CLIENT_TIMEOUTS)
async def test_any_chat_body_gets_an_answer_or_a_4xx(http_front, validator, body, client_timeout) -> None:
    headers = {} if client_timeout is None else {"X-Client-Timeout": client_timeout}
    response = await post_chat(http_front, validator, json.dumps(body).encode(), **headers)
    assert response.status_code == 200 or 400 <= response.status_code < 500, (response.status_code, response.text)
    if response.status_code != 200:
        assert response.json()["error"]["message"]
    assert await answers_a_good_request(http_front, validator)


@FUZZ
@given(body=st.one_of(VALUE, st.fixed_dictionaries({"task_availabilities": VALUE, "llm_model_availabilities": VALUE})))
async def test_any_availability_body_gets_an_answer_or_a_400(http_front, body) -> None:
    async with http_front.raw() as http:
        response = await http.post("/availability", content=json.dumps(body).encode())
    assert response.status_code in (200, 400), (response.status_code, response.text)


def chat(**fields: Any) -> bytes:
    return json.dumps({"model": "any", "messages": [{"role": "user", "content": "hello"}], **fields}).encode()


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (chat(max_tokens=10**400), "max_tokens must be from 1 to 2147483647"),  # was a 500: float() overflowed
        (chat(max_tokens=2**31), "max_tokens must be from 1 to 2147483647"),
        (chat(max_tokens=5.5), "max_tokens must be a whole number"),
        (chat(sampling_parameters={"max_new_tokens": 0}), "max_new_tokens must be from 1"),
        (chat(seed=2**63), "seed must be from -9223372036854775808 to 9223372036854775807"),
        (chat(temperature=float("inf")), "temperature must be a finite number"),
        (chat(temperature=1e300), "temperature must be from 0 to 100"),
        (chat(top_p=float("nan")), "top_p must be a finite number"),
        (chat(top_p=1.5), "top_p must be from 0 to 1"),
        (chat(top_k=-1), "top_k must be from 0"),
        (chat(logprobs=True, top_logprobs=21), "top_logprobs must be from 0 to 20"),
        (chat(timeout=1e400), "timeout must be a finite number"),
        (chat(timeout=3601), "timeout must be from 0 to 3600"),
        (chat(model="\ud800"), "model must be valid Unicode"),  # echoed in every chunk: was a 500
        (b"[" * 100_000 + b"]" * 100_000, "not JSON we can read (RecursionError)"),
        (b'{"max_tokens": 1' + b"0" * 5000 + b"}", "not JSON we can read (ValueError)"),  # over Python's 4,300 digits
    ],
    ids=[
        "max_tokens-401-digits", "max_tokens-over-int32", "max_tokens-fraction", "max_new_tokens-0", "seed-over-int64",
        "temperature-infinite", "temperature-1e300", "top_p-nan", "top_p-over-1", "top_k-negative",
        "top_logprobs-over-20", "timeout-infinite", "timeout-over-an-hour", "model-lone-surrogate", "nested-100k-deep",
        "int-of-5001-digits",
    ],
)
async def test_an_out_of_bounds_body_is_400_with_its_reason(http_front, validator, body: bytes, reason: str) -> None:
    response = await post_chat(http_front, validator, body)
    assert response.status_code == 400 and reason in response.json()["error"]["message"], response.text
    assert await answers_a_good_request(http_front, validator)


async def test_numbers_at_their_bounds_are_taken(http_front, validator) -> None:
    miner = http_front.miner
    body = chat(
        max_tokens=5.0, seed=-(2**63), temperature=100, top_p=0, top_k=2**31 - 1, logprobs=True, top_logprobs=20,
        timeout=3600,
    )
    response = await post_chat(http_front, validator, body, **{"X-Client-Timeout": "inf"})  # ignored, not refused
    assert response.status_code == 200, response.text
    sampling = miner.source.sampling[-1]
    assert sampling.max_tokens == 5 and type(sampling.max_tokens) is int and sampling.seed == -(2**63)
    assert sampling.temperature == 100.0 and sampling.top_p == 0.0 and sampling.top_logprobs == 20


async def test_an_availability_body_naming_a_lone_surrogate_is_400(http_front) -> None:
    async with http_front.raw() as http:
        response = await http.post("/availability", content=json.dumps({"task_availabilities": {"\ud800": True}}))
    assert response.status_code == 400 and "valid Unicode" in response.json()["error"]["message"]


# -- the axon ----------------------------------------------------------------------------------------

SYNAPSE_FIELDS = [
    "roles", "messages", "task_name", "target_model", "seed", "timeout", "completion", "name", "total_size",
    "header_size", "dendrite", "axon", "computed_body_hash",
]
CONVERSATION = st.lists(TEXT, max_size=3)


@st.composite
def synapse_changes(draw: st.DrawFn) -> dict[str, Any]:
    """Fields to put in a signed synapse's body: roles and messages as a conversation (signed as
    such, when a dendrite can sign it) or any JSON, the other fields any JSON."""
    changes = draw(st.dictionaries(st.sampled_from(SYNAPSE_FIELDS), VALUE, max_size=2))
    for field in ("roles", "messages"):
        if draw(st.booleans()):
            changes[field] = draw(CONVERSATION)
    return changes


def signable(value: Any) -> bool:
    """A conversation a dendrite can hash: one or more strings that encode as UTF-8."""
    if not isinstance(value, list) or not value or not all(isinstance(m, str) for m in value):
        return False
    try:
        "".join(value).encode()
    except UnicodeEncodeError:
        return False
    return True


@pytest.fixture
def axon_miner(serve_miner, validator):
    """One miner for all the examples of a property test (fixtures are not reset between them)."""
    return serve_miner(*UNLIMITED, source=FakeSource(TOKENS))


@settings(FUZZ, max_examples=50)
@given(changes=synapse_changes())
async def test_any_synapse_body_gets_an_answer_or_a_4xx(axon_miner, validator, changes) -> None:
    messages = changes.get("messages")
    conversation = messages if signable(messages) else ["hello"]
    async with bt.Dendrite(wallet=validator) as dendrite:
        synapse = dendrite.preprocess_synapse_for_request(
            axon_miner.axon.info(), StreamPromptingSynapse(roles=["user"] * len(conversation), messages=conversation), 5
        )
        body = json.dumps({**synapse.model_dump(), **changes}).encode()
        headers = {**synapse.to_headers(), "content-type": "application/json"}
        url = f"http://127.0.0.1:{axon_miner.axon.port}/StreamPromptingSynapse"
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
            async with session.post(url, data=body, headers=headers) as response:
                status, text = response.status, await response.text(errors="replace")
        following = await ask(dendrite, axon_miner.axon, ["user"], [fresh()], timeout=5)
    assert status == 200 or 400 <= status < 500, (status, text[:300])
    assert following.status == 200 and following.text == ANSWER
