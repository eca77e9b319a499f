import argparse
import logging
from pathlib import Path

import bittensor as bt
import pytest

from openai_miner.config import ConfigError, layered_env, str_to_bool
from openai_miner.miner import OpenAIMiner


def parse(argv: list[str], env: dict[str, str]):
    return OpenAIMiner.config(argv, env=env)


def test_defaults() -> None:
    config = parse([], {})
    assert config.openai.model_name == "gpt-4o-mini"
    assert config.neuron.streaming_batch_size == 12
    assert config.neuron.stop_on_forward_exception is False
    assert config.blacklist.force_validator_permit is True
    assert config.blacklist.allow_non_registered is False
    assert config.openai.base_url is None
    assert config.neuron.system_prompt is None and config.neuron.prompts_dir is None  # per-task templates


def test_precedence_cli_over_env_over_dotenv_over_default(tmp_path: Path) -> None:
    dotenv = tmp_path / ".env"
    dotenv.write_text("OPENAI_TEMPERATURE=0.1\nOPENAI_MAX_TOKENS=111\nOPENAI_MODEL_NAME=from-dotenv\n")
    env = layered_env({"OPENAI_MAX_TOKENS": "222", "OPENAI_MODEL_NAME": "from-env"}, dotenv)
    config = parse(["--openai.model_name", "from-cli"], env)
    assert config.openai.model_name == "from-cli"  # CLI beats all
    assert config.openai.max_tokens == 222  # environment beats .env
    assert config.openai.temperature == 0.1  # .env beats default
    assert config.openai.timeout == 30.0  # default


def test_sdk_names_for_base_url() -> None:
    assert parse([], {"OPENAI_BASE_URL": "http://127.0.0.1:9/v1"}).openai.base_url == "http://127.0.0.1:9/v1"


def test_sn1_aliases() -> None:
    config = parse(
        ["--neuron.model_id", "m", "--neuron.temperature", "0.2", "--neuron.max_tokens", "64"], {}
    )
    assert (config.openai.model_name, config.openai.temperature, config.openai.max_tokens) == ("m", 0.2, 64)


@pytest.mark.parametrize(
    "argv,expected",
    [
        (["--neuron.stop_on_forward_exception", "false"], False),
        (["--neuron.stop_on_forward_exception", "False"], False),
        (["--neuron.stop_on_forward_exception", "0"], False),
        (["--neuron.stop_on_forward_exception", "true"], True),
        (["--neuron.stop_on_forward_exception"], True),
        ([], False),
    ],
)
def test_bool_flags_mean_what_they_say(argv: list[str], expected: bool) -> None:
    assert parse(argv, {}).neuron.stop_on_forward_exception is expected


@pytest.mark.parametrize(
    "argv,env,expected",
    [
        ([], {}, True),  # on by default: no validator's query pays for the load
        (["--no-fallback.preload"], {}, False),
        (["--fallback.preload", "false"], {}, False),
        ([], {"FALLBACK_PRELOAD": "false"}, False),
        (["--fallback.preload"], {"FALLBACK_PRELOAD": "false"}, True),  # the command line wins
        (["--no-fallback.preload"], {"FALLBACK_PRELOAD": "true"}, False),
    ],
)
def test_preload_is_on_by_default_and_no_flag_turns_it_off(
    argv: list[str], env: dict[str, str], expected: bool
) -> None:
    assert parse(argv, env).fallback.preload is expected


def test_every_flag_on_by_default_has_a_no_form() -> None:
    config = parse(["--no-blacklist.force_validator_permit"], {"BLACKLIST_FORCE_VALIDATOR_PERMIT": "true"})
    assert config.blacklist.force_validator_permit is False
    with pytest.raises(SystemExit):  # off by default: no --no- form to confuse anyone
        parse(["--no-mock"], {})


def test_bool_from_environment() -> None:
    config = parse([], {"BLACKLIST_FORCE_VALIDATOR_PERMIT": "false", "MOCK": "yes"})
    assert config.blacklist.force_validator_permit is False and config.mock is True


def test_list_and_store_true_from_environment() -> None:
    config = parse([], {"BLACKLIST_WHITELIST": "5A 5B", "LOGGING_DEBUG": "1"})
    assert config.blacklist.whitelist == ["5A", "5B"] and config.logging.debug is True


def test_bad_bool_flag_is_an_argparse_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        parse(["--mock", "maybe"], {})
    assert exit_info.value.code == 2
    assert "expected a boolean" in capsys.readouterr().err


def test_bad_env_value_names_the_variable() -> None:
    with pytest.raises(ConfigError, match="NEURON_STREAMING_BATCH_SIZE='twelve'"):
        parse([], {"NEURON_STREAMING_BATCH_SIZE": "twelve"})


def test_unrelated_variables_are_ignored() -> None:
    parse([], {"CONFIG": "/nonexistent.yml", "STRICT": "1", "SUBTENSOR__MOCK": "x"})


def test_unreadable_dotenv_is_a_clear_error(tmp_path: Path) -> None:
    dotenv = tmp_path / ".env"
    dotenv.write_bytes(b"OPENAI_MODEL_NAME=\xff\xfe\n")
    with pytest.raises(ConfigError, match="cannot read"):
        layered_env({}, dotenv)


def test_str_to_bool_rejects_garbage() -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        str_to_bool("perhaps")


def test_world_readable_dotenv_with_a_key_is_warned_about(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    dotenv = tmp_path / ".env"
    dotenv.write_text("OPENAI_API_KEY=sk-abc\n")
    dotenv.chmod(0o644)
    with caplog.at_level("WARNING"):
        assert layered_env({}, dotenv)["OPENAI_API_KEY"] == "sk-abc"
        layered_env({}, dotenv)  # read again at start (the key, then the flags): still one warning
    assert caplog.text.count("chmod 600") == 1 and "sk-abc" not in caplog.text
    caplog.clear()
    dotenv.chmod(0o600)
    with caplog.at_level("WARNING"):
        layered_env({}, dotenv)
    assert "chmod 600" not in caplog.text


def test_a_bad_value_is_not_echoed_whole_it_may_be_a_misplaced_key() -> None:
    secret = "sk-proj-" + "s3cr3t" * 10
    with pytest.raises(ConfigError) as error:
        OpenAIMiner.config([], {"OPENAI_MAX_TOKENS": secret})
    assert "OPENAI_MAX_TOKENS" in str(error.value) and secret not in str(error.value)


def test_the_miners_own_log_lines_are_labelled_as_its_own(caplog) -> None:
    from openai_miner.base import label_own_lines
    from openai_miner.access import Refusals

    label_own_lines()
    label_own_lines()  # once is enough: no second filter
    with caplog.at_level("INFO", logger="bittensor"):
        Refusals(every=0).count("a reason")  # logs from openai_miner/access.py
        bt.logging.info("from a test")  # not the package's: bittensor's label stays
    names = {record.getMessage()[:7]: record.name for record in caplog.records}
    assert names == {"refused": "openai_miner", "from a ": "bittensor"}, names
    assert sum(type(f).__name__ == "OwnLines" for f in logging.getLogger("bittensor").filters) == 1
