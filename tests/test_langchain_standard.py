"""LangChain's own standard suites for ChatTrimtab, run on the embedded default model.

Every standard test runs. Those marked xfail need what SmolLM2-135M-Instruct cannot give:
its chat template never reads `tools` (so tool calling raises ToolCallingUnsupported, which the
marks demand: any other failure is a real one), and at 135M parameters it does not reliably
write JSON that follows a schema. The plumbing behind both is tested on a scripted model in
test_langchain.py.
"""
from __future__ import annotations

import atexit
import functools
import shutil
import tempfile
from pathlib import Path

import pytest

pytest.importorskip("langchain_tests")
from langchain_tests.integration_tests import ChatModelIntegrationTests  # noqa: E402
from langchain_tests.unit_tests import ChatModelUnitTests  # noqa: E402

from trimtab.plugin.langchain import ChatTrimtab, ToolCallingUnsupported  # noqa: E402

# The suites' default is max_tokens=100; 24 keeps a test to a couple of seconds on a CPU. (The
# unit suite generates nothing, and passes max_tokens itself in test_standard_params.)
PARAMS = {"model": "default", "max_tokens": 24}

NO_TOOLS = ("SmolLM2-135M-Instruct's chat template has no tool support (it never reads `tools`), "
            "so ChatTrimtab refuses tool calls on it with ToolCallingUnsupported")
NO_JSON = ("SmolLM2-135M-Instruct (135M parameters) does not reliably write a JSON object that follows "
           "a schema, and nothing constrains its decoding to JSON")
V1_MODELS = pytest.mark.parametrize("model", [{}, {"output_version": "v1"}], indirect=True)
SCHEMA_TYPES = pytest.mark.parametrize("schema_type", ["pydantic", "typeddict", "json_schema"])


def no_tools(test):
    return pytest.mark.xfail(reason=NO_TOOLS, raises=ToolCallingUnsupported, strict=True)(test)


no_json = pytest.mark.xfail(reason=NO_JSON)


@functools.cache
def tiny_model_dir() -> str:
    """A tiny random model for the per-call `model=` override tests (they check which model
    answered, not what it said)."""
    from tiny_models import write_tiny_model_dir

    directory = Path(tempfile.mkdtemp(prefix="trimtab-langchain-"))
    atexit.register(shutil.rmtree, directory, ignore_errors=True)
    write_tiny_model_dir("llama", directory)
    return str(directory)


class TestChatTrimtabUnit(ChatModelUnitTests):
    @property
    def chat_model_class(self) -> type[ChatTrimtab]:
        return ChatTrimtab

    @property
    def chat_model_params(self) -> dict:
        return {"model": "default"}

    @property
    def standard_chat_model_params(self) -> dict:
        # The unit suite adds api_key="test" for hosted APIs; trimtab runs the model in this
        # process and refuses api_key with an error saying so (tested in test_langchain.py).
        params = super().standard_chat_model_params
        params.pop("api_key")
        return params


class TestChatTrimtabIntegration(ChatModelIntegrationTests):
    @property
    def chat_model_class(self) -> type[ChatTrimtab]:
        return ChatTrimtab

    @property
    def chat_model_params(self) -> dict:
        return PARAMS

    @property
    def supports_json_mode(self) -> bool:
        return True

    @property
    def model_override_value(self) -> str:
        pytest.importorskip("transformers")
        return tiny_model_dir()

    # -- tool calling: the default model's template cannot show tools ---------------------------

    @V1_MODELS
    @no_tools
    def test_tool_calling(self, model):
        super().test_tool_calling(model)

    @no_tools
    async def test_tool_calling_async(self, model):
        await super().test_tool_calling_async(model)

    @no_tools
    def test_bind_runnables_as_tools(self, model):
        super().test_bind_runnables_as_tools(model)

    @no_tools
    def test_tool_message_histories_string_content(self, model, my_adder_tool):
        super().test_tool_message_histories_string_content(model, my_adder_tool)

    @no_tools
    def test_tool_message_histories_list_content(self, model, my_adder_tool):
        super().test_tool_message_histories_list_content(model, my_adder_tool)

    @no_tools
    def test_tool_choice(self, model):
        super().test_tool_choice(model)

    @no_tools
    def test_tool_calling_with_no_arguments(self, model):
        super().test_tool_calling_with_no_arguments(model)

    @no_tools
    def test_tool_message_error_status(self, model, my_adder_tool):
        super().test_tool_message_error_status(model, my_adder_tool)

    @no_tools
    def test_structured_few_shot_examples(self, model, my_adder_tool):
        super().test_structured_few_shot_examples(model, my_adder_tool)

    @V1_MODELS
    @no_tools
    def test_agent_loop(self, model):
        super().test_agent_loop(model)

    @no_tools
    def test_unicode_tool_call_integration(self, model, *, tool_choice=None, force_tool_call=True):
        super().test_unicode_tool_call_integration(model, tool_choice=tool_choice, force_tool_call=force_tool_call)

    # -- structured output: a 135M model does not write schema-following JSON reliably -----------

    @SCHEMA_TYPES
    @no_json
    def test_structured_output(self, model, schema_type):
        super().test_structured_output(model, schema_type)

    @SCHEMA_TYPES
    @no_json
    async def test_structured_output_async(self, model, schema_type):
        await super().test_structured_output_async(model, schema_type)

    @no_json
    def test_structured_output_pydantic_2_v1(self, model):
        super().test_structured_output_pydantic_2_v1(model)

    @no_json
    def test_structured_output_optional_param(self, model):
        super().test_structured_output_optional_param(model)

    @no_json
    def test_json_mode(self, model):
        super().test_json_mode(model)
