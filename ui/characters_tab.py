"""Characters tab: projects, characters (one source of truth for a look), LoRA versions, reference sheets,
and the negative prompt a character's rejections have taught."""

from __future__ import annotations

import json

import gradio as gr

from engine.characters.characters import REJECTION_REASONS
from engine.characters.sheets import SHEET_EXPRESSIONS, SHEET_VIEWS
from engine.samplers import SAMPLER_NAMES
from ui.common import JOBS_CONCURRENCY_ID, PRIVATE, UIContext, engine_errors, username, wait_for_job

NEGATIVE_COLUMNS = ["term", "source"]
LORA_COLUMNS = ["version", "name", "format", "short hash", "base model", "source"]


def character_choices(studio) -> list[tuple[str, str]]:
    return [(f"{c['name']} ({c['slug']})", c["slug"]) for c in studio.list_characters()]


def build(ctx: UIContext) -> dict:
    """Builds the tab; returns the character dropdown (other tabs refresh their own from it)."""
    studio = ctx.studio
    with gr.Row():
        # allow_custom_value: the choices are fixed when the page is built, and an API caller (a session of
        # its own) must still reach characters made since; the engine names the unknown ones.
        pick = gr.Dropdown(
            [("+ new character", ""), *character_choices(studio)],
            value="",
            label="Character",
            allow_custom_value=True,
            elem_id="character_pick",
        )
        project = gr.Dropdown(
            ["", *[p.slug for p in studio.characters.projects()]],
            value="",
            label="Project",
            allow_custom_value=True,
        )
        refresh = gr.Button("Refresh", size="sm")
        project_name = gr.Textbox(
            label="New project name",
            value="",
            info="its style = the style fields below; characters inherit it",
        )
        project_btn = gr.Button("Create project", size="sm")
        project_save = gr.Button("Save style to the selected project", size="sm")
    with gr.Row():
        with gr.Column(scale=3):
            with gr.Row():
                name = gr.Textbox(label="Name", value="", elem_id="character_name")
                trigger = gr.Textbox(
                    label="Trigger word",
                    value="",
                    elem_id="character_trigger",
                    info="first token of every prompt and caption",
                )
            design = gr.Textbox(label="Design prompt", lines=3, value="", elem_id="character_design")
            negative = gr.Textbox(label="Negative prompt", lines=2, value="", elem_id="character_negative")
            with gr.Row():
                style_preset = gr.Dropdown(
                    ["", *studio.styles().names()], value="", label="Style preset", allow_custom_value=True
                )
                model = gr.Dropdown(
                    [("(inherit)", ""), *studio.model_choices()],
                    value="",
                    label="Default model",
                    allow_custom_value=True,
                )
                sampler = gr.Dropdown(["", *SAMPLER_NAMES], value="", label="Sampler (empty = inherit)")
                engine = gr.Dropdown(
                    [("(inherit)", ""), ("local (diffusers)", "local"), ("ComfyUI", "comfyui")],
                    value="",
                    label="Engine",
                    elem_id="character_engine",
                )
            with gr.Row():
                steps = gr.Number(value=None, precision=0, label="Steps (empty or 0 = inherit)")
                cfg = gr.Number(value=None, label="CFG (empty or 0 = inherit)")
                width = gr.Number(value=None, precision=0, label="Width")
                height = gr.Number(value=None, precision=0, label="Height")
                lora_weight = gr.Slider(-2, 2, value=0.8, step=0.05, label="LoRA weight")
            refs = gr.File(label="Add reference images", file_count="multiple", type="filepath")
            with gr.Row():
                save = gr.Button("Save character", variant="primary", elem_id="character_save")
                delete = gr.Button("Delete character (and its dataset)", variant="stop", size="sm")
            status = gr.Markdown(elem_id="character_status")
        with gr.Column(scale=2):
            effective = gr.Dataframe(
                headers=NEGATIVE_COLUMNS,
                label="Effective negative prompt (with provenance)",
                interactive=False,
                wrap=True,
                elem_id="effective_negative",
            )
            style_box = gr.JSON(label="Effective generation style (source of each value)")
            ref_gallery = gr.Gallery(label="References and sheets", columns=4, height=200)
    with gr.Accordion("LoRA versions", open=False):
        loras = gr.Dataframe(headers=LORA_COLUMNS, interactive=False, elem_id="character_loras")
        with gr.Row():
            lora_file = gr.File(
                label="Upload a LoRA (.safetensors)", type="filepath", file_types=[".safetensors"]
            )
            lora_name = gr.Textbox(label="Name (default: the file's)", value="")
            upload = gr.Button("Upload and attach", size="sm")
        with gr.Row():
            existing = gr.Dropdown(
                studio.lora_names(),
                label="Attach a LoRA from models/loras",
                value=None,
                allow_custom_value=True,
            )
            attach = gr.Button("Attach", size="sm")
            lora_delete = gr.Textbox(label="Delete LoRA (name)", value="")
            delete_lora_btn = gr.Button("Delete file and rows", size="sm", variant="stop")
    with gr.Accordion("Reference sheet", open=False):
        with gr.Row():
            sheet_views = gr.CheckboxGroup(list(SHEET_VIEWS), value=list(SHEET_VIEWS), label="Views")
            sheet_expr = gr.CheckboxGroup(
                list(SHEET_EXPRESSIONS), value=list(SHEET_EXPRESSIONS), label="Expressions"
            )
        with gr.Row():
            sheet_seed = gr.Number(
                value=-1, precision=0, label="Seed (-1 = random, then fixed for every view)"
            )
            sheet_prompt = gr.Textbox(label="Extra prompt", value="")
            sheet_steps = gr.Number(value=None, precision=0, label="Steps (empty or 0 = the character's)")
        with gr.Row():
            sheet_source = gr.Image(label="Source image (optional)", type="filepath", format="png")
            with gr.Column():
                sheet_ip = gr.Checkbox(
                    value=False, label="Use IP-Adapter instead of img2img (needs its weights)"
                )
                sheet_ip_scale = gr.Slider(0, 1.5, value=0.6, step=0.05, label="IP-Adapter strength")
                sheet_denoise = gr.Slider(0, 1, value=0.6, step=0.05, label="img2img denoising")
                sheet_dataset = gr.Checkbox(value=True, label="Queue the views for review in the dataset")
        sheet_btn = gr.Button("Make reference sheet", elem_id="sheet_btn")
        sheet_image = gr.Image(label="Sheet", interactive=False, format="png", elem_id="sheet_image")
    with gr.Accordion("Rejection reasons -> negative terms (editable, shared by all characters)", open=False):
        terms_box = gr.Code(
            value=json.dumps(studio.characters.rejection_terms(), indent=1),
            language="json",
            label="reason -> terms",
            elem_id="rejection_terms",
        )
        terms_save = gr.Button("Save mapping", size="sm")

    hidden = gr.JSON(visible=False)

    # --- API functions ------------------------------------------------------------------------
    def list_characters(project: str = "") -> list:
        """Every character: id, slug, name, trigger word and dataset counts (pending/approved/rejected)."""
        with engine_errors():
            return studio.list_characters(project or "")

    def get_character(character: str) -> dict:
        """One character with its effective style and negative prompt (each with its source), readiness,
        LoRA versions, references and sheets."""
        with engine_errors():
            return studio.character_view(character)

    def save_character(
        character: str = "",
        name: str | None = None,
        trigger_word: str | None = None,
        design_prompt: str | None = None,
        negative_prompt: str | None = None,
        style_preset: str | None = None,
        project: str | None = None,
        model: str | None = None,
        sampler: str | None = None,
        steps: float | None = None,
        cfg_scale: float | None = None,
        width: float | None = None,
        height: float | None = None,
        engine: str | None = None,
        lora_weight: float | None = None,
        reference_images: list[str] | None = None,
        active_lora: str | None = None,
    ) -> dict:
        """Create a character (character empty) or update it (its slug or id). On an update, fields not given
        (None) stay as they are; style fields given empty (or 0) are inherited from the project, then the
        defaults. engine: "local" or "comfyui" renders its generations by default. active_lora picks which
        of its LoRA versions generation uses ("" = none)."""
        style_args = (model, sampler, steps, cfg_scale, width, height, engine)
        values = dict(
            name=name,
            trigger_word=trigger_word,
            design_prompt=design_prompt,
            negative_prompt=negative_prompt,
            style_preset=style_preset,
            project=project,
            lora_weight=float(lora_weight) if lora_weight is not None else None,
            reference_images=list(reference_images or []),
            active_lora=active_lora,
        )
        if not character or any(v is not None for v in style_args):
            # 0 means empty: the browser sends an empty gr.Number as 0, and no style value can be 0 (all >= 1)
            style = {
                "model": model or None,
                "sampler": sampler or None,
                "steps": int(steps) if steps else None,
                "cfg_scale": float(cfg_scale) if cfg_scale else None,
                "width": int(width) if width else None,
                "height": int(height) if height else None,
                "engine": engine or None,
            }
            values["style"] = {k: v for k, v in style.items() if v is not None}
        if character and not name:
            values.pop("name")
        with engine_errors():
            return studio.save_character(values, ref=character or "")

    def delete_character(character: str) -> dict:
        """Delete a character with its dataset (rows and files); its LoRA files stay."""
        with engine_errors():
            return studio.characters.delete(character, studio.settings.outputs_dir)

    def create_project(
        name: str,
        model: str = "",
        sampler: str = "",
        steps: float | None = None,
        cfg_scale: float | None = None,
        width: float | None = None,
        height: float | None = None,
        engine: str = "",
    ) -> dict:
        """A project: a group of characters with a default generation style (and engine) they inherit."""
        style = {
            "model": model or None,
            "sampler": sampler or None,
            "steps": int(steps) if steps else None,
            "cfg_scale": float(cfg_scale) if cfg_scale else None,
            "width": int(width) if width else None,
            "height": int(height) if height else None,
            "engine": engine or None,
        }
        with engine_errors():
            p = studio.characters.create_project(name, {k: v for k, v in style.items() if v is not None})
        return {"id": p.id, "slug": p.slug, "name": p.name, "style": p.style}

    def update_project(
        project: str,
        name: str | None = None,
        model: str = "",
        sampler: str = "",
        steps: float | None = None,
        cfg_scale: float | None = None,
        width: float | None = None,
        height: float | None = None,
        engine: str = "",
    ) -> dict:
        """Rename a project or replace its default generation style (empty = the defaults); its characters
        inherit the new style wherever they do not override it."""
        style = {
            "model": model or None,
            "sampler": sampler or None,
            "steps": int(steps) if steps else None,
            "cfg_scale": float(cfg_scale) if cfg_scale else None,
            "width": int(width) if width else None,
            "height": int(height) if height else None,
            "engine": engine or None,
        }
        with engine_errors():
            p = studio.characters.update_project(
                project or "", name=name or None, style={k: v for k, v in style.items() if v is not None}
            )
        return {"id": p.id, "slug": p.slug, "name": p.name, "style": p.style}

    def upload_lora(file: str, name: str = "", character: str = "") -> dict:
        """Upload a LoRA .safetensors: validated (pickles refused), metadata read (ss_*/modelspec), hashed,
        saved in models/loras and attached to the character as its next version (when given)."""
        if not file:
            raise gr.Error("choose a .safetensors file", title="Invalid input")
        with engine_errors():
            from pathlib import Path

            row = studio.characters.add_lora(
                Path(studio.checked_upload(file, "file")), name or "", character or ""
            )
            return studio._lora_public(row)

    def attach_lora(name: str, character: str) -> dict:
        """Attach a LoRA already in models/loras to a character as its next (and active) version."""
        with engine_errors():
            return studio._lora_public(studio.characters.register_lora(name, character))

    def delete_lora(lora: str) -> dict:
        """Delete a registered LoRA (by name or id): its rows, then its file. Returns {"deleted": name}."""
        with engine_errors():  # a dict: the output is a gr.JSON, which would parse a bare name as JSON
            return {"deleted": studio.characters.delete_lora(lora)}

    def reference_sheet(
        character: str,
        seed: float = -1,
        prompt: str = "",
        views: list[str] | None = None,
        expressions: list[str] | None = None,
        source_image: str | None = None,
        use_ip_adapter: bool = False,
        ip_adapter_scale: float = 0.6,
        denoising_strength: float = 0.6,
        steps: float | None = None,
        width: float | None = None,
        height: float | None = None,
        add_to_dataset: bool = True,
        request: gr.Request = None,
        progress=gr.Progress(),
    ) -> dict:
        """A labelled grid of the character from several views and expressions, one fixed seed; from text, or
        from source_image (img2img, or IP-Adapter with use_ip_adapter). Views join the review queue."""
        values = dict(
            character=character,
            seed=int(seed if seed is not None else -1),
            prompt=prompt or "",
            views=list(views if views is not None else SHEET_VIEWS),
            expressions=list(expressions if expressions is not None else SHEET_EXPRESSIONS),
            source_image=source_image or None,
            use_ip_adapter=bool(use_ip_adapter),
            ip_adapter_scale=float(ip_adapter_scale),
            denoising_strength=float(denoising_strength),
            steps=int(steps) if steps else None,
            width=int(width) if width else None,
            height=int(height) if height else None,
            add_to_dataset=bool(add_to_dataset),
        )
        with engine_errors():
            jid, _ = studio.submit_reference_sheet(values, owner=username(request))
        result = wait_for_job(studio, jid, progress, "reference sheet")
        return {
            **{k: v for k, v in result.items() if k not in ("sheet", "views")},
            "job_id": jid,
            "sheet_file": studio._outputs_relative(result["sheet"]),
            "views": [
                {
                    "view": v["view"],
                    "seed": v["seed"],
                    "generation_id": v["generation_id"],
                    "file": studio._outputs_relative(v["path"]),
                }
                for v in result["views"]
            ],
        }

    def effective_negative(character: str) -> list:
        """The character's effective negative prompt: each term with where it came from."""
        with engine_errors():
            return studio.character_view(character)["effective_negative"]

    def rejection_terms() -> dict:
        """The mapping from rejection reason to negative-prompt terms."""
        return studio.characters.rejection_terms()

    def set_rejection_terms(mapping: str) -> dict:
        """Edit the mapping: a JSON object of reason -> comma-separated terms."""
        try:
            data = json.loads(mapping) if isinstance(mapping, str) else dict(mapping)
        except json.JSONDecodeError as e:
            raise gr.Error(f"mapping is not valid JSON: {e}", title="Invalid input") from None
        if not isinstance(data, dict):
            raise gr.Error(
                f"mapping must be an object of reason -> terms; reasons: {', '.join(REJECTION_REASONS)}",
                title="Invalid input",
            )
        with engine_errors():
            return studio.characters.set_rejection_terms(data)

    # --- page sync (private) ------------------------------------------------------------------
    def fill(character: str):
        if not character:
            return ("", "", "", "", "", "", "", "", None, None, None, None, "", 0.8, [], {}, [], [], "", "")
        with engine_errors():
            v = studio.character_view(character)
        own = v["style"]
        files = [str(studio.settings.outputs_dir / f) for f in [*v["references"], *v["sheets"]]]
        r = v["readiness"]
        state = (
            f"**{v['name']}** · revision {v['revision']} · approved {r['approved']} / pending {r['pending']} / "
            f"rejected {r['rejected']} · "
            + ("**trainable**" if r["trainable"] else f"needs {r['min_approved']} approved to train")
        )
        return (
            v["name"],
            v["trigger_word"],
            v["design_prompt"],
            v["negative_prompt"],
            v["style_preset"],
            v["project"] or "",
            own.get("model", ""),
            own.get("sampler", ""),
            own.get("steps"),
            own.get("cfg_scale"),
            own.get("width"),
            own.get("height"),
            own.get("engine", ""),
            v["lora_weight"],
            [[t["term"], t["source"]] for t in v["effective_negative"]],
            v["effective_style"],
            [
                [lo["version"], lo["name"], lo["format"], lo["short_hash"], lo["base_model"], lo["source"]]
                for lo in v["loras"]
            ],
            files,
            state,
            None,
        )

    form = [
        name,
        trigger,
        design,
        negative,
        style_preset,
        project,
        model,
        sampler,
        steps,
        cfg,
        width,
        height,
        engine,
        lora_weight,
        effective,
        style_box,
        loras,
        ref_gallery,
        status,
        sheet_image,
    ]

    def after_save(result: dict | None):
        slug = (result or {}).get("slug", "")
        return gr.update(choices=[("+ new character", ""), *character_choices(studio)], value=slug)

    pick.change(fill, [pick], form, **PRIVATE)
    save.click(
        save_character,
        [
            pick,
            name,
            trigger,
            design,
            negative,
            style_preset,
            project,
            model,
            sampler,
            steps,
            cfg,
            width,
            height,
            engine,
            lora_weight,
            refs,
        ],
        [hidden],
        api_name="save_character",
    ).success(after_save, [hidden], [pick], **PRIVATE).success(fill, [pick], form, **PRIVATE)
    delete.click(delete_character, [pick], [hidden], api_name="delete_character").success(
        lambda _: gr.update(choices=[("+ new character", ""), *character_choices(studio)], value=""),
        [hidden],
        [pick],
        **PRIVATE,
    )
    gr.api(list_characters, api_name="list_characters")  # an event with no inputs would drop `project`
    refresh.click(
        lambda: (
            gr.update(choices=[("+ new character", ""), *character_choices(studio)]),
            gr.update(choices=["", *[p.slug for p in studio.characters.projects()]]),
            gr.update(choices=studio.lora_names()),
        ),
        None,
        [pick, project, existing],
        **PRIVATE,
    )
    gr.api(get_character, api_name="get_character")
    project_btn.click(
        create_project,
        [project_name, model, sampler, steps, cfg, width, height, engine],
        [hidden],
        api_name="create_project",
    ).success(
        lambda: gr.update(choices=["", *[p.slug for p in studio.characters.projects()]]),
        None,
        [project],
        **PRIVATE,
    )
    project_save.click(
        update_project,
        [project, project_name, model, sampler, steps, cfg, width, height, engine],
        [hidden],
        api_name="update_project",
    ).success(fill, [pick], form, **PRIVATE)
    upload.click(upload_lora, [lora_file, lora_name, pick], [hidden], api_name="upload_lora").success(
        fill, [pick], form, **PRIVATE
    )
    attach.click(attach_lora, [existing, pick], [hidden], api_name="attach_lora").success(
        fill, [pick], form, **PRIVATE
    )
    delete_lora_btn.click(delete_lora, [lora_delete], [hidden], api_name="delete_lora").success(
        fill, [pick], form, **PRIVATE
    )
    sheet_btn.click(
        reference_sheet,
        [
            pick,
            sheet_seed,
            sheet_prompt,
            sheet_views,
            sheet_expr,
            sheet_source,
            sheet_ip,
            sheet_ip_scale,
            sheet_denoise,
            sheet_steps,
            width,
            height,
            sheet_dataset,
        ],
        [hidden],
        api_name="reference_sheet",
        concurrency_limit=ctx.settings.max_queue,
        concurrency_id=JOBS_CONCURRENCY_ID,
    ).success(
        lambda r: str(studio.settings.outputs_dir / r["sheet_file"]) if r else None,
        [hidden],
        [sheet_image],
        **PRIVATE,
    )
    gr.api(effective_negative, api_name="effective_negative")
    gr.api(rejection_terms, api_name="rejection_terms")
    terms_save.click(set_rejection_terms, [terms_box], [hidden], api_name="set_rejection_terms").success(
        lambda m: json.dumps(m, indent=1) if m else gr.skip(), [hidden], [terms_box], **PRIVATE
    ).success(fill, [pick], form, **PRIVATE)
    return {"pick": pick}
