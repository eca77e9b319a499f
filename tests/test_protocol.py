import json

from hypothesis import given, settings
from hypothesis import strategies as st

from openai_miner.protocol import OTHER_STRINGS, StreamPromptingSynapse, strings_at_least


class Content:
    def __init__(self, chunks: list[bytes]) -> None:
        self.chunks = chunks

    async def iter_any(self):
        for chunk in self.chunks:
            yield chunk


class Response:
    """The part of aiohttp's ClientResponse that the synapse reads."""

    def __init__(self, status: int, chunks: list[bytes]) -> None:
        self.status = status
        self.content = Content(chunks)
        self.raw_headers = ((b"name", b"StreamPromptingSynapse"), (b"bt_header_axon_status_code", b"200"))

    async def read(self) -> bytes:
        return b"".join(self.content.chunks)


def synapse() -> StreamPromptingSynapse:
    return StreamPromptingSynapse(roles=["user"], messages=["hi"])


async def collect(s: StreamPromptingSynapse, response: Response) -> list[str]:
    return [chunk async for chunk in s.process_streaming_response(response)]


async def test_keeps_newlines_and_joins_split_multibyte_characters() -> None:
    text = "line one\n\nligne deux: é日本🙂\n"
    raw = text.encode()
    cut = raw.index("日".encode()) + 1  # split inside a 3-byte character
    s = synapse()
    chunks = await collect(s, Response(200, [raw[:cut], raw[cut:cut + 1], raw[cut + 1:]]))
    assert "".join(chunks) == text == s.completion
    assert "\ufffd" not in s.completion


async def test_error_body_is_not_a_completion() -> None:
    s = synapse()
    body = json.dumps({"message": "Forbidden. Key is blacklisted: not registered."}).encode()
    assert await collect(s, Response(403, [body])) == []
    assert s.completion == ""
    extracted = s.extract_response_json(Response(403, []))
    assert extracted["message"].startswith("Forbidden")


def test_extract_response_json_rebuilds_the_synapse() -> None:
    s = synapse()
    s.completion = "answer"
    extracted = s.extract_response_json(Response(200, []))
    assert extracted["completion"] == "answer" and extracted["axon"] == {"code": "200"}
    assert StreamPromptingSynapse(**extracted).deserialize() == "answer"


def test_accepts_newer_validator_fields_and_hashes_messages_only() -> None:
    plain = synapse()
    newer = StreamPromptingSynapse(
        roles=["user"], messages=["hi"], task_name="qa", target_model="x", seed=7, something_new=1
    )
    assert newer.seed == 7 and newer.task_name == "qa"
    assert plain.body_hash == newer.body_hash
    assert plain.body_hash != StreamPromptingSynapse(roles=["user"], messages=["ho"]).body_hash


def test_required_fields_are_bittensors_but_cached() -> None:
    import bittensor as bt

    s = synapse()
    assert s.get_required_fields() == bt.Synapse.get_required_fields(s) == ["roles", "messages"]
    assert s.to_headers()["bt_header_input_obj_roles"]  # headers still carry the required inputs


# -- counting a body's strings without parsing it ----------------------------------------------------

JSON_VALUES = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(alphabet='"\\,: x\n\u00e9')),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(alphabet='"\\,x'), inner, max_size=4),
    max_leaves=20,
)


def strings_in(value: object) -> int:
    if isinstance(value, str):
        return 1
    if isinstance(value, list):
        return sum(strings_in(item) for item in value)
    if isinstance(value, dict):
        return len(value) + sum(strings_in(item) for item in value.values())
    return 0


@settings(max_examples=100, deadline=None)
@given(value=JSON_VALUES, layout=st.sampled_from([{}, {"separators": (",", ":")}, {"indent": 2}, {"ensure_ascii": False}]))
def test_strings_at_least_is_between_half_and_all_of_a_bodys_strings(value, layout) -> None:
    """Never over (a good body is never refused as too long), at least half (a sender cannot
    hide 100,000 messages from it by quoting, escaping or spacing them)."""
    body = json.dumps(value, **layout).encode()
    assert strings_in(value) // 2 <= strings_at_least(body) <= strings_in(value)


def test_strings_at_least_counts_a_synapse_in_c_not_by_parsing() -> None:
    many = 100_000
    body = json.dumps(StreamPromptingSynapse(roles=["user"] * many, messages=['say "x", \\'] * many).model_dump()).encode()
    assert many <= strings_at_least(body) <= 2 * many + OTHER_STRINGS
