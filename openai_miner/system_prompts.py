"""The system prompt of each answer, chosen by the task the validator names in ``task_name``.

SN1 validators name the task they are scoring (``qa``, ``summarization``, ``date_qa``, ``math``...;
some send the task's class name, ``DateQuestionAnsweringTask``), and each task rewards a different
kind of answer: a date first, a bare label, a final number. Each task has a template
``prompts/<task>.txt``; an unnamed or unknown task gets ``generic.txt``. ``--neuron.prompts_dir``
adds or replaces templates by file name, ``--neuron.system_prompt`` replaces them all, and a
system message sent by the validator beats both (:mod:`openai_miner.messages`).

The task name comes from the network: it is only ever looked up among the templates read at
start-up, never turned into a path.
"""

import argparse
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Mapping

from openai_miner.config import ConfigError

if TYPE_CHECKING:
    from importlib.resources.abc import Traversable

DEFAULT_TASK = "generic"


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--neuron.system_prompt", type=str, default=None,
        help="One system prompt for every task, instead of the per-task templates of prompts/ "
        "(a system message sent by the validator still wins).",
    )
    parser.add_argument(
        "--neuron.prompts_dir", type=str, default=None,
        help="Directory of <task>.txt system prompt templates, each replacing the packaged one of "
        "that task (generic.txt: tasks without one).",
    )

# Names SN1 has used for the same tasks (class names, older names), as task keys.
ALIASES = {
    "questionanswering": "qa",
    "datequestionanswering": "dateqa",
    "sentimentanalysis": "sentiment",
    "genericinstruction": "generic",
    "multiplechoice": "multichoice",
}


def task_key(name: str) -> str:
    """One key for every spelling of a task: ``date_qa``, ``Date QA``, ``DateQuestionAnsweringTask``."""
    key = re.sub(r"[^a-z0-9]", "", name.lower())
    key = key.removesuffix("task") or key
    return ALIASES.get(key, key)


@dataclass(frozen=True)
class SystemPrompts:
    """Templates by task key, or one ``override`` for every task."""

    templates: Mapping[str, str]
    override: str | None = None

    def for_task(self, task_name: str | None) -> str:
        if self.override:
            return self.override
        template = self.templates.get(task_key(task_name)) if task_name else None
        return template or self.templates[DEFAULT_TASK]


def read_templates(directory: "Traversable") -> dict[str, str]:
    """Every ``*.txt`` of ``directory`` by task key. An empty template is an error: it would send nothing."""
    templates = {}
    for entry in directory.iterdir():
        if not entry.name.endswith(".txt") or not entry.is_file():
            continue
        try:
            text = entry.read_text("utf-8").strip()
        except (OSError, UnicodeDecodeError) as error:
            raise ConfigError(f"cannot read the prompt template {entry}: {error}") from error
        if not text:
            raise ConfigError(f"the prompt template {entry} is empty")
        templates[task_key(entry.name.removesuffix(".txt"))] = text
    return templates


def load_system_prompts(prompts_dir: str | None = None, system_prompt: str | None = None) -> SystemPrompts:
    """The packaged templates, under those of ``prompts_dir``, unless ``system_prompt`` replaces them.

    The packaged ones are the repository's ``prompts/``, installed as ``openai_miner.prompts``.
    """
    templates = read_templates(resources.files("openai_miner.prompts"))
    if prompts_dir:
        directory = Path(prompts_dir).expanduser()
        if not directory.is_dir():
            raise ConfigError(f"--neuron.prompts_dir (or NEURON_PROMPTS_DIR) {prompts_dir!r} is not a directory")
        templates.update(read_templates(directory))
    return SystemPrompts(templates, system_prompt or None)
