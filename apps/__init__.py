"""The faces over the runtime: the `dllm` command (main.py), generate with its live view, the lm-eval
adapter, the OpenAI-compatible server, export packages with the C++ runner. Each face imports the core
and apps/common.py, never another face; only main.py, the dispatcher, knows them all."""
