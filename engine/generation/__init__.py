"""Image generation: the request, submit-time checks, txt2img/img2img/inpaint, prompts, styles, IP-Adapter, X/Y/Z."""

from engine.jobs.kinds import JobKind

JOB_KINDS = {
    "generate": JobKind(
        "engine.generation.generate:run_generate_job", "engine.generation.request:GenerateRequest"
    ),
    "xyz_plot": JobKind("engine.generation.xyz:run_xyz_job", "engine.generation.xyz:XYZPlotRequest"),
    "reference_sheet": JobKind(
        "engine.generation.reference_sheet:run_reference_sheet_job",
        "engine.generation.reference_sheet:ReferenceSheetRequest",
    ),
}
