"""Importing and calling user code that a config names ("package.module:function" with args): one InputError
naming the config field for every way it can go wrong (not importable, wrong args, raises, wrong return type)."""

from __future__ import annotations

import importlib
import inspect
import typing
from collections.abc import Callable
from typing import Any

import torch
from pydantic import ConfigDict, ValidationError, create_model

from cdm_dist.errors import InputError
from cdm_dist.models.spec import FactorySpec


def load_object(path: str, field: str) -> Any:
    """The object at "package.module:attribute" (attribute may be dotted), or one InputError naming the field."""
    module_name, sep, attribute = path.partition(":")
    if not sep or not module_name or not attribute:
        raise InputError(f"{field}: {path!r} is not of the form 'package.module:function'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise InputError(
            f"{field}: cannot import {module_name!r} ({exc}); install it, or ship it to the actors with "
            "resources.runtime_env (working_dir or py_modules)"
        ) from None
    except Exception as exc:
        raise InputError(f"{field}: importing {module_name!r} raised {type(exc).__name__}: {exc}") from None
    found: Any = module
    for name in attribute.split("."):
        if not hasattr(found, name):
            raise InputError(f"{field}: module {module_name!r} has no {attribute!r}")
        found = getattr(found, name)
    return found


def _hints(function: Callable[..., Any]) -> dict[str, Any]:
    try:
        return typing.get_type_hints(function, include_extras=True)
    except Exception:  # unresolvable annotations: names are still checked, types are not
        return {}


def factory_function(spec: FactorySpec, field: str) -> Callable[..., Any]:
    """The function a factory spec names: the function itself, or the object at its import path."""
    if isinstance(spec.factory, str):
        return load_object(spec.factory, f"{field}.factory")
    return spec.factory


def check_args(function: Callable[..., Any], args: dict[str, Any], field: str) -> None:
    """The function is callable and `{field}.args` fit its signature (names, types where annotated), uncalled."""
    if not callable(function):
        raise InputError(f"{field}: {function!r} is not callable")
    try:
        signature = inspect.signature(function)
    except (TypeError, ValueError):
        return
    params = signature.parameters
    if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        unknown = sorted(set(args) - set(params))
        if unknown:
            expected = sorted(n for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY))
            raise InputError(f"{field}.args: unknown {unknown}; {function.__name__} takes {expected}")
    missing = [
        n
        for n, p in params.items()
        if p.default is p.empty and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and n not in args
        and n != "device"
    ]  # fmt: skip
    if missing:
        raise InputError(f"{field}.args: {function.__name__} needs {missing}")
    hints = _hints(function)
    fields = {
        n: (hints.get(n, Any), ... if p.default is p.empty else p.default)
        for n, p in params.items()
        if n in args and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    }
    try:
        model = create_model("Args", __config__=ConfigDict(arbitrary_types_allowed=True), **fields)
        model.model_validate(args)
    except ValidationError as exc:
        error = exc.errors()[0]
        where = ".".join(str(p) for p in error["loc"])
        raise InputError(f"{field}.args.{where}: {error['msg']}") from None
    except Exception:  # a type pydantic cannot check: leave it to the call
        return


def call_factory(spec: FactorySpec, field: str, device: torch.device | str | None = None) -> Any:
    """Import and call a factory with its args (and device= when it takes one); a raise is one InputError."""
    return call_with_args(factory_function(spec, field), spec.args, field, device)


def call_with_args(
    function: Callable[..., Any],
    args: dict[str, Any],
    field: str,
    device: torch.device | str | None = None,
    label: str | None = None,
) -> Any:
    """The function called with checked args (and device= if it takes one); a raise is one InputError naming label."""
    check_args(function, args, field)
    kwargs = dict(args)
    try:
        takes_device = "device" in inspect.signature(function).parameters
    except (TypeError, ValueError):
        takes_device = False
    if takes_device and "device" not in kwargs and device is not None:
        kwargs["device"] = str(device)
    label = label or field
    try:
        return function(**kwargs)
    except InputError as exc:
        raise InputError(f"{label}: {exc}") from None
    except Exception as exc:
        raise InputError(
            f"{label}: {getattr(function, '__name__', function)} raised {type(exc).__name__}: {exc}"
        ) from exc


def expect_type(value: Any, kind: type | tuple[type, ...], field: str, what: str) -> Any:
    """The value, when it is of the kind; else one InputError naming the field and what was expected."""
    if not isinstance(value, kind):
        raise InputError(f"{field}: the factory returned {type(value).__name__}, not {what}")
    return value
