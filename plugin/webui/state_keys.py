"""The keys of text-generation-webui's generation state, sorted by what trimtab does with them.

webui hands every generation a `state` dict: the Parameters tab (sampling, stopping), the chat
tab, the model tab and more. Each key falls in exactly one of these groups:

- a trimtab setting or a webui setting the settings table knows (`trimtab.backend.settings`:
  SETTINGS, UNSUPPORTED, ALIASES): goes to the guard, which checks it and reports the
  unsupported ones that are not at their neutral value;
- `HANDLED`: webui keys that steer a reply but are not one trimtab setting; mapped by
  `trimtab.plugin.webui.request`;
- `NOT_HONOURED`: webui keys that change a reply where trimtab cannot follow them; reported
  when set to anything but the value at which they change nothing;
- `WEBUI_INTERNAL`: not generation settings at all (chat history, names, UI state, model
  loading, webui's own streaming pace, prompt building webui already did): ignored;
- anything else: a webui setting trimtab does not know; reported as ignored.

Sources (read, not copied): webui's modules/ui.py `list_interface_input_elements` and
`list_model_elements`, modules/shared.py `settings`, modules/presets.py `default_preset`,
modules/text_generation.py `_generate_reply` (its reads of `state`).
"""
from __future__ import annotations

from typing import Any, Callable

# steer the reply, mapped by request.py: stop strings in webui's text form, the reply budget
HANDLED = frozenset({"custom_stopping_strings", "stopping_strings", "auto_max_new_tokens", "truncation_length"})


def _is(expected) -> Callable[[Any], bool]:
    return lambda value: value is None or value == expected


# key → (is the value one that changes nothing, why trimtab cannot follow any other value)
NOT_HONOURED: dict[str, tuple[Callable[[Any], bool], str]] = {
    "add_bos_token": (_is(True), "trimtab adds BOS exactly where the model's own tokenizer config says"),
    "skip_special_tokens": (_is(True), "trimtab always leaves special tokens out of the reply"),
    "min_length": (_is(0), "not supported by trimtab; ignored (min_new_tokens is)"),
    # adaptive-p (llama.cpp): a negative target turns it off; the decay only matters when it is on
    "adaptive_target": (lambda value: value is None or value < 0, "not supported by trimtab; ignored"),
    "adaptive_decay": (lambda value: True, "not supported by trimtab; ignored"),
}

# the parameters a webui preset file holds (modules/presets.py `default_preset`): choosing a
# trimtab preset in the extension replaces all of them, as choosing a preset in webui does
WEBUI_PRESET_PARAMS = frozenset({
    "temperature", "dynatemp_low", "dynatemp_high", "dynatemp_exponent", "smoothing_factor", "smoothing_curve",
    "min_p", "top_p", "top_k", "typical_p", "xtc_threshold", "xtc_probability", "epsilon_cutoff", "eta_cutoff",
    "tfs", "top_a", "top_n_sigma", "adaptive_target", "adaptive_decay", "dry_multiplier", "dry_allowed_length",
    "dry_base", "repetition_penalty", "frequency_penalty", "presence_penalty", "encoder_repetition_penalty",
    "no_repeat_ngram_size", "repetition_penalty_range", "penalty_alpha", "guidance_scale", "mirostat_mode",
    "mirostat_tau", "mirostat_eta", "do_sample", "dynamic_temperature", "temperature_last", "sampler_priority",
    "dry_sequence_breakers", "min_length", "num_beams", "length_penalty", "early_stopping",
})

WEBUI_INTERNAL = frozenset({
    # webui paces and streams the reply itself; thinking and tools shape the prompt it renders
    "stream", "max_tokens_second", "max_updates_second", "static_cache", "enable_thinking", "reasoning_effort",
    "preserve_thinking", "enable_web_search", "web_search_pages", "selected_tools", "mcp_servers",
    "confirm_tool_calls", "include_past_attachments", "paste_to_attachment", "stop_event", "logits_processor",
    # the chat tab: the conversation and the prompt template webui has already applied
    "history", "search_chat", "unique_id", "textbox", "start_with", "mode", "chat_style", "chat-instruct_command",
    "character_menu", "character", "user", "name1", "name2", "name1_instruct", "name2_instruct", "context",
    "context_instruct", "greeting", "user_bio", "custom_system_message", "instruction_template",
    "instruction_template_str", "chat_template_str", "turn_template", "chat_generation_attempts",
    "chat_prompt_size", "navigate_message_index", "navigate_direction", "navigate_message_role",
    "edit_message_index", "edit_message_text", "edit_message_role", "branch_index",
    # the default and notebook tabs, the session tab
    "textbox-default", "textbox-notebook", "prompt_menu-default", "prompt_menu-notebook", "output_textbox",
    "show_two_notebook_columns", "spellcheck", "show_controls", "dark_theme", "preset_menu", "preset",
    "max_new_tokens_min", "max_new_tokens_max", "autoload_model", "default_extensions",
    # the model tab: loading webui's own model
    "filter_by_loader", "loader", "cpu_memory", "gpu_memory", "gpu_layers", "n_gpu_layers", "threads",
    "threads_batch", "batch_size", "ubatch_size", "n_batch", "ctx_size", "n_ctx", "max_seq_len", "cache_type",
    "tensor_split", "split_mode", "extra_flags", "streaming_llm", "gpu_split", "alpha_value", "rope_freq_base",
    "compress_pos_emb", "compute_dtype", "quant_type", "num_experts_per_token", "load_in_8bit", "load_in_4bit",
    "torch_compile", "flash_attn", "use_flash_attention_2", "attn_implementation", "cpu", "cpu_moe", "disk",
    "row_split", "no_kv_offload", "no_offload_kqv", "no_mmap", "mlock", "numa", "use_double_quant",
    "use_eager_attention", "bf16", "autosplit", "enable_tp", "tp_backend", "no_flash_attn", "no_xformers",
    "no_sdpa", "cfg_cache", "cpp_runner", "trust_remote_code", "no_use_fast", "mmproj", "parallel", "fit_target",
    "model_draft", "draft_max", "gpu_layers_draft", "device_draft", "ctx_size_draft", "spec_type",
})
# key prefixes of whole webui tabs that are not text generation (image generation), and
# private keys webui adds for its own bookkeeping ("_notebook_auto_generation", ...)
WEBUI_INTERNAL_PREFIXES = ("image_", "_")


def is_internal(key: str) -> bool:
    return key in WEBUI_INTERNAL or key.startswith(WEBUI_INTERNAL_PREFIXES)
