"""The one rule that turns ``target_modules=`` into modules (peft's rule), shared by the adapters and optim/.

* a list of names: a module is selected when its full name equals an entry or ends with ``"." + entry``
  (``["query", "value"]``, ``["attn.c_attn"]``);
* one string: a regex that must match the module's full name (``r".*\\.layer\\.0\\..*query"``).

Exactly what ``peft.tuners.tuners_utils.check_target_module_exists`` does for these two forms; peft's extras
(``layers_to_transform``, ``"all-linear"``) are not part of this rule.
"""
from __future__ import annotations

import re
from collections.abc import Callable, Sequence

from torch import nn

TargetModules = str | Sequence[str]


def check_target_modules(target_modules: object) -> TargetModules:
    """Validate ``target_modules`` (a non-empty regex string or a non-empty list of non-empty names).

    Returns it, a list/tuple/set turned into a sorted-as-given list. Raises TypeError / ValueError naming the value.
    """
    if isinstance(target_modules, str):
        if not target_modules:
            raise ValueError("target_modules must be a non-empty regex or list of names, got ''")
        try:
            re.compile(target_modules)
        except re.error as exc:
            raise ValueError(f"target_modules {target_modules!r} is not a valid regex: {exc}") from None
        return target_modules
    if isinstance(target_modules, (set, frozenset)):
        target_modules = sorted(target_modules)
    if (not isinstance(target_modules, Sequence) or len(target_modules) == 0
            or not all(isinstance(t, str) and t for t in target_modules)):
        raise TypeError("target_modules must be a regex string or a non-empty list of module-name suffixes, "
                        f"got {target_modules!r}")
    return list(target_modules)


def matches(name: str, target_modules: TargetModules) -> bool:
    """True when the module called ``name`` (full dotted name) is selected by ``target_modules``."""
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    return any(name == key or name.endswith("." + key) for key in target_modules)


def find_modules(model: nn.Module, target_modules: TargetModules, *, accept: Callable[[nn.Module], bool],
                 what: str, skip: Callable[[nn.Module], bool] | None = None) -> list[tuple[str, nn.Module]]:
    """The (name, module) pairs of ``model`` selected by ``target_modules``, in ``named_modules`` order.

    Args:
        accept: modules the caller can handle; a selected module it rejects raises TypeError.
        what: how to name the accepted kinds in errors.
        skip: modules to leave out silently (e.g. the wrapped inner layer of an already adapted module).
    Raises:
        ValueError: nothing matched (the message lists the accepted module names that exist).
        TypeError: ``target_modules`` is malformed, or a matched module is not accepted.
    """
    target_modules = check_target_modules(target_modules)
    found = []
    for name, module in model.named_modules():
        if not name or not matches(name, target_modules):
            continue
        if skip is not None and skip(module):
            continue
        if not accept(module):
            raise TypeError(f"target module {name!r} is a {type(module).__name__}; expected {what}")
        found.append((name, module))
    if not found:
        available = [n for n, m in model.named_modules() if n and accept(m)]
        suffixes = sorted({n.rsplit(".", 1)[-1] for n in available})
        shown = ", ".join(available[:12]) + (f", ... ({len(available)} in all)" if len(available) > 12 else "")
        raise ValueError(f"target_modules={target_modules!r} matched no module of {type(model).__name__}. "
                         f"{what} name suffixes available: {suffixes}; full names: [{shown}]")
    return found


__all__ = ["TargetModules", "check_target_modules", "find_modules", "matches"]
