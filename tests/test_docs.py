"""Every option of the miner is documented in README's table and in .env.example."""

import argparse
from pathlib import Path

import pytest

from openai_miner.config import SHOWN_BITTENSOR, env_name
from openai_miner.miner import OpenAIMiner

ROOT = Path(__file__).resolve().parent.parent
OWN = ("openai", "neuron", "blacklist", "fallback", "http", "loosh", "metrics", "advertise", "netuid", "mock", "axon.off")


def own_options() -> list[argparse.Action]:
    parser = argparse.ArgumentParser()
    OpenAIMiner.add_args(parser)
    return [
        action for action in parser._actions
        if action.dest.split(".")[0] in OWN or action.dest in OWN or action.dest in SHOWN_BITTENSOR
    ]


@pytest.mark.parametrize("action", own_options(), ids=lambda action: action.dest)
def test_option_is_documented(action: argparse.Action) -> None:
    readme = (ROOT / "README.md").read_text("utf-8")
    example = (ROOT / ".env.example").read_text("utf-8")
    name = env_name(action.dest)
    for flag in action.option_strings:
        assert f"`{flag}" in readme, f"README lacks {flag}"
    assert f"`{name}`" in readme, f"README lacks {name}"
    assert f"{name}=" in example, f".env.example lacks {name}"


def test_ci_runs_readme_commands() -> None:
    ci = (ROOT / ".ci" / "run").read_text("utf-8")
    readme = (ROOT / "README.md").read_text("utf-8")
    assert "readme_command install" in ci and "readme_command test" in ci
    assert "<!-- ci:install -->" in readme and "<!-- ci:test -->" in readme


def test_every_prompt_template_is_documented() -> None:
    readme = (ROOT / "README.md").read_text("utf-8")
    templates = sorted((ROOT / "prompts").glob("*.txt"))
    assert templates
    for path in templates:
        assert f"`prompts/{path.name}`" in readme, f"README lacks prompts/{path.name}"
