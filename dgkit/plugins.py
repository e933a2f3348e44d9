"""Plugin discovery (pluggy over the ``dgkit`` entry points) and the alias registries."""

from __future__ import annotations

import functools
import importlib
import pkgutil
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Any, TypeVar

import pluggy

from dgkit import hookspecs
from dgkit.errors import PluginError, UnknownAliasError

ENTRY_POINT_GROUP = "dgkit"
ALIAS_ATTRIBUTE = "dgkit_alias"
T = TypeVar("T")


def qualified_name(obj: Any) -> str:
    """``module.QualName`` of a class or function (of an instance: of its class)."""
    if not hasattr(obj, "__qualname__"):
        obj = type(obj)
    return f"{obj.__module__}.{obj.__qualname__}"


def register(alias: str) -> Callable[[T], T]:
    """Name an algorithm, data set or metric factory where it is defined (timm's habit)::

        @register("erm")
        class ERM(Algorithm): ...

    A plugin's hook then returns :func:`registered_in` of its modules (or a plain
    ``{alias: object}`` dict)."""
    def mark(obj: T) -> T:
        setattr(obj, ALIAS_ATTRIBUTE, alias)
        return obj
    return mark


def registered_in(*modules: types.ModuleType | str) -> dict[str, Any]:
    """``{alias: object}`` of what ``@register`` named in these modules, given as modules or
    names (a package: in it and all its submodules); a plugin's hook returns
    ``registered_in(__name__)``. Subclasses do not inherit their parent's alias."""
    found: dict[str, Any] = {}
    for module in modules:
        if isinstance(module, str):
            module = importlib.import_module(module)
        todo = [module]
        if hasattr(module, "__path__"):
            todo += [importlib.import_module(info.name)
                     for info in pkgutil.walk_packages(module.__path__, module.__name__ + ".")]
        for mod in todo:
            for obj in vars(mod).values():
                alias = vars(obj).get(ALIAS_ATTRIBUTE) if hasattr(obj, "__dict__") else None
                if alias is not None and getattr(obj, "__module__", None) == mod.__name__:
                    found[alias] = obj
    return found

KINDS = {"algorithm": "dgkit_algorithms", "dataset": "dgkit_datasets", "metric": "dgkit_metrics",
         "averaging": "dgkit_averaging", "tta": "dgkit_tta"}


@dataclass(frozen=True)
class Registered:
    """One alias: what it names and which plugin (and distribution) registered it."""

    alias: str
    obj: Any
    plugin: str
    distribution: str

    @property
    def target(self) -> str:
        """Import path of the registered object, as jsonargparse's ``class_path`` expects."""
        return qualified_name(self.obj)


@dataclass(frozen=True)
class PluginFailure:
    plugin: str
    distribution: str
    error: str


@dataclass
class Registry:
    """Aliases of one kind (algorithm, dataset or metric)."""

    kind: str
    entries: dict[str, Registered] = field(default_factory=dict)

    def __contains__(self, alias: str) -> bool:
        return alias.lower() in self.entries

    def __iter__(self) -> Iterator[Registered]:
        return iter(sorted(self.entries.values(), key=lambda e: e.alias))

    def __len__(self) -> int:
        return len(self.entries)

    def get(self, alias: str) -> Registered:
        try:
            return self.entries[alias.lower()]
        except KeyError:
            raise UnknownAliasError(self.kind, alias, self.entries) from None

    def add(self, entry: Registered) -> None:
        previous = self.entries.get(entry.alias)
        if previous is not None and previous.obj is not entry.obj:
            raise PluginError(
                f"{self.kind} alias {entry.alias!r} is registered twice: by plugin "
                f"{previous.plugin!r} ({previous.distribution}) and by {entry.plugin!r} "
                f"({entry.distribution}). Uninstall one of them or rename the alias."
            )
        self.entries[entry.alias] = entry

    def find(self, obj: Any) -> Registered | None:
        """The entry registering ``obj`` (or a base class of it), if any."""
        for entry in self.entries.values():
            if entry.obj is obj:
                return entry
        return None


class Plugins:
    """The loaded plugin manager, every registry, and the plugins that failed to load."""

    def __init__(self, manager: pluggy.PluginManager, distributions: dict[str, str],
                 failures: list[PluginFailure]):
        self.manager = manager
        self.distributions = distributions
        self.failures = failures
        self.registries = {kind: self._collect(kind, hook) for kind, hook in KINDS.items()}

    def __getitem__(self, kind: str) -> Registry:
        return self.registries[kind]

    def _collect(self, kind: str, hook_name: str) -> Registry:
        registry = Registry(kind)
        # Each implementation is called on its own so a failure names its plugin and the
        # rest still register.
        for impl in getattr(self.manager.hook, hook_name).get_hookimpls():
            name = self.manager.get_name(impl.plugin) or repr(impl.plugin)
            dist = self.distributions.get(name, "?")
            try:
                mapping = impl.function()
            except Exception as exc:  # a broken plugin must not take the others down
                self.failures.append(PluginFailure(name, dist, f"{hook_name}: {exc!r}"))
                continue
            for alias, obj in (mapping or {}).items():
                registry.add(Registered(alias.lower(), obj, name, dist))
        return registry


def load_plugins(group: str = ENTRY_POINT_GROUP, extra: dict[str, Any] | None = None) -> Plugins:
    """Load every entry point of ``group`` into a fresh pluggy manager.

    ``extra`` registers additional plugin objects by name (useful in notebooks); the
    command line only ever sees installed entry points.
    """
    manager = pluggy.PluginManager(hookspecs.PROJECT)
    manager.add_hookspecs(hookspecs)
    distributions: dict[str, str] = {}
    failures: list[PluginFailure] = []
    seen: set[tuple[str, str]] = set()
    for ep in entry_points(group=group):
        if (ep.name, ep.value) in seen:  # the same distribution seen twice on sys.path
            continue
        seen.add((ep.name, ep.value))
        dist = ep.dist.name if ep.dist is not None else "?"
        if manager.has_plugin(ep.name):
            failures.append(PluginFailure(ep.name, dist, "entry-point name already taken by "
                                          f"{distributions[ep.name]}"))
            continue
        try:
            plugin = ep.load()
        except Exception as exc:
            failures.append(PluginFailure(ep.name, dist, f"import of {ep.value!r} failed: {exc!r}"))
            continue
        manager.register(plugin, name=ep.name)
        distributions[ep.name] = dist
    for name, plugin in (extra or {}).items():
        manager.register(plugin, name=name)
        distributions[name] = "(registered in code)"
    return Plugins(manager, distributions, failures)


@functools.cache
def plugins() -> Plugins:
    """The process-wide plugins, loaded once."""
    return load_plugins()


def registry(kind: str) -> Registry:
    return plugins()[kind]


@dataclass(frozen=True)
class Culprit:
    plugin: str
    distribution: str
    where: str  # function (file:line) of the deepest frame in the plugin's code


def plugin_of(exc: BaseException) -> Culprit | None:
    """The plugin whose own code raised ``exc``: the deepest traceback frame inside a
    plugin's package (dgkit's core is no plugin's, even for the built-in registrations)."""
    loaded = plugins()
    packages = {}
    for name, plugin in loaded.manager.list_name_plugin():
        if isinstance(plugin, types.ModuleType):
            package = plugin.__name__.split(".")[0]
            if package != "dgkit":
                packages[package] = name
    culprit = None
    tb = exc.__traceback__
    while tb is not None:
        module = str(tb.tb_frame.f_globals.get("__name__", ""))
        name = packages.get(module.split(".")[0])
        if name is not None:
            code = tb.tb_frame.f_code
            where = f"{getattr(code, 'co_qualname', code.co_name)} ({code.co_filename}:{tb.tb_lineno})"
            culprit = Culprit(name, loaded.distributions.get(name, "?"), where)
        tb = tb.tb_next
    return culprit
