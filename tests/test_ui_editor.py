"""The inpaint editor's value (gr.ImageEditor: background + painted layers) becomes source + mask."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

from ui.generate_tab import editor_to_inputs


def test_painted_pixels_on_any_layer_become_the_mask():
    background = Image.new("RGBA", (64, 48), (10, 20, 30, 255))
    one = Image.new("RGBA", (64, 48), (0, 0, 0, 0))
    ImageDraw.Draw(one).rectangle((5, 5, 14, 14), fill=(255, 255, 255, 255))
    two = Image.new("RGBA", (64, 48), (0, 0, 0, 0))
    ImageDraw.Draw(two).ellipse((40, 20, 59, 39), fill=(255, 0, 0, 90))  # a soft brush still counts
    source, mask = editor_to_inputs({"background": background, "layers": [one, two], "composite": background})
    assert source.mode == "RGB" and source.size == (64, 48)
    m = np.asarray(mask)
    assert mask.mode == "L" and set(np.unique(m)) == {0, 255}
    assert m[10, 10] == 255 and m[30, 50] == 255 and m[40, 5] == 0
    assert m.sum() // 255 == (np.asarray(one)[..., 3] > 0).sum() + (np.asarray(two)[..., 3] > 0).sum()


def test_nothing_painted_means_no_mask_and_no_image_means_skip():
    background = Image.new("RGB", (32, 32), "white")
    source, mask = editor_to_inputs({"background": background, "layers": [Image.new("RGBA", (32, 32))]})
    assert source.size == (32, 32) and mask is None
    a, b = editor_to_inputs(None)
    assert type(a).__name__ == type(b).__name__ != "Image"


def test_train_form_fields_follow_the_endpoint_parameters():
    """/train_lora's positional parameters and the form's inputs come from one list, and a preset fills the
    form with the values the API would use when a field is left out."""
    import inspect

    from engine.training.trainer import PRESETS
    from ui import train_tab

    source = inspect.getsource(train_tab.build)
    assert "form.bind(\n        start.click, train_lora, API_ORDER" in source
    # the endpoint's parameters after character, model, preset are FORM_FIELDS, then backend
    assert ("character", "model", "preset", *train_tab.FORM_FIELDS, "backend") == train_tab.API_ORDER
    quick = train_tab.preset_values("quick")
    assert (
        quick["rank"] == PRESETS["quick"]["rank"]
        and quick["max_train_steps"] == PRESETS["quick"]["max_train_steps"]
    )
    quality = train_tab.preset_values("quality")
    assert quality["train_text_encoder"] is True and quality["gradient_checkpointing"] is True
    assert quick["train_text_encoder"] is False and quick["resolution"] == 0
