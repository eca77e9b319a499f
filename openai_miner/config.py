"""Configuration: argparse flags, layered as CLI > environment > ``.env`` file > default.

Every flag ``--a.b_c`` can also be set by the environment variable ``A_B_C`` (dots and dashes
become underscores, upper case; an empty value counts as unset), so ``--openai.base_url`` is ``OPENAI_BASE_URL``, the openai
SDK's own name. The ``.env`` file is read with python-dotenv and never overrides the real
environment. The result is a ``bt.Config`` tree, which bittensor's classes take as they are.
"""

import argparse
import functools
import os
import stat
import typing
from typing import Any, Callable, Iterable, Mapping, Sequence

import bittensor as bt
from dotenv import dotenv_values

from openai_miner.messages import shown

TRUE = frozenset({"1", "true", "yes", "on", "y", "t"})
FALSE = frozenset({"0", "false", "no", "off", "n", "f", ""})


class ConfigError(ValueError):
    """A setting is missing, unreadable or has a bad value; the message says which and why."""


SHOWN = 16  # characters of a bad setting an error quotes: it may be a misplaced key


def str_to_bool(value: str | bool) -> bool:
    """A real boolean for flags and env vars: ``"false"`` means False (argparse's ``bool`` says True)."""
    if isinstance(value, bool):
        return value
    text = value.strip().lower()
    if text in TRUE:
        return True
    if text in FALSE:
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean (true/false, 1/0, yes/no), got {shown(value, SHOWN)}")


def at_least(low: float, kind: Callable[[str], Any] = int, *, inclusive: bool = True) -> Callable[[str], Any]:
    """An argparse type for a number with a floor, so a bad flag or variable fails at parse time."""

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {kind.__name__}, got {shown(text, SHOWN)}") from None
        if value < low or (value == low and not inclusive):
            raise argparse.ArgumentTypeError(
                f"must be {'at least' if inclusive else 'greater than'} {low:g}, got {text[:16]}"
            )
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


def port_problem(value: int, *, any_free: bool = False) -> str | None:
    """Why ``value`` is no port a miner may serve on (1025-65534; 0 for any free one if ``any_free``)."""
    if (any_free and value == 0) or 1024 < value < 65535:
        return None
    return f"must be {'0 (any free port) or ' if any_free else ''}between 1025 and 65534"


def port_number(text: str) -> int:
    """An argparse type for a port to serve on, 0 meaning any free one."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a port number, got {shown(text, SHOWN)}") from None
    problem = port_problem(value, any_free=True)
    if problem:
        raise argparse.ArgumentTypeError(f"{problem}, got {value}")
    return value


def add_bool(parser: argparse.ArgumentParser, *flags: str, default: bool, help: str) -> None:
    """``--flag`` alone means true; ``--flag false`` / ``--flag 0`` means false.

    A flag that is on by default also gets ``--no-flag``, the usual way to turn it off.
    """
    action = parser.add_argument(
        *flags, type=str_to_bool, nargs="?", const=True, default=default, metavar="BOOL", help=help
    )
    if default:
        parser.add_argument(
            *(f"--no-{flag.removeprefix('--')}" for flag in flags), dest=action.dest,
            action="store_false", default=argparse.SUPPRESS, help=argparse.SUPPRESS,  # in README
        )


def env_name(dest: str) -> str:
    return dest.replace(".", "_").replace("-", "_").upper()


def read_env_file(path: str | os.PathLike[str] | None) -> dict[str, str]:
    """The variables of a ``.env`` file; none if there is no file, a clear error if it is unreadable."""
    if path is None or not os.path.exists(path):
        return {}
    try:
        with open(path, encoding="utf-8") as stream:
            values = dotenv_values(stream=stream)
        mode = os.stat(path).st_mode
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read {os.fspath(path)}: {exc}") from exc
    if values.get("OPENAI_API_KEY") and mode & 0o077:
        warn_readable(os.path.abspath(path), mode)
    return {key: value for key, value in values.items() if value is not None}


@functools.cache  # once per file and mode: the file is read more than once at start
def warn_readable(path: str, mode: int) -> None:
    bt.logging.warning(
        f"{path} holds OPENAI_API_KEY and other users can read it (mode {stat.filemode(mode)}): chmod 600 {path}"
    )


def layered_env(
    environ: Mapping[str, str] | None = None, env_file: str | os.PathLike[str] | None = ".env"
) -> dict[str, str]:
    """The environment over the ``.env`` file: a real variable always wins."""
    return {**read_env_file(env_file), **(os.environ if environ is None else environ)}


def env_dests(parser: argparse.ArgumentParser) -> Iterable[argparse.Action]:
    """Every flag of the parser, but those that only act when given (``--help``, ``--no-flag``)
    and bittensor's private ones (``--subtensor._mock``)."""
    for action in parser._actions:
        if action.default is argparse.SUPPRESS or not action.option_strings:
            continue
        if not any(part.startswith("_") for part in action.dest.split(".")):
            yield action


def apply_env(parser: argparse.ArgumentParser, env: Mapping[str, str]) -> None:
    """Turn each matching variable into the flag's default, so the command line still wins."""
    for action in env_dests(parser):
        name = env_name(action.dest)
        if not env.get(name):  # unset or empty (as in .env.example): the flag's default stands
            continue
        try:
            action.default = convert(action, env[name])
        except (argparse.ArgumentTypeError, ValueError, TypeError) as exc:
            raise ConfigError(f"environment variable {name}={shown(env[name], SHOWN)}: {exc}") from exc
        action.required = False


def convert(action: argparse.Action, raw: str) -> Any:
    if action.nargs == 0:  # store_true / store_false: the variable names the value itself
        return str_to_bool(raw)
    to_value = action.type or str
    if action.nargs in ("*", "+"):
        return [to_value(item) for item in raw.split()]
    value = to_value(raw)
    if action.choices is not None and value not in action.choices:
        raise ValueError(f"must be one of {', '.join(map(str, action.choices))}")
    return value


def to_tree(flat: Mapping[str, Any]) -> dict[str, Any]:
    """``{"a.b": 1}`` -> ``{"a": {"b": 1}}``: the nesting bittensor's config expects."""
    tree: dict[str, Any] = {}
    for dest, value in flat.items():
        *parents, leaf = dest.split(".")
        node = tree
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return tree


def build_config(
    parser: argparse.ArgumentParser,
    argv: Sequence[str] | None = None,
    env: Mapping[str, str] | None = None,
) -> bt.Config:
    """Parse ``argv`` (default: ``sys.argv[1:]``) over ``env`` (default: environment over ``.env``).

    Parsing is argparse's own, not ``bt.Config``'s, which ignores the command line unless
    ``BT_NO_PARSE_CLI_ARGS`` is set and falls back to ``sys.argv`` when given no arguments.
    """
    apply_env(parser, layered_env() if env is None else env)
    namespace = parser.parse_args(argv)
    port = getattr(namespace, "axon.port", None)
    problem = None if port is None else port_problem(port)  # bittensor would fail with a bare assert
    if problem:
        raise ConfigError(f"--axon.port (or AXON_PORT) is {port}: it {problem}")
    return bt.Config(parser=None, default=to_tree(vars(namespace)))


# -- the command line's help -----------------------------------------------------------------------

UPSTREAM, LOCAL, ANSWERS, FRONTS, ACCESS, CHAIN = (
    "upstream (OpenAI-compatible)", "local model (fallback)", "answers", "fronts", "who may ask",
    "chain, wallet, axon",
)
GROUPS = ("positional arguments", "options", UPSTREAM, LOCAL, ANSWERS, FRONTS, ACCESS, CHAIN)
"""The help's sections, in order: the miner's own first, the chain's last."""


def group(parser: argparse.ArgumentParser, title: str) -> argparse._ArgumentGroup:
    """The parser's group of that title, made on first use."""
    for existing in parser._action_groups:
        if existing.title == title:
            return existing
    return parser.add_argument_group(title)


SHOWN_BITTENSOR = frozenset(
    {"wallet.name", "wallet.hotkey", "wallet.path", "subtensor.network", "subtensor.chain_endpoint",
     "axon.port", "axon.external_ip", "axon.external_port", "logging.debug", "logging.trace"}
)
"""bittensor's own flags that ``--help`` shows (with the chain's); ``--help-all`` shows the rest."""


class Help(argparse.HelpFormatter):
    """One line per option: its main flag, its first sentence and its default (README has the rest)."""

    WIDTH, COLUMN = 130, 42

    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=self.COLUMN, width=self.WIDTH)

    def _format_action_invocation(self, action: argparse.Action) -> str:
        if not action.option_strings or action.nargs == 0:
            return ", ".join(action.option_strings) or super()._format_action_invocation(action)
        return f"{action.option_strings[0]} {self._format_args(action, self._get_default_metavar_for_optional(action))}"

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = (action.help or "").split(". ")[0].rstrip(".")
        has_default = action.default not in (None, False, argparse.SUPPRESS, [], "") and action.nargs != 0
        default = f" (default: {action.default})" if has_default else ""
        room = self.WIDTH - self.COLUMN - len(default) - 1
        if len(text) > room:
            text = text[: room - 1].rsplit(" ", 1)[0].rstrip(" ,;:(") + "…"
        return (text + default).replace("%", "%%")

    def _get_default_metavar_for_optional(self, action: argparse.Action) -> str:
        kind = getattr(action.type, "__name__", "")
        return "N" if kind in ("int", "float") else action.dest.rsplit(".", 1)[-1].upper()


class Parser(argparse.ArgumentParser):
    """argparse with a one-line usage, so a mistyped flag prints two lines, not fifty."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"usage: {self.usage} (--help lists the options)\n{self.prog}: error: {message}\n")


def advanced(action: argparse.Action) -> argparse.Action:
    """A tuning option that ``--help`` leaves to ``--help-all`` (and README), to keep the help to a screen."""
    action.hidden_help, action.help = action.help or "", argparse.SUPPRESS  # type: ignore[attr-defined]
    return action


class HelpAll(argparse.Action):
    """``--help-all``: the help with the tuning options and bittensor's internal flags too."""

    def __init__(self, option_strings: Sequence[str], dest: str = argparse.SUPPRESS, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, *args: Any) -> None:
        for action in parser._actions:
            if getattr(action, "hidden_help", None):
                action.help = action.hidden_help
        parser.print_help()
        parser.exit()


def tidy_help(parser: argparse.ArgumentParser) -> None:
    """Move the bittensor flags worth showing into the chain's group, hide the others
    (``--help-all`` shows them), and put the groups in :data:`GROUPS`' order."""
    chain = group(parser, CHAIN)
    for action in list(parser._optionals._group_actions):
        if "." not in action.dest or action.dest.startswith("help"):
            continue
        if action.dest in SHOWN_BITTENSOR:
            parser._optionals._group_actions.remove(action)
            chain._group_actions.append(action)
        elif action.help is not argparse.SUPPRESS:
            advanced(action)
    rank = {title: index for index, title in enumerate(GROUPS)}
    parser._action_groups.sort(key=lambda group: rank.get(group.title or "", -1))
