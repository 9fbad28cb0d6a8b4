"""ui.forms: a request model's fields drive the controls, the API parameters and the defaults."""

from __future__ import annotations

import gradio as gr

from engine.generation.request import GenerateRequest
from engine.requests import field_spec
from ui.forms import Form


def _form_app():
    with gr.Blocks() as demo:
        form = Form(GenerateRequest, extra={"use_character_style": False})
        form.number("seed", "Seed")
        steps = form.slider("steps", "Steps")
        form.textbox("prompt", "Prompt")
        form.add("init_image", gr.Image(type="filepath"))
        form.checkbox("use_character_style", "Use its style")
        out = gr.JSON()
        go = gr.Button()

        def handler(request: gr.Request = None, **fields):
            return form.values(fields)

        form.bind(go.click, handler, ("prompt", "steps"), outputs=[out], api_name="handler")
    return demo, form, steps


def test_controls_take_default_range_and_help_from_the_model():
    _, form, steps = _form_app()
    spec = field_spec(GenerateRequest, "steps")
    assert (steps.minimum, steps.maximum, steps.value) == (spec["ge"], spec["le"], spec["default"])
    assert steps.info == spec["info"] and steps.elem_id == "steps"
    assert form["seed"].precision == 0 and form["seed"].value == -1  # an int field
    assert form["use_character_style"].value is False  # a declared UI-only field


def test_api_parameters_are_the_field_names_in_the_given_order():
    demo, _, _ = _form_app()
    params = demo.get_api_info()["named_endpoints"]["/handler"]["parameters"]
    assert [p["parameter_name"] for p in params] == [
        "prompt",
        "steps",
        "seed",
        "init_image",
        "use_character_style",
    ]
    by_name = {p["parameter_name"]: p for p in params}
    assert by_name["steps"]["parameter_default"] == 20 and by_name["seed"]["python_type"]["type"] == "int"
    # a control without an initial value is still optional for API callers
    assert (
        by_name["init_image"]["parameter_has_default"] and by_name["init_image"]["parameter_default"] is None
    )


def test_empty_means_the_models_default_and_numbers_follow_the_model():
    _, form, _ = _form_app()
    given = {"prompt": "", "steps": 12.0, "seed": None, "init_image": None, "use_character_style": True}
    assert form.values(given) == {"steps": 12, "use_character_style": True}
    assert type(form.values(given)["steps"]) is int
    filled = form.values(given, fill_defaults=True)
    assert filled == {"prompt": "", "steps": 12, "seed": -1, "init_image": None, "use_character_style": True}
    assert (
        form.values({"cfg_scale": 7}) == {"cfg_scale": 7.0}
        and type(form.values({"cfg_scale": 7})["cfg_scale"]) is float
    )


def test_an_unknown_field_fails_when_the_form_is_built():
    import pytest

    with gr.Blocks(), pytest.raises(KeyError, match="no field 'stepz'"):
        Form(GenerateRequest).slider("stepz", "Steps")
