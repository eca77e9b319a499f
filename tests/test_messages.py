import pytest
from openai_miner.messages import InvalidPrompt, Message, to_chat_messages


def test_maps_every_role_in_order_with_history() -> None:
    chat = to_chat_messages(
        ["user", "assistant", "user"], ["q1", "a1", "q2"], system_prompt="be brief"
    )
    assert chat == [
        Message("system", "be brief"), Message("user", "q1"), Message("assistant", "a1"), Message("user", "q2")
    ]


def test_synapse_system_message_wins_over_configured_prompt() -> None:
    chat = to_chat_messages(["system", "user"], ["you are a pirate", "hi"], system_prompt="be brief")
    assert [m.content for m in chat] == ["you are a pirate", "hi"]


def test_role_names_are_case_insensitive() -> None:
    assert to_chat_messages(["User"], ["hi"]) == [Message("user", "hi")]


@pytest.mark.parametrize(
    "roles,messages,reason",
    [
        (["user", "assistant"], ["hi"], "2 roles for 1 messages"),
        (["user"], ["hi", "there"], "1 roles for 2 messages"),
        ([], [], "no messages"),
        (["wizard"], ["hi"], "unknown role 'wizard'"),
        (["user"], ["   "], "message 0 (user) is empty"),
        (["system"], ["rules"], "no user message"),
        (["user"], ["x" * 101], "over this miner's limit of 100"),
    ],
)
def test_refusals_say_why(roles: list[str], messages: list[str], reason: str) -> None:
    with pytest.raises(InvalidPrompt, match=reason.replace("(", r"\(").replace(")", r"\)")):
        to_chat_messages(roles, messages, max_chars=100)


@pytest.mark.parametrize("role", ["\x1cuser", "user\x1f", "\x85user", "user\u2028", "\u2029assistant"])
def test_control_and_unicode_separators_around_a_role_are_refused(role: str) -> None:
    with pytest.raises(InvalidPrompt, match="unknown role"):
        to_chat_messages([role, "user"], ["a", "b"])


def test_plain_spaces_around_a_role_are_fine() -> None:
    assert [m.role for m in to_chat_messages([" User\n", "\tassistant ", "user"], ["a", "b", "c"])] == [
        "user", "assistant", "user"
    ]
