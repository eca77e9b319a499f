"""The ``Front`` interface: one way validators reach the miner, in one module.

A front owns everything of its wire: its flags, whether a configuration serves it, where it
listens, its port check, its server, where the chain sends validators when it is the advertised
front, and its piece of the summary line. The base :class:`~openai_miner.base.Miner` loops over the
enabled fronts and names none of them, so a new front is a new file, not an edit of the miner.

Discovery: the built-in fronts (:func:`built_in`: axon, HTTP, SN78, metrics) come first, in that order,
then every class named by an entry point of the group ``openai_miner.fronts`` in any installed
distribution. A third party adds a front by subclassing :class:`Front` and declaring, in its own
package::

    [options.entry_points]
    openai_miner.fronts =
        myfront = mypackage.front:MyFront

The built-ins are a tuple here rather than entry points of this package, so that they are served
from a source checkout whose installed metadata is older than the code.
"""

import abc
import argparse
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, ClassVar, Sequence

import bittensor as bt
import uvicorn
from starlette.types import ASGIApp

from openai_miner.config import ConfigError
from openai_miner.startup import StartupError, ensure_port_free

if TYPE_CHECKING:
    from openai_miner.base import Miner
    from openai_miner.core import Core

GROUP = "openai_miner.fronts"
"""The entry-point group third-party fronts register under."""


class Front(abc.ABC):
    """One front of one miner, made when the miner is; its server is built at start.

    ``name`` is the flag prefix (``--NAME.port``), the ``--advertise`` choice and the label in the
    summary line; ``label`` names it in messages (``"HTTP front"``), ``port_flag`` is the flag an
    error about its port tells the operator to change, and ``switch`` how to turn it on, for the
    error when nothing is served.
    """

    name: ClassVar[str]
    label: ClassVar[str]
    port_flag: ClassVar[str]
    switch: ClassVar[str]
    advertisable: ClassVar[bool] = True
    """Whether validators may be sent to it: an operator's front (metrics) is never published on chain."""

    def __init__(self, miner: "Miner") -> None:
        self.miner = miner

    @staticmethod
    @abc.abstractmethod
    def add_args(parser: argparse._ActionsContainer) -> None:
        """Declare this front's flags; they are read from ``config.<name>``."""

    @classmethod
    @abc.abstractmethod
    def enabled(cls, config: bt.Config) -> bool:
        """Whether ``config`` serves this front (usually: its port is set)."""

    @classmethod
    def advertise_asked(cls, config: bt.Config) -> bool:
        """Whether a flag of its own asks the chain to publish it (``--http.advertise``, kept for
        SN1's operators); ``--advertise NAME`` is the general way."""
        return False

    @property
    @abc.abstractmethod
    def host(self) -> str:
        """The address it listens on."""

    @property
    @abc.abstractmethod
    def port(self) -> int:
        """The port it listens on."""

    @abc.abstractmethod
    def server(self) -> uvicorn.Server:
        """Its server, built once at start, after the miner (and its core) exists.

        The miner hardens ``server.config`` (idle connections, connection places, offenders) the
        same way for every front, then runs every server on one event loop.
        """

    @property
    def published(self) -> tuple[str | None, int]:
        """The address the chain publishes when this front is advertised: the miner's external IP
        and this front's port. The axon, which may sit behind a forwarded port, overrides it."""
        return self.miner.axon.external_ip, self.port

    @property
    def core(self) -> "Core":
        """The miner's core, for a front that answers through it; a miner without one cannot serve it."""
        core = getattr(self.miner, "core", None)
        if core is None:
            raise StartupError(f"{type(self.miner).__name__} has no core to answer the {self.label} with: drop {self.port_flag}")
        return core

    def check_port(self) -> None:
        """Fail fast, with the flag to change, while the port is taken (checked before any model load)."""
        ensure_port_free(self.port, self.label, self.port_flag)

    def summary(self) -> str:
        """Its piece of the summary line."""
        return f"{self.name} {self.host}:{self.port}"


class AppFront(Front):
    """A front that is one ASGI app on a port of its own: served when ``--NAME.port`` is set, on
    ``--NAME.host``. A subclass declares those two flags (``add_args``) and builds its :meth:`app`."""

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        if "name" in vars(cls):
            cls.port_flag = f"--{cls.name}.port"
            cls.switch = f"--{cls.name}.port PORT"

    @classmethod
    def enabled(cls, config: bt.Config) -> bool:
        return getattr(config, cls.name).port is not None

    @property
    def host(self) -> str:
        return getattr(self.miner.config, self.name).host

    @property
    def port(self) -> int:
        return getattr(self.miner.config, self.name).port

    @abc.abstractmethod
    def app(self) -> ASGIApp:
        """Its ASGI application, built once at start (the miner and its core exist by then)."""

    def server(self) -> uvicorn.Server:
        return uvicorn.Server(uvicorn.Config(self.app(), host=self.host, port=self.port, log_level="warning"))


def built_in() -> tuple[type[Front], ...]:
    """The fronts of this package; imported here, as their modules import this one."""
    from openai_miner.fronts import axon, http, loosh, metrics

    return (axon.Front, http.Front, loosh.Front, metrics.Front)


def discover() -> tuple[type[Front], ...]:
    """The built-in fronts, then those registered under :data:`GROUP`; names must be unique."""
    found: list[type[Front]] = list(built_in())
    for point in entry_points(group=GROUP):
        try:
            front = point.load()
        except (ImportError, AttributeError) as error:  # a broken install: say which, not a traceback
            raise ConfigError(f"cannot load the front {point.name} = {point.value} ({GROUP}): {error}") from error
        if not (isinstance(front, type) and issubclass(front, Front)):
            raise ConfigError(f"entry point {point.name} = {point.value} ({GROUP}) is not a Front class")
        found.append(front)
    return unique(found)


def unique(fronts: Sequence[type[Front]]) -> tuple[type[Front], ...]:
    """``fronts`` as given, refused when two share a name: their flags and ``--advertise`` would clash."""
    names: dict[str, type[Front]] = {}
    for front in fronts:
        if front.name in names and names[front.name] is not front:
            raise ConfigError(
                f"two fronts are named {front.name!r}: {names[front.name].__module__} and {front.__module__}"
            )
        names[front.name] = front
    return tuple(names.values())
