"""PNG Info tab: drop any image to read A1111 infotext (PNG chunk or JPEG/WebP EXIF), ComfyUI's
`prompt` graph or StudioNOVA's recipe, and load it into the Generate form."""

from __future__ import annotations

import gradio as gr

from ui.common import UIContext, engine_errors
from ui.send import form_targets, form_updates


def build(ctx: UIContext) -> None:
    from engine.gallery.pnginfo import read_image_metadata

    with gr.Row():
        with gr.Column():
            image = gr.Image(
                label="Image (PNG, JPEG or WebP)",
                type="filepath",
                sources=["upload", "clipboard"],
                format="png",
                elem_id="pnginfo_image",
            )
            send = gr.Button("Send to Generate", variant="primary", elem_id="pnginfo_send")
        with gr.Column():
            source = gr.Markdown(elem_id="pnginfo_source")
            infotext = gr.Textbox(
                label="Parameters (A1111 infotext)", lines=6, buttons=["copy"], elem_id="pnginfo_infotext"
            )
            unmapped = gr.Textbox(label="Not mapped", lines=2)
            details = gr.JSON(label="Parameters as StudioNOVA reads them")

    def png_info(image: str) -> dict:
        """Read the generation parameters of an image: A1111 infotext (PNG `parameters` chunk or JPEG/WebP
        EXIF UserComment), a ComfyUI API graph (`prompt` chunk) or a StudioNOVA recipe. Returns source,
        params (GenerateRequest field names), infotext and what could not be mapped."""
        if not image:
            raise gr.Error("give an image file", title="Invalid input")
        with engine_errors():
            meta = read_image_metadata(image)
        return {
            "source": meta.source,
            "params": meta.params,
            "infotext": meta.infotext,
            "unmapped": meta.unmapped,
            "format": meta.format,
            "size": list(meta.size),
        }

    def show(image: str | None):
        if not image:
            return "", "", "", None
        info = png_info(image)
        label = {"none": "no generation metadata found"}.get(
            info["source"], f"read from **{info['source']}**"
        )
        return label, info["infotext"], "\n".join(info["unmapped"]), info

    image.change(show, [image], [source, infotext, unmapped, details], api_visibility="private")
    hidden = gr.JSON(visible=False)
    image.upload(png_info, [image], [hidden], api_name="png_info")

    if ctx.form is not None:

        def send_to_form(info: dict | None):
            if not info or info.get("source") == "none":
                raise gr.Error("this image has no parameters to load", title="Nothing to load")
            params = dict(info["params"])
            params["model"] = ctx.studio.match_model(params.get("model") or "") or None
            return [*form_updates(ctx.form, params), *ctx.switch_to("generate")]

        send.click(
            send_to_form,
            [details],
            [*form_targets(ctx.form), *ctx.switch_outputs("generate")],
            api_visibility="private",
        )
