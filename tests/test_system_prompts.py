"""Per-task system prompts: the packaged templates of prompts/, overrides, and how they install."""

import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import bittensor as bt
import pytest

from openai_miner.config import ConfigError
from openai_miner.testing.upstream import LoopbackUpstream
from openai_miner.system_prompts import DEFAULT_TASK, load_system_prompts, task_key
from openai_miner.testing.validator import ask

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = ROOT / "prompts"
SN1_TASKS = ["qa", "summarization", "date_qa", "math", "sentiment", "translation", "debugging", "multi_choice"]


def template(name: str) -> str:
    return (PROMPTS / f"{name}.txt").read_text("utf-8").strip()


@pytest.mark.parametrize("task", SN1_TASKS)
def test_each_sn1_task_gets_its_own_template(task: str) -> None:
    prompts = load_system_prompts()
    assert prompts.for_task(task) == template(task)
    assert template(task) != template(DEFAULT_TASK)


@pytest.mark.parametrize(
    ("sent", "task"),
    [
        ("QuestionAnsweringTask", "qa"),
        ("DateQuestionAnsweringTask", "date_qa"),
        ("SummarizationTask", "summarization"),
        ("MathTask", "math"),
        ("SentimentAnalysisTask", "sentiment"),
        ("TranslationTask", "translation"),
        ("MultiChoiceTask", "multi_choice"),
        ("GenericInstructionTask", "generic"),
        ("Date QA", "date_qa"),
        ("MATH", "math"),
    ],
)
def test_other_spellings_of_a_task_find_its_template(sent: str, task: str) -> None:
    assert load_system_prompts().for_task(sent) == template(task)


@pytest.mark.parametrize("sent", [None, "", "inference", "task", "../../etc/passwd", "qa/../math", "x" * 10_000])
def test_no_or_unknown_task_gets_the_generic_template_never_a_path(sent: str | None) -> None:
    assert load_system_prompts().for_task(sent) == template(DEFAULT_TASK)


def test_prompts_dir_replaces_and_adds_templates_by_name(tmp_path: Path) -> None:
    (tmp_path / "math.txt").write_text("Only the number.\n")
    (tmp_path / "web_retrieval.txt").write_text("Cite your sources.")
    (tmp_path / "notes.md").write_text("not a template")
    prompts = load_system_prompts(str(tmp_path))
    assert prompts.for_task("math") == "Only the number."
    assert prompts.for_task("WebRetrievalTask") == "Cite your sources."
    assert prompts.for_task("qa") == template("qa")  # the packaged one still answers the rest


def test_one_system_prompt_replaces_every_template(tmp_path: Path) -> None:
    (tmp_path / "math.txt").write_text("Only the number.")
    prompts = load_system_prompts(str(tmp_path), "Be a pirate.")
    assert {prompts.for_task(task) for task in [*SN1_TASKS, None]} == {"Be a pirate."}


def test_a_prompts_dir_that_is_not_there_or_an_empty_template_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="is not a directory"):
        load_system_prompts(str(tmp_path / "missing"))
    (tmp_path / "qa.txt").write_text("  \n")
    with pytest.raises(ConfigError, match="qa.txt is empty"):
        load_system_prompts(str(tmp_path))


def test_task_key_is_one_key_for_every_spelling() -> None:
    assert task_key("date_qa") == task_key("Date-QA") == task_key("DateQuestionAnsweringTask")
    assert task_key("multi_choice") == task_key("MultiChoiceTask") == task_key("multiple choice")


async def test_validator_task_name_chooses_the_system_prompt_sent_upstream(serve_miner, validator, tmp_path: Path) -> None:
    (tmp_path / "overrides").mkdir()
    (tmp_path / "overrides" / "translation.txt").write_text("Translate, nothing else.")
    with LoopbackUpstream(tokens=["ok"]) as up:
        miner = serve_miner("--openai.base_url", up.base_url, "--fallback.off", "--neuron.prompts_dir", str(tmp_path / "overrides"))
        asked = [
            ("math", ["user"], ["2+2?"]),
            ("DateQuestionAnsweringTask", ["user"], ["When did the Bastille fall?"]),
            ("translation", ["user"], ["Bonjour -> English"]),
            (None, ["user"], ["hello"]),
            ("math", ["system", "user"], ["You are a pirate.", "2+3?"]),  # the validator's own wins
        ]
        async with bt.Dendrite(wallet=validator) as dendrite:
            answers = [await ask(dendrite, miner.axon, roles, messages, task_name=task) for task, roles, messages in asked]
        systems = [request.body["messages"][0] for request in up.requests]
    assert all(answer.status == 200 and answer.text == "ok" for answer in answers)
    assert [message["role"] for message in systems] == ["system"] * 5
    assert [message["content"] for message in systems] == [
        template("math"), template("date_qa"), "Translate, nothing else.", template("generic"), "You are a pirate.",
    ]


@pytest.mark.slow
def test_pip_install_not_editable_ships_the_prompts(tmp_path: Path) -> None:
    """A wheel and an sdist built from this checkout carry prompts/, and the installed wheel finds them."""
    source = tmp_path / "source"  # a copy: building writes build/ and *.egg-info beside setup.py
    source.mkdir()
    for name in ("setup.py", "setup.cfg", "README.md"):
        shutil.copy(ROOT / name, source)
    for name in ("openai_miner", "prompts"):
        shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    built = tmp_path / "dist"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "--wheel-dir", str(built), str(source)],
        check=True, cwd=tmp_path,
    )
    subprocess.run([sys.executable, "setup.py", "--quiet", "sdist", "--dist-dir", str(built)], check=True, cwd=source)
    names = {path.name for path in PROMPTS.glob("*.txt")}
    assert {f"{task}.txt" for task in [*SN1_TASKS, DEFAULT_TASK]} <= names
    (wheel,) = built.glob("*.whl")
    with zipfile.ZipFile(wheel) as archive:
        assert {Path(name).name for name in archive.namelist() if name.startswith("openai_miner/prompts/")} >= names
    (sdist,) = built.glob("*.tar.gz")
    with tarfile.open(sdist) as archive:
        assert {Path(name).name for name in archive.getnames() if "/prompts/" in name} >= names

    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index", "--target", str(target), str(wheel)],
        check=True,
    )
    found = subprocess.run(
        [sys.executable, "-c", "import openai_miner, openai_miner.system_prompts as s; "
         "print(openai_miner.__file__); print(s.load_system_prompts().for_task('math'))"],
        check=True, capture_output=True, text=True, cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(target)},
    ).stdout.splitlines()
    assert found[0].startswith(str(target))  # the installed copy, not this checkout
    assert "\n".join(found[1:]) == template("math")
