"""One declaration per request drives the form, the API and the defaults.

A `Form` builds its controls from a request model's fields (`engine.requests.field_spec`: label aside, the
default, range, step and help come from the model), keeps them by field name, and binds them to a handler by
name (gradio's `inputs_kwargs`), so the API's parameter names are the request's field names and the handler
receives one dict. An empty value (gr.Number sends None when cleared, a textbox "") means "the model's
default": `values()` leaves it out (the engine then applies its default, or a preset's) or, with
`fill_defaults=True`, puts the model's default in. A new request parameter is one field in the model and one
control here.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable
from typing import Any

import gradio as gr
from pydantic import BaseModel

from engine.requests import field_spec
from ui.common import name_range_errors

_COERCE: dict[Any, Callable[[Any], Any]] = {int: int, float: float, bool: bool}


class Form:
    """The controls of one request model, by field name.

    `extra` declares UI-only fields the engine accepts beside the model's own (e.g. `use_character_style`)
    with their defaults."""

    def __init__(self, model: type[BaseModel], extra: dict[str, Any] | None = None):
        self.model = model
        self.extra = dict(extra or {})
        self.components: dict[str, gr.components.Component] = {}

    # --- what the model declares -------------------------------------------------------------------------
    def spec(self, name: str) -> dict[str, Any]:
        if name in self.model.model_fields:
            return field_spec(self.model, name)
        if name in self.extra:
            return {"default": self.extra[name], "info": ""}
        raise KeyError(f"{self.model.__name__} has no field {name!r} and the form declares no such extra")

    def default(self, name: str) -> Any:
        return self.spec(name)["default"]

    def _annotation(self, name: str) -> Any:
        field = self.model.model_fields.get(name)
        if field is not None:
            return field.annotation
        return type(self.extra[name]) if self.extra.get(name) is not None else None

    # --- controls ----------------------------------------------------------------------------------------
    def add(self, name: str, component):
        """Register a control built by hand (images, dropdowns of live choices, ...) under a field name."""
        self.spec(name)  # a typo fails at build time, not at the first click
        self.components[name] = component
        return component

    def _kwargs(self, name: str, extra: dict) -> dict:
        spec = self.spec(name)
        out = {"value": spec["default"], "elem_id": name}
        if spec.get("info"):
            out["info"] = spec["info"]
        return {**out, **extra}

    def slider(self, name: str, label: str, step: float = 1, **extra) -> gr.Slider:
        spec = self.spec(name)
        kwargs = {"step": spec.get("multiple_of", step), **self._kwargs(name, extra)}
        slider = gr.Slider(minimum=spec["ge"], maximum=spec["le"], label=label, **kwargs)
        return self.add(name, name_range_errors(slider, name))

    def number(self, name: str, label: str, **extra) -> gr.Number:
        if self._annotation(name) is int:
            extra.setdefault("precision", 0)
        return self.add(name, gr.Number(label=label, **self._kwargs(name, extra)))

    def checkbox(self, name: str, label: str, **extra) -> gr.Checkbox:
        return self.add(name, gr.Checkbox(label=label, **self._kwargs(name, extra)))

    def textbox(self, name: str, label: str, **extra) -> gr.Textbox:
        return self.add(name, gr.Textbox(label=label, **self._kwargs(name, extra)))

    def dropdown(self, name: str, label: str, choices, **extra) -> gr.Dropdown:
        return self.add(name, gr.Dropdown(choices, label=label, **self._kwargs(name, extra)))

    def radio(self, name: str, label: str, choices, **extra) -> gr.Radio:
        return self.add(name, gr.Radio(choices, label=label, **self._kwargs(name, extra)))

    def __getitem__(self, name: str):
        return self.components[name]

    # --- binding -----------------------------------------------------------------------------------------
    def inputs(self, order: Iterable[str] = (), only: Iterable[str] | None = None) -> dict[str, Any]:
        """name -> control for `inputs_kwargs`, in API parameter order: `order` first (the positions callers
        already rely on), then every other control in the order it was built."""
        names = list(dict.fromkeys([*order, *self.components]))
        if only is not None:
            keep = set(only)
            names = [n for n in names if n in keep]
        return {name: self.components[name] for name in names}

    def bind(
        self,
        event: Callable,
        fn: Callable,
        order: Iterable[str] = (),
        only: Iterable[str] | None = None,
        required: Iterable[str] = (),
        before: dict[str, Any] | None = None,
        **listener: Any,
    ):
        """`event(fn, ...)` with this form's controls as keyword inputs (`before`'s first), fn declaring them
        as its parameters (see `declare_parameters`)."""
        inputs = {**(before or {}), **self.inputs(order, only)}
        declare_parameters(fn, inputs, required)
        return event(fn, inputs_kwargs=inputs, **listener)

    def values(self, given: dict[str, Any], fill_defaults: bool = False) -> dict[str, Any]:
        """The handler's dict -> the engine's values: empty (None, "") = the model's default (left out, or
        filled in with `fill_defaults`); ints and floats as the model declares them."""
        out: dict[str, Any] = {}
        for name, value in given.items():
            if value is None or (isinstance(value, str) and value == ""):
                if fill_defaults:
                    out[name] = self.default(name)
                continue
            coerce = _COERCE.get(self._annotation(name))
            out[name] = coerce(value) if coerce else value
        return out


def declare_parameters(fn: Callable, names: Iterable[str], required: Iterable[str] = ()) -> Callable:
    """fn(request=None, progress=..., **fields) declares one keyword-only parameter per field, so gradio's API
    page and client name them; each defaults to None (empty = the model's default) unless `required`.
    A control without an initial value (an image) is then optional in the client, as a parameter with a
    None default is."""
    signature = inspect.signature(fn)
    own = [p for p in signature.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
    needed = set(required)
    fields = [
        inspect.Parameter(
            name,
            inspect.Parameter.KEYWORD_ONLY,
            default=inspect.Parameter.empty if name in needed else None,
        )
        for name in names
    ]
    fn.__signature__ = signature.replace(parameters=[*own, *fields])  # type: ignore[attr-defined]
    return fn
