"""Name → model constructor registry, so configs can say `dict(name="unet", ...)`."""
import inspect
from typing import Any, Callable

_MODELS: dict[str, Callable[..., Any]] = {}


def register(name: str):
  """Class/function decorator adding a model constructor under `name`."""

  def wrap(ctor):
    if name in _MODELS:
      raise ValueError(f"model {name!r} is registered twice")
    _MODELS[name] = ctor
    return ctor

  return wrap


def names() -> list[str]:
  return sorted(_MODELS)


def accepts(name: str, arg: str) -> bool:
  """Whether registered model `name`'s constructor takes the keyword `arg`
  (a dataclass field, a parameter, or **kwargs); True for an unknown name,
  which `build` reports with the choices."""
  ctor = _MODELS.get(name)
  if ctor is None or arg in getattr(ctor, "__dataclass_fields__", {}):
    return True
  try:
    params = inspect.signature(ctor).parameters
  except (TypeError, ValueError):
    return True
  return arg in params or any(p.kind is p.VAR_KEYWORD
                              for p in params.values())


def build(name: str, **kwargs):
  """Builds the registered model `name` with keyword arguments `kwargs`.

  Raises ValueError naming the choices when `name` is unknown, and naming the
  accepted arguments when a keyword is wrong.
  """
  if name not in _MODELS:
    raise ValueError(f"unknown model {name!r}; choose one of {names()}")
  ctor = _MODELS[name]
  try:
    return ctor(**kwargs)
  except TypeError as e:
    fields = getattr(ctor, "__dataclass_fields__", None)
    accepted = sorted(k for k in (fields or {}) if k not in ("parent", "name"))
    raise ValueError(
        f"model {name!r}: bad arguments {sorted(kwargs)} ({e}); "
        f"accepted: {accepted}") from None
