"""The pass registry: built-in passes, third-party plugins and ``NAME:key=value`` specs."""

from __future__ import annotations

import dataclasses
import typing
from importlib import metadata

from .errors import UserInputError
from .pass_base import Pass

ENTRY_POINT_GROUP = "onnxopt.passes"

_REGISTRY: dict[str, type[Pass]] = {}
_loaded = False


def register_pass(cls: type[Pass]) -> type[Pass]:
    """Class decorator: make a Pass available by its ``name``."""
    if not cls.name:
        raise TypeError(f"{cls.__name__} has no registry name")
    existing = _REGISTRY.get(cls.name)
    if existing is not None and existing is not cls and existing.__qualname__ != cls.__qualname__:
        raise ValueError(f"pass name '{cls.name}' is already registered by {existing.__module__}.{existing.__qualname__}")
    _REGISTRY[cls.name] = cls
    return cls


def _load_all() -> None:
    """Import the built-in pass library and every plugin of the entry-point group once."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    import onnxopt.passes  # noqa: F401  (registers built-in passes)

    for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
        try:
            obj = ep.load()
        except Exception as exc:  # a broken plugin must not break onnxopt
            import warnings

            warnings.warn(f"onnxopt: plugin '{ep.name}' ({ep.value}) failed to load: {exc}", stacklevel=2)
            continue
        if isinstance(obj, type) and issubclass(obj, Pass):
            register_pass(obj)
        # a module entry point registers its passes on import


def all_passes() -> dict[str, type[Pass]]:
    _load_all()
    return dict(sorted(_REGISTRY.items()))


def get_pass(name: str) -> type[Pass]:
    passes = all_passes()
    if name not in passes:
        import difflib

        close = difflib.get_close_matches(name, passes, n=1)
        hint = f"did you mean '{close[0]}'? " if close else ""
        raise UserInputError(f"unknown pass '{name}'.", f"{hint}run 'onnxopt passes' to list the available passes.")
    return passes[name]


def parse_pass_spec(spec: str) -> Pass:
    """``name`` or ``name:key=value,key=value`` → a configured Pass instance."""
    name, _, opts = spec.strip().partition(":")
    cls = get_pass(name.strip())
    options = {}
    if opts.strip():
        for item in opts.split(","):
            key, eq, value = item.partition("=")
            if not eq:
                raise UserInputError(f"option '{item}' of pass '{cls.name}' has no value.", f"write it as {cls.name}:{item.strip()}=VALUE.")
            options[key.strip()] = value.strip()
    return make_pass(cls, options)


def make_pass(cls: type[Pass], options: dict[str, object] | None = None) -> Pass:
    """Instantiate ``cls`` with options given as strings or values, converted to the declared types."""
    fields = {f.name: f for f in dataclasses.fields(cls.Options)}
    hints = typing.get_type_hints(cls.Options)
    # Options may map names that are not Python identifiers to fields: ALIASES = {"global": "global_ranking"}
    aliases = getattr(cls.Options, "ALIASES", {})
    kwargs = {}
    for key, raw in (options or {}).items():
        key = aliases.get(key, key)
        if key not in fields:
            known = ", ".join(fields) or "none"
            raise UserInputError(f"pass '{cls.name}' has no option '{key}'.", f"use one of its options: {known}.")
        kwargs[key] = convert_option(cls.name, key, hints.get(key, str), raw)
    return cls(cls.Options(**kwargs))


def convert_option(pass_name: str, key: str, hint, raw):
    if not isinstance(raw, str):
        return raw
    origin = typing.get_origin(hint)
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if origin is typing.Union or str(origin) == "<class 'types.UnionType'>":
        if raw.lower() in ("none", "null") and type(None) in typing.get_args(hint):
            return None
        for a in args:  # first type that parses wins (e.g. int | float)
            try:
                return convert_option(pass_name, key, a, raw)
            except UserInputError:
                continue
        raise UserInputError(f"option {key}='{raw}' of pass '{pass_name}' is not a valid {hint}.", "give a value of that type.")
    if origin in (list, tuple):
        inner = args[0] if args else str
        return [convert_option(pass_name, key, inner, r) for r in raw.split("+") if r]
    if origin is typing.Literal:
        choices = typing.get_args(hint)
        if raw not in choices:
            raise UserInputError(f"option {key}='{raw}' of pass '{pass_name}' is not one of {', '.join(map(str, choices))}.", "pick one of those values.")
        return raw
    try:
        if hint is bool:
            low = raw.lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise ValueError(raw)
        if hint is int:
            return int(raw)
        if hint is float:
            return float(raw)
        return hint(raw)
    except (TypeError, ValueError):
        name = getattr(hint, "__name__", str(hint))
        raise UserInputError(f"option {key}='{raw}' of pass '{pass_name}' is not a valid {name}.", f"give a {name} value.") from None
