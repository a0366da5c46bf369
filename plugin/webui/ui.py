"""The extension's tab in text-generation-webui: model, device, guard mode, preset, last report.

webui runs its own build of Gradio 4.37; trimtab's standalone app may run a current one. So the
tab uses only components, arguments and events that exist in both (Markdown, Row, Dropdown,
Radio, Button, Textbox; click and change with fn/inputs/outputs; gr.update), and takes the
gradio module as an argument: tests/test_webui_extension.py hands it a recording one that
allows exactly what Gradio 4.37.2's source has.
"""
from __future__ import annotations

import sys

from trimtab.backend.api import DEVICES
from trimtab.backend.guard import GUARD_MODES
from trimtab.backend.presets import VETTED_PRESETS
from trimtab.plugin.local_models import local_models
from trimtab.plugin.webui import extension as ext

ABOUT = ("While this extension is on, replies come from **trimtab**'s engine (not from webui's Model tab), "
         "and every generation's settings pass trimtab's guard first: settings that make quantized models "
         "drift off topic (a banned EOS, a repetition penalty above 1.01, hot sampling) are replaced "
         "(*enforce*) or only reported (*warn*). webui's Stop button stops a reply at the next token.")
GUARD_INFO = "enforce replaces unsafe settings; warn only reports them; off uses them as given"
PRESET_INFO = "webui's own keeps the Parameters tab's values; a trimtab preset replaces webui's preset parameters"


def model_choices() -> list[tuple[str, str]]:
    """The embedded default model, then the models in webui's models folder (when inside webui)."""
    shared = sys.modules.get("modules.shared")
    folder = getattr(getattr(shared, "args", None), "model_dir", None)
    return [("default (embedded SmolLM2-135M-Instruct)", "default"), *local_models(folder)]


def preset_choices() -> list[tuple[str, str]]:
    return [("webui's own (Parameters tab)", ext.WEBUI_PRESET), *((f"trimtab {name}", name) for name in VETTED_PRESETS)]


def build(gr) -> None:
    """The tab's controls, inside the tab webui has opened for the extension."""
    gr.Markdown(ABOUT)
    with gr.Row():
        model = gr.Dropdown(choices=model_choices(), value=ext.params["model"], label="Model", allow_custom_value=True,
                            info="the embedded default, a model from webui's models folder, or a path")
        device = gr.Dropdown(choices=list(DEVICES), value=ext.params["device"], label="Device")
    with gr.Row():
        load = gr.Button("Load", variant="primary")
        unload = gr.Button("Unload")
        refresh = gr.Button("Refresh the model list")
    status = gr.Textbox(value=ext.model_status(), label="Model status", interactive=False)
    with gr.Row():
        guard = gr.Radio(choices=list(GUARD_MODES), value=ext.params["guard"], label="Guard", info=GUARD_INFO)
        preset = gr.Dropdown(choices=preset_choices(), value=ext.params["preset"], label="Preset", info=PRESET_INFO)
    report = gr.Textbox(value=ext.last_report(), label="Last guard report", lines=10, interactive=False)
    show = gr.Button("Show the latest report")

    load.click(ext.load_model, inputs=[model, device], outputs=[status])
    unload.click(ext.unload_model, inputs=[], outputs=[status])
    refresh.click(lambda: gr.update(choices=model_choices()), inputs=[], outputs=[model])
    guard.change(lambda mode: _set_param("guard", mode), inputs=[guard], outputs=[report])
    preset.change(lambda choice: _set_param("preset", choice), inputs=[preset], outputs=[report])
    show.click(ext.last_report, inputs=[], outputs=[report])


def _set_param(name: str, value: str) -> str:
    ext.params[name] = value
    return ext.last_report()
