"""Image generation: the request, submit-time checks, txt2img/img2img/inpaint, prompts, styles, IP-Adapter, X/Y/Z."""
