"""trimtab.plugin: front ends over one generator (command line now; LangChain, webui, Gradio later)."""
